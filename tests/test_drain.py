"""A replica asked to stop leaves its Service before it stops answering (kubedock_dns.ops.drain).

The real process: ``twistd -n kubedock-dns`` gets SIGTERM and, for ``--drain-seconds``, answers
real UDP and TCP queries and admission reviews over TLS while ``/readyz`` says 503 with the
reason; then it exits 0.  A second SIGTERM ends the drain at once.  The service's own order
(children stop only after the drain) is checked on a memory reactor.
"""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import dns.message
import dns.query
import pytest
from twisted.application import service
from twisted.internet.task import Clock

from kubedock_dns.ops.drain import DrainingService
from testbed.ports import wait_for_ports
from tests.podfactory import kubedock_pod, network_id
from tests.test_twistd import twistd_env, wait_for

urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def _readyz(ops: str) -> tuple[int, str]:
    try:
        with urlopen(ops + "/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _review() -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-drain", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "namespace": "tests", "operation": "CREATE",
                    "object": {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": "db", "labels": {"kubedock": "true"},
                                            "annotations": {"kubedock.hostalias/0": "db",
                                                            "kubedock.network/0": network_id("drain")}},
                               "spec": {"containers": [{"name": "main", "image": "postgres"}]}}},
    }).encode()


def _mutate(port: int, ca_pem: bytes) -> dict:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    request = urllib.request.Request(f"https://127.0.0.1:{port}/mutate", data=_review(), method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    with opener.open(request, timeout=10) as r:
        return dict(json.load(r)["response"])


@contextlib.contextmanager
def _server(tmp_path: Path, drain: str) -> Iterator[tuple[subprocess.Popen, Path, dict[str, int], bytes]]:
    """A twistd kubedock-dns answering for two pods, ready; killed on the way out if still running."""
    from testbed.tls import generate_ca_and_cert

    net = network_id("drain")
    pods = [kubedock_pod("db", [net], ip="127.21.0.1", uid="db"),
            kubedock_pod("app", [net], ip="127.21.0.2", uid="app")]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path / "tls")
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"), "--upstream", "127.0.0.1:9",
            "--dns-service-ip", "10.96.0.53", "--tls-cert", str(generated.cert_path),
            "--tls-key", str(generated.key_path), "--drain-seconds", drain,
            "--dns-port", "0", "--webhook-port", "0", "--ops-port", "0", "--dns-interface", "127.0.0.1",
            "--webhook-interface", "127.0.0.1", "--ops-interface", "127.0.0.1"]
    log_path = tmp_path / "twistd.log"
    with open(log_path, "w") as log:
        # SIGINT as an interactive shell leaves it (a background job would inherit it ignored).
        proc = subprocess.Popen(argv, env=twistd_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=str(tmp_path),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ports = wait_for_ports(log_path, ("dns", "webhook", "ops"), lambda: proc.poll() is None)
        wait_for(lambda: _readyz(f"http://127.0.0.1:{ports['ops']}")[0] == 200, what="/readyz 200")
        yield proc, log_path, ports, generated.ca_pem
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answer(port: int, tcp: bool) -> list[str]:
    query = dns.message.make_query("db", "A")
    ask = dns.query.tcp if tcp else dns.query.udp
    reply = ask(query, "127.0.0.1", port=port, source="127.21.0.2", timeout=5)
    return [x.address for x in reply.answer[0]] if reply.answer else []


def test_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    """After SIGTERM the server says not ready (503, "draining") so that an EndpointSlice drops
    it, yet keeps answering DNS over UDP and TCP and admission reviews for the drain period;
    then it stops cleanly with exit code 0, having logged the drain's start and end."""
    drain = 8.0
    with _server(tmp_path, str(drain)) as (proc, log_path, ports, ca_pem):
        ops = f"http://127.0.0.1:{ports['ops']}"
        assert _answer(ports["dns"], tcp=False) == ["127.21.0.1"]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _readyz(ops)[0] == 503, timeout=drain, what="/readyz 503 after SIGTERM")
        status, reason = _readyz(ops)
        assert status == 503 and "draining" in reason, reason
        assert "kubedock_dns_draining 1.0" in urlopen(ops + "/metrics", timeout=5).read().decode()
        assert _answer(ports["dns"], tcp=False) == ["127.21.0.1"]
        assert _answer(ports["dns"], tcp=True) == ["127.21.0.1"]
        response = _mutate(ports["webhook"], ca_pem)
        assert (response["uid"], response["allowed"], response["patchType"]) == ("u-drain", True, "JSONPatch")
        answered_at = time.monotonic() - signalled
        assert proc.poll() is None, "stopped while draining"
        returncode = proc.wait(timeout=drain + 30)
        stopped_after = time.monotonic() - signalled
    out = log_path.read_text()
    assert returncode == 0, out
    assert answered_at < drain <= stopped_after + 0.5, (answered_at, stopped_after)
    assert "draining for 8 s before stopping" in out and "drain over after" in out, out
    assert "Traceback" not in out and "Unhandled" not in out, out


def test_second_sigterm_ends_the_drain_at_once(tmp_path: Path) -> None:
    """A second SIGTERM during a long drain stops the server at once (exit 0): an operator's
    second Ctrl-C or signal is never ignored."""
    with _server(tmp_path, "600") as (proc, log_path, ports, _):
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining for 600 s" in log_path.read_text(), timeout=30, what="the drain to start")
        assert _answer(ports["dns"], tcp=True) == ["127.21.0.1"]
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
    out = log_path.read_text()
    assert returncode == 0, out
    assert "SIGTERM received again" in out, out


def test_drain_seconds_0_stops_at_once(tmp_path: Path) -> None:
    """``--drain-seconds 0`` stops without draining: no drain line, exit 0."""
    with _server(tmp_path, "0") as (proc, log_path, _, _):
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=30)
    out = log_path.read_text()
    assert returncode == 0, out
    assert "draining" not in out, out


class Child(service.Service):
    stopped = False

    def stopService(self) -> None:
        super().stopService()
        self.stopped = True


def test_children_stop_only_after_the_drain() -> None:
    """MultiService stops its children in parallel: the listeners would close at once.  The
    draining service keeps every child running until the drain period has passed."""
    clock = Clock()
    top = DrainingService(clock, 5)
    child = Child()
    child.setServiceParent(top)
    top.startService()
    stopped = top.stopService()
    assert top.draining and not child.stopped and not stopped.called
    clock.advance(4.9)
    assert not child.stopped
    clock.advance(0.1)
    assert child.stopped and stopped.called and not top.draining


def test_an_ended_drain_is_not_started_again() -> None:
    """``end_drain_now`` cuts a drain under way short, and one asked for before the stop began
    (a second signal racing the first) makes the stop skip the drain."""
    clock = Clock()
    top = DrainingService(clock, 5)
    child = Child()
    child.setServiceParent(top)
    top.startService()
    top.stopService()
    top.end_drain_now("test")
    assert child.stopped and not clock.getDelayedCalls()
    early = DrainingService(Clock(), 5)
    early.startService()
    early.end_drain_now("second signal")
    assert early.stopService().called


def test_negative_or_nan_drain_is_refused() -> None:
    """A drain period must be 0 or more seconds."""
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="must be 0 or more"):
            DrainingService(Clock(), bad)
