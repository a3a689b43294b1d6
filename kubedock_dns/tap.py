"""``twistd kubedock-dns``: one MultiService of DNS server, webhook, watcher and ops endpoint.

The top service is a :class:`~kubedock_dns.drain.DrainingService`: on stop (SIGTERM) the replica
turns not ready and keeps serving for ``--drain-seconds`` before its listeners close.

Only the reactor thread touches the index: the watcher thread hands its changes over with
``reactor.callFromThread(index.apply, changes)``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from twisted.application import internet, service
from twisted.internet.error import CannotListenError
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Site

from kubedock_dns.contract import ImagePattern, Relisted, pod_record_from_dict
from kubedock_dns.drain import DrainingService
from kubedock_dns.forwarder import Forwarder
from kubedock_dns.upstreams import upstreams_from_resolv_conf
from kubedock_dns.index import NetworkIndex
from kubedock_dns.latency import LAG_BUCKETS, LatencyHistogram
from kubedock_dns.logs import WarningLimiter
from kubedock_dns.options import Config, Options
from kubedock_dns.resolver import Resolver, ResolverConfig
from kubedock_dns.server import KubedockDNSServerFactory, QueryDatagramProtocol
from kubedock_dns.udp_port import listen_answering_udp
from kubedock_dns.fastpath import FastPath

log = Logger()

__all__ = ["Options", "makeService", "build_service"]


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


class DNSListeners(service.Service):
    """The DNS server's UDP and TCP ports: one port number for both.

    Port 0 lets the kernel choose: UDP is bound first and TCP takes the same number; when another
    process holds that TCP port, both are given up and the kernel is asked again (a few times).
    ``port`` is the bound port while running.  Each start logs ``dns listening on HOST:PORT``
    (tests and tools that start the server on port 0 read the port from there).  ``server`` is the
    TCP factory, and the UDP port answers fast-path hits from it in its read loop."""

    attempts = 20

    def __init__(self, reactor, port: int, interface: str, udp_protocol_factory, server) -> None:
        self.reactor = reactor
        self.requested = port
        self.interface = interface
        self.udp_protocol_factory = udp_protocol_factory
        self.server = server
        self.port = 0
        self._udp: Any = None
        self._tcp: Any = None

    def startService(self) -> None:
        for attempt in range(self.attempts):
            # A fresh protocol each time: one given up is detached only in a later reactor turn.
            udp = listen_answering_udp(self.reactor, self.requested, self.udp_protocol_factory(), self.interface,
                                       self.server)
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self.server, interface=self.interface)
            except CannotListenError:
                udp.stopListening()
                if self.requested or attempt == self.attempts - 1:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        super().startService()
        log.info("dns listening on {interface}:{port} (UDP and TCP)", interface=self.interface or "*",
                 port=self.port)

    def stopService(self):
        super().stopService()
        from twisted.internet import defer

        listening = [p for p in (self._udp, self._tcp) if p is not None]
        self._udp = self._tcp = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])


class LoggedTCPServer(internet.TCPServer):
    """A TCPServer that logs ``<name> listening on HOST:PORT`` with the port it was given."""

    def startService(self) -> None:
        super().startService()
        port = self._port.getHost()  # type: ignore[attr-defined]
        log.info("{name} listening on {interface}:{port}", name=self.name, interface=port.host, port=port.port)


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


class StampedHandOver:
    """The reactor as the watcher thread sees it: every batch handed over with ``callFromThread``
    is stamped on the watcher thread, and ``lag`` observes how long it waited for the reactor
    thread to apply it (the watch lag metric).  Everything else goes to the real reactor."""

    def __init__(self, reactor: Any, lag: LatencyHistogram, clock: Callable[[], float] = time.monotonic) -> None:
        self._reactor = reactor
        self._lag = lag
        self._clock = clock

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self._reactor.callFromThread(self._timed, self._clock(), f, args)

    def _timed(self, stamp: float, f: Callable[..., Any], args: tuple) -> None:
        f(*args)
        self._lag.observe(self._clock() - stamp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


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


def build_service(config: Config, reactor, pod_source=None) -> DrainingService:
    """The whole server.  ``pod_source(index)`` may supply the service feeding the index
    (tests); by default it is the pods file or the API watcher, as configured."""
    top = DrainingService(reactor, config.drain_seconds)
    index = NetworkIndex(require_ready=config.require_ready, unresolved_networks=config.unresolved_networks,
                         sshd_images=tuple(ImagePattern.parse(image) for image in config.sshd_images))
    top.index = index  # type: ignore[attr-defined]
    apply_changes = apply_and_warn(index, WarningLimiter(log, reactor.seconds))
    watch_lag = LatencyHistogram(LAG_BUCKETS)

    upstreams = list(config.upstreams)
    if not upstreams:
        with open(config.resolv_conf) as f:
            upstreams = upstreams_from_resolv_conf(f.read())
    nameserver = injected_nameserver(config) if config.webhook_enabled else None
    looping = [u for u in upstreams
               if nameserver is not None and ipaddress.ip_address(u.host) == ipaddress.ip_address(nameserver)]
    if looping:
        source = "--upstream" if config.upstreams else config.resolv_conf
        raise ValueError(
            f"upstream {looping[0].host} (from {source}) is kubedock-dns' own Service address, which the "
            f"webhook gives opted-in pods: every forwarded query would come back here. Do not label "
            f"kubedock-dns' own pods for opt-in, and leave them dnsPolicy ClusterFirst (or give --upstream)"
        )
    forwarder = Forwarder(reactor, upstreams, config.forward_timeout, config.max_forwards)

    resolver = Resolver(index, ResolverConfig(cluster_domain=config.cluster_domain, ttl=config.ttl,
                                              hold_seconds=config.hold_timeout,
                                              forward_single_label=config.forward_single_label))
    # --verbose takes the full path: it logs every decision, and a fast-path hit makes none.
    fast_path = FastPath(resolver, reactor.seconds) if config.fast_path and not config.verbose else None
    factory = KubedockDNSServerFactory(reactor, resolver, forwarder, fast_path=fast_path,
                                       latency_sample_every=config.latency_sample_every)
    factory.verbose = int(config.verbose)
    top.dns_factory = factory  # type: ignore[attr-defined]
    dns_service = DNSListeners(reactor, config.dns_port, config.dns_interface,
                               lambda: QueryDatagramProtocol(factory, reactor), factory)
    dns_service.setName("dns")
    dns_service.setServiceParent(top)
    top.dns_listeners = dns_service  # type: ignore[attr-defined]
    # After the listeners (children start in the order added): the forwarder's upstream socket
    # takes an ephemeral UDP port, and had it started first the kernel could hand it the very
    # number --dns-port asks for (seen when a restart reused an ephemeral port).
    ForwarderService(forwarder).setServiceParent(top)

    if pod_source is not None:
        pod_source(index).setServiceParent(top)
    elif config.pods_file:
        PodsFileService(config.pods_file, apply_changes).setServiceParent(top)
    else:
        from kubedock_dns.kube.watcher import WatcherConfig, WatcherService

        deliver = apply_changes
        if config.network_policies:
            deliver = policies_follow_index(config, apply_changes, top)
        watcher = WatcherService.for_cluster(
            StampedHandOver(reactor, watch_lag),
            WatcherConfig(namespace=config.namespace, opt_in_label=config.opt_in_label),
            deliver, kubeconfig=config.kubeconfig,
        )
        watcher.setServiceParent(top)

    if nameserver is not None:
        webhook_child(config, nameserver, reactor, lambda: index.synced).setServiceParent(top)

    watcher_service = top.namedServices.get("watcher")

    def metrics() -> dict[str, float]:
        values: dict[str, float] = dict(factory.counters.as_dict())
        values.update(
            pods=len(index), pods_awaiting_ip=index.pods_awaiting_ip,
            conflicted_addresses=len(index.conflicted_addresses()), synced=int(index.synced),
            holding=factory.holding, draining=int(top.draining),
            ip_conflicts_seen=index.conflicts_seen, forwards_in_flight=forwarder.in_flight,
            forwards_failed=forwarder.failed, forwards_refused_overload=forwarder.refused_overload,
        )
        if watcher_service is not None:
            for name, value in dataclasses.asdict(watcher_service.metrics()).items():
                values["watcher_" + name] = value
        return values

    def histograms() -> dict[str, LatencyHistogram]:
        found = {"answer_duration_seconds": factory.answer_latency,
                 "forward_duration_seconds": factory.forward_latency}
        if watcher_service is not None:
            found["watch_lag_seconds"] = watch_lag
        return found

    def explainer(asker: str, name: str, qtype: str):
        return defer.maybeDeferred(explain, resolver, forwarder, asker, name, qtype, reactor.seconds(),
                                   ndots=config.ndots)

    from kubedock_dns.explain import explain
    from kubedock_dns.metrics import ServerCollector, registry
    from kubedock_dns.ops import OpsApp

    ops = LoggedTCPServer(config.ops_port, Site(OpsApp(index, registry(ServerCollector(metrics, histograms)), explainer,
                                                       draining=lambda: top.draining).app.resource()),
                             interface=config.ops_interface)
    ops.setName("ops")
    ops.setServiceParent(top)
    return top


def policies_follow_index(config: Config, apply_changes: Callable[[Iterable], None],
                          top: service.MultiService) -> Callable[[Iterable], None]:
    """``apply_changes`` that also tells the NetworkPolicy writer (its own thread, see
    :class:`kubedock_dns.kube.policy_writer.NetworkPolicyWriter`) which networks have pods, once synced."""
    from kubedock_dns.policies import Membership, PolicyConfig
    from kubedock_dns.kube.policy_writer import NetworkPolicyService

    policy_service = NetworkPolicyService.for_cluster(
        config.kubeconfig, config.namespace,
        PolicyConfig(opt_in_label=config.opt_in_label, kubedock_selector=dict(config.kubedock_pod_selector),
                     base_name=config.isolation_policy))
    policy_service.setServiceParent(top)
    top.policy_writer = policy_service.writer  # type: ignore[attr-defined]

    membership = Membership()

    def apply(changes: Iterable) -> None:
        changes = tuple(changes)
        apply_changes(changes)
        membership.apply(changes)
        if membership.synced:
            # O(pods) per batch on the reactor thread: a set of network IDs, no API call.
            policy_service.writer.want(membership.networks())
    return apply


def injected_nameserver(config: Config) -> str:
    """The address the webhook gives opted-in pods: --dns-service-ip, else the named Service's IP."""
    if config.dns_service_ip:
        return config.dns_service_ip
    assert config.dns_service_name  # options require one of the two with the webhook
    from kubedock_dns.kube.client import service_cluster_ip

    return service_cluster_ip(config.kubeconfig, config.namespace, config.dns_service_name)


