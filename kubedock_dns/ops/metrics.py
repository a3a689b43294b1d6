"""Prometheus metrics: one collector that reads the server's own counters when scraped.

The DNS hot path only increments plain integer attributes and small lists indexed by query type
or rcode (``server.Counters``, the fast path's, the forwarder's, the index's, the watcher's, the
webhook's) and, for sampled queries, a :class:`~kubedock_dns.ops.latency.LatencyHistogram`;
nothing here runs until a scrape asks.  :data:`METRICS` is the one table of names, types and HELP
texts, :data:`LABELS` names the labels of the labelled ones and :data:`DEPRECATED` the names kept
one more release (docs/metrics.md lists the same); a value without an entry is a bug that a test
catches.  Label names follow CoreDNS's (``proto``, ``type``, ``rcode``), so the same ``sum by``
works on both.  The registry adds prometheus_client's process collector (RSS, CPU, open file
descriptors) and the Python platform and GC collectors.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Union

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kubedock_dns.ops.build import build_info
from kubedock_dns.ops.latency import LatencyHistogram

PREFIX = "kubedock_dns_"
COUNTER, GAUGE = "counter", "gauge"
# The release that no longer publishes the names in DEPRECATED.
REMOVED_IN = "0.2.0"

# name (without prefix and without _total) -> (type, HELP).
METRICS: dict[str, tuple[str, str]] = {
    "build_info": (GAUGE, "Always 1, labelled with the version of kubedock-dns and of the Python and Twisted "
                          "it runs on."),
    "requests": (COUNTER, "DNS queries received, by transport (proto: udp, tcp) and question type (type: A, "
                          "AAAA, PTR, ...; other: any other type, or a question that could not be read)."),
    "responses": (COUNTER, "DNS replies sent, by rcode and outcome: answered (records from the asker's "
                           "networks), nodata, nxdomain (no network of the asker holds the name), servfail "
                           "(index not synced, duplicate pod IP), forwarded (the upstream's answer, its "
                           "rcode), upstream_failed (every upstream failed: SERVFAIL), overloaded (too many "
                           "forwards in flight: REFUSED), malformed (FORMERR, NOTIMP, BADVERS)."),
    "admission_reviews": (COUNTER, "Admission requests answered by the webhook, by outcome: allowed "
                                   "(unchanged), patched (allowed with the DNS settings), denied, rejected "
                                   "(HTTP 400: not a review it can read), unavailable (HTTP 503: the review "
                                   "worker was lost or busy)."),
    "admission_warnings": (COUNTER, "Warnings returned to the API server with allowed pods (names that cannot "
                                    "resolve, a pod on no network); kubectl and kubedock show them."),
    "admission_worker_restarts": (COUNTER, "Times the admission review worker process was lost and replaced."),
    "admission_reviews_pending": (GAUGE, "Admission requests waiting for the review worker."),
    "queries_udp": (COUNTER, "DNS queries received over UDP."),
    "queries_tcp": (COUNTER, "DNS queries received over TCP."),
    "answered_local": (COUNTER, "Queries answered with records from the asking pod's networks."),
    "answered_nodata": (COUNTER, "Queries for a name of the asker's networks answered NOERROR with no record "
                                 "of the asked type (NODATA)."),
    "nxdomain": (COUNTER, "Queries answered NXDOMAIN: a single-label name that no network of the asker "
                          "holds (Docker: not found), after any hold."),
    "forwarded": (COUNTER, "Queries relayed to the upstream resolvers."),
    "servfail": (COUNTER, "Queries answered SERVFAIL (index not synced, duplicate pod IP, every upstream "
                          "failed)."),
    "refused": (COUNTER, "Queries answered REFUSED because too many forwarded queries were in flight."),
    "formerr": (COUNTER, "Malformed queries answered FORMERR."),
    "badvers": (COUNTER, "Queries with an EDNS version above 0, answered BADVERS (RFC 6891 6.1.3)."),
    "notimp": (COUNTER, "Queries with an opcode other than QUERY, answered NOTIMP."),
    "dropped": (COUNTER, "Datagrams dropped unanswered (shorter than a header, or a response)."),
    "held": (COUNTER, "Queries held waiting for a name (or the asker) to appear in the index."),
    "hold_overflow": (COUNTER, "Queries decided at once because the bound on held queries was reached."),
    "hold_expired": (COUNTER, "Held queries whose name did not appear within the hold bound."),
    "truncated": (COUNTER, "Answers truncated (TC set) to fit the client's UDP size."),
    "fast_path": (COUNTER, "Queries answered or relayed by the precomputed fast path."),
    "ip_conflicts_seen": (COUNTER, "Times a live pod claimed an address another live pod already had."),
    "forwards_failed": (COUNTER, "Forwarded queries for which every upstream failed (answered SERVFAIL)."),
    "forwards_refused_overload": (COUNTER, "Forwarded queries refused by the in-flight bound."),
    "watcher_relists": (COUNTER, "Complete pod lists delivered to the index (first sync and after 410 Gone)."),
    "watcher_watch_restarts": (COUNTER, "Watches resumed from the last resourceVersion without a relist."),
    "watcher_errors": (COUNTER, "Failed list or watch requests (retried with backoff)."),
    "watcher_events": (COUNTER, "Watch events applied to the index."),
    "watcher_skipped": (COUNTER, "Pods skipped because their object could not be decoded."),
    "pods": (GAUGE, "Opted-in pods in the index (not finished)."),
    "pods_awaiting_ip": (GAUGE, "Opted-in pods without an address yet."),
    "conflicted_addresses": (GAUGE, "Addresses claimed by more than one live pod (answered SERVFAIL)."),
    "synced": (GAUGE, "1 once the index holds a complete list of pods, else 0 (local names get SERVFAIL)."),
    "watch_behind": (GAUGE, "1 while the pod watch has lost changes and the pods are not listed again yet "
                            "(misses of container names are held meanwhile), else 0."),
    "forwards_in_flight": (GAUGE, "Forwarded queries waiting for an upstream."),
    "holding": (GAUGE, "Queries being held right now."),
    "draining": (GAUGE, "1 while the replica drains before stopping (/readyz 503, still answering), else 0."),
}

# Labelled metrics -> their label names, in order.
LABELS: dict[str, tuple[str, ...]] = {
    "build_info": ("version", "python", "twisted"),
    "requests": ("proto", "type"),
    "responses": ("rcode", "outcome"),
    "admission_reviews": ("outcome",),
}

# Names kept until REMOVED_IN, and what replaces them (their HELP says so too).
DEPRECATED: dict[str, str] = {
    "queries_udp": 'sum(kubedock_dns_requests_total{proto="udp"})',
    "queries_tcp": 'sum(kubedock_dns_requests_total{proto="tcp"})',
    "answered_local": 'kubedock_dns_responses_total{outcome="answered"}',
    "answered_nodata": 'kubedock_dns_responses_total{outcome="nodata"}',
    "nxdomain": 'kubedock_dns_responses_total{outcome="nxdomain"}',
    "forwarded": 'sum(kubedock_dns_responses_total{outcome=~"forwarded|upstream_failed|overloaded"})',
    "servfail": 'sum(kubedock_dns_responses_total{rcode="SERVFAIL"})',
    "refused": 'kubedock_dns_responses_total{outcome="overloaded"}',
    "formerr": 'kubedock_dns_responses_total{rcode="FORMERR"}',
    "badvers": 'kubedock_dns_responses_total{rcode="BADVERS"}',
    "notimp": 'kubedock_dns_responses_total{rcode="NOTIMP"}',
}

HISTOGRAMS: dict[str, str] = {
    "answer_duration_seconds": "Receipt to reply of sampled queries answered from the asker's networks "
                               "(including NODATA and any hold).",
    "forward_duration_seconds": "Receipt to reply of sampled forwarded queries (including upstreams that "
                                "failed before one answered).",
    "watch_lag_seconds": "Time from the watcher reading a batch of pod changes from the API server to the "
                         "index applying it on the reactor thread.",
    "admission_review_duration_seconds": "Receipt of an admission request's body to its answer (waiting for "
                                         "and running the review worker included).",
}

# What values() may return for a name: a number, or for a labelled name label values -> number.
Value = Union[float, Mapping[Any, float]]  # Any: tuples of label values, as many as LABELS says


def documentation(name: str) -> str:
    """The HELP text of ``name``: its description, after a deprecation notice for old names."""
    kind, text = METRICS[name]
    if name in DEPRECATED:
        return f"Deprecated, removed in {REMOVED_IN}: use {DEPRECATED[name]}. {text}"
    return text


class ServerCollector(Collector):
    """Turns ``values()`` (name -> number, or label values -> number for the names in
    :data:`LABELS`; names as in :data:`METRICS`) and ``histograms()`` (name -> histogram, names
    as in :data:`HISTOGRAMS`) into metric families at scrape time, with ``build_info`` always."""

    def __init__(self, values: Callable[[], Mapping[str, Value]],
                 histograms: Callable[[], Mapping[str, LatencyHistogram]]) -> None:
        self.values = values
        self.histograms = histograms
        info = build_info()
        self._build_info = {tuple(info[label] for label in LABELS["build_info"]): 1}

    def collect(self) -> Iterator[Metric]:
        values: dict[str, Value] = {"build_info": self._build_info, **self.values()}
        for name, value in sorted(values.items()):
            try:
                kind, _ = METRICS[name]
            except KeyError:
                raise KeyError(f"metric {name!r} has no entry in kubedock_dns.ops.metrics.METRICS") from None
            family: Metric
            labels = LABELS.get(name)
            make = CounterMetricFamily if kind == COUNTER else GaugeMetricFamily
            if labels is None:
                assert not isinstance(value, Mapping), f"{name} has no LABELS entry"
                family = make(PREFIX + name, documentation(name), value=value)
            else:
                assert isinstance(value, Mapping), f"{name} is labelled ({labels}): give label values -> number"
                family = make(PREFIX + name, documentation(name), labels=labels)
                for label_values, number in sorted(value.items()):
                    family.add_metric(label_values, number)
            yield family
        for name, histogram in sorted(self.histograms().items()):
            yield HistogramMetricFamily(PREFIX + name, HISTOGRAMS[name], buckets=histogram.cumulative(),
                                        sum_value=histogram.sum)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names depend on the configuration (watcher or pods file): no pre-check


def registry(collector: ServerCollector) -> CollectorRegistry:
    """A fresh registry (not the global one: tests build several servers in one process)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg
