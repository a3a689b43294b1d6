"""The chart installed for real, on the real node, from an OCI registry, with the image built here.

A user's path, step by step: the Dockerfile built and pushed to a registry (``testbed.image``:
podman and Debian's docker-registry on loopback); then the README's own ``helm`` lines, run as
written by bash (``REGISTRY`` the loopback registry; a ``helm`` shim adds ``--plain-http`` because
it speaks plain HTTP, and the node's kubeconfig): ``helm package`` and ``helm push`` to
``oci://$REGISTRY/charts``, and ``helm upgrade --install`` from ``oci://`` with
``image.repository=$REGISTRY/kubedock-dns``, into a namespace labelled
``pod-security.kubernetes.io/enforce: restricted``, with the ServiceMonitor and the PrometheusRule on
(the Prometheus Operator's CRDs installed first, as kube-prometheus-stack does).  containerd pulls
the image over plain HTTP; both replicas run under the restricted profile and become Ready;
kubedock's pods (a small image pulled from the same registry, run as non-root as the profile
demands) are mutated by the webhook reached through its Service, started by the kubelet, and
resolve their peers through the chart's Service via kube-proxy.

Monitoring: a real Prometheus server (built from the Go module proxy: Debian's package lacks
Kubernetes service discovery) on this machine finds the replicas through Kubernetes
service discovery (a ServiceAccount token with a namespaced Role, as a Prometheus outside the
cluster is given): through the installed ServiceMonitor, a PodMonitor rendered from the same chart
(both turned into scrape jobs by :mod:`testbed.prometheus`, a stand-in for the operator, which
cannot run here) and the pods' scrape annotations; it loads the installed PrometheusRule.  Scaled to
zero, the replicas' absence makes KubedockDNSDown pending, then firing (and the webhook refuses
kubedock's pods meanwhile); scaled back, the alert clears.

Last, ``helm upgrade`` rolls both replicas while a pod keeps looking names up, without a single
failed lookup, and queries sent straight to each old replica while it drains are all answered;
``helm uninstall`` of a release of its own (after deleting the webhook configuration, as
docs/install.md says) leaves nothing behind.

The tests share one release and run in any order: the rolling upgrade leaves it as it was (two
Ready replicas of the same image), and the uninstall test installs a release of its own.
"""

from __future__ import annotations

import contextlib
import datetime
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
import yaml
from kubernetes import client

from testbed.bed import network_id, wait_webhook_in_force
from testbed.controlplane import BUILD_TOOLS
from testbed.node.cluster import Node

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
README = REPO / "README.md"
RELEASE = "kubedock-dns"
KUBEDOCK_NAMESPACE = "<kubedock-namespace>"  # the README's placeholder
# What the test adds to the README's install line: the monitoring a kube-prometheus-stack user
# turns on, and a bound on --wait.
MONITORING = ("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true")
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


def _helm_env(node: Node) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
            "KUBECONFIG": str(node.control_plane.kubeconfig_path), "HELM_CACHE_HOME": "/tmp/kubedock-dns-helm/cache",
            "HELM_CONFIG_HOME": "/tmp/kubedock-dns-helm/config", "HELM_DATA_HOME": "/tmp/kubedock-dns-helm/data"}


