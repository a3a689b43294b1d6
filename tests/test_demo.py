"""``scripts/demo`` says by its exit status what it showed: 0 every answer right, 1 some answer
wrong, 2 the demo could not run (its header and testbed/demo.py document the three).

The demo runs as a user runs it, ``scripts/demo --loopback`` (its own control plane; pods are
127.0.0.0/8 source addresses, so it needs no namespaces), except that ``scripts/setup`` is
skipped (``KUBEDOCK_DNS_DEMO_SETUP=skip``): the suite's setup has run, and setup from a test
would reinstall the package from whichever checkout runs it.  "Some answer wrong" is produced
the only honest way: the demo runs a copy of this checkout whose reverse lookups answer a wrong
name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parent.parent


def run_demo(checkout: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``scripts/demo --loopback`` of ``checkout``, its code first on PYTHONPATH."""
    return subprocess.run(
        [str(checkout / "scripts" / "demo"), "--loopback"], cwd=checkout, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": str(checkout), "KUBEDOCK_DNS_DEMO_SETUP": "skip", **env})


@pytest.fixture(scope="module")
def control_plane_binaries() -> None:
    """The demo builds nothing here: skip, saying why, when kube-apiserver and etcd are missing."""
    from testbed.controlplane import BinariesUnavailable, find_binaries

    try:
        find_binaries()
    except BinariesUnavailable as e:
        pytest.skip(f"no Kubernetes control plane available: {e}")


def test_every_answer_right_exits_0_with_the_table(control_plane_binaries: None) -> None:
    """Both runs resolve their own names: exit 0, the table with every row "ok"."""
    done = run_demo(REPO)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "All 13 lookups answered as Docker would" in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("run-")]
    assert len(rows) == 13 and all("  ok  " in row for row in rows), done.stdout


def test_a_wrong_answer_exits_1_and_says_which(control_plane_binaries: None) -> None:
    """Run against a copy whose reverse lookups answer a wrong name: exit 1, the wrong rows
    marked with what was expected."""
    with tempfile.TemporaryDirectory(prefix="kubedock-dns-demo-broken-") as scratch:
        broken = Path(scratch) / "checkout"
        shutil.copytree(REPO, broken, ignore=shutil.ignore_patterns(".git", "__pycache__", ".hypothesis"))
        resolver = broken / "kubedock_dns" / "resolver.py"
        right = "return Answer(TYPE_PTR, (owner,))"
        assert right in resolver.read_text()
        resolver.write_text(resolver.read_text().replace(right, 'return Answer(TYPE_PTR, (owner + "x",))'))
        done = run_demo(broken)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    wrong = [line for line in done.stdout.splitlines() if "WRONG, expected run-" in line]
    assert len(wrong) == 2, done.stdout  # each run's reverse lookup of its db
    assert "2 of 13 lookups were WRONG" in done.stdout


def test_a_demo_that_cannot_run_exits_2_saying_why() -> None:
    """An interpreter that cannot import kubedock-dns: exit 2 at once, with the fix."""
    done = run_demo(REPO, PYTHON="/bin/false")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not importable by /bin/false" in done.stderr and "pip install -e" in done.stderr
