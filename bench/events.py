"""Cost of one watch event against the number of pods (issue 13: "per-event cost flat").

In-process, no sockets: for each size, the suite's topology is decoded into an index with a warm
fast path (8 askers x the suite's 20 queries), then 1,000 ``MODIFIED`` watch lines (each flips one
pod's Ready condition; the pod JSON carries the ``managedFields`` and metadata the API server
adds) go through what the watcher thread and the reactor do with them: ``json.loads``, the
record decode, ``NetworkIndex.apply`` with the fast path's invalidation, and the askers' queries
answered again (re-preparing whatever was dropped).  Reported: microseconds per event, the best
of ``--repeats`` passes (the minimum is the least disturbed by other work on the machine).

    python -m bench.events [--sizes 100,1000,3000,10000] [--repeats 5] [--plot F]

Two curves: with ``--require-ready`` every flip changes the pod's answers (its names come and go), so the
figure includes dropping and re-preparing the cached answers of its network's askers; without
it a flip changes nothing any answer reads, and the index stores the record without touching
anything.

Prints one JSON object: variant -> size -> microseconds per event.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dns.message

from bench.topology import Topology
from kubedock_dns.contract import Relisted, Upserted
from kubedock_dns.index import NetworkIndex
from kubedock_dns.resolver import Resolver, ResolverConfig
from kubedock_dns.kube.watcher import decode_pod
from kubedock_dns.dns.fastpath import FastPath

EVENTS = 1000
_MANAGED = [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-29T20:00:00Z",
             "fieldsType": "FieldsV1", "subresource": "status",
             "fieldsV1": {"f:status": {"f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}, "f:type": {}}},
                                       "f:phase": {}, "f:podIP": {}, "f:podIPs": {}}}}]


def _as_listed(obj: dict, version: int) -> dict:
    obj["metadata"].update(managedFields=_MANAGED * 3, resourceVersion=str(version),
                           creationTimestamp="2026-11-29T20:00:00Z")
    return obj


def per_event_us(pods: int, repeats: int, require_ready: bool = False) -> float:
    topology = Topology(max(1, pods // 2))
    objects = [_as_listed(p.as_api_object(), 1) for p in topology.pods()]
    index = NetworkIndex(require_ready=require_ready)
    index.apply([Relisted(tuple(r for r in map(decode_pod, objects) if r is not None))])
    fast = FastPath(Resolver(index, ResolverConfig()), time.monotonic)
    asked = [(source.ip, dns.message.make_query(q.view_name, q.qtype).to_wire())
             for source in topology.sources(8) for q in topology.queries_for(source)]
    # Every event flips its pod's readiness (a real change), and every pass ends where it began:
    # the same picks twice over, so each pod flips an even number of times.
    step = max(1, len(objects) // (EVENTS // 2))
    picks = [(n * step) % len(objects) for n in range(EVENTS // 2)] * 2
    ready: dict[int, bool] = {}
    lines = []
    for n, pick in enumerate(picks):
        ready[pick] = not ready.get(pick, True)
        obj = json.loads(json.dumps(objects[pick]))
        obj["status"]["conditions"][0]["status"] = str(ready[pick])
        lines.append(json.dumps({"type": "MODIFIED", "object": _as_listed(obj, n + 2)}).encode())
    best = float("inf")
    for _ in range(repeats):
        for host, wire in asked:
            fast.answer(wire, host, False)
        began = time.perf_counter()
        for line in lines:
            event = json.loads(line)
            record = decode_pod(event["object"])
            index.apply([Upserted(record)])
            for host, wire in asked:
                fast.answer(wire, host, False)
        best = min(best, (time.perf_counter() - began) / EVENTS)
    # What answering the asked queries costs without any event, subtracted (best of as many).
    quiet = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(EVENTS):
            for host, wire in asked:
                fast.answer(wire, host, False)
        quiet = min(quiet, (time.perf_counter() - began) / EVENTS)
    return round((best - quiet) * 1e6, 1)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,3000,10000", help="pod counts (default 100,1000,3000,10000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", type=Path, help="also draw the curves into this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    result = {label: {size: per_event_us(size, args.repeats, strict) for size in sizes}
              for label, strict in (("default", False), ("require_ready", True))}
    print(json.dumps({"microseconds_per_event": result}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, curve in result.items():
            ax.plot(list(curve), list(curve.values()), marker="o",
                    label="Ready flips change answers (--require-ready)" if label == "require_ready"
                    else "Ready flips change no answer (default)")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("pods in the index")
        ax.set_ylabel("microseconds per watch event")
        ax.set_title("Cost of one watch event (python -m bench.events)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return 0

if __name__ == "__main__":
    sys.exit(main())
