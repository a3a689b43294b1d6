"""Instructions per answered query, counted by ``valgrind --tool=callgrind``, for kubedock-dns and
its peers (issue 13).

Times on a shared 2-core machine swing with everyone else's load; the number of instructions a
server executes per query does not.  Each server serves the suite's 100-pod topology
(:mod:`bench.peers` configures it exactly as the QPS suite does) under callgrind; this sends
``--queries`` identical queries of one kind from one pod address over loopback, one after another
(each waits for its answer), with the counters zeroed before and dumped after, and divides.  The
count covers everything the server process executes in user space for a query, all its threads
included: the event loop's poll, recvfrom, the decision, sendto.  The kernel's share of the
system calls is not counted (callgrind sees user space only), nor the upstream's work for a
forwarded query (another process).

What runs even with no query (Go's scheduler and garbage collector, tokio's and Twisted's timers)
is counted over an idle stretch as long as the queries took, from the same process right after,
and reported beside (``idle``); ``net`` subtracts it.  aardvark-dns forks into the background,
where ``callgrind_control`` cannot reach it: its count is the difference between the whole-life
counts of two processes, one asked ``--queries`` more queries than the other, which stayed idle
as long instead.  CoreDNS runs with ``GODEBUG=asyncpreemptoff=1``: Go's preemption signals
crash callgrind.

Kinds and servers:

* **local**: the first query of the mix, ``db`` A in the search-suffixed form glibc sends first
  (``db.bench.svc.cluster.local``; ``db.n0000.bench.svc.cluster.local`` for the servers without
  per-source views).  kubedock-dns twice: answered from prepared bytes (``fast path``) and by a
  second server started with ``--no-fast-path`` (``full path``);
* **forwarded**: ``fw1.example.test`` A, relayed to the upstream dnsmasq and back.

    python -m bench.cost [--queries 1000] [--servers kubedock-dns,dnsmasq,coredns,aardvark]

Prints one JSON object and a table.  A regression shows as a larger count even when the machine
is busy (the count does not depend on how much CPU the process was given, only on what it
executed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query

from bench.peers import (
    AARDVARK_SERVER, DNSMASQ_SERVER, KUBEDOCK_SERVER, Process, Server, Unavailable, answer_matches,
    coredns_server, start, start_upstream,
)
from bench.topology import Topology

_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.M)


def _instructions(dump_dir: Path, before: set[Path]) -> int:
    """The instruction total of the dump file(s) written since ``before`` (one per thread with
    ``--separate-threads``, one per process otherwise)."""
    total = 0
    for path in sorted(set(dump_dir.glob("callgrind.out*")) - before):
        match = _TOTALS.search(path.read_bytes())
        if match:
            total += int(match.group(1))
    return total


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _dump(process: Process, dump_dir: Path, before: set[Path]) -> int:
    _control("--dump", str(process.pid))
    deadline = time.monotonic() + 60
    while not (total := _instructions(dump_dir, before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return total


def count(process: Process, dump_dir: Path, wire: bytes, source: str, queries: int, check) -> dict:
    """Instructions per query of ``queries`` sends of ``wire`` from ``source``, and what the process
    executes idle over as long a stretch, per query."""
    address = process.address(source)

    def ask() -> dns.message.Message:
        return dns.query.udp(dns.message.from_wire(wire), address, port=process.port, source=source, timeout=30)

    for _ in range(50):  # warm: caches prepared, upstream sockets open
        response = ask()
    if not check(response):
        raise RuntimeError(f"{process.name} answered wrongly: {response}")
    _control("--zero", str(process.pid))
    before = set(dump_dir.glob("callgrind.out*"))
    began = time.monotonic()
    for _ in range(queries):
        ask()
    took = time.monotonic() - began
    busy = _dump(process, dump_dir, before)
    _control("--zero", str(process.pid))
    before = set(dump_dir.glob("callgrind.out*"))
    time.sleep(took)
    idle = _dump(process, dump_dir, before)
    return {"instructions": round(busy / queries), "idle": round(idle / queries),
            "net": round((busy - idle) / queries), "seconds": round(took, 2)}


def count_by_lifetime(start, wire: bytes, source: str, queries: int, check) -> dict:
    """For a server that forks into the background (aardvark-dns), which callgrind_control cannot
    reach: the whole-life count of one process that answered ``queries`` more queries, less that of
    an identical process left idle as long instead (start-up, warm-up and idle time cancel)."""
    totals = []
    took = 0.0
    for asked in (queries, 0):
        process, dump_dir = start()
        address = process.address(source)

        def ask() -> dns.message.Message:
            return dns.query.udp(dns.message.from_wire(wire), address, port=process.port, source=source, timeout=30)

        try:
            for _ in range(50):
                response = ask()
            if not check(response):
                raise RuntimeError(f"{process.name} answered wrongly: {response}")
            began = time.monotonic()
            for _ in range(asked):
                ask()
            took = took or time.monotonic() - began
            if not asked:
                time.sleep(took)
            pid = process.pid
        finally:
            process.stop()
        deadline = time.monotonic() + 60
        while not (dump_dir / f"callgrind.out.{pid}").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        totals.append(_instructions(dump_dir, {p for p in dump_dir.glob("callgrind.out*") if p.name != f"callgrind.out.{pid}"}))
    per_query = round((totals[0] - totals[1]) / queries)
    return {"instructions": per_query, "idle": None, "net": per_query, "seconds": round(took, 2),
            "method": "whole-life difference of two processes"}


def _start(server: Server, topology: Topology, work: Path, upstream, extra: list[str]) -> Process:
    """``server`` under callgrind, once it answers (a taken port is chosen again, as in the suite)."""
    # Go's asynchronous preemption signals crash callgrind (threads.c post_signal assertion).
    go = ["env", "GODEBUG=asyncpreemptoff=1"] if server.name == "CoreDNS" else []
    wrapper = [*go, "valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out.%p", "--dump-instr=no"]
    return start(server, topology, work, upstream, None, wrapper=wrapper, extra=extra, label=" under callgrind",
                 ready_timeout=600)


def subjects(chosen: list[str]) -> list[tuple[str, Server, list[str], tuple[str, ...]]]:
    """(label, server, extra arguments, kinds) for each server run under callgrind."""
    table = {
        "kubedock-dns": [("kubedock-dns fast path", KUBEDOCK_SERVER, [], ("local", "forwarded")),
                         ("kubedock-dns full path", KUBEDOCK_SERVER, ["--no-fast-path"], ("local", "forwarded"))],
        "dnsmasq": [("dnsmasq", DNSMASQ_SERVER, [], ("local", "forwarded"))],
        "coredns": [("CoreDNS", coredns_server(build=False), [], ("local", "forwarded"))],
        "aardvark": [("aardvark-dns", AARDVARK_SERVER, [], ("local", "forwarded"))],
    }
    return [s for key in chosen for s in table[key]]


def measure(work: Path, queries: int, chosen: list[str]) -> dict:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise RuntimeError("valgrind is missing: apt-get install valgrind")
    topology = Topology(50)
    source = topology.sources(1)[0]
    mix = topology.queries_for(source)
    local = mix[0]
    forwarded = next(q for q in mix if q.kind == "forwarded" and q.view_name.startswith("fw1."))
    upstream, upstream_process = start_upstream(work / "upstream", None)
    result: dict = {"queries_per_kind": queries, "valgrind": subprocess.run(
        ["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "python": sys.version.split()[0], "servers": {}}
    try:
        for label, server, extra, kinds in subjects(chosen):
            sdir = work / label.replace(" ", "-")
            entry = result["servers"][label] = {}
            try:
                result.setdefault("versions", {})[server.name] = server.version(server.resolve_binary())
                if server.pid_file:
                    for i, kind in enumerate(kinds):
                        query = local if kind == "local" else forwarded
                        wire = dns.message.make_query(*query.line(server.form).split()).to_wire()
                        runs = iter(range(100))

                        def fresh(server=server, kind=kind, extra=extra, runs=runs):
                            d = sdir / f"{kind}-{next(runs)}"
                            return _start(server, topology, d, upstream, extra), d

                        entry[kind] = count_by_lifetime(fresh, wire, source.ip, queries,
                                                        lambda r, q=query: answer_matches(r, q, owner=False))
                        entry[kind]["query"] = query.line(server.form)
                    continue
                process = _start(server, topology, sdir, upstream, extra)
            except Unavailable as e:
                result["servers"][label] = {"missing": str(e)}
                continue
            try:
                for kind in kinds:
                    query = local if kind == "local" else forwarded
                    wire = dns.message.make_query(*query.line(server.form).split()).to_wire()
                    entry[kind] = count(process, sdir, wire, source.ip, queries,
                                        lambda r, q=query: answer_matches(r, q))
                    entry[kind]["query"] = query.line(server.form)
            finally:
                process.stop()
    finally:
        upstream_process.stop()
    return result


def _f(value) -> str:
    return "–" if value is None else f"{value:,}"


def table(result: dict) -> str:
    lines = ["| server | local: instructions (idle) | forwarded: instructions (idle) |", "|---|---|---|"]
    for label, entry in result["servers"].items():
        if "missing" in entry:
            lines.append(f"| {label} | missing: {entry['missing']} | |")
            continue
        cells = [f"{entry[k]['instructions']:,} ({_f(entry[k]['idle'])})" if k in entry else "–"
                 for k in ("local", "forwarded")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000, help="queries per kind (default 1000)")
    parser.add_argument("--servers", default="kubedock-dns,dnsmasq,coredns,aardvark",
                        help="comma-separated subset of kubedock-dns,dnsmasq,coredns,aardvark (default all)")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    chosen = args.servers.split(",")
    unknown = [c for c in chosen if c not in ("kubedock-dns", "dnsmasq", "coredns", "aardvark")]
    if unknown:
        parser.error(f"unknown server {unknown}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-cost."))
    try:
        result = measure(work, args.queries, chosen)
    except RuntimeError as e:
        print(f"cost: cannot run: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
