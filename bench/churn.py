"""Maximum QPS of kubedock-dns while pods churn in a real API server (issue 13).

One kube-apiserver and etcd (``testbed.controlplane``), the 100-pod / 50-network topology of the
suite created in it (Running, ready), and kubedock-dns watching it (``--kubeconfig``).  dnsperf
then measures the maximum QPS of the suite's query mix from 8 pod addresses in three conditions,
``--rounds`` times each in rotated order (the medians are compared):

* **quiet**: nothing changes;
* **bystander churn**: ``--rate`` status patches per second to pods that are *not* opted in
  (the watcher's label selector hides them): the API server, etcd and the load generator work
  as hard as under churn, but kubedock-dns sees no event.  This is the control: what the machine
  loses to the churn machinery itself;
* **churn**: the same rate to opted-in pods, flipping their Ready condition.  kubedock-dns runs
  with ``--require-ready``, so each flip adds or removes the pod's names: one real index change
  each.  The flipped pods are a third pod, ``cache``, in every network (the askers' own networks
  included), which no query asks for: the askers' cached answers are dropped by a change in
  their network and prepared again, while no query is held waiting for a name that is gone.

The churn target is "with churn within 10% of quiet"; bystander churn separates the cost of
kubedock-dns's own work per change from the cost of sharing 2 cores with an API server at 100
writes/s.  The load generator is ``--workers`` processes, each with one keep-alive HTTPS
connection and a fixed schedule (the Python client in one thread reached about 28 writes/s on a
shared core); the rate they actually reached is reported.

    python -m bench.churn [--rate 100] [--workers 4] [--duration 10] [--server-source DIR]

``--server-source`` runs kubedock-dns from another checkout (e.g. the main branch, for a before
figure in the same conditions).  kubedock-dns is pinned to core 0; dnsperf, the upstream, etcd,
kube-apiserver and the churn workers to core 1.  Prints one JSON object.  Exit status 2 when the
control plane cannot be had.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.load import dnsperf_version, run_load
from bench.peers import (
    KUBEDOCK_SERVER, Process, answer_matches, ask, free_port, pinning, start_upstream, wait_answering,
)
from bench.propagation import _create
from bench.run import write_query_files
from bench.topology import NAMESPACE, Pod, Topology, _hex

SERVER_CORE, LOAD_CORE = 0, 1


def _companion(topology: Topology, pod: Pod) -> dict:
    """A ``cache`` pod beside ``pod`` (a ``db``) in its network, with an address of its own."""
    obj = pod.as_api_object()
    cid = _hex(f"bench-companion-{pod.index}", 12)
    ip = topology.pod_ip(topology.size + pod.index)
    obj["metadata"].pop("uid")
    obj["metadata"]["name"] = f"kubedock-{cid}"
    obj["metadata"]["labels"]["kubedock.containerid"] = cid
    obj["metadata"]["annotations"] = {"kubedock.hostalias/0": "cache", "kubedock.network/0": pod.network.id,
                                      "kubedock.containername": f"{pod.network.label}-cache-1"}
    obj["spec"]["hostname"] = "cache"
    obj["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    return obj


def _bystander(companion: dict) -> dict:
    """The same pod, not opted in: the API server stores it, kubedock-dns never sees it."""
    obj = json.loads(json.dumps(companion))
    obj["metadata"]["name"] = obj["metadata"]["name"].replace("kubedock-", "bystander-")
    del obj["metadata"]["labels"]["kubedock"]
    return obj


def _create_running(api, obj: dict) -> None:
    status = obj.pop("status")
    api.create_namespaced_pod(NAMESPACE, obj)
    api.patch_namespaced_pod_status(obj["metadata"]["name"], NAMESPACE, {"status": status})


def _churn_worker(url: str, token: str, ca: str, names: list[str], rate: float, start_at: float,
                  stop_at: float, results) -> None:
    """Flip the Ready condition of ``names`` in turn, ``rate`` times a second, on one keep-alive
    connection; put ``(done, failed, first error)`` on ``results``."""
    split = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(split.hostname, split.port, context=ssl.create_default_context(cafile=ca),
                                       timeout=10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/strategic-merge-patch+json",
               "Accept": "application/json"}
    ready = dict.fromkeys(names, True)
    done = failed = 0
    error = ""
    time.sleep(max(0.0, start_at - time.monotonic()))
    due = time.monotonic()
    turn = 0
    while due < stop_at:
        name = names[turn % len(names)]
        turn += 1
        ready[name] = not ready[name]
        body = json.dumps({"status": {"conditions": [{"type": "Ready", "status": str(ready[name])}]}})
        try:
            conn.request("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status", body, headers)
            response = conn.getresponse()
            payload = response.read()
            if response.status == 200:
                done += 1
            else:
                failed += 1
                error = error or f"HTTP {response.status}: {payload[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            failed += 1
            error = error or repr(e)
            conn.close()
        due += 1 / rate
        time.sleep(max(0.0, due - time.monotonic()))
    results.put((done, failed, error))


def churn_during(cp, names: list[str], rate: float, workers: int, seconds: float, measure):
    """Run ``measure()`` while ``workers`` processes patch ``names`` at ``rate`` in all; returns
    ``(measure's result, writes per second reached, failures, first error)``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.monotonic() + 2.0  # the workers' start-up is not churn
    stop_at = start_at + seconds + 1.0
    procs = []
    for w in range(workers):
        share = names[w::workers]
        proc = context.Process(target=_churn_worker, args=(cp.url, cp.token, str(cp.ca_path), share,
                                                          rate / workers, start_at, stop_at, results))
        proc.start()
        if pinning(LOAD_CORE):
            os.sched_setaffinity(proc.pid, {LOAD_CORE})
        procs.append(proc)
    time.sleep(max(0.0, start_at - time.monotonic()))
    outcome = measure()
    done = failed = 0
    error = ""
    for _ in procs:
        d, f, e = results.get(timeout=60)
        done, failed, error = done + d, failed + f, error or e
    for proc in procs:
        proc.join(30)
    return outcome, done / (stop_at - start_at), failed, error


def _pin_control_plane(cp) -> None:
    """etcd and kube-apiserver, every thread, onto the load core (off kubedock-dns's)."""
    if not pinning(LOAD_CORE):
        return
    for pid in cp.pids().values():
        subprocess.run(["taskset", "-a", "-p", "-c", str(LOAD_CORE), str(pid)], check=False, capture_output=True)


def _start_kubedock(cp, work: Path, upstream, server_source: Path | None, probe_source: Pod, probe) -> Process:
    binary = KUBEDOCK_SERVER.resolve_binary()
    port = free_port()
    argv = [binary, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "kubedock-dns", "--kubeconfig", str(cp.kubeconfig_path), "--namespace", NAMESPACE,
            "--dns-port", str(port), "--dns-interface", "127.0.0.1",
            "--resolv-conf", str(upstream.resolv_conf), "--ops-port", "0", "--require-ready"]
    if upstream.port != 53:
        argv += ["--upstream", upstream.hostport]
    work.mkdir(parents=True, exist_ok=True)
    log = work / "kubedock-dns.log"
    source = str(server_source or Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=source)
    with open(log, "wb") as out:
        popen = subprocess.Popen(pinning(SERVER_CORE) + argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=str(work), env=env)
    process = Process("kubedock-dns", pinning(SERVER_CORE) + argv, popen, port, log)
    wait_answering(process, probe, "view", probe_source.ip, 120)
    return process


def _wrong_answers(process: Process, topology: Topology, sources: list[Pod]) -> list[str]:
    wrong = []
    for source in sources:
        for query in topology.queries_for(source):
            if query.kind != "local" or query.qtype != "A":
                continue
            try:
                if not answer_matches(ask(process.port, query, "view", source.ip, timeout=2), query):
                    wrong.append(f"{source.ip} {query.view_name}")
            except Exception as e:  # noqa: BLE001 - a timeout is a wrong answer here
                wrong.append(f"{source.ip} {query.view_name}: {e!r}")
    return wrong


def _churn_seen(cp, process: Process, topology: Topology, sources: list[Pod]) -> dict:
    """Whether kubedock-dns followed the churn: for each source's network, its ``cache`` pod
    answers exactly when the API server says it is Ready (the flips stop before this runs)."""
    import dns.message
    import dns.query
    import dns.rcode
    from kubernetes import client

    agree, disagree, not_ready = 0, [], 0
    with cp.api_client() as api_client:
        api = client.CoreV1Api(api_client)
        for source in sources:
            db = topology.pods()[source.network.index * 2]
            companion = _companion(topology, db)
            pod = api.read_namespaced_pod_status(companion["metadata"]["name"], NAMESPACE)
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
            not_ready += not ready
            query = dns.message.make_query("cache.bench.svc.cluster.local", "A")
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=process.port, source=source.ip, timeout=5)
                answered = reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)
            except Exception as e:  # noqa: BLE001 - reported
                disagree.append(f"{source.ip}: {e!r}")
                continue
            if answered == ready:
                agree += 1
            else:
                disagree.append(f"{source.ip}: API Ready={ready}, answered={answered}")
    return {"agree": agree, "of_which_not_ready": not_ready, "disagree": disagree}