def run_helm(helm: str, node: Node, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=timeout, env=_helm_env(node),
                          check=False)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def readme_commands() -> dict[str, str]:
    """The README's install block ("Using it with kubedock"), continuation lines joined: its
    ``export REGISTRY=... TAG=...`` line, the ``helm package ... && helm push ...`` line and the
    ``helm upgrade --install ...`` line."""
    section = README.read_text().split("## Using it with kubedock", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", "").splitlines()
    found = {"export": [l for l in lines if l.startswith("export REGISTRY=")],
             "publish": [l for l in lines if l.startswith("helm package ")],
             "install": [l for l in lines if l.startswith("helm upgrade --install ")]}
    assert all(len(v) == 1 for v in found.values()), f"README's install block should have one of each: {found}"
    return {k: v[0] for k, v in found.items()}


def helm_shim(directory: Path, helm: str) -> Path:
    """``<directory>/helm``: the real helm, with ``--plain-http`` for the commands that talk to a
    registry (the loopback registry speaks plain HTTP; a registry with TLS needs nothing)."""
    shim = directory / "helm"
    shim.write_text("#!/bin/sh\n"
                    "# The test bed's helm (tests/test_node_chart.py): the loopback registry is plain HTTP.\n"
                    f'case "$1" in push|pull|install|upgrade|show|template) exec {helm} "$@" --plain-http ;; esac\n'
                    f'exec {helm} "$@"\n')
    shim.chmod(0o755)
    return shim


def run_readme(line: str, node: Node, work: Path, registry: str, namespace: str = "", extra: tuple[str, ...] = (),
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run one README line with bash in ``work`` (where ``helm/`` links to the checkout's, so
    ``helm package helm/kubedock-dns`` works as written and writes its archive there), after the
    README's own export line with ``REGISTRY`` pointed at ``registry``."""
    export = readme_commands()["export"]
    export = re.sub(r"REGISTRY=\S+", f"REGISTRY={registry}", export)
    command = line.replace(KUBEDOCK_NAMESPACE, namespace) + "".join(f" '{a}'" for a in extra)
    env = {**_helm_env(node), "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{export}\n{command}"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"README line failed ({done.returncode}): {command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def readme_work(helm: str) -> Iterator[Path]:
    """A scratch directory to run the README's lines in: ``helm/`` links to the checkout's charts,
    ``bin/helm`` is the shim."""
    with tempfile.TemporaryDirectory(prefix="kubedock-dns-readme-") as work:
        (Path(work) / "helm").symlink_to(REPO / "helm")
        (Path(work) / "bin").mkdir()
        helm_shim(Path(work) / "bin", helm)
        yield Path(work)


@pytest.fixture(scope="module")
def chart_ref(node: Node, images: dict[str, str], readme_work: Path) -> dict[str, str]:
    """The chart packaged and pushed to the registry by the README's line, as an OCI artifact."""
    tag = re.search(r"TAG=(\S+)", readme_commands()["export"]).group(1)  # type: ignore[union-attr]
    run_readme(readme_commands()["publish"], node, readme_work, images["registry"])
    assert (readme_work / f"kubedock-dns-{tag}.tgz").exists()
    return {"ref": f"oci://{images['registry']}/charts/kubedock-dns", "version": tag}


@contextlib.contextmanager
def installed(node: Node, images: dict[str, str], chart_ref: dict[str, str],
              readme_work: Path) -> Iterator[dict[str, Any]]:
    """The README's ``helm upgrade --install`` from ``oci://``, into a new restricted namespace,
    with the ServiceMonitor and PrometheusRule on (their CRDs installed first); ``install(*extra)``
    runs it again (an upgrade)."""
    from testbed.prometheus import CrdsUnavailable, install_crds, operator_crds

    try:
        install_crds(node.api_client, operator_crds())
    except CrdsUnavailable as e:
        pytest.skip(str(e))
    namespace = node.create_namespace("kubedock", labels=RESTRICTED)

    def install(*extra: str) -> subprocess.CompletedProcess[str]:
        try:
            return run_readme(readme_commands()["install"], node, readme_work, images["registry"], namespace,
                              (*MONITORING, "--timeout", "5m", *extra))
        except AssertionError as e:
            raise AssertionError(f"{e}\n{node.pod_logs(namespace, 'app.kubernetes.io/name=kubedock-dns')}") from None

    try:
        install()
        yield {"namespace": namespace, "install": install}
    finally:
        node.delete_namespace(namespace)


@pytest.fixture(scope="module")
def release(node: Node, images: dict[str, str], chart_ref: dict[str, str],
            readme_work: Path) -> Iterator[dict[str, Any]]:
    """The release the module's tests share."""
    with installed(node, images, chart_ref, readme_work) as shared:
        yield shared


def _server_pods(node: Node, namespace: str) -> list[Any]:
    return list(node.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/name=kubedock-dns").items)


def _opted_in_probe(image: str) -> dict[str, Any]:
    """A kubedock pod to create as a dry run (stored nowhere): what the webhook does to it shows."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "webhook-probe-", "labels": {"kubedock": "true"},
                         "annotations": {"kubedock.network/0": network_id("webhook-probe")}},
            "spec": {"securityContext": NON_ROOT,
                     "containers": [{"name": "main", "image": image, "securityContext": LOCKED_DOWN}]}}


def _kubedock_pod(node: Node, namespace: str, name: str, networks: list[str], image: str) -> dict[str, Any]:
    # `helm --wait` says the replicas are Ready; the API server reaches the webhook through its
    # Service, which may lag behind them (endpoints, kube-proxy rules): prove the webhook answers
    # there with a dry-run pod (stored nowhere) before creating one.
    wait_webhook_in_force(node.core, namespace, _opted_in_probe(image), None, lambda message: None, timeout=60)
    pod = node.create_kubedock_pod(namespace, name, networks, image=image, command=None,
                                   pod_security_context=NON_ROOT, container_security_context=LOCKED_DOWN)
    return pod


def test_the_chart_came_from_the_oci_registry(
        node: Node, release: dict[str, Any], chart_ref: dict[str, str], images: dict[str, str], helm: str) -> None:
    """The README's ``helm push`` stored the chart in the registry as an OCI artifact (Helm's
    chart media types), and the release runs that chart version: Helm recorded the chart it
    installed from ``oci://``, the same one ``helm show chart`` reads from the registry."""
    port = images["registry"].rsplit(":", 1)[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/charts/kubedock-dns/manifests/{chart_ref['version']}",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        manifest = json.load(response)
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.helm.config.v1+json"
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.cncf.helm.chart.content.v1.tar+gzip"]
    shown = yaml.safe_load(run_helm(helm, node, "show", "chart", chart_ref["ref"], "--version", chart_ref["version"],
                                    "--plain-http").stdout)
    listed = json.loads(run_helm(helm, node, "list", "--namespace", release["namespace"], "--output", "json").stdout)
    assert [(r["name"], r["chart"]) for r in listed] == [(RELEASE, f"kubedock-dns-{chart_ref['version']}")]
    assert shown["version"] == chart_ref["version"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]


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


# --- monitoring: a real Prometheus through Kubernetes service discovery ----------------------------


@pytest.fixture(scope="module")
def prometheus(node: Node, release: dict[str, Any], helm: str, chart_ref: dict[str, str]) -> Iterator[Any]:
    """A Prometheus server on this machine, given what a Prometheus outside the cluster gets: the
    API server's URL and CA, and a ServiceAccount token whose Role lets it list and watch pods,
    Services, Endpoints and EndpointSlices in the release namespace.  Jobs: the installed
    ServiceMonitor, a PodMonitor rendered from the same chart (release and namespace), the pods'
    scrape annotations, and Prometheus itself; rules: the installed PrometheusRule."""
    from kubernetes import client

    from testbed.prometheus import (Prometheus, PrometheusUnavailable, annotation_job, find_prometheus,
                                    pod_monitor_jobs, service_monitor_jobs)

    try:
        binary = find_prometheus()
    except PrometheusUnavailable as e:
        pytest.skip(str(e))
    namespace = release["namespace"]
    monitoring = node.create_namespace("monitoring")
    try:
        node.core.create_namespaced_service_account(monitoring, {"metadata": {"name": "prometheus"}})
        rbac: Any = client.RbacAuthorizationV1Api(node.api_client)
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "prometheus-discovery"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "services", "endpoints"], "verbs": ["get", "list", "watch"]},
                      {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "prometheus-discovery"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "prometheus-discovery"},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": monitoring}]})
        token = node.core.create_namespaced_service_account_token(
            "prometheus", monitoring, {"spec": {"expirationSeconds": 3600}}).status.token
        custom: Any = client.CustomObjectsApi(node.api_client)
        service_monitor = custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace,
                                                              "servicemonitors", RELEASE)
        rule = custom.get_namespaced_custom_object("monitoring.coreos.com", "v1", namespace, "prometheusrules", RELEASE)
        rendered = run_helm(helm, node, "template", RELEASE, chart_ref["ref"], "--version", chart_ref["version"],
                            "--plain-http", "--namespace", namespace, "--set", "metrics.podMonitor.enabled=true").stdout
        (pod_monitor,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "PodMonitor"]
        with tempfile.TemporaryDirectory(prefix="kubedock-dns-prometheus-") as work:
            token_file, rules_file = Path(work) / "token", Path(work) / "kubedock-dns.rules.yaml"
            token_file.write_text(token)
            token_file.chmod(0o600)
            rules_file.write_text(yaml.safe_dump(rule["spec"]))
            sd = (node.control_plane.url, node.control_plane.ca_path, token_file)
            jobs = [*service_monitor_jobs(service_monitor, *sd), *pod_monitor_jobs(pod_monitor, *sd),
                    annotation_job("kubernetes-pods", *sd, namespaces=[namespace])]
            with Prometheus(binary, jobs, [rules_file], work, scrape_itself=True) as prom:
                yield prom
    finally:
        node.delete_namespace(monitoring)


def _jobs_and_pods(results: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["metric"].get("job", ""), r["metric"].get("pod", "")) for r in results}


