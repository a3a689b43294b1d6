"""``twistd kubedock-dns``: one MultiService of DNS server, webhook, watcher and ops endpoint.

The composition root, and nothing else: :func:`build_server` makes every part from a
:class:`~kubedock_dns.options.Config` and returns a :class:`Server` naming what it built;
:func:`makeService` (twistd's entry) returns its top service.  The top service is a
:class:`~kubedock_dns.ops.drain.DrainingService`: on stop (SIGTERM) the replica turns not ready
and keeps serving for ``--drain-seconds`` before its listeners close.

Only the reactor thread touches the index: the watcher thread hands its changes over with
``reactor.callFromThread(index.apply, changes)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from kubedock_dns.contract import ImagePattern, Relisted, pod_record_from_dict
from kubedock_dns.dns.fastpath import FastPath
from kubedock_dns.dns.forwarder import Forwarder
from kubedock_dns.dns.listeners import DNSListeners
from kubedock_dns.dns.server import KubedockDNSServerFactory
from kubedock_dns.index import NetworkIndex
from kubedock_dns.ops.drain import DrainingService
from kubedock_dns.ops.latency import LAG_BUCKETS, LatencyHistogram
from kubedock_dns.ops.logs import WarningLimiter
from kubedock_dns.options import Config, Options, check_no_upstream_loop, upstreams_of
from kubedock_dns.resolver import Resolver, ResolverConfig

log = Logger()

__all__ = ["Options", "Server", "build_server", "makeService"]


@dataclass(frozen=True)
class Server:
    """What :func:`build_server` built.  ``service`` is the top service (start and stop it);
    the rest are its parts, for tests and tools: ``webhook``, ``review_pool`` and
    ``policy_writer`` are None when not configured."""

    service: DrainingService
    index: NetworkIndex
    resolver: Resolver
    dns: KubedockDNSServerFactory
    listeners: DNSListeners
    forwarder: Forwarder
    ops: Any  # kubedock_dns.ops.endpoint.OpsService
    webhook: Any = None  # kubedock_dns.admission.service.WebhookService
    review_pool: Any = None  # kubedock_dns.admission.workers.ReviewPool
    policy_writer: Any = None  # kubedock_dns.kube.policy_writer.NetworkPolicyWriter


class ForwarderService(service.Service):
    """Opens the upstream sockets on start and closes them on stop."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def startService(self) -> None:
        super().startService()
        self.forwarder.start()

    def stopService(self):
        super().stopService()
        return self.forwarder.stop()


class PodsFileService(service.Service):
    """Feeds the index from a JSON list of pods once, instead of watching an API server."""

    def __init__(self, path: str, apply: Callable[[Iterable], None]) -> None:
        self.path = path
        self.apply = apply

    def startService(self) -> None:
        super().startService()
        with open(self.path) as f:
            pods = json.load(f)
        if isinstance(pods, dict):
            pods = pods.get("items", [])
        self.apply((Relisted(tuple(pod_record_from_dict(p) for p in pods)),))
        log.info("loaded {count} pods from {path}", count=len(pods), path=self.path)


def apply_and_warn(index: NetworkIndex, warnings: WarningLimiter, remembered: int = 4096) -> Callable[[Iterable], None]:
    """``index.apply`` that also warns, rate-limited, about what a user must act on: two live pods
    claiming one address (answered SERVFAIL until one goes; one warning per address) and names
    refused as invalid (not resolvable, as in Docker; one warning a minute in all, each pod once)."""
    warned: OrderedDict[str, None] = OrderedDict()  # pods whose refused names were reported

    def apply(changes: Iterable) -> None:
        changes = tuple(changes)
        seen = index.conflicts_seen
        index.apply(changes)
        if index.conflicts_seen != seen:
            for ip in index.conflicted_addresses():
                warnings.warn(
                    "duplicate-ip:" + ip,
                    "address {ip} is claimed by several live pods ({pods}): names and questions "
                    "involving it get SERVFAIL until the stale pod is deleted",
                    ip=ip, pods=", ".join(index.claimants(ip)),
                )
        for change in changes:
            records = change.records if isinstance(change, Relisted) else (getattr(change, "record", None),)
            for record in records:
                if record is None or not record.refused_names or record.uid in warned:
                    continue
                warned[record.uid] = None
                if len(warned) > remembered:
                    warned.popitem(last=False)
                name, reason = record.refused_names[0]
                warnings.warn(
                    "refused-name",
                    "pod {namespace}/{pod}: name {name!r} cannot be resolved ({reason}); Docker would "
                    "not resolve it either; `kubedock-dns networks` lists every refused name",
                    namespace=record.namespace, pod=record.name, name=name, reason=reason,
                )
    return apply


