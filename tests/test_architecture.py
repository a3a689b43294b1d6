"""Who may import whom (STYLE: the house by role), checked on the source so a violation fails CI.

The floors, bottom up:

- the pure core (``contract``, ``index``, ``resolver``) imports no Twisted and no Kubernetes client,
  and of the package only the core and :mod:`kubedock_dns.dns.wire` (the home of DNS constants);
- ``dns/`` (the DNS path), ``admission/`` (the webhook) and ``kube/`` (the only importer of the
  ``kubernetes`` client) stand on the core and never import each other; of ``ops/`` they use only
  its instruments (``ops.logs``, ``ops.limits``, ``ops.latency``);
- ``ops/``'s operator pieces (endpoint, metrics, explain, views, cli, drain) read the core and DNS;
- ``options`` and ``tap`` compose everything; nothing imports ``tap``;
- the package's top (``kubedock_dns/__init__.py``) holds only its metadata, ``__version__`` (the
  one source of the version), which any module may read.

A module this file has no rule for fails the test: a new room gets its rules when it is built.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kubedock_dns"

THIRD_PARTY_SERVING = {"twisted", "klein", "treq", "kubernetes", "OpenSSL", "cryptography", "prometheus_client"}
INSTRUMENTS = {"kubedock_dns.ops.logs", "kubedock_dns.ops.limits", "kubedock_dns.ops.latency"}
CORE = {"kubedock_dns.contract", "kubedock_dns.index", "kubedock_dns.resolver"}


# (module or package prefix, allowed kubedock_dns imports, forbidden third-party top-level names).
# The most specific rule wins.  Allowed imports are module names or prefixes ("kubedock_dns.dns"
# allows the package and everything in it).
RULES: list[tuple[str, set[str], set[str]]] = [
    ("kubedock_dns", set(), set()),  # __init__ and __main__ (below)
    ("kubedock_dns.__main__", {"kubedock_dns.ops.cli"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.contract", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.index", {"kubedock_dns.contract"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.resolver", {"kubedock_dns.contract", "kubedock_dns.index", "kubedock_dns.dns.wire"},
     THIRD_PARTY_SERVING),
    ("kubedock_dns.dns", CORE | {"kubedock_dns.dns"} | INSTRUMENTS,
     {"kubernetes", "klein", "treq", "OpenSSL", "cryptography", "prometheus_client"}),
    ("kubedock_dns.dns.wire", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.admission", {"kubedock_dns.contract", "kubedock_dns.admission"} | INSTRUMENTS,
     {"kubernetes", "treq", "prometheus_client"}),
    # All that the review worker process loads: JSON in, JSON out.
    ("kubedock_dns.admission.review", {"kubedock_dns.contract"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.admission.workers", {"kubedock_dns.admission.review"},
     {"kubernetes", "klein", "treq", "OpenSSL", "cryptography", "prometheus_client"}),
    # The worker process's main: the standard library and the review, nothing else.
    ("kubedock_dns.admission.review_process", {"kubedock_dns.admission.review"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.kube", {"kubedock_dns.contract", "kubedock_dns.kube"} | INSTRUMENTS,
     {"klein", "treq", "OpenSSL", "prometheus_client"}),
    ("kubedock_dns.kube.listing", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.kube.policies", {"kubedock_dns.contract"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.ops", CORE | {"kubedock_dns.ops", "kubedock_dns.dns"}, {"kubernetes", "treq"}),
    ("kubedock_dns.ops.logs", set(), THIRD_PARTY_SERVING - {"twisted"}),
    ("kubedock_dns.ops.limits", {"kubedock_dns.ops.logs"}, THIRD_PARTY_SERVING - {"twisted"}),
    ("kubedock_dns.ops.latency", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.ops.views", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.ops.cli", {"kubedock_dns.ops.views", "kubedock_dns.ops.build"}, THIRD_PARTY_SERVING),
    ("kubedock_dns.ops.build", set(), THIRD_PARTY_SERVING),
    ("kubedock_dns.options", {"kubedock_dns.contract", "kubedock_dns.dns.upstreams", "kubedock_dns.kube.policies",
                              "kubedock_dns.ops.logs", "kubedock_dns.ops"}, {"kubernetes", "klein", "treq"}),
    ("kubedock_dns.tap", {"kubedock_dns"}, set()),
]


def module_path(module: str) -> Path:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rule_for(module: str) -> tuple[str, set[str], set[str]] | None:
    best = None
    for rule in RULES:
        prefix = rule[0]
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = rule
    return best


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "kubedock_dns" or node.module.startswith("kubedock_dns."):
                # ``from kubedock_dns.ops import views`` imports the module kubedock_dns.ops.views
                names.update(f"{node.module}.{alias.name}" if (PACKAGE.parent / node.module.replace(".", "/")
                                                                / f"{alias.name}.py").exists() else node.module
                             for alias in node.names)
            else:
                names.add(node.module)
    return names


def violates(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_follow_the_floors(module):
    """Each module imports only what its floor may: the pure core no Twisted, the DNS path no
    Kubernetes client and no webhook, the webhook no index, only kube/ the kubernetes client."""
    rule = rule_for(module)
    assert rule is not None and (rule[0] != "kubedock_dns" or module in {"kubedock_dns"}), (
        f"{module} has no import rule in tests/test_architecture.py: give its room one")
    _, allowed, forbidden_third_party = rule
    names = imported_names(module_path(module))
    ours = {n for n in names if violates(n, "kubedock_dns") and n != "kubedock_dns"}  # the top: metadata
    bad = sorted(n for n in ours if n != module and not any(violates(n, a) for a in allowed))
    assert not bad, f"{module} imports {bad}; its floor allows only {sorted(allowed)}"
    third = sorted(n for n in names - ours for f in forbidden_third_party if violates(n, f))
    assert not third, f"{module} imports {third}"


def test_the_package_top_holds_only_its_metadata():
    """``kubedock_dns/__init__.py`` is a docstring and ``__version__`` (a string), nothing else:
    so any module may read the version without importing anything of the product."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.Assign), ast.dump(tree)
    assert [t.id for t in body[0].targets if isinstance(t, ast.Name)] == ["__version__"]
    assert isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)


