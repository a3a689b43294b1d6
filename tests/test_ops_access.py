"""Who may read what on the ops endpoint, on real sockets.

The probes and ``/metrics`` answer every address (the kubelet probes the pod's address,
Prometheus scrapes it).  What reveals networks' names and addresses (``/debug/networks``,
``/networks``, ``/networks/<id>``, ``/explain``, the page at ``/``) answers only connections from
the loopback address, where ``kubectl exec`` and ``kubectl port-forward`` arrive: from another
pod it is 403, saying how to ask instead.  The other address here is this machine's own
non-loopback one (a connection to it comes from it), so nothing of another host is needed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from twisted.application import service
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kubedock_dns.contract import Relisted
from kubedock_dns.dns.upstreams import parse_upstream
from kubedock_dns.options import Config
from kubedock_dns.tap import build_server
from tests.test_dns_server import A_SVC, NS, base_pods

REVEALING = ["/debug/networks", "/networks", f"/networks/{base_pods()[0].networks[0][:12]}",
             f"/explain?from={A_SVC}&name=db", "/"]
OPEN = ["/healthz", "/readyz", "/metrics"]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _this_machines_address(family: int) -> str | None:
    from testbed.node.host import node_ip

    if family == 4:
        try:
            return node_ip()
        except RuntimeError:
            return None
    import subprocess

    for line in subprocess.run(["ip", "-6", "-o", "addr", "show", "scope", "global"], capture_output=True,
                               text=True).stdout.splitlines():
        return line.split()[3].split("/")[0]
    return None


class OpsAccessTests(TestCase):
    timeout = 60
    interface = ""  # all IPv4 addresses, as the chart's pod listens

    def setUp(self) -> None:
        config = Config(dns_port=0, dns_interface="127.0.0.1", upstreams=(parse_upstream("127.0.0.1:9"),),
                        namespace=NS, ops_port=0, ops_interface=self.interface, drain_seconds=0)
        self.server = build_server(config, reactor, pod_source=lambda index: service.Service())
        self.server.index.apply([Relisted(tuple(base_pods()))])
        self.server.service.startService()
        self.addCleanup(self.server.service.stopService)

    def url(self, host: str, path: str) -> str:
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.server.ops.port}{path}"

    @defer.inlineCallbacks
    def check(self, loopback: str, other: str | None) -> defer.Deferred:
        if other is None:
            self.skipTest("this machine has no non-loopback address of that family")
        for path in OPEN:
            for host in (loopback, other):
                status, _ = yield deferToThread(_get, self.url(host, path))
                self.assertEqual(status, 200, (host, path))
        for path in REVEALING:
            status, body = yield deferToThread(_get, self.url(loopback, path))
            self.assertEqual(status, 200, (loopback, path, body[:200]))
            status, body = yield deferToThread(_get, self.url(other, path))
            self.assertEqual(status, 403, (other, path, body[:200]))
            self.assertNotIn(b"127.10.", body)  # no address of any pod
            message = json.loads(body)["error"] if path != "/" else body.decode()
            self.assertIn("kubectl", message)
            self.assertIn("port-forward", message)

    def test_names_answer_only_the_loopback_address(self) -> defer.Deferred:
        """From this machine's own address (as from another pod) the probes and metrics answer
        and every endpoint that reveals names says 403 with how to ask instead; from 127.0.0.1
        (kubectl exec, kubectl port-forward) everything answers."""
        return self.check("127.0.0.1", _this_machines_address(4))


class OpsAccessDualStackTests(OpsAccessTests):
    """The same on an IPv6 listener (``--ops-interface ::``), whose IPv4 clients arrive as
    IPv4-mapped addresses (``::ffff:127.0.0.1`` is loopback too)."""

    interface = "::"

    def test_names_answer_only_the_loopback_address_over_ipv6(self) -> defer.Deferred:
        """::1 gets everything, this machine's global IPv6 address gets 403 for names."""
        return self.check("::1", _this_machines_address(6))
