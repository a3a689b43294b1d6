"""Fuzzing in the suite: the kept seeds and crashes replay through every harness of
``tests/fuzz.py`` (no atheris needed), and a short coverage-guided run per target finds no
broken contract.  The long run is on demand: ``python -m tests.fuzz dns -max_total_time=600``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import CORPUS, HARNESSES

REPO = Path(__file__).resolve().parent.parent
SHORT_RUN_SECONDS = int(os.environ.get("KUBEDOCK_DNS_FUZZ_SECONDS", "10"))


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_every_kept_input_still_passes(target):
    """Seeds and every crash ever found (files in tests/fuzz_corpus/<target>/) hold the
    contracts: a regression of a fixed crash fails here, on every run."""
    harness = HARNESSES[target]()
    inputs = sorted((CORPUS / target).iterdir())
    assert len(inputs) >= 5
    for path in inputs:
        try:
            harness.run(path.read_bytes())
        except Exception as e:
            raise AssertionError(f"{path.relative_to(REPO)} breaks the {target} contract: {e!r}") from e


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (pip install atheris)")
@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_short_coverage_guided_run_finds_nothing(target, tmp_path):
    """A bounded atheris run (KUBEDOCK_DNS_FUZZ_SECONDS, default 10 s) from the kept seeds ends
    without a crash; a crash is written to the test's temporary directory and named here, to be
    copied into tests/fuzz_corpus/<target>/ with its fix."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "work").mkdir()  # new inputs go here; the kept corpus is only read
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", target, f"-max_total_time={SHORT_RUN_SECONDS}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(tmp_path / "work"), str(CORPUS / target)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SHORT_RUN_SECONDS * 6 + 60,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name != "work")
    assert done.returncode == 0 and not crashes, (crashes, done.stderr[-3000:])
    runs = [line for line in done.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 1000, done.stderr[-2000:]
