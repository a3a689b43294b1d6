"""The Helm chart ``helm/kubedock-dns``: what a cluster admin relies on when installing it.

Every documented option is linted and rendered with the real ``helm`` (built by
``scripts/build-tools.sh helm`` into the cache), and the rendered objects are checked for the
properties the chart promises: a restricted security context, least-privilege namespaced RBAC, a
webhook that only ever sees kubedock's pods in its own namespace and never collides with another
install, a Service mapping 53 and 443 to the unprivileged ports, and a webhook certificate that
stays the same across upgrades.  The ``controlplane`` tests hand every rendered object to the real
test API server (server-side dry-run apply) and run ``helm install`` + ``helm upgrade`` against it,
where ``lookup`` is live, and start kubedock-dns with the chart's arguments and certificate
behind the chart's webhook configuration to see kubedock's pods mutated for real.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from testbed.ports import wait_for_ports

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
BUILD_TOOLS = REPO / "scripts" / "build-tools.sh"

# Every option the twistd plugin accepts (kubedock_dns/options.py); the chart may pass no other.
PLUGIN_OPTIONS = {
    "--dns-port", "--dns-interface", "--resolv-conf", "--upstream", "--ttl", "--hold-timeout",
    "--forward-timeout", "--max-forwards", "--namespace", "--kubeconfig", "--opt-in-label",
    "--require-ready", "--pods-file", "--webhook-port", "--webhook-interface", "--tls-cert",
    "--tls-key", "--dns-service-ip", "--dns-service-name", "--cluster-domain", "--ndots",
    "--ops-port", "--ops-interface", "--forward-single-label", "--unresolved-network",
    "--network-policies", "--isolation-policy", "--kubedock-pod-selector", "--drain-seconds",
    "--log-format", "--log-level",
    "--testcontainers-sshd-image",
    "--review-timeout",
}

# The documented options (values.yaml / docs/install.md), each rendered and linted.
OPTIONS: dict[str, list[str]] = {
    "default": [],
    "cert-manager": ["--set", "certManager.enabled=true"],
    "cert-manager-issuer": [
        "--set", "certManager.enabled=true",
        "--set", "certManager.issuerRef.name=corp-ca", "--set", "certManager.issuerRef.kind=ClusterIssuer",
    ],
    "failure-policy-ignore": ["--set", "webhook.failurePolicy=Ignore"],
    "fixed-cluster-ip": ["--set", "service.clusterIP=10.96.0.53"],
    "one-replica": ["--set", "replicaCount=1"],
    "three-replicas": ["--set", "replicaCount=3"],
    "long-drain": ["--set", "drainSeconds=45", "--set", "terminationGracePeriodSeconds=60"],
    "upstreams": ["--set", "dns.upstreams={10.96.0.10,9.9.9.9:53}", "--set", "dns.requireReady=true"],
    "custom-opt-in-label": ["--set", "optInLabel=example.com/kubedock"],
    "docker-fidelity": ["--set", "dns.forwardSingleLabel=true",
                        "--set", "dns.unresolvedNetworks={" + "ab" * 32 + ",0123456789ab}",
                        "--set", "dns.testcontainersSshdImages={registry.example.com/team/sshd,testcontainers/sshd:1.4.0}"],
    "network-policies": ["--set", "networkPolicies.enabled=true",
                         "--set", "networkPolicies.kubedockPodSelector.app\\.kubernetes\\.io/name=kubedock",
                         "--set", "networkPolicies.kubedockPodSelector.tier=ci"],
    "service-monitor": ["--set", "metrics.serviceMonitor.enabled=true",
                        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
                        "--set", "metrics.serviceMonitor.interval=30s", "--set", "metrics.serviceMonitor.scrapeTimeout=10s",
                        "--set-json", 'metrics.serviceMonitor.metricRelabelings=[{"action": "drop", '
                                      '"sourceLabels": ["__name__"], "regex": "python_gc_.*"}]',
                        "--set", "metrics.prometheusRule.enabled=true",
                        "--set", "metrics.scrapeAnnotations.enabled=false"],
    "pod-monitor": ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.interval=1m",
                    "--set-json", 'metrics.podMonitor.relabelings=[{"targetLabel": "cluster", "replacement": "ci"}]',
                    "--set", "metrics.service.enabled=false", "--set", "metrics.scrapeAnnotations.enabled=false"],
    "pinned-digest": ["--set", f"image.digest=sha256:{'ab' * 32}"],
    "zone-spread": ["--set-json", 'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": '
                                  '"topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]'],
    "platform-assigned-ids": ["--set", "podSecurityContext.runAsUser=null", "--set", "podSecurityContext.runAsGroup=null",
                              "--set", "podSecurityContext.fsGroup=null", "--set", "securityContext.runAsUser=null",
                              "--set", "securityContext.runAsGroup=null"],
    "common-labels": ["--set-string", "commonLabels.team=ci", "--set-string", "commonLabels.cost-center=42"],
    "json-logs": ["--set", "logFormat=json"],
    "warnings-only": ["--set", "logLevel=warn"],
}

CERT_MANAGER_KINDS = {"Certificate", "Issuer", "ClusterIssuer"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # testbed.prometheus.MONITORING_KINDS


# --- helm --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: $HELM, else the cached build (built on first use).  Skips only when no
    Go toolchain and no cached binary exist."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    result = subprocess.run(
        ["bash", str(BUILD_TOOLS), "helm"], capture_output=True, text=True, timeout=1800
    )
    lines = result.stdout.strip().splitlines()
    path = lines[-1] if lines else ""
    if path and os.access(path, os.X_OK):
        return path
    if not _have_go():
        pytest.skip(f"helm cannot be built: no Go toolchain and no cached binary ({result.stderr[-300:]})")
    raise AssertionError(f"scripts/build-tools.sh helm failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _have_go() -> bool:
    from shutil import which

    return which("go") is not None


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stderr}"
    return result


def render(
    helm: str, *args: str, release: str = "kd", namespace: str = "kubedock"
) -> list[dict[str, Any]]:
    """``helm template`` output as a list of objects."""
    out = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def dns_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Service kubedock's pods use as nameserver (not the metrics Service)."""
    found = [o for o in objects if o["kind"] == "Service"
             and o["metadata"]["labels"].get("app.kubernetes.io/component") != "metrics"]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def metrics_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == "Service"
             and o["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics"]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def args_of(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The container's ``--option=value`` arguments as option -> values."""
    parsed: dict[str, list[str]] = {}
    for arg in container(objects)["args"]:
        option, _, value = arg.partition("=")
        parsed.setdefault(option, []).append(value)
    return parsed


@pytest.fixture(scope="module")
def default(helm: str) -> list[dict[str, Any]]:
    return render(helm)


# --- lint and render every option ---------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_lint_and_template_every_documented_option(helm: str, option: str) -> None:
    """``helm lint --strict`` passes and ``helm template`` renders for the defaults and for every
    documented option; the chart passes the DNS server only options it knows."""
    lint = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", "kubedock", *OPTIONS[option])
    assert "0 chart(s) failed" in lint.stdout
    objects = render(helm, *OPTIONS[option])
    assert set(args_of(objects)) <= PLUGIN_OPTIONS
    for obj in objects:
        if obj["kind"] != "MutatingWebhookConfiguration":
            assert obj["metadata"]["namespace"] == "kubedock"


def test_default_objects_are_namespaced_except_the_webhook(default: list[dict[str, Any]]) -> None:
    """The default install creates exactly these objects; the only cluster-scoped one is the
    webhook configuration (no ClusterRole, no CRD)."""
    assert sorted(o["kind"] for o in default) == sorted([
        "Deployment", "MutatingWebhookConfiguration", "PodDisruptionBudget", "Role", "RoleBinding",
        "Secret", "Service", "Service", "ServiceAccount",
    ])


# --- the Deployment ------------------------------------------------------------------------------


def test_restricted_security_context(default: list[dict[str, Any]]) -> None:
    """Pod and container meet the "restricted" Pod Security Standard: non-root, read-only root
    filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp."""
    pod = one(default, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    sc = container(default)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    for port in container(default)["ports"]:
        assert port["containerPort"] >= 1024, "an unprivileged user cannot bind below 1024"


def test_deployment_stays_available(default: list[dict[str, Any]]) -> None:
    """Two replicas that prefer different nodes, a rolling update that never removes a replica
    before its successor is ready, a PDB keeping one, readiness on /readyz and liveness on /healthz
    on the ops port; a stopping replica drains (not ready, still answering) well within the
    kubelet's grace period."""
    deployment = one(default, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 1
    (drain,) = args_of(default)["--drain-seconds"]
    assert 0 < float(drain) < spec["template"]["spec"]["terminationGracePeriodSeconds"]
    term = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = one(default, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]
    c = container(default)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == 8080
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert spec["template"]["spec"]["dnsPolicy"] == "ClusterFirst"


@pytest.mark.parametrize("timeout", [1, 5, 30])
def test_a_review_is_answered_before_the_api_server_gives_up(helm: str, timeout: int) -> None:
    """The server's review deadline (past it: 503, the failure policy applies, the worker is
    replaced) is below the webhook's timeoutSeconds, whatever that is set to, and the server
    accepts it."""
    from kubedock_dns.options import Options

    objects = render(helm, "--set", f"webhook.timeoutSeconds={timeout}")
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    [deadline] = args_of(objects)["--review-timeout"]
    assert 0 < float(deadline) < webhook["timeoutSeconds"] == timeout
    options = Options()
    options.parseOptions(["--upstream", "10.0.0.1", "--namespace", "ns", "--review-timeout", deadline])
    assert options.config().review_timeout == float(deadline)


def test_arguments_wire_ports_tls_and_namespace(default: list[dict[str, Any]]) -> None:
    """The server listens where the Service and probes point, reads the certificate from the
    mounted Secret, serves the release namespace and finds its address through its own Service."""
    args = args_of(default)
    assert args["--dns-port"] == ["5353"] and args["--webhook-port"] == ["8443"] and args["--ops-port"] == ["8080"]
    assert args["--namespace"] == ["kubedock"]
    assert args["--opt-in-label"] == ["kubedock"]
    assert args["--dns-service-name"] == [dns_service(default)["metadata"]["name"]]
    assert "--dns-service-ip" not in args
    assert "--upstream" not in args  # the pod's resolv.conf (ClusterFirst: the cluster DNS) is used
    pod = one(default, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in container(default)["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == one(default, "Secret")["metadata"]["name"]
    assert args["--tls-cert"] == [mount["mountPath"] + "/tls.crt"]
    assert args["--tls-key"] == [mount["mountPath"] + "/tls.key"]
    assert pod["serviceAccountName"] == one(default, "ServiceAccount")["metadata"]["name"]


def test_service_maps_dns_and_webhook_ports(default: list[dict[str, Any]]) -> None:
    """Port 53 over UDP and TCP reaches the DNS server's port 5353, port 443 the webhook's 8443,
    and the Service selects exactly the Deployment's pods."""
    service = dns_service(default)
    deployment = one(default, "Deployment")
    named = {p["name"]: p["containerPort"] for p in container(default)["ports"]}
    ports = {(p["port"], p["protocol"]): named[p["targetPort"]] for p in service["spec"]["ports"]}
    assert ports == {(53, "UDP"): 5353, (53, "TCP"): 5353, (443, "TCP"): 8443}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert "clusterIP" not in service["spec"]


# --- monitoring -------------------------------------------------------------------------------


def test_metrics_service_exposes_only_the_ops_port(default: list[dict[str, Any]]) -> None:
    """By default a second Service carries the ops port (port ``metrics``, 8080, to the container's
    ``ops`` port, where /metrics is served) for the Deployment's pods; only it has the label
    ``app.kubernetes.io/component: metrics`` a ServiceMonitor selects, and the DNS Service does not
    expose the ops port."""
    service = metrics_service(default)
    named = {p["name"]: p["containerPort"] for p in container(default)["ports"]}
    assert [(p["name"], p["port"], named[p["targetPort"]]) for p in service["spec"]["ports"]] == [("metrics", 8080, 8080)]
    assert service["spec"]["selector"] == one(default, "Deployment")["spec"]["selector"]["matchLabels"]
    assert service["metadata"]["name"] == dns_service(default)["metadata"]["name"] + "-metrics"
    assert "app.kubernetes.io/component" not in dns_service(default)["metadata"]["labels"]
    assert 8080 not in [p["port"] for p in dns_service(default)["spec"]["ports"]]


def test_metrics_service_name_stays_a_dns_label(helm: str) -> None:
    """A 63-character full name still gives a metrics Service name of at most 63 characters."""
    long_name = "k" * 63
    objects = render(helm, "--set", f"fullnameOverride={long_name}")
    name = metrics_service(objects)["metadata"]["name"]
    assert len(name) <= 63 and name.endswith("-metrics")


def test_pods_carry_scrape_annotations_unless_turned_off(helm: str, default: list[dict[str, Any]]) -> None:
    """The pods announce their metrics the way annotation-driven Prometheus configurations read
    them (scrape, port of /metrics, path); podAnnotations can override one; turned off, none."""
    annotations = one(default, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    assert 8080 in [p["containerPort"] for p in container(default)["ports"]]
    overridden = render(helm, "--set-string", "podAnnotations.prometheus\\.io/scrape=false",
                        "--set-string", "podAnnotations.team=ci")
    annotations = one(overridden, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "ci"
    off = render(helm, "--set", "metrics.scrapeAnnotations.enabled=false")
    assert "annotations" not in one(off, "Deployment")["spec"]["template"]["metadata"]


def test_service_monitor_selects_exactly_the_metrics_service(helm: str, default: list[dict[str, Any]]) -> None:
    """Off by default.  Enabled, the ServiceMonitor (with the labels the Prometheus looks for)
    selects the metrics Service and not the DNS Service, in the release namespace only, scrapes
    its ``metrics`` port at /metrics with the interval, timeout and relabelings given."""
    assert not [o for o in default if o["kind"] in MONITORING_KINDS]
    objects = render(helm, *OPTIONS["service-monitor"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s["metadata"]["name"] for s in objects if s["kind"] == "Service"
                and selector.items() <= s["metadata"]["labels"].items()]
    assert selected == [metrics_service(objects)["metadata"]["name"]]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubedock"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in metrics_service(objects)["spec"]["ports"]]
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("/metrics", "30s", "10s")
    assert endpoint["metricRelabelings"] == [{"action": "drop", "sourceLabels": ["__name__"], "regex": "python_gc_.*"}]
    assert "relabelings" not in endpoint


def test_pod_monitor_scrapes_the_pods_ops_port(helm: str) -> None:
    """The PodMonitor selects the Deployment's pods by their selector labels and scrapes the
    container port named in it (the ops port, /metrics); it needs no Service."""
    objects = render(helm, *OPTIONS["pod-monitor"])
    monitor = one(objects, "PodMonitor")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubedock"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports[endpoint["port"]] == 8080 and endpoint["path"] == "/metrics" and endpoint["interval"] == "1m"
    assert endpoint["relabelings"] == [{"targetLabel": "cluster", "replacement": "ci"}]
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics")]


@pytest.mark.parametrize("options, message", [
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"],
     "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true"),
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"],
     "metrics.serviceMonitor.enabled needs metrics.service.enabled"),
])
def test_monitor_settings_that_cannot_work_are_refused(helm: str, options: list[str], message: str) -> None:
    """Both Prometheus Operator monitors at once (every series scraped twice), or a ServiceMonitor
    without the Service it selects (no target at all): rendering fails saying so."""
    result = run_helm(helm, "template", "kd", str(CHART), *options, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --- the usual knobs ------------------------------------------------------------------------------


def test_image_digest_pins_the_image(helm: str, default: list[dict[str, Any]]) -> None:
    """By default the image is <repository>:<appVersion>; with ``image.digest`` it is pulled by
    digest and the tag no longer counts."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(default)["image"] == f"localhost:5000/kubedock-dns:{chart['appVersion']}"
    digest = f"sha256:{'ab' * 32}"
    pinned = render(helm, *OPTIONS["pinned-digest"], "--set", "image.tag=moved")
    assert container(pinned)["image"] == f"localhost:5000/kubedock-dns@{digest}"


def test_topology_spread_constraints_get_the_pod_selector(helm: str, default: list[dict[str, Any]]) -> None:
    """None by default; a constraint without labelSelector gets the Deployment's pod selector (a
    constraint counting no pod would spread nothing), one with its own keeps it."""
    assert "topologySpreadConstraints" not in one(default, "Deployment")["spec"]["template"]["spec"]
    deployment = one(render(helm, *OPTIONS["zone-spread"]), "Deployment")
    (constraint,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint == {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                          "whenUnsatisfiable": "ScheduleAnyway",
                          "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}
    own = {"matchLabels": {"tier": "dns"}}
    deployment = one(render(helm, "--set-json", 'topologySpreadConstraints=[{"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", '
                                                '"whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"tier": "dns"}}}]'),
                     "Deployment")
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"] == own


def test_security_contexts_can_leave_the_ids_to_the_platform(helm: str, default: list[dict[str, Any]]) -> None:
    """The fixed uid/gid 10001 can be changed (a platform's uid range) or dropped (a platform that
    assigns them, like OpenShift's restricted SCC); every other hardening setting stays."""
    pod = one(default, "Deployment")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (10001, 10001)
    ranged = render(helm, "--set", "podSecurityContext.runAsUser=1000700000", "--set", "securityContext.runAsUser=1000700000")
    pod = one(ranged, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1000700000 == container(ranged)["securityContext"]["runAsUser"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assigned = render(helm, *OPTIONS["platform-assigned-ids"])
    pod_sc = one(assigned, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    sc = container(assigned)["securityContext"]
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & (set(pod_sc) | set(sc))
    assert pod_sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False


def test_common_labels_reach_every_object_but_no_selector(helm: str, default: list[dict[str, Any]]) -> None:
    """``commonLabels`` label every object the chart creates and the pods; selectors stay as they
    are, so changing them never orphans a running pod."""
    objects = render(helm, *OPTIONS["common-labels"])
    for obj in objects:
        assert {"team": "ci", "cost-center": "42"}.items() <= obj["metadata"]["labels"].items(), obj["kind"]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ci"
    assert deployment["spec"]["selector"] == one(default, "Deployment")["spec"]["selector"]
    assert dns_service(objects)["spec"]["selector"] == dns_service(default)["spec"]["selector"]


@pytest.mark.parametrize("options, message", [
    (["--set-string", "commonLabels.app\\.kubernetes\\.io/name=other"],
     "commonLabels.app.kubernetes.io/name: the chart sets this label itself"),
    (["--set-string", "commonLabels.helm\\.sh/chart=x"], "commonLabels.helm.sh/chart: the chart sets this label itself"),
    (["--set-string", "podLabels.app\\.kubernetes\\.io/instance=x"],
     "podLabels/commonLabels.app.kubernetes.io/instance: the Deployment selects its pods by this label"),
    (["--set-string", "commonLabels.kubedock=true"], "commonLabels.kubedock=true would opt kubedock-dns' own pods in"),
])
def test_labels_that_would_break_the_release_are_refused(helm: str, options: list[str], message: str) -> None:
    """A common or pod label replacing one the chart sets (a selector label would orphan the
    pods), or opting the server's own pods in: rendering fails naming the label."""
    result = run_helm(helm, "template", "kd", str(CHART), *options, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_log_format_reaches_the_server(helm: str, default: list[dict[str, Any]]) -> None:
    """``logFormat`` and ``logLevel`` become the server's ``--log-format`` and ``--log-level``
    (text and info by default)."""
    assert (args_of(default)["--log-format"], args_of(default)["--log-level"]) == (["text"], ["info"])
    assert args_of(render(helm, *OPTIONS["json-logs"]))["--log-format"] == ["json"]
    assert args_of(render(helm, *OPTIONS["warnings-only"]))["--log-level"] == ["warn"]


# --- RBAC --------------------------------------------------------------------------------------


def test_rbac_is_least_privilege(default: list[dict[str, Any]]) -> None:
    """The Role allows exactly get/list/watch on pods and get on its own Service by name, bound to
    its own ServiceAccount in its namespace; nothing cluster-scoped."""
    role = one(default, "Role")
    service_name = dns_service(default)["metadata"]["name"]
    rules = sorted(
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])), tuple(r.get("resourceNames", ())))
        for r in role["rules"]
    )
    assert rules == [
        (("",), ("pods",), ("get", "list", "watch"), ()),
        (("",), ("services",), ("get",), (service_name,)),
    ]
    binding = one(default, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": one(default, "ServiceAccount")["metadata"]["name"], "namespace": "kubedock"}
    ]
    assert not [o for o in default if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_fixed_cluster_ip_needs_no_access_to_services(helm: str) -> None:
    """With ``service.clusterIP`` the Service gets that address, the server is told it directly,
    and the Role loses its one rule on Services."""
    objects = render(helm, *OPTIONS["fixed-cluster-ip"])
    assert dns_service(objects)["spec"]["clusterIP"] == "10.96.0.53"
    args = args_of(objects)
    assert args["--dns-service-ip"] == ["10.96.0.53"] and "--dns-service-name" not in args
    assert [r["resources"] for r in one(objects, "Role")["rules"]] == [["pods"]]


# --- the webhook configuration ------------------------------------------------------------------


def test_webhook_sees_only_kubedock_pods_of_its_namespace(default: list[dict[str, Any]]) -> None:
    """The webhook matches CREATE and UPDATE of pods, in its own namespace only, labelled with the
    opt-in label = "true"; it is side-effect free, short, fails closed by default and calls the
    Service on 443 at /mutate."""
    config = one(default, "MutatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    assert webhook["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kubedock"}}
    assert webhook["objectSelector"] == {"matchLabels": {"kubedock": "true"}}
    assert webhook["rules"] == [{
        "operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
        "resources": ["pods"], "scope": "Namespaced",
    }]
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert 1 <= webhook["timeoutSeconds"] <= 10
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["clientConfig"]["service"] == {
        "namespace": "kubedock", "name": dns_service(default)["metadata"]["name"], "path": "/mutate", "port": 443,
    }


def test_webhook_never_matches_its_own_pods(default: list[dict[str, Any]]) -> None:
    """kubedock-dns' own pods lack the opt-in label, so the API server never asks the webhook
    about them: a failing webhook cannot keep its own replacement from starting."""
    (webhook,) = one(default, "MutatingWebhookConfiguration")["webhooks"]
    labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = webhook["objectSelector"]["matchLabels"]
    assert not all(labels.get(k) == v for k, v in selector.items())


def test_custom_opt_in_label_reaches_selector_and_server(helm: str) -> None:
    """A different opt-in label is used by both the webhook's objectSelector and the server."""
    objects = render(helm, *OPTIONS["custom-opt-in-label"])
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["objectSelector"] == {"matchLabels": {"example.com/kubedock": "true"}}
    assert args_of(objects)["--opt-in-label"] == ["example.com/kubedock"]


def test_webhook_failure_policy_ignore(helm: str) -> None:
    """``webhook.failurePolicy=Ignore`` is passed through (pods start unmodified in an outage)."""
    (webhook,) = one(render(helm, *OPTIONS["failure-policy-ignore"]), "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"


def test_installs_never_collide(helm: str) -> None:
    """The cluster-scoped webhook configuration (and its webhook) carries release and namespace:
    a second release in the same namespace, or the same release name in another namespace, gets
    a different name and so never overwrites the first install's."""
    names = {}
    for release, namespace in [("kd", "team-a"), ("kd", "team-b"), ("other", "team-a")]:
        config = one(render(helm, release=release, namespace=namespace), "MutatingWebhookConfiguration")
        name = config["metadata"]["name"]
        assert release in name and namespace in name
        names[(release, namespace)] = (name, config["webhooks"][0]["name"])
    assert len({n for n, _ in names.values()}) == 3


# --- replicas ----------------------------------------------------------------------------------


def test_replica_count(helm: str) -> None:
    """``replicaCount`` sets the replicas; a single replica gets no PDB (minAvailable 1 would block
    every node drain), more replicas keep the PDB."""
    single = render(helm, *OPTIONS["one-replica"])
    assert one(single, "Deployment")["spec"]["replicas"] == 1
    assert not [o for o in single if o["kind"] == "PodDisruptionBudget"]
    three = render(helm, *OPTIONS["three-replicas"])
    assert one(three, "Deployment")["spec"]["replicas"] == 3
    assert one(three, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


@pytest.mark.parametrize("upstream", ["10.96.0.10", "10.96.0.10:5353", "[fd00::10]:53", "fd00::10"])
def test_schema_accepts_every_upstream_form_the_server_takes(helm: str, upstream: str) -> None:
    """dns.upstreams entries are IP addresses with an optional port, IPv6 in brackets."""
    from kubedock_dns.dns.upstreams import parse_upstream

    parse_upstream(upstream)
    args = args_of(render(helm, "--set-json", f'dns.upstreams=["{upstream}"]'))
    assert args["--upstream"] == [upstream]


def test_upstreams_and_require_ready(helm: str) -> None:
    """Configured upstreams become repeated ``--upstream`` options; ``dns.requireReady`` the flag."""
    args = args_of(render(helm, *OPTIONS["upstreams"]))
    assert args["--upstream"] == ["10.96.0.10", "9.9.9.9:53"]
    assert args["--require-ready"] == [""]


def test_single_label_and_unresolved_network_options(helm: str, default: list[dict[str, Any]]) -> None:
    """By default missing single-label names are NXDOMAIN, every network resolves and the sshd
    image is Testcontainers' own; ``dns.forwardSingleLabel``, ``dns.unresolvedNetworks`` and
    ``dns.testcontainersSshdImages`` become the server's options."""
    assert "--forward-single-label" not in args_of(default)
    assert "--unresolved-network" not in args_of(default)
    assert "--testcontainers-sshd-image" not in args_of(default)
    args = args_of(render(helm, *OPTIONS["docker-fidelity"]))
    assert args["--forward-single-label"] == [""]
    assert args["--unresolved-network"] == ["ab" * 32, "0123456789ab"]
    assert args["--testcontainers-sshd-image"] == ["registry.example.com/team/sshd", "testcontainers/sshd:1.4.0"]


def test_network_policies_are_off_by_default_and_complete_when_on(helm: str, default: list[dict[str, Any]]) -> None:
    """Off: no NetworkPolicy, no networkpolicies permission, no option.  On: the isolation policy
    (every opted-in pod, ingress only from kubedock's pods), the permission the server needs to
    keep per-network policies, and the options naming that policy and kubedock's labels."""
    assert not [o for o in default if o["kind"] == "NetworkPolicy"]
    assert not [r for r in one(default, "Role")["rules"] if "networkpolicies" in r["resources"]]
    assert "--network-policies" not in args_of(default)
    objects = render(helm, *OPTIONS["network-policies"])
    policy = one(objects, "NetworkPolicy")
    kubedock = {"app.kubernetes.io/name": "kubedock", "tier": "ci"}
    assert policy["spec"] == {"podSelector": {"matchLabels": {"kubedock": "true"}}, "policyTypes": ["Ingress"],
                              "ingress": [{"from": [{"podSelector": {"matchLabels": kubedock}}]}]}
    [rule] = [r for r in one(objects, "Role")["rules"] if "networkpolicies" in r["resources"]]
    assert rule["apiGroups"] == ["networking.k8s.io"] and "resourceNames" not in rule
    assert sorted(rule["verbs"]) == ["create", "delete", "get", "list", "update"]
    args = args_of(objects)
    assert args["--network-policies"] == [""]
    assert args["--isolation-policy"] == [policy["metadata"]["name"]]
    assert args["--kubedock-pod-selector"] == ["app.kubernetes.io/name=kubedock,tier=ci"]
    closed = one(render(helm, "--set", "networkPolicies.enabled=true"), "NetworkPolicy")
    assert closed["spec"]["ingress"] == []


# --- TLS --------------------------------------------------------------------------------------


def _decode(data: str) -> bytes:
    return base64.b64decode(data)


def test_generated_certificate_is_trusted_for_the_service(default: list[dict[str, Any]]) -> None:
    """The caBundle given to the API server is the CA in the mounted Secret, and the serving
    certificate is signed by it, valid now, for the Service's in-cluster DNS name."""
    from cryptography import x509

    secret = one(default, "Secret")
    (webhook,) = one(default, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(_decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(_decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    service = dns_service(default)["metadata"]["name"]
    assert f"{service}.kubedock.svc" in sans
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert secret["type"] == "kubernetes.io/tls"


def test_explicit_tls_values_are_kept_across_upgrades(helm: str, default: list[dict[str, Any]], tmp_path: Path) -> None:
    """A second render of an upgrade that is given the existing CA, certificate and key (as a
    values file) keeps exactly them: the caBundle and the Secret do not change, so the API server
    keeps trusting the running replicas while the Deployment rolls.  Without them every render
    would mint a new CA, which is what makes this check meaningful."""
    first = one(default, "Secret")["data"]
    values = tmp_path / "tls.yaml"
    values.write_text(yaml.safe_dump({"tls": {
        "caCert": _decode(first["ca.crt"]).decode(),
        "cert": _decode(first["tls.crt"]).decode(),
        "key": _decode(first["tls.key"]).decode(),
    }}))
    upgrades = [render(helm, "-f", str(values)) for _ in range(2)]
    for upgrade in upgrades:
        assert one(upgrade, "Secret")["data"] == first
        (webhook,) = one(upgrade, "MutatingWebhookConfiguration")["webhooks"]
        assert webhook["clientConfig"]["caBundle"] == first["ca.crt"]
    fresh = render(helm)
    assert one(fresh, "Secret")["data"]["ca.crt"] != first["ca.crt"]


def test_pod_labels_that_would_opt_the_server_in_are_refused(helm: str) -> None:
    """podLabels carrying the opt-in label would make the webhook point kubedock-dns' own pods
    at their own Service (a forwarding loop): rendering fails and says which label to remove.
    Other pod labels, and the opt-in label with another value, are fine."""
    result = run_helm(helm, "template", "kd", str(CHART), "--set-string", "podLabels.kubedock=true", check=False)
    assert result.returncode != 0
    assert "podLabels.kubedock=true would opt kubedock-dns' own pods in" in result.stderr
    custom = run_helm(helm, "template", "kd", str(CHART), "--set", "optInLabel=example.com/kd",
                      "--set-string", "podLabels.example\\.com/kd=true", check=False)
    assert custom.returncode != 0 and "podLabels.example.com/kd=true" in custom.stderr
    fine = render(helm, "--set-string", "podLabels.team=qa", "--set-string", "podLabels.kubedock=false")
    labels = one(fine, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "qa" and labels["kubedock"] == "false"


def test_a_grace_period_that_would_cut_the_drain_short_is_refused(helm: str) -> None:
    """terminationGracePeriodSeconds not above drainSeconds would let the kubelet kill a replica
    mid-drain: rendering fails naming both values; drainSeconds 0 (stop at once) renders."""
    result = run_helm(helm, "template", "kd", str(CHART), "--set", "drainSeconds=40", check=False)
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds (30) must be larger than drainSeconds (40)" in result.stderr
    assert args_of(render(helm, "--set", "drainSeconds=0"))["--drain-seconds"] == ["0"]
    longer = render(helm, "--set", "drainSeconds=40", "--set", "terminationGracePeriodSeconds=60")
    assert one(longer, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


def test_partial_tls_values_are_refused(helm: str) -> None:
    """Giving only some of tls.caCert/cert/key fails with a message naming all three."""
    result = run_helm(helm, "template", "kd", str(CHART), "--set", "tls.cert=abc", check=False)
    assert result.returncode != 0
    assert "tls.caCert, tls.cert and tls.key" in result.stderr


def test_cert_manager_replaces_generated_certificate(helm: str) -> None:
    """With cert-manager the chart renders no Secret and no caBundle; a Certificate writes the
    Secret the Deployment mounts, and the webhook's inject-ca-from annotation names it."""
    objects = render(helm, *OPTIONS["cert-manager"])
    assert not [o for o in objects if o["kind"] == "Secret"]
    config = one(objects, "MutatingWebhookConfiguration")
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    certificates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    namespace, _, name = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].partition("/")
    assert namespace == "kubedock"
    serving = certificates[name]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert serving["spec"]["secretName"] == next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    service = dns_service(objects)["metadata"]["name"]
    assert f"{service}.kubedock.svc" in serving["spec"]["dnsNames"]
    issuers = {o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"}
    assert serving["spec"]["issuerRef"]["name"] in issuers

    external = render(helm, *OPTIONS["cert-manager-issuer"])
    assert not [o for o in external if o["kind"] == "Issuer"]
    (serving,) = [o for o in external if o["kind"] == "Certificate"]
    assert serving["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


@pytest.mark.parametrize("bad", [
    "webhook.failurePolicy=Sometimes",
    "webhook.timeoutSeconds=60",
    "replicaCount=0",
    "service.clusterIP=not-an-ip",
    "no.such.value=1",
    "dns.unresolvedNetworks={bridge}",
    "dns.testcontainersSshdImages={Team/Sshd}",
    "dns.upstreams={not-an-ip}",
    "dns.upstreams={10.96.0.10:99999}",
    "dns.upstreams={dns.example:53}",
    "dns.upstreams={10.96.0.300}",
    "dns.upstreams={[fd00::10]53}",
    "drainSeconds=-1",
    "terminationGracePeriodSeconds=0",
    "image.digest=latest",
    "image.digest=sha256:abc",
    "topologySpreadConstraints=zone",
    "podSecurityContext.runAsUser=root",
    "podSecurityContext.runAsUser=-1",
    "podSecurityContext.seccompProfile.type=Lenient",
    "securityContext.privileged=yes",
    "securityContext.readOnlyRootFilesytem=true",
    "commonLabels={team}",
    "commonLabels.cost-center=42",
    "logFormat=xml",
    "logLevel=warning",
    "logLevel=",
    "metrics.serviceMonitor.enabled=maybe",
    "metrics.serviceMonitor.interval=soon",
    "metrics.podMonitor.scrapeTimeout=10",
    "metrics.podMonitor.labels={release}",
    "metrics.service.enabled=1",
    "metrics.scrapeAnnotations=true",
])
def test_schema_refuses_bad_values(helm: str, bad: str) -> None:
    """values.schema.json catches misspelt or out-of-range values before anything is applied."""
    result = run_helm(helm, "template", "kd", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0 and "schema" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("bad", [
    'topologySpreadConstraints=[{"maxSkew": "one", "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}]',
    'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone"}]',
    'securityContext={"capabilities": {"drop": "ALL"}}',
    'metrics.serviceMonitor.relabelings={"action": "drop"}',
])
def test_schema_refuses_bad_structures(helm: str, bad: str) -> None:
    """Wrong types inside the structured knobs (a string skew, a constraint missing a required
    field, a string where a list belongs) fail before anything is applied."""
    result = run_helm(helm, "template", "kd", str(CHART), "--set-json", bad, check=False)
    assert result.returncode != 0 and "schema" in result.stderr.lower(), result.stderr


# --- against the real API server ------------------------------------------------------------------


def _apply_dry_run(dynamic: Any, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    """Server-side dry-run apply; an unknown field is an error (fieldValidation=Strict), not a
    warning."""
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    kwargs = {"namespace": namespace} if resource.namespaced else {}
    return resource.server_side_apply(
        body=obj, name=obj["metadata"]["name"], field_manager="kubedock-dns-chart-test",
        dry_run="All", query_params=[("fieldValidation", "Strict")], **kwargs,
    ).to_dict()


@pytest.fixture(scope="session")
def monitoring_crds(control_plane: Any) -> None:
    """The Prometheus Operator's CRDs installed on the test control plane (once per session)."""
    from testbed.prometheus import CrdsUnavailable, install_crds, operator_crds

    try:
        crds = operator_crds()
    except CrdsUnavailable as e:
        pytest.skip(str(e))
    api_client = control_plane.api_client()
    try:
        install_crds(api_client, crds)
    finally:
        api_client.close()


@pytest.fixture
def dynamic(control_plane: Any) -> Iterator[Any]:
    from kubernetes.dynamic import DynamicClient

    api_client = control_plane.api_client()
    try:
        yield DynamicClient(api_client)
    finally:
        api_client.close()


@pytest.mark.controlplane
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_rendered_object_is_accepted_by_the_api_server(
    helm: str, control_plane: Any, dynamic: Any, namespace: str, option: str, request: pytest.FixtureRequest
) -> None:
    """Every object the chart renders, for every documented option, passes the real API server's
    validation and admission (server-side dry-run apply, unknown fields refused), the
    ServiceMonitor, PodMonitor and PrometheusRule against the Prometheus Operator's own CRD
    schemas.  cert-manager's Certificate and Issuer are skipped: their CRDs are not installed on
    the test control plane."""
    set_args = list(OPTIONS[option])
    if any("Monitor.enabled=true" in a or "prometheusRule.enabled=true" in a for a in set_args):
        request.getfixturevalue("monitoring_crds")
    if option == "fixed-cluster-ip":  # an address inside this control plane's service range
        net = ipaddress.ip_network(control_plane.service_cidr)
        set_args = ["--set", f"service.clusterIP={net.network_address + 53}"]
    objects = render(helm, *set_args, namespace=namespace)
    applied = []
    for obj in objects:
        if obj["kind"] in CERT_MANAGER_KINDS:
            assert obj["apiVersion"].startswith("cert-manager.io/")
            continue
        result = _apply_dry_run(dynamic, obj, namespace)
        assert result["metadata"]["name"] == obj["metadata"]["name"]
        applied.append(obj["kind"])
    assert "Deployment" in applied and "MutatingWebhookConfiguration" in applied


@pytest.mark.controlplane
@pytest.mark.parametrize("path, value, complaint", [
    (("endpoints", 0, "interval"), "soon", "interval"),
    (("endpoints", 0, "scheme"), "gopher", "scheme"),
    (("endpoints", 0, "portName"), "metrics", "portName"),
    (("selector", "matchLabels"), ["not", "a", "map"], "matchLabels"),
])
def test_the_crd_schemas_refuse_a_broken_service_monitor(
    helm: str, monitoring_crds: None, dynamic: Any, namespace: str,
    path: tuple[Any, ...], value: Any, complaint: str,
) -> None:
    """The validation above bites: the chart's ServiceMonitor with one field broken (a bad
    duration, an unknown scheme, a misspelt field, a list for a map) is refused by the API
    server, naming the field."""
    from kubernetes.client.exceptions import ApiException

    monitor = one(render(helm, *OPTIONS["service-monitor"], namespace=namespace), "ServiceMonitor")
    _apply_dry_run(dynamic, monitor, namespace)  # positive control: as rendered, it is accepted
    target = monitor["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ApiException) as refused:
        _apply_dry_run(dynamic, monitor, namespace)
    # 422 for a schema violation; server-side apply reports a field its schema lacks, or the wrong
    # shape, as 500 "failed to create typed patch object" (the API server's way, not ours).
    assert refused.value.status in (422, 500) and complaint in refused.value.body, refused.value.body


def _without_tls_material(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects with the generated certificate's bytes (Secret data, caBundle) blanked."""
    objects = json.loads(json.dumps(objects))
    for obj in objects:
        if obj["kind"] == "Secret":
            obj["data"] = {key: "<generated>" for key in obj["data"]}
        if obj["kind"] == "MutatingWebhookConfiguration":
            for webhook in obj["webhooks"]:
                webhook["clientConfig"]["caBundle"] = "<generated>"
    return objects


@pytest.mark.controlplane
def test_helm_template_renders_what_helm_install_installs(
    helm: str, control_plane: Any, core_api: Any, namespace: str, tmp_path: Path
) -> None:
    """What GitOps tools apply (``helm template``, no cluster access) is what ``helm install``
    applies on a real API server, even where a cluster DNS Service ``kube-system/kube-dns``
    exists: the chart looks nothing up to find the upstream (the server reads its resolv.conf at
    run time).  With the certificate given as values the manifests are identical; generated, only
    the certificate's bytes differ (each render makes a new one)."""
    from kubernetes.client.exceptions import ApiException

    release = "kd"
    created_kube_dns = False
    try:
        core_api.read_namespaced_service("kube-dns", "kube-system")
    except ApiException as e:
        assert e.status == 404
        net = ipaddress.ip_network(control_plane.service_cidr)
        core_api.create_namespaced_service("kube-system", {
            "metadata": {"name": "kube-dns"},
            "spec": {"clusterIP": str(net.network_address + 10), "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
        })
        created_kube_dns = True
    from testbed.tls import generate_ca_and_cert

    tls = generate_ca_and_cert([f"{release}-kubedock-dns.{namespace}.svc"], tmp_path / "tls")
    fixed = tmp_path / "values.yaml"
    fixed.write_text(yaml.safe_dump({"tls": {"caCert": tls.ca_pem.decode(), "cert": tls.cert_path.read_text(),
                                             "key": tls.key_path.read_text()}}))
    common = ["--kubeconfig", str(control_plane.kubeconfig_path), "--namespace", namespace]

    def installed(*args: str) -> list[dict[str, Any]]:
        run_helm(helm, "install", release, str(CHART), *common, *args)
        try:
            manifest = run_helm(helm, "get", "manifest", release, *common).stdout
        finally:
            run_helm(helm, "uninstall", release, *common)
        return [doc for doc in yaml.safe_load_all(manifest) if doc]

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    try:
        for args, normalise in ((["-f", str(fixed)], lambda o: o), ([], _without_tls_material)):
            templated = sorted(normalise(render(helm, *args, release=release, namespace=namespace)), key=key)
            applied = sorted(normalise(installed(*args)), key=key)
            assert [key(o) for o in templated] == [key(o) for o in applied]
            for rendered, real in zip(templated, applied):
                assert rendered == real, f"{key(rendered)} differs between helm template and helm install"
            assert "--upstream" not in args_of(templated)
    finally:
        if created_kube_dns:
            core_api.delete_namespaced_service("kube-dns", "kube-system")


@pytest.mark.controlplane
def test_helm_upgrade_keeps_the_certificate_in_the_cluster(
    helm: str, control_plane: Any, core_api: Any, namespace: str
) -> None:
    """``helm install`` then ``helm upgrade`` against the real API server: the upgrade finds the
    existing Secret through ``lookup`` and keeps its CA, certificate and key, so the webhook's
    caBundle never changes under the running replicas.  The install's notes name the next step
    (kubedock with --disable-services in this namespace) and the safe uninstall order."""
    from kubernetes import client

    admission: Any = client.AdmissionregistrationV1Api(core_api.api_client)
    release = "kd"
    common = ["--kubeconfig", str(control_plane.kubeconfig_path), "--namespace", namespace]
    installed = run_helm(helm, "install", release, str(CHART), *common)
    webhook_name = f"{release}-kubedock-dns-{namespace}"
    try:
        # NOTES.txt tells the kubedock user the exact next step, and how to uninstall safely.
        assert f"kubedock server --namespace {namespace} --port-forward --disable-services" in installed.stdout
        assert f"kubectl delete mutatingwebhookconfiguration {webhook_name}" in installed.stdout
        secret = core_api.read_namespaced_secret(f"{release}-kubedock-dns-tls", namespace)
        before = admission.read_mutating_webhook_configuration(webhook_name)
        bundle = before.webhooks[0].client_config.ca_bundle
        assert base64.b64decode(bundle) == base64.b64decode(secret.data["ca.crt"])

        run_helm(helm, "upgrade", release, str(CHART), *common, "--set", "dns.ttl=7")
        after_secret = core_api.read_namespaced_secret(f"{release}-kubedock-dns-tls", namespace)
        assert after_secret.data == secret.data
        after = admission.read_mutating_webhook_configuration(webhook_name)
        assert after.webhooks[0].client_config.ca_bundle == bundle
        deployment: Any = client.AppsV1Api(core_api.api_client).read_namespaced_deployment(f"{release}-kubedock-dns", namespace)
        assert "--ttl=7" in deployment.spec.template.spec.containers[0].args
    finally:
        admission.delete_mutating_webhook_configuration(webhook_name)
        run_helm(helm, "uninstall", release, *common)


@pytest.mark.controlplane
def test_rendered_webhook_mutates_pods_for_real(
    helm: str, control_plane: Any, core_api: Any, namespace: str, tmp_path: Path
) -> None:
    """The chart's own MutatingWebhookConfiguration, pointed at a kubedock-dns started locally
    with the chart's own container arguments and its rendered Secret, makes the real API server
    rewrite kubedock's pods (the ready-made examples/two-networks.yaml): each is stored with
    ``dnsPolicy: None`` and the chart's Service IP as its only nameserver, while a pod without the
    opt-in label is left alone.  Only the transport differs from a cluster: the API server calls
    ``https://127.0.0.1:<port>/mutate`` instead of the Service, and the server listens on free
    local ports."""
    from kubernetes import client

    from testbed.tls import generate_ca_and_cert

    release = "kd"
    service = f"{release}-kubedock-dns"
    service_ip = str(ipaddress.ip_network(control_plane.service_cidr).network_address + 53)
    tls = generate_ca_and_cert(["127.0.0.1", f"{service}.{namespace}.svc"], tmp_path / "generated")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "service": {"clusterIP": service_ip},
        "tls": {"caCert": tls.ca_pem.decode(), "cert": Path(tls.cert_path).read_text(),
                "key": Path(tls.key_path).read_text()},
    }))
    objects = render(helm, "-f", str(values), release=release, namespace=namespace)

    # The Secret as the pod would see it mounted, and the container's arguments.
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for key, data in one(objects, "Secret")["data"].items():
        (mounted / key).write_bytes(base64.b64decode(data))
    # Port 0 for each listener: the server logs the ports the kernel gave (testbed.ports).
    local = {
        "--dns-port": "0", "--webhook-port": "0",
        "--ops-port": "0", "--tls-cert": str(mounted / "tls.crt"),
        "--tls-key": str(mounted / "tls.key"),
    }
    argv = []
    for arg in container(objects)["args"]:
        option, _, value = arg.partition("=")
        argv.append(f"{option}={local.get(option, value)}" if value else option)
    argv += ["--dns-interface=127.0.0.1", "--webhook-interface=127.0.0.1", "--ops-interface=127.0.0.1",
             f"--kubeconfig={control_plane.kubeconfig_path}", "--upstream=127.0.0.1:9"]
    log = (tmp_path / "kubedock-dns.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "kubedock-dns", *argv],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    admission: Any = client.AdmissionregistrationV1Api(core_api.api_client)
    webhook = one(objects, "MutatingWebhookConfiguration")
    try:
        ports = wait_for_ports(tmp_path / "kubedock-dns.log", ("dns", "webhook", "ops"), lambda: server.poll() is None)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "kubedock-dns.log").read_text()
            try:
                with opener.open(f"http://127.0.0.1:{ports['ops']}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "kubedock-dns.log").read_text()
            time.sleep(0.2)

        config = webhook["webhooks"][0]["clientConfig"]
        del config["service"]
        config["url"] = f"https://127.0.0.1:{ports['webhook']}/mutate"
        admission.create_mutating_webhook_configuration(body=webhook)

        examples = [d for d in yaml.safe_load_all((REPO / "examples" / "two-networks.yaml").read_text()) if d]
        probe = json.loads(json.dumps(examples[0]))
        probe["metadata"]["name"] = "webhook-probe"
        deadline = time.monotonic() + 30
        while True:  # the API server picks the configuration up through an informer
            stored = core_api.create_namespaced_pod(namespace, body=probe, dry_run="All")
            if stored.spec.dns_policy == "None":
                break
            assert time.monotonic() < deadline, "the rendered webhook configuration never took effect"
            time.sleep(0.2)

        for pod in examples:
            stored = core_api.create_namespaced_pod(namespace, body=pod)
            assert stored.spec.dns_policy == "None", pod["metadata"]["name"]
            assert stored.spec.dns_config.nameservers == [service_ip]
            assert stored.spec.restart_policy == "Never"
        plain = json.loads(json.dumps(examples[0]))
        plain["metadata"]["name"] = "not-opted-in"
        del plain["metadata"]["labels"]["kubedock"]
        stored = core_api.create_namespaced_pod(namespace, body=plain)
        assert stored.spec.dns_policy == "ClusterFirst" and stored.spec.dns_config is None
    finally:
        from kubernetes.client.exceptions import ApiException

        try:
            admission.delete_mutating_webhook_configuration(webhook["metadata"]["name"])
        except ApiException as e:
            if e.status != 404:
                raise
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- the chart's README ---------------------------------------------------------------------------


def _chart_readme(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "chart_readme.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_chart_readme_is_generated_from_the_current_values() -> None:
    """helm/kubedock-dns/README.md is exactly what scripts/chart_readme.py writes from
    values.yaml, Chart.yaml and the template: every value, its type, default and description."""
    done = _chart_readme("--check")
    assert done.returncode == 0, done.stderr
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    assert "| `metrics.serviceMonitor.enabled` | bool | `false` |" in readme
    assert f"| `replicaCount` | int | `{values['replicaCount']}` |" in readme
    assert "{{" not in readme.split("## Values")[0]


def test_chart_readme_check_catches_drift_and_undocumented_values(tmp_path: Path) -> None:
    """A description changed without regenerating fails ``--check``; a value without a ``# --``
    description cannot be written at all (the generator names it)."""
    import shutil

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Number of DNS/webhook replicas.", "# -- How many replicas."))
    stale = _chart_readme("--check", "--chart", str(chart))
    assert stale.returncode == 1 and "is not current" in stale.stderr
    assert _chart_readme("--chart", str(chart)).returncode == 0
    assert "How many replicas." in (chart / "README.md").read_text()
    values.write_text(values.read_text() + "\nsurprise:\n  knob: 1\n")
    undocumented = _chart_readme("--chart", str(chart))
    assert undocumented.returncode == 2 and "surprise.knob has no '# --' description" in undocumented.stderr


def test_chart_package_holds_the_readme_but_not_its_template(helm: str, tmp_path: Path) -> None:
    """``helm package`` ships the generated README (``helm show readme`` prints it) and leaves the
    template out (.helmignore)."""
    import tarfile

    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("kubedock-dns-*.tgz")
    names = tarfile.open(archive).getnames()
    assert "kubedock-dns/README.md" in names and "kubedock-dns/README.md.tmpl" not in names
    shown = run_helm(helm, "show", "readme", str(archive)).stdout
    assert shown.rstrip("\n") == (CHART / "README.md").read_text().rstrip("\n")
