"""Who may import whom (STYLE: module rules), checked on the source so a violation fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kubedock_dns"

# module -> top-level names it must never import, directly or inside a function.
FORBIDDEN = {
    "contract": {"twisted", "kubernetes", "klein", "treq"},
    "index": {"twisted", "kubernetes", "klein", "treq"},
    "resolver": {"twisted", "kubernetes", "klein", "treq"},
    "wire": {"twisted", "kubernetes", "klein", "treq", "kubedock_dns.index", "kubedock_dns.resolver"},
    "fastpath": {"kubernetes", "klein", "kubedock_dns.kube", "kubedock_dns.webhook", "kubedock_dns.server"},
    "server": {"kubernetes", "kubedock_dns.kube", "kubedock_dns.webhook"},
    "udp_port": {"kubernetes", "klein", "kubedock_dns.kube", "kubedock_dns.webhook", "kubedock_dns.index",
                 "kubedock_dns.resolver"},
    "forwarder": {"kubernetes", "kubedock_dns.kube", "kubedock_dns.webhook"},
    "webhook": {"kubernetes", "kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server"},
    "tls": {"kubernetes", "kubedock_dns.index"},
    "ops": {"kubernetes"},
    "limits": {"kubernetes", "kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server",
               "kubedock_dns.webhook", "kubedock_dns.kube"},
    "reviewing": {"kubernetes", "kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server"},
    "latency": {"twisted", "kubernetes", "klein", "treq", "prometheus_client"},
    "views": {"twisted", "kubernetes", "klein", "treq"},
    "cli": {"twisted", "kubernetes", "klein", "treq", "kubedock_dns.index", "kubedock_dns.resolver"},
    "explain": {"kubernetes", "kubedock_dns.kube", "kubedock_dns.webhook"},
    "metrics": {"kubernetes", "kubedock_dns.kube", "kubedock_dns.webhook"},
    "logs": {"kubernetes", "kubedock_dns.kube", "kubedock_dns.webhook"},
    "policies": {"twisted", "kubernetes", "klein", "treq"},
    "options": {"kubernetes", "klein", "kubedock_dns.forwarder", "kubedock_dns.server", "kubedock_dns.kube",
                "kubedock_dns.webhook"},
    "upstreams": {"kubernetes", "klein", "treq", "twisted.internet", "kubedock_dns.forwarder",
                  "kubedock_dns.server"},
    # The kube side: the watch loop reaches the API server only through its PodApi seam.
    "kube.watcher": {"kubernetes", "kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server",
                     "kubedock_dns.webhook", "kubedock_dns.kube.policy_writer"},
    "kube.listing": {"twisted", "kubernetes", "klein", "treq", "kubedock_dns"},
    "kube.client": {"kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server",
                    "kubedock_dns.webhook", "kubedock_dns.kube.policy_writer"},
    "kube.policy_writer": {"kubedock_dns.index", "kubedock_dns.resolver", "kubedock_dns.server",
                           "kubedock_dns.webhook", "kubedock_dns.kube.watcher"},
}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def violates(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_imports_follow_the_layering(module):
    """The DNS side never imports the Kubernetes client; only the kube package does; the webhook never
    touches the index; the pure core imports no Twisted."""
    relative = module.replace(".", "/") + ".py"
    path = PACKAGE / relative
    if not path.exists():
        pytest.skip(f"{relative} does not exist")
    bad = sorted(n for n in imported_names(path) for f in FORBIDDEN[module] if violates(n, f))
    assert not bad, f"kubedock_dns/{relative} imports {bad}"


def test_only_the_kube_package_imports_kubernetes():
    """The kubernetes client stays behind one package, kubedock_dns/kube."""
    users = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                   if any(violates(n, "kubernetes") for n in imported_names(p)))
    assert users, "nothing imports kubernetes: has the kube package moved?"
    assert [u for u in users if not u.startswith("kube/")] == []


def test_plugin_is_thin():
    """The twistd plugin names its tap module as a string: importing it imports no klein and no
    kubedock_dns module, so `twistd --reactor` still chooses the reactor."""
    plugin = PACKAGE.parent / "twisted" / "plugins" / "kubedock_dns.py"
    assert imported_names(plugin) == {"twisted.application.service"}


def test_package_type_checks():
    """mypy (with the zope plugin for Twisted's interfaces) finds no error in kubedock_dns."""
    import shutil
    import subprocess
    import sys

    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy is not installed (pip install -e '.[lint]')")
    done = subprocess.run([sys.executable, "-m", "mypy", "kubedock_dns"], cwd=PACKAGE.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
