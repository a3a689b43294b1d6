"""Instructions per answered query, counted by ``valgrind --tool=callgrind`` (issue 13).

Times on a shared 2-core machine swing with everyone else's load; the number of instructions the
server executes per query does not.  This runs kubedock-dns (the suite's 100-pod topology from a
pods file) under callgrind, sends ``--queries`` identical queries of one kind one after another
(each waits for its answer), with the counters zeroed before and dumped after, and divides.  The
count covers everything the server process does for a query: the reactor's poll, recvfrom, the
decision, sendto (the upstream's work for a forwarded query is another process and not counted).

Kinds:

* **fast path**: ``db.bench.svc.cluster.local`` A from a known pod, answered from prepared bytes;
* **full path**: the same query to a second server started with ``--no-fast-path``;
* **forwarded**: ``fwN.example.test`` A, relayed to the upstream dnsmasq and back.

    python -m bench.cost [--queries 2000]

Prints one JSON object.  A regression shows as a larger count even when the machine is busy
(the count does not depend on how much CPU the process was given, only on what it executed).
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

from bench.peers import KUBEDOCK_SERVER, free_port, start_upstream, wait_answering, Process, launch
from bench.topology import Topology

_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.M)


def _instructions(dump_dir: Path, before: set[Path]) -> int:
    """The instruction total of the newest dump file(s) written since ``before``."""
    total = 0
    for path in sorted(set(dump_dir.glob("callgrind.out*")) - before):
        match = _TOTALS.search(path.read_bytes())
        if match:
            total += int(match.group(1))
    return total


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def count(process: Process, dump_dir: Path, wire: bytes, source: str, queries: int) -> float:
    """Instructions per query of ``queries`` sends of ``wire`` from ``source``."""
    pid = str(process.popen.pid)
    for _ in range(50):  # warm: caches prepared, upstream connection open
        dns.query.udp(dns.message.from_wire(wire), "127.0.0.1", port=process.port, source=source, timeout=30)
    _control("--zero", pid)
    before = set(dump_dir.glob("callgrind.out*"))
    for _ in range(queries):
        dns.query.udp(dns.message.from_wire(wire), "127.0.0.1", port=process.port, source=source, timeout=30)
    _control("--dump", pid)
    deadline = time.monotonic() + 60
    while not (total := _instructions(dump_dir, before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return total / queries


def _start(topology: Topology, work: Path, upstream, extra: list[str]) -> Process:
    binary = KUBEDOCK_SERVER.resolve_binary()
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out.%p",
            "--dump-instr=no", *KUBEDOCK_SERVER.configure(binary, topology, work, port, upstream), *extra]
    process = launch("kubedock-dns under callgrind", argv, port, work, None)
    source = topology.sources(1)[0]
    wait_answering(process, topology.queries_for(source)[0], "view", source.ip, 600)
    return process


def measure(work: Path, queries: int) -> dict:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise RuntimeError("valgrind is missing: apt-get install valgrind")
    topology = Topology(50)
    source = topology.sources(1)[0]
    local = dns.message.make_query("db.bench.svc.cluster.local", "A").to_wire()
    forwarded = dns.message.make_query("fw1.example.test", "A").to_wire()
    upstream, upstream_process = start_upstream(work / "upstream", None)
    result: dict = {"queries_per_kind": queries, "valgrind": subprocess.run(
        ["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "python": sys.version.split()[0]}
    try:
        for label, extra, kinds in (("fast", [], (("fast_path", local), ("forwarded", forwarded))),
                                    ("full", ["--no-fast-path"], (("full_path", local),))):
            process = _start(topology, work / label, upstream, extra)
            try:
                for kind, wire in kinds:
                    result[f"{kind}_instructions"] = round(count(process, work / label, wire, source.ip, queries))
            finally:
                process.stop()
    finally:
        upstream_process.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=2000, help="queries per kind (default 2000)")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-cost."))
    try:
        result = measure(work, args.queries)
    except RuntimeError as e:
        print(f"cost: cannot run: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
