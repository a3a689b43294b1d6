"""The chart installed for real, on the real node, with the image built here (issue 9, item 3).

A user's path, step by step: the Dockerfile built and pushed to a registry (``testbed.image``:
podman and Debian's docker-registry on loopback), ``helm upgrade --install`` with the defaults and
``image.repository=<registry>/kubedock-dns`` into a namespace labelled
``pod-security.kubernetes.io/enforce: restricted``; containerd pulls the image over plain HTTP; both
replicas run under the restricted profile and become Ready; kubedock's pods (a small image pulled
from the same registry, run as non-root as the profile demands) are mutated by the webhook reached
through its Service, started by the kubelet, and resolve their peers through the chart's Service
via kube-proxy; ``helm upgrade`` rolls both replicas while a pod keeps looking names up, without a
single failed lookup, and queries sent straight to each old replica while it drains are all
answered; ``helm uninstall`` (after deleting the webhook configuration, as docs/install.md says)
leaves nothing behind.

The tests share one release and run in any order: the rolling upgrade leaves it as it was (two
Ready replicas of the same image), and the uninstall test installs a release of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from kubernetes import client

from testbed.bed import network_id, wait_webhook_in_force
from testbed.controlplane import BUILD_TOOLS
from testbed.node.cluster import Node

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
RELEASE = "kubedock-dns"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
# What the restricted profile demands of kubedock's pods in that namespace too.
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
            "seccompProfile": {"type": "RuntimeDefault"}}
LOCKED_DOWN = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@pytest.fixture(scope="module")
def images(node: Node) -> Iterator[dict[str, str]]:
    """kubedock-dns' image (the repository's Dockerfile) and the test pod image, pushed to a
    registry on loopback that containerd pulls from over plain HTTP."""
    try:
        from testbed.image import Podman, PodmanUnavailable, Registry, kubedock_dns_image, test_pod_image
    except ImportError as e:  # pragma: no cover - testbed.image is part of this repository
        raise AssertionError(f"testbed.image is missing: {e}") from e
    try:
        podman = Podman()
    except PodmanUnavailable as e:
        pytest.skip(f"no image builder here: {e}")
    with tempfile.TemporaryDirectory(prefix="kubedock-dns-registry-") as storage, Registry(storage) as registry:
        assert node.containerd is not None
        node.containerd.add_registry(registry.address)
        yield {"registry": registry.address,
               "server": kubedock_dns_image(podman, registry.address),
               "pod": test_pod_image(podman, registry.address)}


@pytest.fixture(scope="module")
def helm() -> str:
    done = subprocess.run(["bash", str(BUILD_TOOLS), "helm"], capture_output=True, text=True,
                          timeout=3600, check=False)
    assert done.returncode == 0, f"build-tools.sh helm failed:\n{done.stderr[-2000:]}"
    return done.stdout.split()[-1]


def run_helm(helm: str, node: Node, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
           "KUBECONFIG": str(node.control_plane.kubeconfig_path), "HELM_CACHE_HOME": "/tmp/kubedock-dns-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/kubedock-dns-helm/config", "HELM_DATA_HOME": "/tmp/kubedock-dns-helm/data"}
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@contextlib.contextmanager
def installed(node: Node, images: dict[str, str], helm: str) -> Iterator[dict[str, Any]]:
    """``helm upgrade --install`` as docs/install.md says, into a new restricted namespace."""
    namespace = node.create_namespace("kubedock", labels=RESTRICTED)
    install = ["upgrade", "--install", RELEASE, str(CHART), "--namespace", namespace,
               "--set", f"image.repository={images['registry']}/kubedock-dns", "--wait", "--timeout", "5m"]
    try:
        try:
            run_helm(helm, node, *install)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{node.pod_logs(namespace, 'app.kubernetes.io/name=kubedock-dns')}") from None
        yield {"namespace": namespace, "install": install}
    finally:
        node.delete_namespace(namespace)


@pytest.fixture(scope="module")
def release(node: Node, images: dict[str, str], helm: str) -> Iterator[dict[str, Any]]:
    """The release the module's tests share."""
    with installed(node, images, helm) as shared:
        yield shared