def measure(work: Path, networks: int, rate: float, workers: int, duration: float, sources_count: int,
            server_source: Path | None, rounds: int = 3) -> dict:
    from kubernetes import client

    from testbed.controlplane import ControlPlane

    topology = Topology(networks)
    sources = topology.sources(sources_count)
    files, _forward = write_query_files(topology, sources, work)
    pairs = [(s.ip, files["view"][s.ip]) for s in sources]
    upstream, upstream_process = start_upstream(work / "upstream", LOAD_CORE)
    result: dict = {"pods": topology.size, "networks": networks, "rate_target": rate, "workers": workers,
                    "duration_s": duration, "sources": len(sources), "dnsperf": dnsperf_version(),
                    "server_source": str(server_source or "this checkout"),
                    "loadavg_start": os.getloadavg()}
    try:
        with ControlPlane() as cp:
            _pin_control_plane(cp)
            with cp.api_client() as api_client:
                api = client.CoreV1Api(api_client)
                api.create_namespace({"metadata": {"name": NAMESPACE}})
                pods = topology.pods()
                companions = [_companion(topology, p) for p in pods if p.role == "db"]
                extra = companions + [_bystander(c) for c in companions]
                opted = [c["metadata"]["name"] for c in companions]
                bystanders = [_bystander(c)["metadata"]["name"] for c in companions]
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda p: _create(api, p, True), pods))
                    list(pool.map(lambda obj: _create_running(api, obj), extra))
            process = _start_kubedock(cp, work / "kubedock-dns", upstream, server_source, sources[0],
                                      topology.queries_for(sources[0])[0])
            try:
                def load(tag: str):
                    top = run_load("127.0.0.1", process.port, pairs, work / "load", tag, duration,
                                   outstanding=20, clients=4, core=LOAD_CORE)
                    return {"qps": round(top.qps), "lost": top.lost, "errors": round(top.error_fraction, 4)}

                runs: dict[str, list[dict]] = {"quiet": [], "bystander_churn": [], "churn": []}
                for round_ in range(rounds):
                    # Rotated order: a burst of load from elsewhere on the machine falls on each
                    # kind of run alike, and the medians compare like with like.
                    order = ["quiet", "bystander_churn", "churn"]
                    for label in order[round_ % 3:] + order[:round_ % 3]:
                        tag = f"{label}-{round_}"
                        if label == "quiet":
                            runs[label].append(load(tag) | {"loadavg": os.getloadavg()[0]})
                            continue
                        names = opted if label == "churn" else bystanders
                        outcome, reached, failed, error = churn_during(cp, names, rate, workers, duration,
                                                                       lambda tag=tag: load(tag))
                        runs[label].append(outcome | {"writes_per_s": round(reached, 1), "write_failures": failed,
                                                      "first_error": error, "loadavg": os.getloadavg()[0]})
                result["runs"] = runs
                result["median_qps"] = {k: statistics.median(r["qps"] for r in v) for k, v in runs.items()}
                time.sleep(1)  # the last flips' events
                result["churn_followed"] = _churn_seen(cp, process, topology, sources)
                result["wrong_after_churn"] = _wrong_answers(process, topology, sources)
                result["peak_rss_kib"] = process.peak_rss_kib()
                median = result["median_qps"]
                result["churn_vs_quiet"] = round(median["churn"] / median["quiet"], 3)
                result["bystander_vs_quiet"] = round(median["bystander_churn"] / median["quiet"], 3)
                result["churn_vs_bystander"] = round(median["churn"] / median["bystander_churn"], 3)
            finally:
                process.stop()
    finally:
        upstream_process.stop()
    result["loadavg_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", type=int, default=50, help="networks of two pods (default 50)")
    parser.add_argument("--rate", type=float, default=100.0, help="pod changes per second (default 100)")
    parser.add_argument("--workers", type=int, default=4, help="load generator processes (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run (default 10)")
    parser.add_argument("--sources", type=int, default=8, help="source pod addresses (default 8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (quiet, bystander churn, churn), order rotated; medians compared (default 3)")
    parser.add_argument("--server-source", type=Path, help="run kubedock-dns from this checkout")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-churn."))
    try:
        from testbed.controlplane import ControlPlaneError
    except ImportError as e:
        print(f"churn: cannot run: {e}", file=sys.stderr)
        return 2
    try:
        result = measure(work, args.networks, args.rate, args.workers, args.duration, args.sources,
                         args.server_source, args.rounds)
    except ControlPlaneError as e:
        print(f"churn: cannot run: control plane failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
