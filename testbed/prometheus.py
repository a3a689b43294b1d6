"""A real Prometheus server that finds targets through Kubernetes service discovery.

Contract
--------
:func:`find_prometheus` is the Prometheus server built by ``scripts/build-tools.sh prometheus``
(the Go module proxy's ``github.com/prometheus/prometheus``, the same version as promtool) or
``$PROMETHEUS``.  Debian's ``prometheus`` package cannot serve here: Debian builds it without
Kubernetes service discovery (``field kubernetes_sd_configs not found in type
config.ScrapeConfig``, 2.42.0+ds-5+deb12u1).

``with Prometheus(binary, scrape_configs, rule_files, parent_dir) as prom:`` writes a configuration
(``scrape_configs`` as given, ``rule_files`` copied in, scrape and evaluation interval
``interval``), starts the server on ``127.0.0.1`` with its storage in a fresh directory, and
returns once ``/-/ready`` answers 200.  Then ``prom.query(expr)`` is an instant
query's result vector, ``prom.targets()`` the active targets, ``prom.rule_groups()`` the loaded
rule groups, ``prom.alerts()`` the active (pending or firing) alerts, each as Prometheus' HTTP API
returns them.  Prometheus cannot be told to bind port 0 and report the port, so a free port is
picked and the start retried on another one when it loses the race.  Leaving the block stops the
process (its whole group) and removes the directory.  :class:`PrometheusUnavailable`: no binary
and no Go to build one (tests skip); :class:`PrometheusError`: it did not start, with its log's tail.

Kubernetes service discovery is configured by the caller: :func:`kubernetes_sd` gives the
``kubernetes_sd_configs`` entry for an API server URL, its CA and a bearer-token file (what a
Prometheus outside the cluster is given).  With ``scrape_itself`` Prometheus also scrapes its own
``/metrics`` (job ``prometheus``): another process whose ``process_*`` series sit beside
kubedock-dns', as in any real Prometheus.

:func:`operator_crds` gives the Prometheus Operator's ServiceMonitor, PodMonitor and
PrometheusRule CRDs as it publishes them (``scripts/build-tools.sh prometheus-operator-crds``
takes them from its Go module into the cache, keyed by version); :func:`install_crds` creates
them on an API server and waits until they are served.

The Prometheus Operator itself cannot run here (it deploys Prometheus as a StatefulSet from an image
this machine cannot pull), so :func:`service_monitor_jobs` and :func:`pod_monitor_jobs` stand in for
its configuration generator: they turn a ServiceMonitor or PodMonitor object (as stored by the API
server) into the scrape jobs the operator generates for the fields the chart uses (selector,
namespaceSelector.matchNames, port, path, scheme, interval, scrapeTimeout, relabelings,
metricRelabelings): Kubernetes SD with role ``endpoints`` or ``pod`` in those namespaces, keep
targets whose Service or pod labels match the selector and whose port name matches, drop pods that
finished, then the operator's target labels (``namespace``, ``service``, ``pod``, ``container``,
``endpoint``, ``job``).  :func:`annotation_job` is the annotation-driven pod job of Prometheus'
example Kubernetes configuration (``prometheus.io/scrape``, ``/port``, ``/path``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Sequence

import yaml

from testbed.controlplane import ManagedProcess

__all__ = ["MONITORING_KINDS", "CrdsUnavailable", "Prometheus", "PrometheusError", "PrometheusUnavailable",
           "annotation_job", "find_prometheus", "install_crds", "kubernetes_sd", "operator_crds",
           "pod_monitor_jobs", "service_monitor_jobs"]

BUILD_TOOLS = Path(__file__).resolve().parent.parent / "scripts" / "build-tools.sh"
MONITORING_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
# Loopback only: never through a proxy the environment may name.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


class PrometheusUnavailable(RuntimeError):
    """No Prometheus server here and no Go toolchain to build one."""


class PrometheusError(RuntimeError):
    """Prometheus did not start or an API call failed; the message carries its log's tail."""


