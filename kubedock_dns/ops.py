"""The operations endpoint: liveness, readiness, Prometheus metrics and what the server believes.

Plain HTTP on its own port, so kubelet probes and scrapers need no certificate:
``/healthz`` (the process serves), ``/readyz`` (the index holds a complete list of pods),
``/metrics`` (Prometheus text format), ``/debug/networks`` (JSON: every network, its pods, their
names and addresses; the first place to look when a name does not resolve).
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

from klein import Klein


class OpsApp:
    app = Klein()

    def __init__(self, index, metrics: Callable[[], Mapping[str, float]]) -> None:
        self.index = index
        self.metrics = metrics

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
        request.setHeader("Content-Type", "text/plain; version=0.0.4")
        lines = []
        for name, value in sorted(self.metrics().items()):
            gauge = name in GAUGES
            metric = "kubedock_dns_" + name + ("" if gauge else "_total")
            lines.append(f"# TYPE {metric} {'gauge' if gauge else 'counter'}")
            lines.append(f"{metric} {value}")
        return ("\n".join(lines) + "\n").encode()

    @app.route("/debug/networks", methods=["GET"])
    def networks(self, request):
        request.setHeader("Content-Type", "application/json")
        return json.dumps(self.index.describe(), indent=2).encode()


GAUGES = frozenset({"pods", "pods_awaiting_ip", "conflicted_addresses", "synced", "forwards_in_flight",
                    "holding"})