def _up_targets(prom: Any) -> set[tuple[str, str]]:
    return {(t["labels"]["job"], t["labels"].get("pod", "")) for t in prom.targets() if t["health"] == "up"}


def test_prometheus_scrapes_every_replica_found_through_kubernetes(
        node: Node, release: dict[str, Any], prometheus: Any) -> None:
    """Each way of finding the replicas (the ServiceMonitor's endpoints of the metrics Service, the
    PodMonitor's pod port, the scrape annotations) gives exactly the two replicas as targets that
    are up, labelled with namespace and pod, and each reports its index synced."""
    namespace = release["namespace"]
    pods = {p.metadata.name for p in _server_pods(node, namespace)}
    jobs = {f"{RELEASE}-metrics", f"{namespace}/{RELEASE}", "kubernetes-pods"}
    want = {(job, pod) for job in jobs for pod in pods}
    up = prometheus.wait_for("every replica up in every job", lambda: _up_targets(prometheus) >= want and want,
                             timeout=120)
    assert {t for t in up if t[0] in jobs} == want, (up, prometheus.targets())
    synced = prometheus.wait_for(
        "kubedock_dns_synced from every target",
        lambda: [r for r in prometheus.query(f'kubedock_dns_synced{{namespace="{namespace}"}} == 1')
                 if (r["metric"]["job"], r["metric"]["pod"]) in want], timeout=60)
    assert _jobs_and_pods(synced) == want
    assert {r["metric"]["service"] for r in synced if r["metric"]["job"] == f"{RELEASE}-metrics"} == {f"{RELEASE}-metrics"}


