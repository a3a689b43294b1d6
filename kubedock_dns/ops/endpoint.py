"""The operations endpoint: liveness, readiness, Prometheus metrics and what the server believes.

Plain HTTP on its own port, so kubelet probes and scrapers need no certificate:
``/healthz`` (the process serves), ``/readyz`` (the index holds a complete list of pods and
the replica is not draining before a stop: 503 with the reason otherwise),
``/metrics`` (Prometheus or OpenMetrics text by prometheus_client; docs/metrics.md),
``/debug/networks`` (JSON: every network, its pods, their names and addresses), ``/networks`` and
``/networks/<id>`` (the networks view of :mod:`kubedock_dns.ops.views`, for ``kubedock-dns
networks``), ``/`` (the same as a small read-only HTML page) and ``/explain?from=&name=&type=``
(:mod:`kubedock_dns.ops.explain`, for ``kubedock-dns explain``).  Bad requests get HTTP 400 or 404
with ``{"error": ...}`` saying what to give instead.

Who may read what: the probes and ``/metrics`` answer every address (the kubelet probes the pod's
address, Prometheus scrapes it).  Everything that reveals networks' names and addresses (the
page, ``/debug/networks``, ``/networks*``, ``/explain``: more than DNS would tell any one pod)
answers only connections from a loopback address, which is where ``kubectl exec`` (the
``kubedock-dns`` command inside the container) and ``kubectl port-forward`` arrive; from anywhere
else, another pod included, 403 with how to ask instead.

:class:`OpsService` listens for it on plain TCP and logs ``ops listening on HOST:PORT``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from kubedock_dns.ops import views


log = Logger()


class OpsService(Service):
    """Serves ``resource`` over plain HTTP on ``interface:port`` while running; ``port`` is the
    bound port (useful when asked for 0)."""

    def __init__(self, reactor: Any, resource: Resource, port: int, interface: str) -> None:
        self.setName("ops")
        self._reactor = reactor
        self._site = Site(resource)
        self._requested = port
        self._interface = interface
        self._listening: Any = None

    @property
    def port(self) -> int:
        if self._listening is None:
            raise RuntimeError("the ops endpoint is not listening; start it first")
        return int(self._listening.getHost().port)

    def startService(self) -> None:
        self._listening = self._reactor.listenTCP(self._requested, self._site, interface=self._interface)
        super().startService()
        host = self._listening.getHost()
        log.info("{name} listening on {interface}:{port}", name=self.name, interface=host.host, port=host.port)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        listening, self._listening = self._listening, None
        return defer.maybeDeferred(listening.stopListening) if listening is not None else defer.succeed(None)


_NOT_HERE = ("this endpoint shows every network's names and addresses, so it answers only on the loopback "
             "address: ask inside the server's pod (kubectl exec deploy/kubedock-dns -- kubedock-dns networks, "
             "or ... explain --from <pod> <name>) or through kubectl port-forward deploy/kubedock-dns 8080")


def from_loopback(request: Any) -> bool:
    """Whether the request's connection comes from a loopback address (IPv4-mapped included)."""
    try:
        address = ipaddress.ip_address(str(getattr(request.getClientAddress(), "host", "")).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _refused_here(request: Any, html: bool = False) -> bytes:
    request.setResponseCode(403)
    if html:
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return (_NOT_HERE + "\n").encode()
    request.setHeader("Content-Type", "application/json")
    return _json({"error": _NOT_HERE})


class OpsApp:
    app = Klein()

    def __init__(self, index, registry: CollectorRegistry, explainer=None,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.index = index
        # True from SIGTERM until the listeners close (kubedock_dns.ops.drain).
        self.draining = draining
        self.registry = registry
        # explainer(asker, name, type) -> Deferred of the JSON-ready account (kubedock_dns.ops.explain).
        self.explainer = explainer

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        request.setHeader("Content-Type", "text/plain")
        return b"ok\n"

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request):
        request.setHeader("Content-Type", "text/plain")
        if self.draining():
            request.setResponseCode(503)
            return (b"not ready: draining before shutdown (stopping was asked for); DNS and the "
                    b"webhook keep answering until the drain period ends\n")
        if self.index.synced:
            return b"ready\n"
        request.setResponseCode(503)
        return b"not ready: the pod index has not received a complete list yet\n"

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request):
        accept = request.getHeader("Accept")
        encode, content_type = choose_encoder(accept or "")
        request.setHeader("Content-Type", content_type)
        return encode(self.registry)

    @app.route("/debug/networks", methods=["GET"])
    def networks(self, request):
        if not from_loopback(request):
            return _refused_here(request)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(self.index.describe(), indent=2).encode()

    @app.route("/", methods=["GET"])
    def page(self, request):
        if not from_loopback(request):
            return _refused_here(request, html=True)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        return views.render_html(self.index.describe()).encode()

    @app.route("/networks", methods=["GET"])
    def network_list(self, request):
        if not from_loopback(request):
            return _refused_here(request)
        request.setHeader("Content-Type", "application/json")
        described = self.index.describe()
        return _json({"synced": described["synced"], "conflicted_addresses": described["conflicted_addresses"],
                      "networks": views.summaries(described)})

    @app.route("/networks/<network>", methods=["GET"])
    def network_inspect(self, request, network: str):
        if not from_loopback(request):
            return _refused_here(request)
        request.setHeader("Content-Type", "application/json")
        try:
            return _json([views.inspect(self.index.describe(), network)])
        except views.NoSuchNetwork as missing:
            request.setResponseCode(404)
            return _json({"error": str(missing)})

    @app.route("/explain", methods=["GET"])
    def explain(self, request):
        if not from_loopback(request):
            return _refused_here(request)
        request.setHeader("Content-Type", "application/json")
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items() if v}
        missing = [k for k in ("from", "name") if not args.get(k)]
        if missing or self.explainer is None:
            request.setResponseCode(400)
            return _json({"error": f"missing query parameter(s) {', '.join(missing)}: "
                                   "/explain?from=<pod name or IP>&name=<name>[&type=A|AAAA|PTR]"
                          if missing else "this server cannot explain"})

        def failed(failure):
            from kubedock_dns.ops.explain import ExplainError

            failure.trap(ExplainError)
            request.setResponseCode(400)
            return _json({"error": str(failure.value)})

        d = self.explainer(args["from"], args["name"], args.get("type", "A"))
        return d.addCallback(_json).addErrback(failed)


def _json(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()
