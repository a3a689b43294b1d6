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

from kubedock_dns.ops.metrics import HISTOGRAMS, METRICS, PREFIX
from tests.test_chart import helm, render, run_helm  # noqa: F401  (helm is a fixture)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
RULE_TESTS = REPO / "tests" / "alerts" / "prometheus-rules.test.yaml"


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


def published_names() -> set[str]:
    names = {PREFIX + n + ("_total" if kind == "counter" else "") for n, (kind, _) in METRICS.items()}
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
    assert "SUCCESS: 5 rules found" in done.stdout + done.stderr


def test_alerts_fire_for_what_they_name(promtool: str) -> None:
    """Not synced for 5 minutes, more than 5% failed forwards for 10 minutes, a duplicate pod IP
    that stays, the hold bound reached, forwards refused: each alert fires for its replica with
    its text, and not for the replica beside it that is fine."""
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
    """A renamed metric cannot leave a silent alert or an empty panel behind."""
    published = published_names()
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]] + dashboard_expressions()
    used = {m for e in exprs for m in re.findall(r"\bkubedock_dns_[a-z_]+", e)}
    assert used, "no kubedock-dns metric referenced"
    assert used <= published, f"not published: {sorted(used - published)}"


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
