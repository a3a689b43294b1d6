"""``kubedock-dns explain`` and ``kubedock-dns networks`` on the real bed: pods created through the
real API server (mutated by the webhook), each in its own network namespace with the resolv.conf a
kubelet renders, asking with glibc; the server learns of them from its watch.

For each situation the pod's own lookup (``getent ahosts``, glibc walking its search list) runs
beside the command a user would run (``kubedock-dns explain --from <pod name>``), and the story
must end with what glibc got.  The watch lag histogram must have seen the pods arrive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from testbed import netns
from testbed.bed import DECOY_DB_IP, KUBERNETES_IP, EndToEndBed, new_network_id

pytestmark = [pytest.mark.controlplane, pytest.mark.netns]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bed(control_plane) -> Iterator[EndToEndBed]:
    ok, reason = netns.is_available()
    if not ok:
        pytest.skip(reason)
    with EndToEndBed(control_plane=control_plane, dataplane="netns", namespace_prefix="explain") as b:
        yield b


def command(bed: EndToEndBed, *argv: str) -> subprocess.CompletedProcess[str]:
    """The ``kubedock-dns`` console command, as ``kubectl exec deploy/kubedock-dns --`` runs it."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KUBEDOCK_DNS_OPS=f"http://127.0.0.1:{bed.ops_port}")
    return subprocess.run([sys.executable, "-m", "kubedock_dns", *argv], capture_output=True, text=True,
                          env=env, timeout=60)


def explain(bed: EndToEndBed, pod, name: str, *extra: str) -> dict:
    done = command(bed, "explain", "--from", pod.name, name, "--json", *extra)
    assert done.returncode == 0, done.stderr
    text = command(bed, "explain", "--from", pod.name, name, *extra)
    assert text.returncode == 0 and text.stdout.startswith(f"asker: pod {pod.name} in namespace {bed.namespace}")
    return json.loads(done.stdout)


def ahosts(bed: EndToEndBed, pod, name: str) -> tuple[int, set[str]]:
    rc, out, _ = bed.exec(pod, ["getent", "ahosts", name], timeout=30)
    return rc, {line.split()[0] for line in out.splitlines() if line.strip()}


def test_the_story_ends_with_what_glibc_got(bed: EndToEndBed) -> None:
    """Own network's db (answered at the first search form, never the decoy Service), the other
    run's container (NXDOMAIN at once on every form, never held: glibc fails), an outside name (forwarded,
    the cluster DNS's address), a pod in two networks (the first network with the name wins) and a
    reverse lookup (the peer's name): explain's result equals glibc's every time."""
    net_a, net_b = new_network_id(), new_network_id()
    a_db = bed.create_kubedock_pod("db", [net_a], aliases=["database"], container_name="run-a_db")
    a_app = bed.create_kubedock_pod("app", [net_a])
    b_db = bed.create_kubedock_pod("db", [net_b], container_name="run-b_db")
    both = bed.create_kubedock_pod("both", [net_b, net_a])

    report = explain(bed, a_app, "database")
    assert ahosts(bed, a_app, "database") == (0, {a_db.ip})
    assert report["result"]["records"] == [a_db.ip]
    assert report["result"]["form"] == f"database.{bed.namespace}.svc.cluster.local"
    assert report["asker"]["pods"][0]["networks"] == [net_a]
    assert DECOY_DB_IP not in report["result"]["records"]

    report = explain(bed, a_app, "run-b_db")
    rc, ips = ahosts(bed, a_app, "run-b_db")
    assert (rc, ips) == (2, set())
    assert report["result"]["rcode"] == "NXDOMAIN" and report["result"]["records"] == []
    assert report["forms"][0]["decision"]["rule"] == "NotFound"
    assert {f["name"] for f in report["forms"]} >= {"run-b_db", f"run-b_db.{bed.namespace}.svc.cluster.local"}

    report = explain(bed, a_app, "kubernetes.default")
    assert ahosts(bed, a_app, "kubernetes.default") == (0, {KUBERNETES_IP})
    assert report["result"]["records"] == [KUBERNETES_IP]
    assert report["forms"][0]["decision"]["rule"] == "Forward"

    report = explain(bed, both, "db")
    assert ahosts(bed, both, "db") == (0, {b_db.ip})
    assert report["result"]["records"] == [b_db.ip]
    assert report["forms"][0]["decision"]["network"] == net_b

    assert a_db.ip is not None
    report = explain(bed, a_app, a_db.ip, "--type", "PTR")
    rc, out, _ = bed.exec(a_app, ["getent", "hosts", a_db.ip])
    assert rc == 0 and out.split()[1] == report["result"]["records"][0] == "run-a_db"  # the container name


def test_networks_command_and_watch_lag(bed: EndToEndBed) -> None:
    """`kubedock-dns networks` lists a new network with its pod as soon as glibc resolves it, and
    the watch lag histogram counted the batches that brought the pods."""
    network = new_network_id()
    web = bed.create_kubedock_pod("web", [network], aliases=["frontend"])
    deadline = time.monotonic() + 10
    while True:
        done = command(bed, "networks")
        assert done.returncode == 0, done.stderr
        row = next((line for line in done.stdout.splitlines() if line.startswith(network[:12])), None)
        if row or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row is not None and "frontend" in row and str(web.ip) in row, done.stdout
    inspected = json.loads(command(bed, "networks", network[:12]).stdout)[0]
    assert inspected["Containers"][web.name]["IPv4Address"] == web.ip
    metrics = bed.metrics()
    assert metrics["kubedock_dns_watch_lag_seconds_count"] >= 1
    assert metrics['kubedock_dns_watch_lag_seconds_bucket{le="+Inf"}'] == metrics["kubedock_dns_watch_lag_seconds_count"]