def test_prometheus_reads_the_labelled_metrics_of_this_build(
        node: Node, release: dict[str, Any], prometheus: Any) -> None:
    """Through the ServiceMonitor's job, Prometheus has every replica's build_info with the
    version of kubedock_dns/__init__.py (the image was built from this tree), and the DNS replies
    and admission reviews as labelled series an admin can ``sum by``."""
    import kubedock_dns

    namespace = release["namespace"]
    pods = {p.metadata.name for p in _server_pods(node, namespace)}
    job = f"{RELEASE}-metrics"
    info = prometheus.wait_for(
        "kubedock_dns_build_info from every replica",
        lambda: [r for r in prometheus.query(
            f'kubedock_dns_build_info{{namespace="{namespace}", job="{job}", version="{kubedock_dns.__version__}"}} == 1')
            if r["metric"]["pod"] in pods], timeout=120)
    assert {r["metric"]["pod"] for r in info} == pods
    assert all(r["metric"]["python"] and r["metric"]["twisted"] for r in info), info
    outcomes = prometheus.query(f'sum by (outcome) (kubedock_dns_responses_total{{namespace="{namespace}", job="{job}"}})')
    assert {r["metric"]["outcome"] for r in outcomes} >= {"answered", "nxdomain", "forwarded", "upstream_failed"}
    types = prometheus.query(f'sum by (proto, type) (kubedock_dns_requests_total{{namespace="{namespace}", job="{job}"}})')
    assert {(r["metric"]["proto"], r["metric"]["type"]) for r in types} >= {("udp", "A"), ("tcp", "AAAA"), ("udp", "other")}
    reviews = prometheus.query(f'sum by (outcome) (kubedock_dns_admission_reviews_total{{namespace="{namespace}", job="{job}"}})')
    assert {r["metric"]["outcome"] for r in reviews} == {"allowed", "patched", "denied", "rejected", "unavailable"}


