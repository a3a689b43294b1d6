"""The benchmark suite in one command: ``python -m bench.run [--quick]`` from the repository root.

For each topology (100 pods in 50 networks; with the full run also 10,000 pods in 5,000
networks) and each server (kubedock-dns, CoreDNS, dnsmasq, podman's aardvark-dns, the naive
twisted.names baseline):
start the server pinned to core 0, check that it answers every query of the mix as expected,
measure the maximum QPS with dnsperf pinned to core 1 (one dnsperf process per source pod
address), then p50/p99 latency at 50% and 90% of that maximum, forwarded-only maximum QPS and
latency at a fixed rate (against asking the upstream directly), and peak RSS.  ``--propagation``
adds the figures of :mod:`bench.propagation` (real API server).  Writes ``docs/benchmarks.md``,
``docs/benchmarks.png`` and the raw ``benchmarks.json`` in the work directory.

The exit status is 0 when every measurement ran, whatever the numbers; 1 when a server that is
present failed to start or answered a query wrongly (its numbers would mean nothing); 2 when the
harness itself cannot run (no dnsperf, no dnsmasq, an unreadable dnsperf output).  kubedock-dns
and, with ``--quick``, an unbuilt CoreDNS are reported as missing without failing the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.load import HarnessError, LoadResult, dnsperf_version, run_load
from bench.peers import (
    AARDVARK_SERVER, DNSMASQ_SERVER, KUBEDOCK_SERVER, NAIVE_SERVER, REPO, Process, Server, Unavailable, answer_matches,
    ask, coredns_server, start, start_upstream,
)
from bench.topology import FORWARDED_ZONE, Topology

SERVER_CORE = 0
LOAD_CORE = 1


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split(":")[1].strip()
    except (OSError, IndexError):
        mem = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def summarise(load: LoadResult) -> dict:
    out = {"qps": round(load.qps, 1), "sent": load.sent, "completed": load.completed, "lost": load.lost,
           "lost_fraction": load.lost_fraction, "error_fraction": load.error_fraction, "rcodes": load.rcodes}
    for kind in ("all", "local", "forwarded"):
        for p in (50, 99):
            value = load.latency(p, kind)
            out[f"p{p}_{kind}_ms"] = None if value is None else round(value * 1000, 3)
    return out


def check_answers(process: Process, server: Server, topology: Topology, sources,
                  defects: set[str] | None = None) -> list[str]:
    """Ask every query of every source's mix (UDP; the first source also over TCP when the server
    serves TCP); list the wrong.  An answer wrong only by the server's ``known_defect`` is added
    to ``defects`` (when given) instead."""
    wrong = []
    for i, source in enumerate(sources):
        for query in topology.queries_for(source):
            for tcp in ((False, True) if i == 0 and server.tcp else (False,)):
                defect = None
                try:
                    response = ask(process.port, query, server.form, source.ip, timeout=3.0, tcp=tcp,
                                   server=process.address(source.ip))
                    ok = answer_matches(response, query)
                    if not ok and server.known_defect and defects is not None:
                        defect = server.known_defect(response, query)
                    got = [rr.to_text() for rr in response.answer] or [f"rcode {response.rcode()}"]
                except Exception as e:  # noqa: BLE001 - a timeout is a wrong answer here
                    ok, got = False, [repr(e)]
                if defect:
                    defects.add(defect)  # type: ignore[union-attr]
                elif not ok:
                    wrong.append(f"{'TCP' if tcp else 'UDP'} from {source.ip}: {query.line(server.form)} "
                                 f"expected {query.expect}, got {got}")
    return wrong


@dataclass
class Subject:
    """A started server in one topology: its results entry and the arguments of its dnsperf runs."""

    server: Server
    entry: dict
    process: Process
    common: dict


def start_server(server: Server, topology: Topology, work: Path, upstream, sources, files,
                 args) -> tuple[dict, Subject | None]:
    """Start ``server`` and check every answer; the entry, and the subject to load when it is
    fit to be measured (None: missing, skipped or failed, said in the entry)."""
    entry: dict = {"name": server.name, "form": server.form}
    try:
        binary = server.resolve_binary()
        entry["version"] = server.version(binary)
    except Unavailable as e:
        entry.update(status="missing", note=str(e))
        return entry, None
    swork = work / server.name.replace(" ", "-").replace(".", "")
    if server.max_networks and topology.networks > server.max_networks[0]:
        entry.update(status="skipped", note=f"not run above {server.max_networks[0]:,} networks: {server.max_networks[1]}")
        return entry, None
    try:
        process = start(server, topology, swork, upstream, SERVER_CORE)
    except Unavailable as e:
        entry.update(status="missing", note=str(e))
        return entry, None
    except Exception as e:  # noqa: BLE001 - reported, the run goes on with the others
        entry.update(status="failed", note=f"did not start: {e}")
        return entry, None
    try:
        return entry, _checked(server, entry, process, topology, swork, sources, files, args)
    except BaseException:
        process.stop()
        raise


def _checked(server: Server, entry: dict, process: Process, topology: Topology, swork: Path, sources, files,
             args) -> Subject | None:
    """The started server's subject once every answer is right; None (and stopped) when not."""
    entry["command"] = process.argv
    if (swork / "Corefile").is_file():
        entry["corefile"] = (swork / "Corefile").read_text()
    first_network = swork / "aardvark" / topology.network(0).label
    if first_network.is_file():
        entry["config_example"] = f"# {first_network}\n" + first_network.read_text()
    defects: set[str] = set()
    wrong = check_answers(process, server, topology, sources, defects)
    entry["checked"] = (len(sources) + (1 if server.tcp else 0)) * len(topology.queries_for(sources[0]))
    if defects or server.notes:
        entry["defects"] = sorted(defects) + list(server.notes)
    if wrong:
        entry.update(status="failed", note=f"{len(wrong)} wrong answers", wrong=wrong[:20])
        process.stop()
        return None
    pairs = [(s.ip, files[server.form][s.ip]) for s in sources]
    common = dict(server="127.0.0.1", port=process.port, sources=pairs, work=swork, targets=process.addresses,
                  core=LOAD_CORE, outstanding=args.outstanding, clients=args.clients)
    return Subject(server, entry, process, common)


