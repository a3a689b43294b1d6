"""The chart's alerts and dashboard: valid for the real Prometheus tooling, about metrics the
server really publishes, and each alert fires for the situation it names and stays quiet
otherwise (``promtool test rules`` with tests/alerts/prometheus-rules.test.yaml).

promtool is built from the Go module proxy by ``scripts/build-tools.sh promtool`` into the cache
(keyed by version); the tests skip only when neither Go nor a cached binary exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kubedock_dns.admission.review import REVIEW_OUTCOMES
from kubedock_dns.dns.server import OUTCOMES
from kubedock_dns.dns.wire import RCODE_NAMES, TYPE_SLOT_NAMES
from kubedock_dns.ops.metrics import DEPRECATED, HISTOGRAMS, METRICS, PREFIX
from tests.test_chart import helm, render, run_helm  # noqa: F401  (helm is a fixture)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
RULE_TESTS = REPO / "tests" / "alerts" / "prometheus-rules.test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
# Where the project's documentation is published (Chart.yaml's home); runbook links point there.
RUNBOOK_BASE = "https://github.com/kubedock-dns/kubedock-dns/blob/main/docs/runbooks.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    if os.environ.get("PROMTOOL"):
        return os.environ["PROMTOOL"]
    result = subprocess.run(["bash", str(REPO / "scripts" / "build-tools.sh"), "promtool"],
                            capture_output=True, text=True, timeout=3600)
    lines = result.stdout.strip().splitlines()
    if lines and os.access(lines[-1], os.X_OK):
        return lines[-1]
    from shutil import which

    if which("go") is None:
        pytest.skip("promtool cannot be built: no Go toolchain and no cached binary")
    raise AssertionError(f"scripts/build-tools.sh promtool failed:\n{result.stderr[-3000:]}")


def published_names(deprecated: bool = True) -> set[str]:
    names = {PREFIX + n + ("_total" if kind == "counter" else "") for n, (kind, _) in METRICS.items()
             if deprecated or n not in DEPRECATED}
    for n in HISTOGRAMS:
        names |= {PREFIX + n + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_rules_pass_promtool_check(promtool: str) -> None:
    """``promtool check rules`` accepts the rule file (syntax, PromQL, templates)."""
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout + done.stderr


def test_alerts_fire_for_what_they_name(promtool: str) -> None:
    """No ready replica in a namespace (gone, not synced or draining) for a minute, none ever
    scraped, not synced for 5 minutes, more than 5% failed forwards for 10 minutes (local answers
    and local SERVFAILs not counted), a duplicate pod IP that stays, the hold bound reached,
    forwards refused, admission requests answered 503 for 5 minutes: each alert fires for its
    replica or namespace with its text and runbook link, and not for the one beside it that is fine."""
    done = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL (checked by promtool as a recording rule, with
    Grafana's variables replaced by what Grafana substitutes)."""
    rules = []
    for i, expr in enumerate(dashboard_expressions()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$pod", ".*")
        rules.append({"record": f"kubedock_dns:dashboard_{i}", "expr": concrete})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_and_dashboard_only_use_published_metrics() -> None:
    """A renamed metric cannot leave a silent alert or an empty panel behind, and neither uses a
    deprecated name (they go in the next release); every label value they match on is one the
    server publishes."""
    published = published_names(deprecated=False)
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]] + dashboard_expressions()
    used = {m for e in exprs for m in re.findall(r"\bkubedock_dns_[a-z_]+", e)}
    assert used, "no kubedock-dns metric referenced"
    assert used <= published, f"not published, or deprecated: {sorted(used - published)}"
    known = {"outcome": set(OUTCOMES) | set(REVIEW_OUTCOMES), "rcode": set(RCODE_NAMES.values()),
             "type": set(TYPE_SLOT_NAMES), "proto": {"udp", "tcp"}}
    for label, op, value in ((m[0], m[1], m[2]) for e in exprs for m in re.findall(r'\b(outcome|rcode|type|proto)(=~|=|!=)"([^"]*)"', e)):
        values = value.split("|") if op == "=~" else [value]
        assert set(values) <= known[label], f'{label}{op}"{value}" matches no published value'