def test_every_rule_loads_and_nothing_fires_while_replicas_serve(
        node: Node, release: dict[str, Any], prometheus: Any) -> None:
    """The installed PrometheusRule loads into Prometheus: every rule is evaluated without error,
    every alert carries its runbook link, and none is active once Prometheus has seen both
    replicas serve.  (Before their first scrape KubedockDNSDown is rightly pending: nothing was
    known to serve; so the test waits for the scrape, then for every rule's next evaluation.)"""
    shipped = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    names = {r["alert"] for g in shipped["groups"] for r in g["rules"]}

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        done = [r for r in rules if r["health"] == "ok" and not r["lastEvaluation"].startswith("0001")]
        return rules if len(done) == len(rules) == len(names) else []

    rules = prometheus.wait_for("every rule evaluated", evaluated, timeout=60)
    assert {r["name"] for r in rules} == names
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert rule["annotations"]["runbook_url"].startswith("https://"), rule["name"]
    namespace = release["namespace"]
    pods = {p.metadata.name for p in _server_pods(node, namespace)}
    prometheus.wait_for(
        "every replica scraped synced and not draining",
        lambda: pods <= {r["metric"].get("pod") for r in prometheus.query(
            f'kubedock_dns_synced{{namespace="{namespace}"}} == 1 '
            f'unless on (job, instance) kubedock_dns_draining == 1')}, timeout=120)
    seen_serving = time.time()

    def evaluated_since() -> bool:
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        return bool(rules) and all(_rfc3339_seconds(r["lastEvaluation"]) > seen_serving + 1 for r in rules)

    prometheus.wait_for("every rule evaluated after both replicas were seen serving", evaluated_since, timeout=60)
    assert [a for a in prometheus.alerts() if a["labels"]["alertname"] in names] == []


