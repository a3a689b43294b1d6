"""The soak in short (bench/soak.py; the full run's figures are in docs/benchmarks.md): DNS load
from many pod addresses while pods churn through the real API server, which is killed and
restarted, and whose watch connection is black-holed, with and without hostile clients beside
(junk queries, a TCP hog): no wrong answer, almost every query answered, changes still arrive
afterwards, and memory does not grow."""

from __future__ import annotations

import os

import pytest

from bench.soak import soak

pytestmark = pytest.mark.controlplane

MINUTES = float(os.environ.get("KUBEDOCK_DNS_SOAK_MINUTES", "1"))


@pytest.fixture
def binaries():
    from testbed.controlplane import BinariesUnavailable, find_binaries

    try:
        return find_binaries()
    except BinariesUnavailable as e:
        pytest.skip(f"no Kubernetes control plane available: {e}")


@pytest.mark.parametrize("hostile", [False, True], ids=["calm", "hostile"])
def test_short_soak_with_faults(binaries, tmp_path, hostile):
    """One minute (KUBEDOCK_DNS_SOAK_MINUTES) of load, churn, an API server restart and a black
    hole, and (hostile) a pod sending junk and another holding every TCP slot: zero wrong
    answers, at most 1% unanswered, a new network resolvable within 15 s of its creation after
    the faults, resident memory at the end within 15 MiB of after the warm-up.  The soak runs
    its own control plane: it kills and restarts that API server."""
    result = soak(tmp_path, minutes=MINUTES, stable=10, churn=5, load_threads=2, hostile=hostile)
    print(result)
    assert result["queries"] > 1000, result
    assert result["wrong"] == 0, result["wrong_examples"]
    assert result["unanswered"] <= result["queries"] / 100, result
    assert result["new_network_resolvable_after_s"] is not None and result["new_network_resolvable_after_s"] < 15, result
    assert result["rss_kib_end"] - result["rss_kib_after_warmup"] < 15 * 1024, result
