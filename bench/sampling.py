"""What timing queries for the latency histograms costs: fast-path QPS by ``--latency-sample-every``.

Starts ``twistd kubedock-dns`` with examples/pods.json once per setting (0 = never timed, 1 =
every query, the default 16), loads each with dnsperf from one pod address asking local names,
and repeats the settings interleaved so that a busy machine disturbs them alike.  Prints the
median QPS of each and its ratio to "never timed"; docs/metrics.md quotes a run.

On a shared machine dnsperf's QPS swings by more than the difference sought, so ``--micro`` also
measures the CPU cost per query in-process: the server's ``datagram_received`` on the fast path,
with a socket that discards the reply, best of many repeats (the minimum is what the code costs
when nothing else interferes).

    python -m bench.sampling [--rounds 3] [--duration 5] [--micro]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.load import run_load
from bench.peers import pinning
from testbed.upstream import Dnsmasq, free_port

REPO = Path(__file__).resolve().parent.parent
SOURCE = "127.77.1.2"  # run-a's service in examples/pods.json
NAMES = ["db", "run-a_db", "service", "db.demo.svc.cluster.local"]


def serve(every: int, port: int, ops_port: int, upstream: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = pinning(0) + [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                         "--pidfile=", "--logfile=/dev/null", "kubedock-dns",
                         "--pods-file", str(REPO / "examples" / "pods.json"), "--dns-port", str(port),
                         "--dns-interface", "127.0.0.1", "--upstream", upstream, "--ops-port", str(ops_port),
                         "--ops-interface", "127.0.0.1", "--latency-sample-every", str(every)]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if opener.open(f"http://127.0.0.1:{ops_port}/readyz", timeout=1).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("kubedock-dns did not become ready")


def micro(settings: list[int], repeats: int = 30, number: int = 20000) -> dict[int, float]:
    """Nanoseconds per fast-path query for each sampling setting (best of ``repeats``)."""
    import json as json_
    import timeit

    from twisted.internet.task import Clock

    from kubedock_dns.contract import Relisted, pod_record_from_dict
    from kubedock_dns.dns.forwarder import Forwarder
    from kubedock_dns.dns.upstreams import Upstream
    from kubedock_dns.index import NetworkIndex
    from kubedock_dns.resolver import Resolver, ResolverConfig
    from kubedock_dns.dns.server import KubedockDNSServerFactory
    from kubedock_dns.dns.fastpath import FastPath

    class Discard:
        def sendto(self, data, address):
            return len(data)

    class Transport:
        socket = Discard()

    class Proto:
        transport = Transport()

    pods = json_.loads((REPO / "examples" / "pods.json").read_text())
    query = bytes.fromhex("12340100000100000000000002646200000100 01".replace(" ", ""))
    out = {}
    timings: dict[int, list[float]] = {s: [] for s in settings}
    factories = {}
    for every in settings:
        clock = Clock()
        index = NetworkIndex()
        index.apply((Relisted(tuple(pod_record_from_dict(p) for p in pods)),))
        resolver = Resolver(index, ResolverConfig())
        factories[every] = KubedockDNSServerFactory(
            clock, resolver, Forwarder(clock, [Upstream("127.0.0.1")]),
            fast_path=FastPath(resolver, clock.seconds), latency_sample_every=every)
    address = (SOURCE, 40000)
    for _ in range(repeats):  # interleaved, so that interference hits every setting alike
        for every in settings:
            receive = factories[every].datagram_received
            timings[every].append(timeit.timeit(lambda: receive(query, Proto, address), number=number))
    for every in settings:
        assert factories[every].counts()["answered_local"] == repeats * number
        out[every] = min(timings[every]) / number * 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--settings", default="0,1,16")
    parser.add_argument("--micro", action="store_true", help="also the in-process CPU cost per query")
    parser.add_argument("--micro-only", action="store_true", help="only the in-process CPU cost")
    args = parser.parse_args(argv)
    settings = [int(s) for s in args.settings.split(",")]
    if args.micro or args.micro_only:
        costs = micro(settings)
        print("in-process fast-path cost per query (best of 30 x 20,000):")
        for every in settings:
            print(f"  --latency-sample-every {every:<3}: {costs[every]:,.0f} ns "
                  f"(+{costs[every] - costs[settings[0]]:,.0f} ns, {costs[every] / costs[settings[0]]:.3f}x)")
        if args.micro_only:
            return 0
    work = Path(tempfile.mkdtemp(prefix="kubedock-dns-sampling-"))
    queries = work / "queries.txt"
    queries.write_text("".join(f"{n} A\n" for n in NAMES))
    results: dict[int, list[float]] = {s: [] for s in settings}
    with Dnsmasq("127.0.0.1", free_port()) as upstream:
        for round_ in range(args.rounds):
            for every in settings:
                port, ops_port = free_port(), free_port()
                proc = serve(every, port, ops_port, upstream.upstream_arg)
                try:
                    load = run_load("127.0.0.1", port, [(SOURCE, queries)], work, f"s{every}r{round_}",
                                    args.duration, outstanding=50, clients=4)
                finally:
                    proc.terminate()
                    proc.wait(30)
                if load.error_fraction or load.lost_fraction > 0.01:
                    raise RuntimeError(f"bad run for {every}: {load.rcodes}, lost {load.lost}")
                results[every].append(load.qps)
                print(f"round {round_ + 1}: sample every {every}: {load.qps:,.0f} QPS", flush=True)
    base = statistics.median(results[settings[0]])
    load_avg = os.getloadavg()[0]
    print(f"\nmedian of {args.rounds} rounds of {args.duration:g} s, 1-minute load {load_avg:.1f}:")
    for every in settings:
        qps = statistics.median(results[every])
        label = "never timed" if every == 0 else ("every query" if every == 1 else f"1 in {every}")
        print(f"  --latency-sample-every {every:<3} ({label}): {qps:,.0f} QPS = {qps / base:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