def build_server(config: Config, reactor, pod_source: Callable[[NetworkIndex], service.Service] | None = None) -> Server:
    """The whole server.  ``pod_source(index)`` may supply the service feeding the index
    (tests); by default it is the pods file or the API watcher, as configured."""
    top = DrainingService(reactor, config.drain_seconds)
    index = NetworkIndex(require_ready=config.require_ready, unresolved_networks=config.unresolved_networks,
                         sshd_images=tuple(ImagePattern.parse(image) for image in config.sshd_images))
    apply_changes = apply_and_warn(index, WarningLimiter(log, reactor.seconds))
    watch_lag = LatencyHistogram(LAG_BUCKETS)

    upstreams = upstreams_of(config)
    nameserver = injected_nameserver(config) if config.webhook_enabled else None
    check_no_upstream_loop(config, upstreams, nameserver)
    forwarder = Forwarder(reactor, upstreams, config.forward_timeout, config.max_forwards)

    resolver = Resolver(index, ResolverConfig(cluster_domain=config.cluster_domain, ttl=config.ttl,
                                              hold_seconds=config.hold_timeout,
                                              forward_single_label=config.forward_single_label))
    # --verbose takes the full path: it logs every decision, and a fast-path hit makes none.
    fast_path = FastPath(resolver, reactor.seconds) if config.fast_path and not config.verbose else None
    factory = KubedockDNSServerFactory(reactor, resolver, forwarder, fast_path=fast_path,
                                       latency_sample_every=config.latency_sample_every)
    factory.verbose = int(config.verbose)
    listeners = DNSListeners(reactor, config.dns_port, config.dns_interface, factory)
    listeners.setName("dns")
    listeners.setServiceParent(top)
    # After the listeners (children start in the order added): the forwarder's upstream socket
    # takes an ephemeral UDP port, and had it started first the kernel could hand it the very
    # number --dns-port asks for (seen when a restart reused an ephemeral port).
    ForwarderService(forwarder).setServiceParent(top)

    watcher_service = None
    policy_writer = None
    if pod_source is not None:
        pod_source(index).setServiceParent(top)
    elif config.pods_file:
        PodsFileService(config.pods_file, apply_changes).setServiceParent(top)
    else:
        from kubedock_dns.kube.client import WatcherConfig
        from kubedock_dns.kube.watcher import WatcherService

        deliver = apply_changes
        if config.network_policies:
            deliver, policy_writer = policies_follow_index(config, apply_changes, top)
        watcher_service = WatcherService.for_cluster(
            reactor, WatcherConfig(namespace=config.namespace, opt_in_label=config.opt_in_label),
            deliver, kubeconfig=config.kubeconfig, lag=watch_lag,
        )
        watcher_service.setServiceParent(top)

    webhook = review_pool = webhook_app = None
    if nameserver is not None:
        webhook, review_pool, webhook_app = webhook_child(config, nameserver, reactor, lambda: index.synced, top)

    from kubedock_dns.ops.endpoint import OpsApp, OpsService
    from kubedock_dns.ops.explain import explain
    from kubedock_dns.ops.metrics import ServerCollector, Value, registry

    def metrics() -> dict[str, Value]:
        values: dict[str, Value] = dict(factory.counts())
        values.update(requests=factory.requests(), responses=factory.responses())
        values.update(
            pods=len(index), pods_awaiting_ip=index.pods_awaiting_ip,
            conflicted_addresses=len(index.conflicted_addresses()), synced=int(index.synced),
            watch_behind=int(index.behind),
            holding=factory.holding, draining=int(top.draining),
            ip_conflicts_seen=index.conflicts_seen, forwards_in_flight=forwarder.in_flight,
            forwards_failed=forwarder.failed, forwards_refused_overload=forwarder.refused_overload,
        )
        if watcher_service is not None:
            for name, value in dataclasses.asdict(watcher_service.metrics()).items():
                values["watcher_" + name] = value
        if webhook_app is not None and review_pool is not None:
            values.update(admission_reviews={(outcome,): n for outcome, n in webhook_app.reviews.items()},
                          admission_warnings=webhook_app.warnings,
                          admission_worker_restarts=review_pool.worker_restarts,
                          admission_reviews_pending=review_pool.pending)
        return values

    def histograms() -> dict[str, LatencyHistogram]:
        found = {"answer_duration_seconds": factory.sampler.answers,
                 "forward_duration_seconds": factory.sampler.forwards}
        if watcher_service is not None:
            found["watch_lag_seconds"] = watch_lag
        if webhook_app is not None:
            found["admission_review_duration_seconds"] = webhook_app.review_seconds
        return found

    def explainer(asker: str, name: str, qtype: str):
        return defer.maybeDeferred(explain, resolver, forwarder, asker, name, qtype, reactor.seconds(),
                                   ndots=config.ndots)

    app = OpsApp(index, registry(ServerCollector(metrics, histograms)), explainer, draining=lambda: top.draining)
    ops = OpsService(reactor, app.app.resource(), config.ops_port, config.ops_interface)
    ops.setServiceParent(top)
    return Server(service=top, index=index, resolver=resolver, dns=factory, listeners=listeners,
                  forwarder=forwarder, ops=ops, webhook=webhook, review_pool=review_pool,
                  policy_writer=policy_writer)