def _server_pods(node: Node, namespace: str) -> list[Any]:
    return list(node.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/name=kubedock-dns").items)


def _kubedock_pod(node: Node, namespace: str, name: str, networks: list[str], image: str) -> dict[str, Any]:
    # `helm --wait` says the replicas are Ready; the API server reaches the webhook through its
    # Service, which may lag behind them (endpoints, kube-proxy rules): prove the webhook answers
    # there with a dry-run pod (stored nowhere) before creating one.
    probe = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"generateName": "webhook-probe-", "labels": {"kubedock": "true"},
                          "annotations": {"kubedock.network/0": network_id("webhook-probe")}},
             "spec": {"securityContext": NON_ROOT,
                      "containers": [{"name": "main", "image": image, "securityContext": LOCKED_DOWN}]}}
    wait_webhook_in_force(node.core, namespace, probe, None, lambda message: None, timeout=60)
    pod = node.create_kubedock_pod(namespace, name, networks, image=image, command=None,
                                   pod_security_context=NON_ROOT, container_security_context=LOCKED_DOWN)
    return pod


def test_both_replicas_run_the_pulled_image_under_the_restricted_profile(
        node: Node, release: dict[str, Any], images: dict[str, str]) -> None:
    """Two replicas, Running and Ready, from the image containerd pulled from the registry, in a
    namespace whose Pod Security admission enforces "restricted" (it would have refused them)."""
    namespace = release["namespace"]
    pods = _server_pods(node, namespace)
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
        (status,) = pod.status.container_statuses
        assert status.image == images["server"] or status.image.endswith(images["server"].split("/", 1)[1])
    assert node.containerd is not None
    assert images["server"] in node.containerd.images()  # pulled by containerd, not imported
    labels = node.core.read_namespace(namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kubedock_pods_resolve_peers_through_the_charts_service(
        node: Node, release: dict[str, Any], images: dict[str, str]) -> None:
    """The webhook, reached by the API server through the chart's Service, points kubedock's pods
    at the chart's DNS Service; through kube-proxy they resolve their peers, not another network's
    names, and cluster names via CoreDNS (the server's run-time upstream)."""
    namespace = release["namespace"]
    service_ip = node.core.read_namespaced_service(RELEASE, namespace).spec.cluster_ip
    net_a, net_b = network_id(f"{namespace}-a"), network_id(f"{namespace}-b")
    web = _kubedock_pod(node, namespace, "web", [net_a], images["pod"])
    db = _kubedock_pod(node, namespace, "db", [net_a], images["pod"])
    other = _kubedock_pod(node, namespace, "other", [net_b], images["pod"])
    assert web["spec"]["dnsConfig"]["nameservers"] == [service_ip]
    web_name = web["metadata"]["name"]
    resolv = node.exec(namespace, web_name, ["cat", "/etc/resolv.conf"])
    assert f"nameserver {service_ip}" in resolv.stdout.splitlines()
    # Lookups run as the pod's own user, as `kubectl exec` would (restricted: not root).
    assert node.exec(namespace, web_name, ["id", "-u"]).stdout.split() == [str(NON_ROOT["runAsUser"])]
    found = node.exec(namespace, web_name, ["getent", "hosts", "db"])
    assert found.returncode == 0, found.stdout + found.stderr
    assert found.stdout.split()[0] == db["status"]["podIP"]
    hidden = node.exec(namespace, other["metadata"]["name"], ["getent", "hosts", "db"])
    assert hidden.returncode == 2, hidden.stdout
    cluster = node.exec(namespace, web_name, ["getent", "hosts", "kubernetes.default"])
    assert cluster.returncode == 0, cluster.stdout + cluster.stderr
    assert cluster.stdout.split()[0] == node.control_plane.service_ip


# Asks for one name straight at each address given (a replica's pod IP, port 5353) every
# 0.1 s until /tmp/stop-aiming exists; one line per query: the time it was sent, the address,
# "ok" for an answer with records, else why not.  Standard library only (the test pod's python3).
AIM = """
import os, random, socket, struct, sys, threading, time
name, targets = sys.argv[1], sys.argv[2:]
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0\\0\\1\\0\\1"

def aim(target):  # one thread per address: a silent one does not slow the others down
    while not os.path.exists("/tmp/stop-aiming"):
        qid = random.randrange(65536)
        sent = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            try:
                s.sendto(struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + question, (target, 5353))
                reply = s.recv(2048)
                ok = reply[:2] == struct.pack("!H", qid) and reply[3] & 15 == 0 and reply[6:8] != b"\\0\\0"
                outcome = "ok" if ok else "bad-reply"
            except OSError as e:
                outcome = type(e).__name__
        print(f"{sent:.3f} {target} {outcome}", flush=True)
        time.sleep(0.1)

threads = [threading.Thread(target=aim, args=(t,)) for t in targets]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def _rfc3339(stamp: Any) -> float:
    """A Kubernetes timestamp (whole seconds) as a Unix time."""
    return float(stamp.timestamp())


def test_helm_upgrade_rolls_both_replicas_without_a_failed_lookup(
        node: Node, release: dict[str, Any], images: dict[str, str], helm: str) -> None:
    """While ``helm upgrade`` replaces both replicas (a changed pod template), a pod looks its peer
    up again and again with glibc through the Service: every lookup succeeds, also while the old
    replicas drain and stop (they get SIGTERM while kube-proxy still sends them queries), until
    they are gone.

    Through the Service only some lookups meet a stopping replica, so a broken drain often went
    unseen (docs record a control run without the drain with 0 failures in 225 lookups).  So the
    same pod also asks each old replica directly, at its pod IP, throughout: every such question
    sent from when the replica was told to stop (its deletionTimestamp minus the grace period,
    whole seconds: from one second after) until its drain ends (drainSeconds after, minus half a
    second) must be answered, and there must be at least five of them per replica.  Without the
    drain a replica stops answering within a second of SIGTERM and most of them fail."""
    namespace = release["namespace"]
    old = {p.metadata.name: p.status.pod_ip for p in _server_pods(node, namespace)}
    net = network_id(f"{namespace}-roll")
    peer = _kubedock_pod(node, namespace, "peer", [net], images["pod"])
    asker = _kubedock_pod(node, namespace, "asker", [net], images["pod"])
    asker_name = asker["metadata"]["name"]
    deployment: Any = client.AppsV1Api(node.api_client).read_namespaced_deployment(RELEASE, namespace)
    pod_spec = deployment.spec.template.spec
    grace = pod_spec.termination_grace_period_seconds
    drain = next(float(a.split("=", 1)[1]) for a in pod_spec.containers[0].args if a.startswith("--drain-seconds="))
    outcomes: list[tuple[float, int, str]] = []
    stop = threading.Event()
    aimed: dict[str, Any] = {}
    stopping: dict[str, float] = {}  # old replica -> when it was told to stop (Unix time, upper bound)

    def ask() -> None:
        while not stop.is_set():
            result = node.exec(namespace, asker_name, ["getent", "hosts", "peer"], timeout=30)
            outcomes.append((time.monotonic(), result.returncode, result.stdout.strip()))

    def aim() -> None:
        aimed["done"] = node.exec(namespace, asker_name, ["python3", "-c", AIM, "peer", *old.values()],
                                  timeout=600)

    def answered_through_the_service(after: float) -> int:
        return sum(1 for at, rc, _ in list(outcomes) if at > after and rc == 0)

    node.exec(namespace, asker_name, ["rm", "-f", "/tmp/stop-aiming"])
    threads = [threading.Thread(target=ask, daemon=True), threading.Thread(target=aim, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        started = time.monotonic()
        # The event that the asker is asking: lookups through the Service have been answered.
        while answered_through_the_service(started) < 3:
            assert time.monotonic() - started < 120 and threads[0].is_alive(), outcomes
            time.sleep(0.1)
        upgrade = threading.Thread(target=lambda: aimed.update(
            helm=run_helm(helm, node, *release["install"], "--set", "podAnnotations.rolled=yes")), daemon=True)
        upgrade.start()
        # Until every old replica is gone: note when each was told to stop.
        deadline = time.monotonic() + 600
        while True:
            current = {p.metadata.name: p for p in _server_pods(node, namespace)}
            for name, pod in current.items():
                if name in old and pod.metadata.deletion_timestamp and name not in stopping:
                    stopping[name] = _rfc3339(pod.metadata.deletion_timestamp) - grace + 1
            if upgrade.is_alive() is False and not set(old) & set(current):
                break
            assert time.monotonic() < deadline, (list(current), stopping)
            time.sleep(0.1)
        upgrade.join()
        assert "helm" in aimed, "helm upgrade failed (its output is above)"
        # A few more lookups after the last old replica is gone: the new ones answer too.
        gone = time.monotonic()
        while answered_through_the_service(gone) < 3:
            assert time.monotonic() - gone < 120 and threads[0].is_alive(), outcomes
            time.sleep(0.1)
    finally:
        stop.set()
        node.exec(namespace, asker_name, ["touch", "/tmp/stop-aiming"])
        for thread in threads:
            thread.join(60)
    after = {p.metadata.name for p in _server_pods(node, namespace)}
    assert set(old).isdisjoint(after) and len(after) == 2, (old, after)
    failed = [o for o in outcomes if o[1] != 0 or o[2].split()[:1] != [peer["status"]["podIP"]]]
    print(f"{len(outcomes)} lookups through the Service while rolling, {len(failed)} failed")
    assert len(outcomes) >= 10, outcomes
    assert failed == [], f"{len(failed)} of {len(outcomes)} lookups failed: {failed[:5]}"

    assert set(stopping) == set(old), (stopping, old)
    lines = [line.split() for line in aimed["done"].stdout.splitlines() if line.count(" ") == 2]
    for name, ip in old.items():
        told = stopping[name]
        before_stop = [o for t, target, o in lines if target == ip and float(t) < told - 1]
        draining = [o for t, target, o in lines if target == ip and told <= float(t) <= told - 1 + drain - 0.5]
        print(f"{name}: {len(draining)} questions aimed at it while it drained, "
              f"{sum(o != 'ok' for o in draining)} unanswered")
        assert "ok" in before_stop, (name, before_stop[-5:])  # the aimed path works at all
        assert all(o == "ok" for o in draining), (name, drain, draining)
        assert len(draining) >= 5, (name, told, lines[-20:])


@pytest.fixture
def own_release(node: Node, images: dict[str, str], helm: str) -> Iterator[dict[str, Any]]:
    """A release of its own, for the test that uninstalls it (the shared one stays)."""
    with installed(node, images, helm) as mine:
        yield mine


def test_helm_uninstall_leaves_nothing_that_blocks_later_pods(
        node: Node, own_release: dict[str, Any], images: dict[str, str], helm: str) -> None:
    """docs/install.md's uninstall (webhook configuration first, then the release) removes every
    object of the release, and kubedock's pods are created again, unmutated."""
    namespace = own_release["namespace"]
    admission: Any = client.AdmissionregistrationV1Api(node.api_client)
    admission.delete_mutating_webhook_configuration(f"{RELEASE}-{namespace}")
    run_helm(helm, node, "uninstall", RELEASE, "--namespace", namespace, "--wait")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    deadline = time.monotonic() + 60
    while _server_pods(node, namespace) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _server_pods(node, namespace) == []
    apps: Any = client.AppsV1Api(node.api_client)
    rbac: Any = client.RbacAuthorizationV1Api(node.api_client)
    remaining = (
        [d.metadata.name for d in apps.list_namespaced_deployment(namespace, label_selector=selector).items]
        + [s.metadata.name for s in node.core.list_namespaced_service(namespace, label_selector=selector).items]
        + [s.metadata.name for s in node.core.list_namespaced_secret(namespace, label_selector=selector).items]
        + [r.metadata.name for r in rbac.list_namespaced_role(namespace, label_selector=selector).items]
        + [w.metadata.name for w in admission.list_mutating_webhook_configuration().items
           if w.metadata.name == f"{RELEASE}-{namespace}"]  # this release's (the shared one's stays)
    )
    assert remaining == []
    later = node.create_kubedock_pod(namespace, "later", [network_id("later")], image=images["pod"],
                                     command=None, pod_security_context=NON_ROOT,
                                     container_security_context=LOCKED_DOWN)
    assert later["spec"].get("dnsPolicy") != "None"
