"""The chart installed for real, on the real node, with the image built here (issue 9, item 3).

A user's path, step by step: the Dockerfile built and pushed to a registry (``testbed.image``:
podman and Debian's docker-registry on loopback), ``helm upgrade --install`` with the defaults and
``image.repository=<registry>/kubedock-dns`` into a namespace labelled
``pod-security.kubernetes.io/enforce: restricted``; containerd pulls the image over plain HTTP; both
replicas run under the restricted profile and become Ready; kubedock's pods (a small image pulled
from the same registry, run as non-root as the profile demands) are mutated by the webhook reached
through its Service, started by the kubelet, and resolve their peers through the chart's Service
via kube-proxy; ``helm upgrade`` rolls both replicas while a pod keeps looking names up, without a
single failed lookup; ``helm uninstall`` (after deleting the webhook configuration, as
docs/install.md says) leaves nothing behind.

The tests in this module run in order and share one release.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

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


@pytest.fixture(scope="module")
def release(node: Node, images: dict[str, str], helm: str) -> Iterator[dict[str, Any]]:
    """``helm upgrade --install`` as docs/install.md says, into a restricted namespace."""
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


INSTALL_GUIDE = REPO / "docs" / "install.md"


def troubleshooting_commands() -> list[str]:
    """Every ``kubectl`` command of docs/install.md's troubleshooting section, as written
    (continuation lines joined, comments dropped)."""
    section = INSTALL_GUIDE.read_text().split("## 7. Troubleshooting", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("kubectl "):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_the_install_guides_troubleshooting_commands_work_through_kubectl(
        node: Node, release: dict[str, Any], images: dict[str, str], tmp_path: Path) -> None:
    """docs/install.md's troubleshooting, command by command through the real kubectl against the
    chart's release (the namespace, pod, address and network put in for the guide's examples):
    ``kubectl exec deploy/kubedock-dns -- kubedock-dns explain|networks`` reach a replica and tell
    the story of the pod's real answer, ``kubectl exec <pod>`` shows its resolv.conf and lookups,
    ``kubectl port-forward deployment/kubedock-dns`` serves the networks page and JSON, and the
    rest (rollout status, logs, custom columns, the server-side dry run) succeeds."""
    namespace = release["namespace"]
    net = network_id(f"{namespace}-guide")
    web = _kubedock_pod(node, namespace, "guide-web", [net], images["pod"])
    db = _kubedock_pod(node, namespace, "db", [net], images["pod"])  # the guide asks for db
    web_name, db_ip = web["metadata"]["name"], db["status"]["podIP"]
    service_ip = node.core.read_namespaced_service(RELEASE, namespace).spec.cluster_ip
    (tmp_path / "pod.yaml").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "guide-dry-run-", "labels": {"kubedock": "true"},
                     "annotations": {"kubedock.network/0": net}},
        "spec": {"securityContext": NON_ROOT,
                 "containers": [{"name": "main", "image": images["pod"], "securityContext": LOCKED_DOWN}]}}))
    # What each command must show besides succeeding (checked where the guide promises it).
    expected = {
        "explain --from <pod> db": [f"answered from network {net[:12]}", db_ip],
        "explain --from <pod> db --type AAAA": ["NODATA"],
        "explain --from <pod> 10.42.0.17 --type PTR": [db["metadata"]["annotations"]["kubedock.containername"]],
        "kubedock-dns networks": [net[:12]],
        "kubedock-dns networks 66b1": [db_ip, web_name],
        "exec <pod> -- getent hosts db": [db_ip],
        "exec <pod> -- cat /etc/resolv.conf": [f"nameserver {service_ip}"],
        "NAMESERVER:.spec.dnsConfig.nameservers'": [web_name],
        "create --dry-run=server -o yaml -f pod.yaml": ["dnsPolicy: None", service_ip],
    }
    commands = troubleshooting_commands()
    assert len(commands) >= 15 and any("port-forward" in c for c in commands), commands
    unchecked = set(expected)
    for command in commands:
        if "port-forward" in command:
            continue  # below: it keeps running
        run = (command.replace("-n kubedock ", f"-n {namespace} ").replace("<pod>", web_name)
               .replace("10.42.0.17", db_ip).replace("networks 66b1", f"networks {net[:4]}")
               .replace("kubedock-dns-kubedock", f"{RELEASE}-{namespace}"))
        run = run.split(" | ")[0].removesuffix(" -f")  # the guide's grep and follow are for people
        argv, env = node.kubectl_command(*shlex.split(run)[1:])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        for key, wanted in expected.items():
            if command.endswith(key):
                unchecked.discard(key)
                for text in wanted:
                    assert text in done.stdout, f"{command}: no {text!r} in\n{done.stdout}"
    assert unchecked == set(), f"the guide no longer has these commands: {unchecked}"

    forward_line = next(c for c in commands if "port-forward" in c)
    assert forward_line.endswith("deployment/kubedock-dns 8080:8080 &"), forward_line
    argv, env = node.kubectl_command("-n", namespace, "port-forward", "deployment/kubedock-dns", "0:8080")
    forward = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert forward.stdout is not None
        first = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8080"
        assert first.startswith("Forwarding from 127.0.0.1:"), first
        port = int(first.split("127.0.0.1:", 1)[1].split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/debug/networks", timeout=20) as response:
            assert web_name in {m["pod"] for m in json.load(response)["networks"][net]}
        with opener.open(f"http://127.0.0.1:{port}/", timeout=20) as response:
            assert net[:12] in response.read().decode()
        listed = subprocess.run([sys.executable, "-m", "kubedock_dns", "--ops", f"http://127.0.0.1:{port}",
                                 "networks"], capture_output=True, text=True, timeout=60, check=False)
        assert listed.returncode == 0 and net[:12] in listed.stdout, listed.stdout + listed.stderr
    finally:
        forward.terminate()
        forward.wait(10)


def test_helm_upgrade_rolls_both_replicas_without_a_failed_lookup(
        node: Node, release: dict[str, Any], images: dict[str, str], helm: str) -> None:
    """While ``helm upgrade`` replaces both replicas (a changed pod template), a pod looks its peer
    up again and again with glibc: every lookup succeeds, also while the old replicas drain and
    stop (they get SIGTERM while kube-proxy still sends them queries), until they are gone."""
    namespace = release["namespace"]
    before = {p.metadata.name for p in _server_pods(node, namespace)}
    net = network_id(f"{namespace}-roll")
    peer = _kubedock_pod(node, namespace, "peer", [net], images["pod"])
    asker = _kubedock_pod(node, namespace, "asker", [net], images["pod"])
    asker_name = asker["metadata"]["name"]
    outcomes: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            result = node.exec(namespace, asker_name, ["getent", "hosts", "peer"], timeout=30)
            outcomes.append((time.monotonic(), result.returncode, result.stdout.strip()))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    try:
        time.sleep(2)
        run_helm(helm, node, *release["install"], "--set", "podAnnotations.rolled=yes")
        # `--wait` returns once the new replicas are ready; the last old one may still be
        # draining: keep asking until every old replica is gone, and a little longer.
        deadline = time.monotonic() + 120
        while before & {p.metadata.name for p in _server_pods(node, namespace)} and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        asking.join(60)
    after = {p.metadata.name for p in _server_pods(node, namespace)}
    assert before.isdisjoint(after) and len(after) == 2, (before, after)
    failed = [o for o in outcomes if o[1] != 0 or o[2].split()[:1] != [peer["status"]["podIP"]]]
    print(f"{len(outcomes)} lookups while rolling, {len(failed)} failed")
    assert len(outcomes) >= 10, outcomes
    assert failed == [], f"{len(failed)} of {len(outcomes)} lookups failed: {failed[:5]}"


def test_helm_uninstall_leaves_nothing_that_blocks_later_pods(
        node: Node, release: dict[str, Any], images: dict[str, str], helm: str) -> None:
    """docs/install.md's uninstall (webhook configuration first, then the release) removes every
    object of the release, and kubedock's pods are created again, unmutated."""
    from kubernetes import client

    namespace = release["namespace"]
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
           if w.metadata.name.startswith(RELEASE)]
    )
    assert remaining == []
    later = node.create_kubedock_pod(namespace, "later", [network_id("later")], image=images["pod"],
                                     command=None, pod_security_context=NON_ROOT,
                                     container_security_context=LOCKED_DOWN)
    assert later["spec"].get("dnsPolicy") != "None"