def find_prometheus(timeout: float = 3600) -> str:
    """``$PROMETHEUS``, else the server ``scripts/build-tools.sh prometheus`` builds (or has cached)."""
    if os.environ.get("PROMETHEUS"):
        return os.environ["PROMETHEUS"]
    done = subprocess.run(["bash", str(BUILD_TOOLS), "prometheus"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and os.access(lines[-1], os.X_OK):
        return lines[-1]
    if shutil.which("go") is None:
        raise PrometheusUnavailable("the Prometheus server is not cached and Go is not installed to build it")
    raise RuntimeError(f"build-tools.sh prometheus failed:\n{done.stderr[-2000:]}")


class CrdsUnavailable(RuntimeError):
    """The CRDs are not cached and there is no Go toolchain to fetch them (tests skip)."""


def operator_crds(timeout: float = 600) -> list[dict[str, Any]]:
    """The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs (module
    docstring); :class:`CrdsUnavailable` when they cannot be had, RuntimeError when fetching failed."""
    done = subprocess.run(["bash", str(BUILD_TOOLS), "prometheus-operator-crds"], capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        if shutil.which("go") is None:
            raise CrdsUnavailable("the Prometheus Operator's CRDs are not cached and Go is not installed to fetch them")
        raise RuntimeError(f"build-tools.sh prometheus-operator-crds failed:\n{done.stderr[-2000:]}")
    crds = [yaml.safe_load(path.read_text()) for path in sorted(Path(lines[-1]).glob("*.yaml"))]
    kinds = {c["spec"]["names"]["kind"] for c in crds}
    if kinds != MONITORING_KINDS:
        raise RuntimeError(f"expected the CRDs of {sorted(MONITORING_KINDS)} in {lines[-1]}, found {sorted(kinds)}")
    return crds


def install_crds(api_client: Any, crds: Sequence[dict[str, Any]], timeout: float = 60) -> None:
    """Create the CRDs (kept if they exist) and wait until the API server serves them."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    extensions: Any = client.ApiextensionsV1Api(api_client)
    for crd in crds:
        try:
            extensions.create_custom_resource_definition(body=crd)
        except ApiException as e:
            if e.status != 409:
                raise
    deadline = time.monotonic() + timeout
    for crd in crds:
        while True:
            stored = extensions.read_custom_resource_definition(crd["metadata"]["name"])
            if any(c.type == "Established" and c.status == "True" for c in (stored.status.conditions or [])):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {crd['metadata']['name']} was not established within {timeout:.0f} s")
            time.sleep(0.2)


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubernetes_sd(role: str, api_server: str, ca_file: str | Path, token_file: str | Path,
                  namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """One ``kubernetes_sd_configs`` entry: ``role`` objects of ``namespaces`` (all when empty)
    from the API server at ``api_server``, trusted through ``ca_file``, as the bearer of the token
    in ``token_file``."""
    entry: dict[str, Any] = {"role": role, "api_server": api_server,
                             "tls_config": {"ca_file": str(ca_file)},
                             "authorization": {"type": "Bearer", "credentials_file": str(token_file)}}
    if namespaces:
        entry["namespaces"] = {"names": list(namespaces)}
    return entry


def _sanitize(label: str) -> str:
    """A Kubernetes label name as Prometheus' SD meta label suffix (non-word characters -> _)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _endpoint_settings(endpoint: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = {"metrics_path": endpoint.get("path", "/metrics"),
                           "scheme": endpoint.get("scheme", "http")}
    if endpoint.get("interval"):
        job["scrape_interval"] = endpoint["interval"]
    if endpoint.get("scrapeTimeout"):
        job["scrape_timeout"] = endpoint["scrapeTimeout"]
    return job


def _relabelings(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's RelabelConfig (camelCase) as Prometheus' relabel_config (snake_case)."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{names.get(k, k): v for k, v in item.items()} for item in items]


def _selector_keeps(match_labels: dict[str, str], meta: str) -> list[dict[str, Any]]:
    return [{"action": "keep",
             "source_labels": [f"__meta_kubernetes_{meta}_label_{_sanitize(k)}",
                               f"__meta_kubernetes_{meta}_labelpresent_{_sanitize(k)}"],
             "regex": f"({re.escape(v)});true"} for k, v in sorted(match_labels.items())]


def _namespaces(monitor: dict[str, Any]) -> list[str]:
    selector = monitor["spec"].get("namespaceSelector") or {}
    return list(selector.get("matchNames") or [monitor["metadata"]["namespace"]])


def service_monitor_jobs(monitor: dict[str, Any], api_server: str, ca_file: str | Path,
                         token_file: str | Path) -> list[dict[str, Any]]:
    """The scrape jobs the Prometheus Operator generates for a ServiceMonitor (module docstring)."""
    meta, spec = monitor["metadata"], monitor["spec"]
    jobs = []
    for i, endpoint in enumerate(spec["endpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector_keeps(spec["selector"].get("matchLabels") or {}, "service"),
            {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"],
             "regex": endpoint["port"]},
            {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                               "__meta_kubernetes_endpoint_address_target_name"],
             "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
            *_relabelings(endpoint.get("relabelings") or []),
        ]
        jobs.append({"job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{i}",
                     "honor_labels": False,
                     "kubernetes_sd_configs": [kubernetes_sd("endpoints", api_server, ca_file, token_file,
                                                             _namespaces(monitor))],
                     **_endpoint_settings(endpoint),
                     "relabel_configs": relabel,
                     "metric_relabel_configs": _relabelings(endpoint.get("metricRelabelings") or [])})
    return jobs


def pod_monitor_jobs(monitor: dict[str, Any], api_server: str, ca_file: str | Path,
                     token_file: str | Path) -> list[dict[str, Any]]:
    """The scrape jobs the Prometheus Operator generates for a PodMonitor (module docstring)."""
    meta, spec = monitor["metadata"], monitor["spec"]
    jobs = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            *_selector_keeps(spec["selector"].get("matchLabels") or {}, "pod"),
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": endpoint["port"]},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
            *_relabelings(endpoint.get("relabelings") or []),
        ]
        jobs.append({"job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                     "honor_labels": False,
                     "kubernetes_sd_configs": [kubernetes_sd("pod", api_server, ca_file, token_file,
                                                             _namespaces(monitor))],
                     **_endpoint_settings(endpoint),
                     "relabel_configs": relabel,
                     "metric_relabel_configs": _relabelings(endpoint.get("metricRelabelings") or [])})
    return jobs


def annotation_job(name: str, api_server: str, ca_file: str | Path, token_file: str | Path,
                   namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """The annotation-driven pod job of Prometheus' example Kubernetes configuration
    (``prometheus.io/scrape: "true"``, ``prometheus.io/port``, ``prometheus.io/path``), with
    ``namespace`` and ``pod`` target labels."""
    return {
        "job_name": name,
        "kubernetes_sd_configs": [kubernetes_sd("pod", api_server, ca_file, token_file, namespaces)],
        "relabel_configs": [
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
             "regex": "true"},
            {"action": "replace", "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
             "target_label": "__metrics_path__", "regex": "(.+)"},
            {"action": "replace",
             "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
             "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
            {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


class Prometheus:
    """A Prometheus server on loopback; see the module docstring."""

    def __init__(self, binary: str, scrape_configs: Sequence[dict[str, Any]], rule_files: Sequence[Path] = (),
                 parent_dir: str | Path | None = None, *, interval: str = "2s", scrape_itself: bool = False,
                 start_timeout: float = 60.0, attempts: int = 5) -> None:
        self.binary = binary
        self.scrape_configs = list(scrape_configs)
        self.rule_files = list(rule_files)
        self.parent_dir = Path(parent_dir) if parent_dir else None
        self.interval = interval
        self.scrape_itself = scrape_itself
        self.start_timeout = start_timeout
        self.attempts = attempts
        self.port = 0
        self._dir: Path | None = None
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return self._process.tail(lines) if self._process else ""

    def __enter__(self) -> "Prometheus":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write_config(self) -> Path:
        assert self._dir is not None
        rules = []
        for i, source in enumerate(self.rule_files):
            target = self._dir / f"rules-{i}-{source.name}"
            shutil.copyfile(source, target)
            rules.append(str(target))
        jobs = list(self.scrape_configs)
        if self.scrape_itself:
            jobs.append({"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]})
        config = {"global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                             "evaluation_interval": self.interval},
                  "rule_files": rules, "scrape_configs": jobs}
        path = self._dir / f"prometheus-{self.port}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=self.parent_dir))
        try:
            for _ in range(self.attempts):
                self.port = _free_tcp_port()
                if self._start_once(self._write_config()):
                    return
            raise PrometheusError(f"prometheus lost the race for a free port {self.attempts} times:\n{self.log_tail()}")
        except BaseException:
            self.close()
            raise

    def _start_once(self, config: Path) -> bool:
        assert self._dir is not None
        storage = self._dir / f"data-{self.port}"
        self._process = ManagedProcess("prometheus", [
            self.binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
        ], self._dir / "prometheus.log")
        self._process.start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self._process.alive():
                if "address already in use" in self.log_tail():
                    self._process.stop(0)
                    return False
                raise PrometheusError(f"prometheus exited on start:\n{self.log_tail()}")
            try:
                with _urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus was not ready within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def close(self) -> None:
        if self._process is not None:
            self._process.stop(10.0)
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- the HTTP API

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``; a failed call raises :class:`PrometheusError`."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with _urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"GET /api/v1/{path}{query}: {e.code} {e.read().decode(errors='replace')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET /api/v1/{path}{query}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        data = self.api("query", query=expr)
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self.api("rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, poll: float = 1.0) -> Any:
        """Poll ``check`` until it returns something truthy (returned); fail after ``timeout``
        seconds saying ``what`` was awaited and what the last check returned."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = check()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})\n{self.log_tail(15)}")
            time.sleep(poll)
