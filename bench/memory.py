"""Where kubedock-dns' resident memory goes: imports by part, then records and index per pod.

Each part runs in a fresh interpreter that first imports everything before it, in the order a
server started by ``twistd kubedock-dns`` imports them, and reports the resident set (VmRSS,
anonymous and file-backed) after it.  Then ``--pods`` pods of the benchmark topology, as the API
server lists them (``--page``: a page of the API server's JSON whose first pod is the template, by
default a built-in one), are decoded 500 at a time through the watcher's list decoder into
records and applied to an index, under tracemalloc: what stays allocated after each, and the
most allocated above it meanwhile.  The resident set of the server grows more than these traced
bytes (the allocators' own overhead).  The benchmark of the whole server against a real API
server is ``python -m bench.propagation`` (docs/benchmarks.md, "Memory at 10,000 pods").

    python -m bench.memory [--pods 10000] [--page page.json]

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (part, Python statements run after those of the parts before it)
PARTS = [
    ("interpreter", ""),
    ("twistd and its plugin scan",
     "import twisted.scripts.twistd\n"
     "from twisted.plugin import getPlugins\n"
     "from twisted.application.service import IServiceMaker\n"
     "list(getPlugins(IServiceMaker))"),
    ("the reactor (Twisted imports its TLS: pyOpenSSL, cryptography)", "import twisted.internet.reactor"),
    ("the DNS side (twisted.names, twisted.web, kubedock_dns.tap)", "import kubedock_dns.tap"),
    ("the kubernetes client and kubedock_dns.kube", "import kubedock_dns.kube.watcher"),
    ("the ops endpoint (klein, prometheus_client)",
     "import kubedock_dns.ops.endpoint, kubedock_dns.ops.metrics, kubedock_dns.ops.explain"),
]

STATUS = r"""
import re
_s = open('/proc/self/status').read()
print({k: int(re.search(r'^' + k + r':\s+(\d+)', _s, re.M).group(1)) for k in ('VmRSS', 'RssAnon', 'RssFile')})
"""

# An opted-in pod as kube-apiserver lists it after kubedock created it and the kubelet ran it.
TEMPLATE = {
    "metadata": {
        "name": "", "namespace": "bench", "uid": "", "resourceVersion": "13868", "generation": 1,
        "creationTimestamp": "2026-11-29T23:07:15Z", "labels": {}, "annotations": {},
        "managedFields": [
            {"manager": "kubedock", "operation": "Update", "apiVersion": "v1", "time": "2026-11-29T23:07:15Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}}, "f:labels": {".": {}}},
                                                    "f:spec": {"f:containers": {'k:{"name":"main"}': {".": {}}}}}},
            {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-29T23:07:16Z",
             "fieldsType": "FieldsV1", "subresource": "status",
             "fieldsV1": {"f:status": {"f:conditions": {".": {}}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}}}},
        ],
    },
    "spec": {
        "containers": [{"name": "main", "image": "bench/db:latest", "resources": {},
                        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                        "imagePullPolicy": "Always"}],
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "securityContext": {}, "schedulerName": "default-scheduler", "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
    },
    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": None,
                                                   "lastTransitionTime": "2026-11-29T23:07:16Z"}],
               "qosClass": "BestEffort"},
}


def _status(code: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", code + STATUS], capture_output=True, text=True, cwd=REPO,
                          check=True)
    kib = json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))
    return {k: round(v / 1024, 1) for k, v in kib.items()}


def imports() -> list[dict]:
    """The resident set after each part, each in a fresh interpreter with the parts before it."""
    rows, code, before = [], "", 0.0
    for part, statements in PARTS:
        code += statements + "\n"
        status = _status(code)
        rows.append({"part": part, "added_mib": round(status["VmRSS"] - before, 1), "rss_mib": status["VmRSS"],
                     "anon_mib": status["RssAnon"], "file_mib": status["RssFile"]})
        before = status["VmRSS"]
    return rows


POD_DATA = r"""
import gc, json, sys, tracemalloc
from kubedock_dns.contract import Relisted, pod_record_from_dict
from kubedock_dns.index import NetworkIndex
from kubedock_dns.kube.listing import ListBody
from bench.topology import Topology

template = json.loads(sys.argv[1])
pods = [p.as_api_object() for p in Topology(int(sys.argv[2]) // 2).pods()]
for pod in pods:
    full = json.loads(json.dumps(template))
    full["metadata"].update(pod["metadata"])
    full["spec"].update(pod["spec"])
    full["status"].update(pod["status"])
    pod.clear()
    pod.update(full)
pages = [json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                     "items": pods[i:i + 500]}).encode() for i in range(0, len(pods), 500)]
del pods, full
gc.collect()
tracemalloc.start()
start = tracemalloc.get_traced_memory()[0]
records = []
for page in pages:
    for item in ListBody(page[i:i + 65536] for i in range(0, len(page), 65536)).items():
        records.append(pod_record_from_dict(item))
listed, list_peak = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
index = NetworkIndex()
index.apply((Relisted(tuple(records)),))
indexed, apply_peak = tracemalloc.get_traced_memory()
mib = lambda n: round(n / 2**20, 1)
print(json.dumps({"page_bytes_per_pod": round(sum(map(len, pages)) / len(records)),
                  "records_mib": mib(listed - start), "list_peak_above_records_mib": mib(list_peak - listed),
                  "index_mib": mib(indexed - listed), "apply_peak_above_index_mib": mib(apply_peak - indexed)}))
"""


def pod_data(pods: int, template: dict) -> dict:
    """Resident growth for decoding ``pods`` pods into records, then indexing them."""
    done = subprocess.run([sys.executable, "-c", POD_DATA, json.dumps(template), str(pods)], capture_output=True,
                          text=True, cwd=REPO, check=True)
    return {"pods": pods, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--page", type=Path, help="a pod list page saved from kube-apiserver (its first pod is the template)")
    args = parser.parse_args(argv)
    template = json.loads(args.page.read_text())["items"][0] if args.page else TEMPLATE
    rows = imports()
    print(json.dumps({"imports": rows, "imports_total_mib": rows[-1]["rss_mib"],
                      "pod_data": pod_data(args.pods, template)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
