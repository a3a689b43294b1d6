"""Propagation and initial-sync figures for kubedock-dns against a real API server (DESIGN.md §7).

Separate from the QPS suite because it needs the control plane (``testbed.controlplane``, a real
etcd and kube-apiserver) and the watcher, not a pods file:

* **propagation**: with ``pairs`` networks of two pods each in the API server, for each network
  set the ``db`` pod's IP and phase through the status subresource (as a kubelet would) and time
  from just before that write until a query for ``db`` sent from the ``service`` pod's address
  returns the new IP.  The clock starts before the API call, so the figure includes the write.
  Queries are repeated every millisecond with a short timeout (kubedock-dns may also hold the first
  one until the name appears; either way the first correct answer stops the clock).
* **initial sync**: create ``sync_pods`` Running pods first, then start kubedock-dns and time from
  process start to the first correct answer for the last pod created; peak RSS after that.

    python -m bench.propagation [--pairs 500] [--sync-pods 10000] [--skip-sync]

Prints one JSON object on stdout.  Exit status 2 when the control plane or kubedock-dns cannot
be had, 0 otherwise (slow results are results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.load import percentile
from bench.peers import (
    KUBEDOCK_SERVER, Process, Unavailable, answer_matches, ask, launch, start_upstream,
)
from bench.topology import NAMESPACE, Pod, Topology
from testbed.ports import wait_for_ports

SERVER_CORE = 0


def _create(api, pod: Pod, running: bool) -> None:
    obj = pod.as_api_object()
    status = obj.pop("status")
    obj["metadata"].pop("uid")
    api.create_namespaced_pod(NAMESPACE, obj)
    if running:
        _set_running(api, pod, status)


def _set_running(api, pod: Pod, status: dict | None = None) -> None:
    status = status or pod.as_api_object()["status"]
    api.patch_namespaced_pod_status(f"kubedock-{pod.container_id}", NAMESPACE, {"status": status})


def _start_kubedock(cp, work: Path, upstream) -> Process:
    binary = KUBEDOCK_SERVER.resolve_binary()
    argv = [binary, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "kubedock-dns", "--kubeconfig", str(cp.kubeconfig_path), "--namespace", NAMESPACE,
            "--dns-port", "0", "--dns-interface", "127.0.0.1",
            "--resolv-conf", str(upstream.resolv_conf), "--ops-port", "0"]
    if upstream.port != 53:
        argv += ["--upstream", upstream.hostport]
    process = launch("kubedock-dns", argv, 0, work, SERVER_CORE)
    # Port 0: the server binds what the kernel gives and logs it.
    process.port = wait_for_ports(process.log, ("dns",), process.alive)["dns"]
    return process


def _until_answered(process: Process, topology: Topology, asker: Pod, target: Pod, deadline_s: float) -> float | None:
    """Seconds until ``asker`` gets ``target``'s address for ``db``, or None at the deadline."""
    query = topology.queries_for(asker)[0 if target.role == "db" else 1]
    began = time.monotonic()
    while time.monotonic() - began < deadline_s:
        if not process.alive():
            raise RuntimeError(f"kubedock-dns exited (rc={process.popen.returncode}):\n{process.log_tail()}")
        try:
            if answer_matches(ask(process.port, query, "view", asker.ip, timeout=0.2), query):
                return time.monotonic()
        except Exception:  # noqa: BLE001 - a timeout or SERVFAIL: ask again
            pass
        time.sleep(0.001)
    return None


def propagation(cp, work: Path, upstream, pairs: int) -> dict:
    from kubernetes import client

    topology = Topology(pairs)
    with cp.api_client() as api_client:
        api = client.CoreV1Api(api_client)
        pods = topology.pods()
        with ThreadPoolExecutor(8) as pool:
            # service pods run (they ask); db pods wait without an IP.
            list(pool.map(lambda p: _create(api, p, p.role == "service"), pods))
        process = _start_kubedock(cp, work, upstream)
        try:
            first_db, first_service = pods[0], pods[1]
            _set_running(api, first_db)
            if _until_answered(process, topology, first_service, first_db, 60) is None:
                raise RuntimeError(f"kubedock-dns never answered:\n{process.log_tail()}")
            latencies, missed = [], 0
            for n in range(1, pairs):
                db, service = pods[2 * n], pods[2 * n + 1]
                t0 = time.monotonic()
                _set_running(api, db)
                t1 = _until_answered(process, topology, service, db, 5)
                if t1 is None:
                    missed += 1
                else:
                    latencies.append(t1 - t0)
            latencies.sort()
            return {"pairs": pairs, "events": len(latencies) + missed, "missed": missed,
                    "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
                    "max_ms": _ms(latencies[-1] if latencies else None),
                    "peak_rss_kib": process.peak_rss_kib()}
        finally:
            process.stop()
            api.delete_collection_namespaced_pod(NAMESPACE, grace_period_seconds=0)


def initial_sync(cp, work: Path, upstream, pods_count: int) -> dict:
    from kubernetes import client

    topology = Topology(pods_count // 2)
    with cp.api_client() as api_client:
        api = client.CoreV1Api(api_client)
        pods = topology.pods()
        began = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: _create(api, p, True), pods))
        created_s = time.monotonic() - began
        t0 = time.monotonic()
        process = _start_kubedock(cp, work, upstream)
        try:
            t1 = _until_answered(process, topology, pods[-1], pods[-2], 120)
            return {"pods": len(pods), "create_s": round(created_s, 1),
                    "start_to_answer_s": None if t1 is None else round(t1 - t0, 2),
                    "peak_rss_kib": process.peak_rss_kib(),
                    "note": "includes interpreter start-up and imports"}
        finally:
            process.stop()
            api.delete_collection_namespaced_pod(NAMESPACE, grace_period_seconds=0)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class PropagationUnavailable(Exception):
    """The control plane or kubedock-dns's watcher cannot be had; the message says which."""


def measure(work: Path, pairs: int = 500, sync_pods: int = 10_000, skip_sync: bool = False) -> dict:
    """Both figures (see the module docstring) as a JSON-able dict."""
    try:
        from kubernetes import client

        from testbed.controlplane import ControlPlane, ControlPlaneError

        KUBEDOCK_SERVER.resolve_binary()
    except (ImportError, Unavailable) as e:
        raise PropagationUnavailable(str(e)) from None
    upstream, upstream_process = start_upstream(work / "upstream", core=1)
    try:
        with ControlPlane() as cp:
            with cp.api_client() as api_client:
                client.CoreV1Api(api_client).create_namespace({"metadata": {"name": NAMESPACE}})
            results = {"propagation": propagation(cp, work / "prop", upstream, pairs)}
            if not skip_sync:
                results["initial_sync"] = initial_sync(cp, work / "sync", upstream, sync_pods)
            return results
    except ControlPlaneError as e:
        raise PropagationUnavailable(f"control plane failed: {e}") from None
    finally:
        upstream_process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500, help="networks of two pods (default 500: 1,000 pods)")
    parser.add_argument("--sync-pods", type=int, default=10_000)
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-prop."))
    try:
        results = measure(work, args.pairs, args.sync_pods, args.skip_sync)
    except PropagationUnavailable as e:
        print(f"propagation: cannot run: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