def webhook_child(config: Config, nameserver: str, reactor, ready) -> service.Service:
    """The TLS admission webhook, injecting ``nameserver`` into opted-in pods."""
    from kubedock_dns.webhook import WebhookApp, WebhookConfig, webhook_service

    assert config.tls_cert and config.tls_key  # webhook_enabled
    from kubedock_dns.reviewing import ReviewPool

    webhook_config = WebhookConfig(nameserver_ip=nameserver, cluster_domain=config.cluster_domain,
                                   ndots=config.ndots, opt_in_label=config.opt_in_label,
                                   network_labels=config.network_policies)
    # Reviews are decoded and decided in a worker process: in this one they would stall DNS.
    pool = ReviewPool(webhook_config, reactor)
    app = WebhookApp(webhook_config, ready=ready, reviewer=pool.review)
    child = webhook_service(app.resource(), config.webhook_port, config.webhook_interface,
                            config.tls_cert, config.tls_key, reactor)
    child.setName("webhook")
    child.review_pool = pool  # type: ignore[attr-defined]
    top = service.MultiService()
    top.setName("webhook")
    child.setServiceParent(top)
    ReviewPoolService(pool).setServiceParent(top)
    top.review_pool = pool  # type: ignore[attr-defined]
    top.listener = child  # type: ignore[attr-defined]
    return top


class ReviewPoolService(service.Service):
    """Stops the admission review worker process when the server stops."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        self.pool.close()


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    try:
        top = build_service(options.config(), reactor)
    except (OSError, ValueError) as error:  # bad certificate, unreadable kubeconfig, no upstream...
        raise SystemExit(f"kubedock-dns: cannot start: {error}")
    top.handle_signals()
    return top