def policies_follow_index(config: Config, apply_changes: Callable[[Iterable], None],
                          top: service.MultiService) -> tuple[Callable[[Iterable], None], Any]:
    """``apply_changes`` that also tells the NetworkPolicy writer (its own thread, see
    :class:`kubedock_dns.kube.policy_writer.NetworkPolicyWriter`) which networks have pods, once
    synced; and that writer."""
    from kubedock_dns.kube.policies import Membership, PolicyConfig
    from kubedock_dns.kube.policy_writer import NetworkPolicyService

    policy_service = NetworkPolicyService.for_cluster(
        config.kubeconfig, config.namespace,
        PolicyConfig(opt_in_label=config.opt_in_label, kubedock_selector=dict(config.kubedock_pod_selector),
                     base_name=config.isolation_policy))
    policy_service.setServiceParent(top)

    membership = Membership()

    def apply(changes: Iterable) -> None:
        changes = tuple(changes)
        apply_changes(changes)
        membership.apply(changes)
        if membership.synced:
            # O(pods) per batch on the reactor thread: a set of network IDs, no API call.
            policy_service.writer.want(membership.networks())
    return apply, policy_service.writer


def injected_nameserver(config: Config) -> str:
    """The address the webhook gives opted-in pods: --dns-service-ip, else the named Service's IP."""
    if config.dns_service_ip:
        return config.dns_service_ip
    assert config.dns_service_name  # options require one of the two with the webhook
    from kubedock_dns.kube.client import service_cluster_ip

    return service_cluster_ip(config.kubeconfig, config.namespace, config.dns_service_name)


def webhook_child(config: Config, nameserver: str, reactor, ready, top: service.MultiService) -> tuple[Any, Any, Any]:
    """The TLS admission webhook, injecting ``nameserver`` into opted-in pods, as a child of
    ``top``; returns its listener, its review worker pool and its routes (which count the reviews)."""
    from kubedock_dns.admission.review import WebhookConfig
    from kubedock_dns.admission.service import WebhookApp, webhook_service
    from kubedock_dns.admission.workers import ReviewPool

    assert config.tls_cert and config.tls_key  # webhook_enabled
    webhook_config = WebhookConfig(nameserver_ip=nameserver, cluster_domain=config.cluster_domain,
                                   ndots=config.ndots, opt_in_label=config.opt_in_label,
                                   network_labels=config.network_policies)
    # Reviews are decoded and decided in a worker process: in this one they would stall DNS.
    pool = ReviewPool(webhook_config, reactor, deadline=config.review_timeout)
    app = WebhookApp(webhook_config, ready=ready, reviewer=pool.review)
    listener = webhook_service(app.resource(), config.webhook_port, config.webhook_interface,
                               config.tls_cert, config.tls_key, reactor)
    listener.setName("webhook")
    child = service.MultiService()
    child.setName("webhook")
    listener.setServiceParent(child)
    ReviewPoolService(pool).setServiceParent(child)
    child.setServiceParent(top)
    return listener, pool, app


class ReviewPoolService(service.Service):
    """Stops the admission review worker process when the server stops (waiting for it a
    bounded time: see :meth:`ReviewPool.close`)."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.close()


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    try:
        server = build_server(options.config(), reactor)
    except (OSError, ValueError) as error:  # bad certificate, unreadable kubeconfig, no upstream...
        raise SystemExit(f"kubedock-dns: cannot start: {error}")
    server.service.handle_signals()
    return server.service
