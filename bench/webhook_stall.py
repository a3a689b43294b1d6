"""How long DNS answers wait while the webhook decides the worst admissible review: in the review
worker process (what the server does) against in the reactor's own process (what it avoids).

One process serves DNS (a pod pair from examples/pods.json) and two webhook listeners over TLS
on loopback: one hands reviews to a :class:`kubedock_dns.admission.workers.ReviewPool` worker, the other
decides them in the reactor's process.  While the largest review the webhook admits (about two
million tiny JSON values just under ``MAX_REVIEW_BYTES``: the costliest to decode) is posted to
one of them, a DNS client in another process (so that this process's interpreter lock cannot
hide a stall from it) asks every 5 ms and keeps the longest answer time.  Rounds alternate the
two listeners so that a busy machine disturbs both alike; the result is the median of each and
their ratio.  docs/design.md ("The webhook") quotes a run.

This was a timed test (tests/test_webhook_limits.py) until issue 23: a ratio of two timings from
one run belongs here; the test keeps a bound no machine load can break (DNS answers are given
while the worker decides).

    python -m bench.webhook_stall [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ASKER = "127.77.1.2"  # run-a's service in examples/pods.json: it asks for its db
NAMESERVER_IP = "10.96.0.53"

# Asks 'db' every 5 ms from the given source address until told to stop on stdin; then prints
# the longest answer time seen.
PROBE = """
import select, sys, time
import dns.message, dns.query
port, source = int(sys.argv[1]), sys.argv[2]
query = dns.message.make_query("db", "A")
dns.query.udp(query, "127.0.0.1", port=port, source=source, timeout=5)
print("ready", flush=True)
worst = 0.0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    started = time.monotonic()
    dns.query.udp(query, "127.0.0.1", port=port, source=source, timeout=5)
    worst = max(worst, time.monotonic() - started)
print(worst, flush=True)
"""


def review_of(pod: dict[str, Any]) -> dict[str, Any]:
    """An AdmissionReview v1 CREATE request for ``pod``, as the API server sends it."""
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "name": pod["metadata"]["name"], "namespace": "team-a", "operation": "CREATE",
                        "userInfo": {"username": "system:serviceaccount:team-a:kubedock"},
                        "object": pod, "oldObject": None, "dryRun": False}}


def kubedock_pod() -> dict[str, Any]:
    """A pod as kubedock creates it: opted in, one network."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db", "namespace": "team-a", "labels": {"kubedock": "true"},
                         "annotations": {"kubedock.hostalias/0": "db", "kubedock.network/0": "ab" * 32}},
            "spec": {"containers": [{"name": "main", "image": "postgres:16"}], "restartPolicy": "Never"}}


