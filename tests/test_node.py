"""On a real node: kubedock's pods are mutated, started by the real kubelet, and resolve their
network peers (and only those) through the kubedock-dns Service IP programmed by the real
kube-proxy, and cluster names through CoreDNS.

The node (``testbed.node.Node``: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kubelet, kube-proxy, containerd + runc + the bridge CNI, CoreDNS as a pod) is one per session
(fixture ``node`` in conftest.py); it skips only when this machine cannot run one at all (not root,
packages missing, no Go toolchain and nothing cached).  kubedock-dns here is the checkout's code run
as a host process behind a Service (``testbed.node.hostserver``); the chart tier
(``test_node_chart.py``) runs the built image instead.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from testbed.bed import network_id
from testbed.node.cluster import Node, NodeBinaries, find_node_binaries, unavailable_reason
from testbed.node.errors import NodeComponentError, NodeUnavailable
from testbed.node.hostserver import HostKubedockDns


def _addresses(result: Any) -> list[str]:
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.own_node
def test_a_component_that_cannot_start_is_named_with_its_log_and_nothing_is_left() -> None:
    """A kubelet that dies at start-up fails the node with "kubelet", its exit status and its log
    tail (never a bare timeout), and the half-built node is removed entirely."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        real = find_node_binaries()
    except NodeUnavailable as e:
        pytest.skip(str(e))
    scratch = Path(tempfile.mkdtemp(prefix="kubedock-dns-fake-kubelet-"))
    try:
        fake = scratch / "kubelet"
        fake.write_text("#!/bin/sh\necho 'E0000 fake kubelet: refusing to start for this test' >&2\nexit 3\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        node = Node(binaries=NodeBinaries({**real.paths, "kubelet": str(fake)}))
        with pytest.raises(NodeComponentError) as raised:
            node.start()
        message = str(raised.value)
        assert raised.value.component == "kubelet"
        assert "exited with status 3" in message
        assert "fake kubelet: refusing to start for this test" in message
        assert node.leftovers() == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


KILLED_RUN = """
import json, sys, time
from testbed.node.cluster import Node
node = Node(progress=lambda m: print(m, file=sys.stderr, flush=True))
node.start()
namespace = node.create_namespace("killed")
node.create_kubedock_pod(namespace, "web", ["0" * 64], opt_in=False)
print(json.dumps({"run": str(node.run), "bridge": node.bridge}), flush=True)
time.sleep(600)
"""


@pytest.mark.own_node
def test_a_run_killed_outright_is_swept_by_the_next() -> None:
    """A node whose owner is SIGKILLed with a pod running leaves containers, mounts, a pod network
    namespace, kube-proxy's rules and its bridge behind; the next node run finds them by the dead
    owner's state file and removes every one."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        find_node_binaries()
    except NodeUnavailable as e:
        pytest.skip(str(e))
    from testbed.node import host
    from testbed.node.cluster import sweep_stale_runs

    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    owner = subprocess.Popen([sys.executable, "-c", KILLED_RUN], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        line = owner.stdout.readline() if owner.stdout else ""
        assert line, f"the node did not come up (exit status {owner.wait(timeout=60)})"
        state = json.loads(line)
    finally:
        owner.kill()
        owner.wait(timeout=30)
    run, bridge = Path(state["run"]), state["bridge"]
    left = host.leftovers(run, bridge)
    assert any(item.startswith("bridge") for item in left), left
    assert any(item.startswith("process") for item in left), left  # the pod's container and shim
    lock = host.MachineLock(lambda message: None)
    lock.acquire(timeout=600)
    try:
        assert str(run) in sweep_stale_runs()
    finally:
        lock.release()
    assert host.leftovers(run, bridge) == []
    netns_after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    # Only the CNI's pod namespaces (cni-<uuid>) are the node's: other test beds running on the
    # machine at the same time (the stand-in's kd-<pid>-...) come and go on their own.
    assert {name for name in netns_after - netns_before if name.startswith("cni-")} == set()


@pytest.fixture(scope="module")
def served(node: Node) -> Iterator[tuple[Node, str, HostKubedockDns]]:
    """A namespace on the node with kubedock-dns serving it (host process behind a Service)."""
    namespace = node.create_namespace("node-kubedock")
    try:
        with HostKubedockDns(node, namespace) as server:
            yield node, namespace, server
    finally:
        node.delete_namespace(namespace)


@pytest.fixture(scope="module")
def pods(served: tuple[Node, str, HostKubedockDns]) -> dict[str, dict[str, Any]]:
    """Pods as kubedock creates them: ``web`` and ``db`` (alias ``database``) on network A,
    ``other`` on network B, ``plain`` an ordinary workload (no opt-in label)."""
    node, namespace, _ = served
    net_a, net_b = network_id(f"{namespace}-a"), network_id(f"{namespace}-b")
    created = {
        "web": node.create_kubedock_pod(namespace, "web", [net_a], wait=False),
        "db": node.create_kubedock_pod(namespace, "db", [net_a], aliases=["database"], wait=False),
        "other": node.create_kubedock_pod(namespace, "other", [net_b], wait=False),
        "plain": node.create_kubedock_pod(namespace, "plain", [net_a], opt_in=False, wait=False),
    }
    return {key: node.wait_pod_running(namespace, pod["metadata"]["name"]) for key, pod in created.items()}


def test_kubedock_pods_are_mutated_and_get_the_kubelet_written_resolv_conf(
        served: tuple[Node, str, HostKubedockDns], pods: dict[str, dict[str, Any]]) -> None:
    """The webhook points opted-in pods at the kubedock-dns Service IP; the kubelet writes that into
    the container's /etc/resolv.conf, with the cluster search list; a pod without the opt-in label
    keeps the cluster DNS."""
    node, namespace, server = served
    web = pods["web"]
    assert web["spec"]["dnsPolicy"] == "None"
    assert web["spec"]["dnsConfig"]["nameservers"] == [server.service_ip]
    resolv = node.exec(namespace, web["metadata"]["name"], ["cat", "/etc/resolv.conf"])
    assert resolv.returncode == 0, resolv.stderr
    lines = resolv.stdout.splitlines()
    assert f"nameserver {server.service_ip}" in lines
    assert not any(line.startswith("nameserver") and server.service_ip not in line for line in lines)
    assert any(line.startswith("search") and f"{namespace}.svc.cluster.local" in line for line in lines)
    plain = node.exec(namespace, pods["plain"]["metadata"]["name"], ["cat", "/etc/resolv.conf"])
    assert f"nameserver {node.cluster_dns_ip}" in plain.stdout.splitlines()


def test_a_pod_resolves_its_network_peers_through_the_service_ip(
        served: tuple[Node, str, HostKubedockDns], pods: dict[str, dict[str, Any]]) -> None:
    """glibc in the web pod resolves db and its alias to db's pod IP (answered by kubedock-dns via
    the Service IP kube-proxy programs, seeing web's own address)."""
    node, namespace, _ = served
    web, db = pods["web"]["metadata"]["name"], pods["db"]
    for name in ("db", "database"):
        result = node.exec(namespace, web, ["getent", "hosts", name])
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert _addresses(result) == [db["status"]["podIP"]]


def test_another_networks_names_stay_invisible(
        served: tuple[Node, str, HostKubedockDns], pods: dict[str, dict[str, Any]]) -> None:
    """The pod on network B cannot resolve web or db, and web cannot resolve other (exit status 2:
    not found), although all of them are running in the same namespace."""
    node, namespace, _ = served
    other, web = pods["other"]["metadata"]["name"], pods["web"]["metadata"]["name"]
    for asker, name in ((other, "web"), (other, "db"), (web, "other")):
        result = node.exec(namespace, asker, ["getent", "hosts", name])
        assert result.returncode == 2, f"{asker} resolved {name}: {result.stdout}"


def test_cluster_names_are_answered_by_coredns(
        served: tuple[Node, str, HostKubedockDns], pods: dict[str, dict[str, Any]]) -> None:
    """kubernetes.default (through the search list) resolves to the kubernetes Service IP: the
    kubedock-dns Service forwards what is not a container name to CoreDNS behind kube-dns."""
    node, namespace, _ = served
    result = node.exec(namespace, pods["web"]["metadata"]["name"], ["getent", "hosts", "kubernetes.default"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert _addresses(result) == [node.control_plane.service_ip]


# A server in a pod for `kubectl port-forward`: busybox's httpd serving a token, after a log line;
# the shell stays PID 1 and ends at once on SIGTERM (an httpd as PID 1 would ignore it, and the
# pod's deletion would wait out its grace period).
HTTPD = ("/bin/sh", "-c", "mkdir -p /tmp/www && echo \"$0\" > /tmp/www/index.html && echo serving; "
         "trap 'exit 0' TERM; busybox httpd -f -p 8000 -h /tmp/www & wait")


def test_kubectl_exec_logs_and_port_forward_reach_the_pod_through_its_kubelet(
        served: tuple[Node, str, HostKubedockDns], pods: dict[str, dict[str, Any]]) -> None:
    """The API server reaches the node's kubelet (at its InternalIP: the node's name resolves
    nowhere here), so the real ``kubectl exec`` (with standard input), ``kubectl logs`` and
    ``kubectl port-forward`` work as on any cluster.  kubedock's ``docker exec``/``docker cp``,
    Testcontainers' ``execInContainer`` and kubedock's ``--port-forward`` go the same way."""
    import secrets
    import urllib.request

    node, namespace, _ = served
    web, db = pods["web"]["metadata"]["name"], pods["db"]
    looked_up = node.kubectl("-n", namespace, "exec", web, "--", "getent", "hosts", "database")
    assert looked_up.returncode == 0, looked_up.stdout + looked_up.stderr
    assert _addresses(looked_up) == [db["status"]["podIP"]]
    echoed = node.kubectl("-n", namespace, "exec", "-i", web, "--", "cat", input="through stdin\n")
    assert (echoed.returncode, echoed.stdout) == (0, "through stdin\n"), echoed.stderr

    token = secrets.token_hex(8)
    httpd = node.create_kubedock_pod(namespace, "httpd", [network_id(f"{namespace}-a")],
                                     command=(*HTTPD, token))["metadata"]["name"]
    logs = node.kubectl("-n", namespace, "logs", httpd)
    assert (logs.returncode, logs.stdout) == (0, "serving\n"), logs.stderr
    argv, env = node.kubectl_command("-n", namespace, "port-forward", f"pod/{httpd}", "--address", "127.0.0.1",
                                     "0:8000")
    forward = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert forward.stdout is not None
        first = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8000"
        assert first.startswith("Forwarding from 127.0.0.1:"), first + (forward.stderr.read() if forward.poll() else "")
        port = int(first.split("127.0.0.1:", 1)[1].split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline, body = time.monotonic() + 20, ""
        while not body and time.monotonic() < deadline:  # httpd starts just after its log line
            try:
                with opener.open(f"http://127.0.0.1:{port}/", timeout=20) as response:
                    body = response.read().decode().strip()
            except OSError:
                time.sleep(0.2)
        assert body == token
    finally:
        forward.terminate()
        forward.wait(10)