def _rfc3339_seconds(stamp: str) -> float:
    """Seconds since the epoch of Prometheus' RFC 3339 time stamps (nanoseconds cut to micro)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
    return seconds + float(f"0.{fraction or 0}")


def test_dashboard_memory_and_cpu_show_only_kubedock_dns(release: dict[str, Any], prometheus: Any) -> None:
    """The dashboard's memory and CPU queries with "All" selected return the replicas' processes
    and not Prometheus' own, which the same Prometheus scrapes (positive control: the unscoped
    metric has it)."""
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "process_" in t["expr"]]
    assert len(exprs) == 2
    unscoped = prometheus.wait_for("Prometheus' own process metrics",
                                   lambda: prometheus.query('process_resident_memory_bytes{job="prometheus"}'), 60)
    assert unscoped
    for expr in exprs:
        concrete = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$pod", ".*")
        results = prometheus.wait_for(f"samples for {concrete}", lambda: prometheus.query(concrete), timeout=60)
        assert {r["metric"]["job"] for r in results} <= {f"{RELEASE}-metrics", f"{release['namespace']}/{RELEASE}",
                                                         "kubernetes-pods"}, results
        assert {r["metric"]["namespace"] for r in results} == {release["namespace"]}


def _down_alert(prometheus: Any, namespace: str) -> dict[str, Any] | None:
    for alert in prometheus.alerts():
        if alert["labels"]["alertname"] == "KubedockDNSDown" and alert["labels"].get("namespace") == namespace:
            return dict(alert)
    return None


def _scale(node: Node, namespace: str, replicas: int) -> None:
    from kubernetes import client

    apps: Any = client.AppsV1Api(node.api_client)
    apps.patch_namespaced_deployment_scale(RELEASE, namespace, {"spec": {"replicas": replicas}})


def test_nothing_serving_alert_fires_when_scaled_to_zero_and_clears(
        node: Node, release: dict[str, Any], prometheus: Any, images: dict[str, str]) -> None:
    """The Deployment scaled to zero: KubedockDNSDown for the namespace goes pending while the
    replicas drain and vanish, then firing after its minute (meanwhile the webhook refuses a
    kubedock pod: the outage the alert is about); scaled back to two, the alert clears once a
    replica is ready again."""
    from kubernetes.client.exceptions import ApiException

    namespace = release["namespace"]
    assert _down_alert(prometheus, namespace) is None  # positive control: serving, no alert
    began = time.monotonic()
    _scale(node, namespace, 0)
    try:
        pending = prometheus.wait_for("KubedockDNSDown pending", lambda: _down_alert(prometheus, namespace), 60)
        assert pending["state"] == "pending" and pending["labels"]["severity"] == "critical", pending
        pending_after = time.monotonic() - began
        # Once the replicas are gone the API server cannot reach the webhook: a kubedock pod is
        # refused (asked as a dry run, so that no pod is left behind).
        deadline = time.monotonic() + 90
        while _server_pods(node, namespace) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _server_pods(node, namespace) == []
        with pytest.raises(ApiException) as refused:
            node.core.create_namespaced_pod(namespace, body=_opted_in_probe(images["pod"]), dry_run="All")
        assert "failed calling webhook" in str(refused.value.body), refused.value.body
        firing = prometheus.wait_for(
            "KubedockDNSDown firing",
            lambda: (a := _down_alert(prometheus, namespace)) is not None and a["state"] == "firing" and a, 150)
        firing_after = time.monotonic() - began
        assert firing["annotations"]["summary"] == f"no kubedock-dns replica is ready in namespace {namespace}"
        assert firing_after >= 60, "the alert must hold for its minute before firing"
    finally:
        _scale(node, namespace, 2)
    node.wait_deployment_ready(namespace, RELEASE, timeout=180)
    prometheus.wait_for("KubedockDNSDown cleared", lambda: _down_alert(prometheus, namespace) is None or None, 60)
    cleared_after = time.monotonic() - began
    print(f"KubedockDNSDown: pending after {pending_after:.0f} s, firing after {firing_after:.0f} s, "
          f"cleared {cleared_after:.0f} s after scaling to zero")
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
            helm=release["install"]("--set", "podAnnotations.rolled=yes")), daemon=True)
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
def own_release(node: Node, images: dict[str, str], chart_ref: dict[str, str],
                readme_work: Path) -> Iterator[dict[str, Any]]:
    """A release of its own, for the test that uninstalls it (the shared one stays)."""
    with installed(node, images, chart_ref, readme_work) as mine:
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