def test_chart_renders_rule_and_dashboard_only_when_asked(helm: str) -> None:  # noqa: F811
    """Off by default; enabled, the PrometheusRule carries the rule file verbatim (its {{ $labels }}
    left for Prometheus) with the labels asked for, and the ConfigMap the dashboard for Grafana's
    sidecar; both pass ``helm lint --strict``."""
    kinds = {o["kind"] for o in render(helm)}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
    options = ["--set", "metrics.prometheusRule.enabled=true",
               "--set", "metrics.prometheusRule.labels.release=kube-prometheus-stack",
               "--set", "metrics.grafanaDashboard.enabled=true"]
    lint = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", "kubedock", *options)
    assert "0 chart(s) failed" in lint.stdout
    objects = render(helm, *options)
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kubedock-dns.json"]) == json.loads(DASHBOARD.read_text())


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, spaces to dashes, punctuation gone."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_a_runbook_section_that_says_what_to_do() -> None:
    """Each alert's ``runbook_url`` points at docs/runbooks.md, at a section that exists, is named
    after the alert and says what it means and what to do; every section belongs to an alert."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    text = RUNBOOKS.read_text()
    sections = {_github_anchor(m.group(1)): m.end() for m in re.finditer(r"^## (.+)$", text, re.M)}
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE, f"{rule['alert']}: runbook_url {url!r}"
        assert anchor == _github_anchor(rule["alert"]) and anchor in sections, f"{rule['alert']}: no section #{anchor}"
        body = text[sections[anchor]:].split("\n## ", 1)[0]
        assert "**What it means.**" in body and "**What to do.**" in body, rule["alert"]
    assert set(sections) == {_github_anchor(r["alert"]) for r in rules}


def test_nothing_serving_alert_covers_every_way_to_be_unready() -> None:
    """KubedockDNSDown is critical and counts a replica as serving only when it is scraped,
    synced and not draining, exactly /readyz's condition."""
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    down = rules["KubedockDNSDown"]
    assert down["labels"]["severity"] == "critical"
    assert "kubedock_dns_synced == 1" in down["expr"] and "kubedock_dns_draining == 1" in down["expr"]


def test_dashboard_process_panels_show_only_kubedock_dns(promtool: str, tmp_path: Path) -> None:
    """The memory and CPU panels, with "All" namespaces and replicas selected, show the
    kubedock-dns replicas and not the other processes the same Prometheus scrapes (here: itself
    and a CoreDNS pod), evaluated by promtool on series shaped like real scrapes."""
    panels = {t["expr"]: p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]
              if re.search(r"\b(process|python)_", t["expr"])}
    assert len(panels) >= 2, panels
    series = []
    for job, instance, labels, memory, cpu_per_minute in [
        ("kd", "10.0.0.1:8080", 'namespace="ci", pod="dns-a"', 100, 6),
        ("kd", "10.0.0.2:8080", 'namespace="ci", pod="dns-b"', 200, 12),
        ("prometheus", "localhost:9090", "", 999, 60),
        ("coredns", "10.0.0.9:9153", 'namespace="kube-system", pod="coredns-1"', 888, 30),
    ]:
        common = f'job="{job}", instance="{instance}"' + (f", {labels}" if labels else "")
        series.append({"series": f"process_resident_memory_bytes{{{common}}}", "values": f"{memory}x10"})
        series.append({"series": f"process_cpu_seconds_total{{{common}}}", "values": f"0+{cpu_per_minute}x10"})
        if job == "kd":
            series.append({"series": f"kubedock_dns_synced{{{common}}}", "values": "1x10"})
    tests = []
    for expr in panels:
        concrete = expr.replace("$__rate_interval", "2m").replace("$namespace", ".*").replace("$pod", ".*")
        tests.append({"expr": concrete, "eval_time": "5m", "exp_samples": [
            {"labels": _expected_labels(concrete, "dns-a"), "value": 100 if "memory" in concrete else 0.1},
            {"labels": _expected_labels(concrete, "dns-b"), "value": 200 if "memory" in concrete else 0.2},
        ]})
    path = tmp_path / "dashboard.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": series, "promql_expr_test": tests}]}))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _expected_labels(expr: str, pod: str) -> str:
    """The label set promtool prints for a panel's sample of replica ``pod`` (rate() drops the
    metric name, a plain selector keeps it)."""
    instance = {"dns-a": "10.0.0.1:8080", "dns-b": "10.0.0.2:8080"}[pod]
    labels = f'instance="{instance}", job="kd", namespace="ci", pod="{pod}"'
    if expr.startswith("rate("):
        return "{" + labels + "}"
    return "process_resident_memory_bytes{" + labels + "}"