def say_status(entry: dict) -> None:
    """Print, as it happens, that a server is missing, skipped or failed (and its wrong answers)."""
    label = "FAILED" if entry["status"] == "failed" else entry["status"]
    print(f"bench:   {entry['name']}: {label}: {entry['note']}", file=sys.stderr, flush=True)
    for line in entry.get("wrong", []):
        print(f"bench:     {line}", file=sys.stderr)


def median_round(results: list[LoadResult], key) -> LoadResult:
    """The round whose ``key`` is the median (the lower middle of an even count)."""
    ranked = sorted(results, key=key)
    return ranked[(len(ranked) - 1) // 2]


def interleaved(subjects: list[Subject], rounds: int, what: str, run) -> dict[str, list[LoadResult]]:
    """``run(subject)`` for every subject, ``rounds`` times, the order rotated each round: the
    machine's other load, which drifts over minutes, falls on every server alike instead of on
    whichever ran during a busy stretch."""
    results: dict[str, list[LoadResult]] = {s.server.name: [] for s in subjects}
    for r in range(rounds):
        order = subjects[r % len(subjects):] + subjects[: r % len(subjects)] if subjects else []
        for subject in order:
            print(f"bench:   {subject.server.name}: {what} (round {r + 1} of {rounds})", file=sys.stderr, flush=True)
            results[subject.server.name].append(run(subject))
    return results


def measure_servers(chosen: list[Server], topology: Topology, work: Path, upstream, sources, files,
                    args, forward_files) -> list[dict]:
    """Every chosen server's entry: all are started and checked first, then the maximum-QPS and
    forwarded runs go round them in ``args.rounds`` interleaved rounds (the median round is
    reported, every round's QPS beside it); latency at 50% and 90% of each one's own maximum."""
    entries: list[dict] = []
    subjects: list[Subject] = []
    try:
        for server in chosen:
            entry, subject = start_server(server, topology, work, upstream, sources, files, args)
            entries.append(entry)
            if subject is not None:
                subjects.append(subject)
            else:
                say_status(entry)
        maxima = interleaved(subjects, args.rounds, "max QPS",
                             lambda s: run_load(tag="max", duration=args.duration, **s.common))
        for subject in subjects:
            rounds = maxima[subject.server.name]
            top = median_round(rounds, lambda r: r.qps)
            subject.entry["max"] = summarise(top)
            subject.entry["max_rounds"] = [round(r.qps, 1) for r in rounds]
            subject.entry["dnsperf_max_command"] = top.commands[0]
            few = spread(subject.common["sources"], args.latency_sources)
            for share in (50, 90):
                rate = top.qps * share / 100
                print(f"bench:   {subject.server.name}: latency at {share}% ({rate:.0f} QPS)", file=sys.stderr, flush=True)
                load = run_load(tag=f"lat{share}", duration=args.duration, rate=rate,
                                **(subject.common | {"sources": few}))
                subject.entry[f"at{share}"] = summarise(load) | {"rate": round(rate)}
                subject.entry.setdefault("dnsperf_latency_command", load.commands[0])
        if forward_files:
            fpairs = [(s.ip, forward_files[s.ip]) for s in sources]
            fmax = interleaved(subjects, args.rounds, "forwarded-only max QPS",
                               lambda s: run_load(tag="fwd", duration=args.duration, **(s.common | {"sources": fpairs})))
            flat = interleaved(subjects, args.rounds, f"forwarded-only latency at {args.forward_rate} QPS",
                               lambda s: run_load(tag="fwdlat", duration=args.duration, rate=args.forward_rate,
                                                  **(s.common | {"sources": spread(fpairs, args.latency_sources)})))
            for subject in subjects:
                name = subject.server.name
                subject.entry["forwarded_max"] = summarise(median_round(fmax[name], lambda r: r.qps))
                at_rate = flat[name]
                subject.entry["forwarded_at_rate"] = summarise(
                    median_round(at_rate, lambda r: r.latency(99, "forwarded") or 0.0)) | {"rate": args.forward_rate}
                subject.entry["forwarded_at_rate_rounds"] = [summarise(r) for r in at_rate]
        for subject in subjects:
            subject.entry["peak_rss_kib"] = subject.process.peak_rss_kib()
            if not subject.process.alive():
                subject.entry.update(status="failed", note=f"exited during the run:\n{subject.process.log_tail()}")
                say_status(subject.entry)
            else:
                subject.entry["status"] = "ok"
        return entries
    finally:
        for subject in subjects:
            subject.process.stop()


def spread(pairs: list, count: int) -> list:
    """``count`` of the sources, evenly spread, for latency runs: every extra dnsperf process on the
    load core delays the others' receive timestamps (with 8, dnsmasq's p99 grew about fivefold)."""
    return [pairs[i * len(pairs) // count] for i in range(min(count, len(pairs)))]


def write_query_files(topology: Topology, sources, work: Path) -> tuple[dict, dict]:
    files: dict = {"view": {}, "peer": {}}
    qdir = work / "queries"
    qdir.mkdir(parents=True, exist_ok=True)
    for source in sources:
        mix = topology.queries_for(source)
        for form in ("view", "peer"):
            path = qdir / f"{form}-{source.ip}.txt"
            path.write_text("".join(q.line(form) + "\n" for q in mix))
            files[form][source.ip] = path
    forward = {}
    for source in sources:
        path = qdir / f"forwarded-{source.ip}.txt"
        path.write_text("".join(q.line("peer") + "\n" for q in topology.forwarded_queries()))
        forward[source.ip] = path
    return files, forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: 2 s loads, the 100-pod topology only, CoreDNS only if already built")
    parser.add_argument("--duration", type=float, help="seconds per dnsperf run (default 10, quick 2)")
    parser.add_argument("--sources", type=int, help="source pod addresses (dnsperf processes; default 8, quick 4)")
    parser.add_argument("--latency-sources", type=int, default=2,
                        help="source pods (dnsperf processes) for the latency runs (default 2)")
    parser.add_argument("--forward-rate", type=int, default=2000,
                        help="QPS at which forwarded-only latency is compared with the upstream's (default 2000)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds of the maximum-QPS and forwarded runs, median reported "
                             "(default 3, quick 1)")
    parser.add_argument("--outstanding", type=int, default=20, help="dnsperf -q per process (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c per process (default 4)")
    parser.add_argument("--servers", help="comma-separated subset: kubedock-dns,coredns,dnsmasq,aardvark,naive")
    parser.add_argument("--sizes", help="comma-separated network counts (default 50,5000; quick 50)")
    parser.add_argument("--propagation", action="store_true",
                        help="also measure propagation (1,000 pods) and 10,000-pod initial sync against a "
                             "real API server (bench.propagation; needs testbed.controlplane)")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one in /tmp)")
    parser.add_argument("--output-dir", type=Path,
                        help="where benchmarks.md/.png go (default docs/; quick: the work directory)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.sources = args.sources or (4 if args.quick else 8)
    args.rounds = args.rounds or (1 if args.quick else 3)
    sizes = [int(s) for s in (args.sizes or ("50" if args.quick else "50,5000")).split(",")]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-bench."))
    work.mkdir(parents=True, exist_ok=True)
    output = args.output_dir or (work if args.quick else REPO / "docs")
    began = time.monotonic()

    servers = {"kubedock-dns": KUBEDOCK_SERVER, "coredns": coredns_server(build=not args.quick),
               "dnsmasq": DNSMASQ_SERVER, "aardvark": AARDVARK_SERVER, "naive": NAIVE_SERVER}
    chosen = (args.servers or ",".join(servers)).split(",")
    unknown = [c for c in chosen if c not in servers]
    if unknown:
        parser.error(f"unknown server {unknown} (expected some of {', '.join(servers)})")

    results: dict = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "duration_s": args.duration, "sources": args.sources,
        "outstanding": args.outstanding, "clients": args.clients, "latency_sources": args.latency_sources,
        "rounds": args.rounds,
        "machine": machine(), "topologies": [], "work_dir": str(work),
    }
    failed = False
    try:
        results["dnsperf"] = dnsperf_version()
        upstream, upstream_process = start_upstream(work / "upstream", LOAD_CORE)
    except (HarnessError, Unavailable, RuntimeError) as e:
        print(f"bench: cannot run: {e}", file=sys.stderr)
        return 2
    results["upstream"] = {"address": upstream.hostport, "command": upstream_process.argv}
    try:
        for networks in sizes:
            topology = Topology(networks)
            twork = work / f"t{topology.size}"
            sources = topology.sources(args.sources)
            files, forward = write_query_files(topology, sources, twork)
            forward = forward if networks == sizes[0] else None
            tentry: dict = {"name": topology.name, "pods": topology.size, "networks": networks,
                            "sources": [s.ip for s in sources], "servers": []}
            results["topologies"].append(tentry)
            print(f"bench: {topology.name}", file=sys.stderr, flush=True)
            tentry["servers"] = measure_servers([servers[key] for key in chosen], topology, twork, upstream,
                                                sources, files, args, forward)
            failed = failed or any(entry["status"] == "failed" for entry in tentry["servers"])
            if forward:
                print("bench:   upstream directly: forwarded-only max QPS", file=sys.stderr, flush=True)
                direct = run_load(server=upstream.address, port=upstream.port,
                                  sources=[(s.ip, forward[s.ip]) for s in sources], work=twork / "direct",
                                  tag="fwd", duration=args.duration, core=LOAD_CORE,
                                  outstanding=args.outstanding, clients=args.clients)
                tentry["upstream_direct"] = summarise(direct)
                print(f"bench:   upstream directly: forwarded-only latency at {args.forward_rate} QPS",
                      file=sys.stderr, flush=True)
                direct = run_load(server=upstream.address, port=upstream.port,
                                  sources=spread([(s.ip, forward[s.ip]) for s in sources], args.latency_sources),
                                  work=twork / "direct", tag="fwdlat", duration=args.duration,
                                  rate=args.forward_rate, core=LOAD_CORE, outstanding=args.outstanding,
                                  clients=args.clients)
                tentry["upstream_direct_at_rate"] = summarise(direct) | {"rate": args.forward_rate}
        results["upstream"]["peak_rss_kib"] = upstream_process.peak_rss_kib()
    except HarnessError as e:
        print(f"bench: harness failure: {e}", file=sys.stderr)
        traceback.print_exc()
        return 2
    finally:
        upstream_process.stop()
    if args.propagation:
        from bench import propagation

        print("bench: propagation and initial sync against the control plane", file=sys.stderr, flush=True)
        try:
            results["propagation"] = propagation.measure(work / "propagation")
        except propagation.PropagationUnavailable as e:
            results["propagation"] = {"missing": str(e)}
        except Exception as e:  # noqa: BLE001 - kubedock-dns failing here is a reported failure
            results["propagation"] = {"failed": f"{type(e).__name__}: {e}"}
            failed = True
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["machine"]["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    (work / "benchmarks.json").write_text(json.dumps(results, indent=2))
    output.mkdir(parents=True, exist_ok=True)
    invocation = ("python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    report.write(results, output / "benchmarks.md", output / "benchmarks.png", invocation)
    print(f"bench: wrote {output / 'benchmarks.md'}, {output / 'benchmarks.png'}, "
          f"{work / 'benchmarks.json'} in {results['elapsed_s']} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
