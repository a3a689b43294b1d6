"""The benchmark compares like with like: every server answers the generated queries correctly.

These tests run the pieces of ``bench/`` with tiny loads: the generated pods follow the kubedock
contract, every server (CoreDNS, dnsmasq, the naive twisted.names baseline and, once its plugin
exists, kubedock-dns) gives the expected answer to every query of the mix from pod source
addresses, dnsperf's output is read correctly, and the whole suite runs end to end.  Timings are
never asserted.  A server whose binary is genuinely absent is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil

import dns.rcode
import pytest

from bench import load, peers, run
from bench.topology import FORWARDED_ANSWER, ROLES, Topology
from kubedock_dns.contract import pod_record_from_dict

SERVERS = {
    "dnsmasq": peers.DNSMASQ_SERVER,
    "CoreDNS": peers.coredns_server(build=False),
    "naive": peers.NAIVE_SERVER,
    "kubedock-dns": peers.KUBEDOCK_SERVER,
    "aardvark-dns": peers.AARDVARK_SERVER,
}


def _require(server: peers.Server) -> None:
    try:
        server.resolve_binary()
    except peers.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    if not shutil.which("dnsmasq") and not shutil.which(peers.DNSMASQ):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    up, process = peers.start_upstream(tmp_path_factory.mktemp("upstream"), core=None)
    yield up
    process.stop()


def test_generated_pods_follow_the_kubedock_contract():
    """Every generated pod parses to a record with its address, its one network, and the names
    Docker resolves (hostname first, then alias, container name, short ID); networks have two pods."""
    topology = Topology(5)
    raw = json.loads(topology.pods_json())
    assert len(raw) == topology.size == 10
    for pod, obj in zip(topology.pods(), raw):
        record = pod_record_from_dict(obj)
        assert record.ips == (pod.ip,)
        assert record.networks == (pod.network.id,)
        assert record.names == pod.names
        assert record.is_asker and record.is_answer()
        assert pod.ip.startswith("127.10.")
    assert len({p.network.id for p in topology.pods()}) == 5
    assert len({p.ip for p in topology.pods()}) == 10


def test_large_topology_is_unique_and_stays_in_the_pod_range():
    """10,000 pods get distinct addresses in 127.10.0.0/16 and distinct peer-form names."""
    topology = Topology(5000)
    pods = topology.pods()
    assert len({p.ip for p in pods}) == 10_000
    assert all(p.ip.startswith("127.10.") for p in pods)
    names = [n for _, ns in topology.peer_records() for n in ns]
    assert len(names) == len(set(names))


def test_query_mix_is_the_same_text_for_every_asker_in_view_form():
    """kubedock-dns gets one query text from every pod for local names (the source picks the
    network), while the peer form names the asker's network; both expect the same addresses."""
    topology = Topology(50)
    a, b = topology.sources(2)
    qa, qb = topology.queries_for(a), topology.queries_for(b)
    assert len(qa) == 20
    shared = ("db.", "service.", "postgres.", "api.")
    view_a = [q.line("view") for q in qa if q.kind == "local" and q.view_name.startswith(shared)]
    view_b = [q.line("view") for q in qb if q.kind == "local" and q.view_name.startswith(shared)]
    assert len(view_a) == 12 and view_a == view_b
    assert {q.peer_name for q in qa if q.kind == "local" and q.qtype != "PTR"}.isdisjoint(
        {q.peer_name for q in qb if q.kind == "local" and q.qtype != "PTR"})
    assert qa[0].expect == (a.ip,) and qb[0].expect == (b.ip,)
    assert {q.qtype for q in qa} == {"A", "AAAA", "PTR"}
    assert [q.expect for q in qa if q.kind == "forwarded"] == [(FORWARDED_ANSWER,)] * 3


@pytest.mark.parametrize("networks", [50, 5000])
@pytest.mark.parametrize("name", list(SERVERS))
def test_every_server_answers_every_query_of_the_mix(name, networks, upstream, tmp_path):
    """From several pod source addresses, each server returns the expected A addresses, NODATA
    for AAAA, the pod's primary name for PTR, and the upstream's answer for forwarded names."""
    server = SERVERS[name]
    _require(server)
    if server.max_networks and networks > server.max_networks[0]:
        pytest.skip(f"{name} is not run above {server.max_networks[0]} networks: {server.max_networks[1]}")
    topology = Topology(networks)
    try:
        process = peers.start(server, topology, tmp_path, upstream, core=None)
    except peers.Unavailable as e:  # aardvark-dns needs the upstream on port 53 (root)
        pytest.skip(str(e))
    try:
        sources = topology.sources(3)
        defects: set[str] = set()
        wrong = run.check_answers(process, server, topology, sources, defects)
        assert wrong == []
        # Only a peer's documented defect may stand in for a right answer, never ours.
        assert not defects or (server.known_defect and name != "kubedock-dns")
        # The same name from two networks: different addresses (view form) or names (peer form).
        q0, q1 = (topology.queries_for(s)[0] for s in sources[:2])
        r0 = peers.ask(process.port, q0, server.form, sources[0].ip, server=process.address(sources[0].ip))
        r1 = peers.ask(process.port, q1, server.form, sources[1].ip, server=process.address(sources[1].ip))
        assert r0.answer[0][0].address == sources[0].ip != r1.answer[0][0].address
        aaaa = next(q for q in topology.queries_for(sources[0]) if q.qtype == "AAAA")
        response = peers.ask(process.port, aaaa, server.form, sources[0].ip, server=process.address(sources[0].ip))
        assert response.rcode() == dns.rcode.NOERROR and response.answer == []
    finally:
        process.stop()