def test_nothing_imports_the_composition_root():
    """tap.py builds the server; no module (and no CLI) depends on it."""
    users = [m for m in MODULES if m != "kubedock_dns.tap" and "kubedock_dns.tap" in imported_names(module_path(m))]
    assert users == []


def test_only_the_kube_package_imports_kubernetes():
    """The kubernetes client stays behind one package, kubedock_dns/kube."""
    users = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                   if any(violates(n, "kubernetes") for n in imported_names(p)))
    assert users, "nothing imports kubernetes: has the kube package moved?"
    assert [u for u in users if not u.startswith("kube/")] == []


def test_the_review_worker_loads_no_web_stack():
    """The spawned review worker runs admission.review_process, which imports admission.review
    alone: importing it in a fresh interpreter loads neither Twisted, klein nor OpenSSL (they
    cost the worker memory and start-up)."""
    import subprocess
    import sys

    probe = ("import sys, kubedock_dns.admission.review_process; "
             "print(sorted(m for m in ('twisted', 'klein', 'OpenSSL', 'cryptography') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_product_and_testbed_are_siblings():
    """The product never imports the test bed, and the test bed runs the product as a process
    (twistd, ``python -m kubedock_dns``) rather than importing its modules; of the package it
    reads only the top's public metadata (``kubedock_dns.__version__``, the image tag)."""
    product_users = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                           if any(violates(n, "testbed") or violates(n, "tests") for n in imported_names(p)))
    assert product_users == []
    bed_users = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "testbed").rglob("*.py")
                       if any(violates(n, "kubedock_dns") and n != "kubedock_dns" for n in imported_names(p)))
    assert bed_users == []


def test_plugin_is_thin():
    """The twistd plugin names its tap module as a string: importing it imports no klein and no
    kubedock_dns module, so `twistd --reactor` still chooses the reactor."""
    plugin = ROOT / "twisted" / "plugins" / "kubedock_dns.py"
    assert imported_names(plugin) == {"twisted.application.service"}


def test_package_type_checks():
    """mypy (with the zope plugin for Twisted's interfaces) finds no error in kubedock_dns."""
    import shutil
    import subprocess
    import sys

    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy is not installed (pip install -e '.[lint]')")
    done = subprocess.run([sys.executable, "-m", "mypy", "kubedock_dns"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _private_twisted_uses(path: Path) -> list[str]:
    """``from twisted.x import _y`` and ``<twisted module or name>._y`` in ``path``."""
    tree = ast.parse(path.read_text())
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "twisted":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "twisted":
                    aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_no_private_twisted_names():
    """The product uses Twisted's public API only (STYLE): a private name can vanish in any
    release.  Where there is no public one, the module states what it does instead."""
    uses = {p.relative_to(ROOT).as_posix(): _private_twisted_uses(p) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in uses.items() if v} == {}
