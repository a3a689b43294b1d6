"""Prometheus metrics: one collector that reads the server's own counters when scraped.

The DNS hot path only increments plain integer attributes (``server.Counters``, the forwarder's,
the index's, the watcher's) and, for sampled queries, a :class:`~kubedock_dns.ops.latency.LatencyHistogram`;
nothing here runs until a scrape asks.  :data:`METRICS` is the one table of names, types and
HELP texts (docs/metrics.md lists the same); a value without an entry is a bug that a test catches.
The registry adds prometheus_client's process collector (RSS, CPU, open file descriptors) and the
Python platform and GC collectors.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kubedock_dns.ops.latency import LatencyHistogram

PREFIX = "kubedock_dns_"
COUNTER, GAUGE = "counter", "gauge"

# name (without prefix and without _total) -> (type, HELP).
METRICS: dict[str, tuple[str, str]] = {
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

HISTOGRAMS: dict[str, str] = {
    "answer_duration_seconds": "Receipt to reply of sampled queries answered from the asker's networks "
                               "(including NODATA and any hold).",
    "forward_duration_seconds": "Receipt to reply of sampled forwarded queries (including upstreams that "
                                "failed before one answered).",
    "watch_lag_seconds": "Time from the watcher reading a batch of pod changes from the API server to the "
                         "index applying it on the reactor thread.",
}


class ServerCollector(Collector):
    """Turns ``values()`` (name -> number, names as in :data:`METRICS`) and ``histograms()``
    (name -> histogram, names as in :data:`HISTOGRAMS`) into metric families at scrape time."""

    def __init__(self, values: Callable[[], Mapping[str, float]],
                 histograms: Callable[[], Mapping[str, LatencyHistogram]]) -> None:
        self.values = values
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        for name, value in sorted(self.values().items()):
            try:
                kind, documentation = METRICS[name]
            except KeyError:
                raise KeyError(f"metric {name!r} has no entry in kubedock_dns.ops.metrics.METRICS") from None
            family: Metric
            if kind == COUNTER:
                family = CounterMetricFamily(PREFIX + name, documentation, value=value)
            else:
                family = GaugeMetricFamily(PREFIX + name, documentation, value=value)
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
