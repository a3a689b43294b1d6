"""The operations endpoint: liveness, readiness, Prometheus metrics and what the server believes.

Plain HTTP on its own port, so kubelet probes and scrapers need no certificate:
``/healthz`` (the process serves), ``/readyz`` (the index holds a complete list of pods),
``/metrics`` (Prometheus or OpenMetrics text, by prometheus_client; see docs/metrics.md), ``/debug/networks`` (JSON: every network, its pods, their
names and addresses; the first place to look when a name does not resolve).
"""

from __future__ import annotations

import json

from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class OpsApp:
    app = Klein()

    def __init__(self, index, registry: CollectorRegistry) -> None:
        self.index = index
        self.registry = registry

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        request.setHeader("Content-Type", "text/plain")
        return b"ok\n"

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request):
        request.setHeader("Content-Type", "text/plain")
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
        request.setHeader("Content-Type", "application/json")
        return json.dumps(self.index.describe(), indent=2).encode()