def test_dnsperf_output_is_read_back(upstream, tmp_path):
    """A tiny rate-limited dnsperf load from two pod addresses against dnsmasq: every query
    completes with NOERROR, the counts add up, and every query gets a latency of the right kind."""
    if not shutil.which("dnsperf"):
        pytest.skip("dnsperf is not installed (apt-get install dnsperf)")
    topology = Topology(50)
    sources = topology.sources(2)
    process = peers.start(peers.DNSMASQ_SERVER, topology, tmp_path / "srv", upstream, core=None)
    try:
        files, _ = run.write_query_files(topology, sources, tmp_path)
        result = load.run_load("127.0.0.1", process.port, [(s.ip, files["peer"][s.ip]) for s in sources],
                               tmp_path / "load", "t", duration=1, rate=200, core=None)
    finally:
        process.stop()
    assert result.sent > 0 and result.completed == result.sent and result.lost == 0
    assert result.rcodes == {"NOERROR": result.completed}
    assert len(result.latencies["all"]) == result.completed
    assert len(result.latencies["forwarded"]) == pytest.approx(result.completed * 3 / 20, abs=4)
    assert result.latency(50) <= result.latency(99)
    assert [c[c.index("-a") + 1] for c in result.commands] == [s.ip for s in sources]


def test_the_suite_runs_end_to_end(tmp_path):
    """``python -m bench.run --quick`` with one peer writes the Markdown table and the plot and
    exits 0."""
    if not shutil.which("dnsperf"):
        pytest.skip("dnsperf is not installed (apt-get install dnsperf)")
    status = run.main(["--quick", "--duration", "1", "--sources", "2", "--servers", "dnsmasq",
                       "--work-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert status == 0
    text = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "| dnsmasq | " in text and "Dnsmasq version" in text
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    entry = results["topologies"][0]["servers"][0]
    assert entry["status"] == "ok" and entry["max"]["qps"] > 0 and entry["peak_rss_kib"] > 0
    assert results["topologies"][0]["upstream_direct"]["qps"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out" / "benchmarks.png").stat().st_size > 0


def test_roles_are_two_pods_per_network():
    """The topology sizes the issue asks for: 100 pods in 50 networks, 10,000 in 5,000."""
    assert len(ROLES) == 2
    assert (Topology(50).size, Topology(5000).size) == (100, 10_000)


def test_report_names_missing_and_failed_servers_instead_of_numbers():
    """A server that is missing or failed appears in the table with its reason, and the target
    lines say kubedock-dns was not measured rather than inventing a ratio."""
    from bench import report

    results = {
        "started": "2026-01-01T00:00:00+00:00", "work_dir": "/tmp/x", "quick": True, "duration_s": 2,
        "sources": 4, "clients": 4, "outstanding": 20, "latency_sources": 2, "dnsperf": "dnsperf 2.10.0",
        "machine": {"nproc": 2, "cpu": "cpu", "memory": "1 kB", "kernel": "k", "python": "3.11",
                    "loadavg_at_start": "0.00 0.00 0.00", "loadavg_at_end": "0.00 0.00 0.00"},
        "upstream": {"command": ["dnsmasq"]},
        "topologies": [{"name": "100 pods / 50 networks", "sources": ["127.10.0.10"], "servers": [
            {"name": "kubedock-dns", "status": "failed", "note": "3 wrong answers\nmore"},
            {"name": "CoreDNS", "status": "missing", "note": "CoreDNS is not built yet"},
        ]}],
    }
    text = report.markdown(results, None, "python -m bench.run --quick")
    assert "| kubedock-dns | failed: 3 wrong answers |" in text
    assert "| CoreDNS | missing: CoreDNS is not built yet |" in text
    assert "kubedock-dns not measured (failed: 3 wrong answers)" in text
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and load.percentile([], 99) is None


def test_memory_breakdown_runs_and_adds_up(capsys):
    """bench.memory reports every import part in server order, each resident set at least the one
    before it, and the records and index of the pods it decodes through the watcher's decoder."""
    from bench import memory

    assert memory.main(["--pods", "1000"]) == 0
    report = json.loads(capsys.readouterr().out)
    parts = report["imports"]
    assert [row["part"] for row in parts] == [part for part, _ in memory.PARTS]
    assert all(later["rss_mib"] >= earlier["rss_mib"] - 0.5 for earlier, later in zip(parts, parts[1:]))
    assert report["imports_total_mib"] == parts[-1]["rss_mib"]
    data = report["pod_data"]
    assert data["pods"] == 1000 and data["records_mib"] > 0 and data["index_mib"] > 0