def worst_review() -> bytes:
    """A well-formed review just under the body bound, made of what is costliest to decode:
    about two million tiny JSON values."""
    from kubedock_dns.admission.service import MAX_REVIEW_BYTES

    document = review_of(kubedock_pod())
    filler = MAX_REVIEW_BYTES - len(json.dumps(document)) - 1000
    document["request"]["object"]["spec"]["filler"] = [0] * (filler // 2)
    body = json.dumps(document, separators=(",", ":")).encode()
    assert len(body) < MAX_REVIEW_BYTES
    return body


def post_over_tls(port: int, ca_pem: bytes, body: bytes, timeout: float = 60) -> tuple[bytes, float]:
    """POST ``body`` to ``/mutate`` over TLS; the raw answer and the exchange's duration."""
    request = (b"POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    context = ssl.create_default_context(cadata=ca_pem.decode())
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        with context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            while data := tls.recv(65536):
                received += data
    return received, time.monotonic() - started


def worst_dns_answer_during(dns_port: int, webhook_port: int, ca_pem: bytes, body: bytes) -> tuple[float, float, bytes]:
    """(worst DNS answer time while the review ran, the review's time, its answer)."""
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(dns_port), ASKER],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdin is not None
        if probe.stdout.readline().strip() != "ready":
            raise RuntimeError("the DNS probe got no answer")
        answer, took = post_over_tls(webhook_port, ca_pem, body)
        probe.stdin.write("stop\n")
        probe.stdin.flush()
        worst = float(probe.stdout.readline())
    finally:
        probe.kill()
        probe.wait()
    return worst, took, answer


def measure(rounds: int) -> dict[str, list[float]]:
    """Run the rounds on the real reactor (started and stopped here); worst DNS answer times in
    seconds per setting ("worker", "in-process")."""
    from twisted.application import service
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    from kubedock_dns.contract import Relisted, pod_record_from_dict
    from kubedock_dns.admission.review import WebhookConfig
    from kubedock_dns.admission.service import WebhookApp, webhook_service
    from kubedock_dns.admission.workers import ReviewPool
    from kubedock_dns.dns.upstreams import parse_upstream
    from kubedock_dns.options import Config
    from kubedock_dns.tap import build_server
    from testbed.tls import generate_ca_and_cert

    work = Path(tempfile.mkdtemp(prefix="kubedock-dns-stall-bench-"))
    pods = json.loads((REPO / "examples" / "pods.json").read_text())
    results: dict[str, list[float]] = {"worker": [], "in-process": []}
    outcome: list[BaseException] = []
    try:
        tls = generate_ca_and_cert(["127.0.0.1"], work / "tls")
        # The upstream is never asked (every question is a local name); any address parses.
        config = Config(dns_port=0, dns_interface="127.0.0.1", upstreams=(parse_upstream("127.0.0.1:9"),),
                        ops_port=0, ops_interface="127.0.0.1", drain_seconds=0)
        server = build_server(config, reactor, pod_source=lambda index: service.Service())
        top = server.service
        server.index.apply([Relisted(tuple(pod_record_from_dict(p) for p in pods))])
        webhook = WebhookConfig(nameserver_ip=NAMESERVER_IP)
        pool = ReviewPool(webhook, reactor)
        listeners = {}
        for name, reviewer in (("worker", pool.review), ("in-process", None)):
            listeners[name] = webhook_service(WebhookApp(webhook, reviewer=reviewer).resource(), 0, "127.0.0.1",
                                              str(tls.cert_path), str(tls.key_path), reactor, check_interval=0)
        body = worst_review()
        small = json.dumps(review_of(kubedock_pod())).encode()

        def run() -> None:
            dns_port = server.listeners.port
            post_over_tls(listeners["worker"].port, tls.ca_pem, small)  # starts the worker
            for round_ in range(rounds):
                for name in ("worker", "in-process") if round_ % 2 == 0 else ("in-process", "worker"):
                    worst, took, answer = worst_dns_answer_during(dns_port, listeners[name].port, tls.ca_pem, body)
                    if not answer.startswith(b"HTTP/1.1 200 "):
                        raise RuntimeError(f"{name}: the review was not answered 200: {answer[:200]!r}")
                    results[name].append(worst)
                    print(f"round {round_ + 1} {name:>10}: worst DNS answer {worst * 1000:7.1f} ms, "
                          f"review {took:.2f} s", flush=True)

        def start() -> None:
            top.startService()
            for listener in listeners.values():
                listener.startService()
            deferToThread(run).addErrback(lambda f: outcome.append(f.value)).addBoth(lambda _: stop())

        def stop() -> None:
            pool.close()
            for listener in listeners.values():
                listener.stopService()
            top.stopService()
            reactor.stop()

        reactor.callWhenRunning(start)
        reactor.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if outcome:
        raise outcome[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_stall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per setting, alternating (default 5)")
    args = parser.parse_args(argv)
    results = measure(args.rounds)
    worker, inline = statistics.median(results["worker"]), statistics.median(results["in-process"])
    print(f"median worst DNS answer while the worst review is decided: {worker * 1000:.1f} ms in the worker "
          f"process, {inline * 1000:.1f} ms in the reactor's process ({inline / worker:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
