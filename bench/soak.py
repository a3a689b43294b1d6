"""A soak with faults: DNS load from many pod addresses while pods churn through the real API
server, the API server is restarted and the watch connection is black-holed once.

    python -m bench.soak [--minutes 5] [--hostile] [--write-docs]

Setting: a real etcd and kube-apiserver (``testbed.controlplane``), the upstream dnsmasq of the
benchmark suite, and kubedock-dns under ``twistd`` watching the API server through a
:class:`testbed.blackhole.BlackHoleProxy`.  ``stable`` networks of two Running pods stay for the
whole run; ``churn`` more networks have their pods created (Running, with their IP) and deleted
over and over.  Load threads send the benchmark mix (A, AAAA NODATA, PTR, forwarded names; see
:meth:`bench.topology.Topology.queries_for`) from the stable pods' addresses, each answer checked
against what it must be.  At one third of the run the API server is restarted; at two thirds the
proxy black-holes the watch connection (open, nothing flows).  At the end a new network is created
and the time until its ``db`` resolves is measured (changes still arrive after the faults).

``--hostile`` runs the soak twice, the second time with two hostile clients beside the same load
(issue 19): a **junk** client, one of the stable pods' addresses sending junk datagrams (8 KiB of
random bytes, a good question followed by junk, 5,000-byte padded queries, invented single-label
and outside names) and junk 60 KB TCP messages, and a **TCP hog** at another pod's address holding
300 connections (more than the cap of 256), each asking now and then, plus one pipelining
questions it never reads.  One load query in ten goes over TCP in both runs, so that the pods
need TCP slots while the hog holds them.  Compared: wrong and unanswered pod queries (0), and
the resident memory of the two runs.

Counted: queries, **wrong** answers (NOERROR with other records, or NXDOMAIN/NODATA where a
record exists: must be 0; a pod of a churning network answered to a stable pod would be one),
**unanswered** (timeout or SERVFAIL), and kubedock-dns's resident memory after the warm-up and at
the end (must be flat).  Prints one JSON object; ``--write-docs`` also puts the figures into the
soak section of ``docs/benchmarks.md`` (kept when ``bench.run`` rewrites the rest).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.peers import KUBEDOCK_SERVER, REPO, Process, answer_matches, ask, launch, start_upstream
from bench.topology import NAMESPACE, Pod, Topology
from testbed.blackhole import BlackHoleProxy
from testbed.ports import wait_for_ports

SOAK_BEGIN = "<!-- soak: written by python -m bench.soak --write-docs; kept by bench.run -->"
SOAK_END = "<!-- /soak -->"


def _rss_kib(process: Process) -> int | None:
    try:
        status = Path(f"/proc/{process.popen.pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else None


def _create(api, pod: Pod) -> None:
    obj = pod.as_api_object()
    status = obj.pop("status")
    obj["metadata"].pop("uid")
    api.create_namespaced_pod(NAMESPACE, obj, _request_timeout=10)
    api.patch_namespaced_pod_status(obj["metadata"]["name"], NAMESPACE, {"status": status}, _request_timeout=10)


def _delete(api, pod: Pod) -> None:
    api.delete_namespaced_pod(f"kubedock-{pod.container_id}", NAMESPACE, grace_period_seconds=0,
                              _request_timeout=10)


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.ok = self.wrong = self.unanswered = 0
        self.wrong_examples: list[str] = []
        self.unanswered_examples: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.sent += 1
            setattr(self, outcome, getattr(self, outcome) + 1)
            examples = {"wrong": self.wrong_examples, "unanswered": self.unanswered_examples}.get(outcome)
            if examples is not None and len(examples) < 5:
                examples.append(f"{time.strftime('%H:%M:%S')} {detail}")


def _load(process: Process, topology: Topology, askers: list[Pod], tally: _Tally, stop: threading.Event,
          seed: int) -> None:
    rng = random.Random(seed)
    mixes = {pod.uid: topology.queries_for(pod) for pod in askers}
    while not stop.is_set():
        asker = rng.choice(askers)
        query = rng.choice(mixes[asker.uid])
        tcp = rng.random() < 0.1
        try:
            response = ask(process.port, query, "view", asker.ip, timeout=2.0, tcp=tcp)
        except Exception as e:  # noqa: BLE001 - a timeout, or a TCP connection refused: unanswered
            tally.add("unanswered", f"{asker.ip} {'TCP' if tcp else 'UDP'} {query.line('view')}: {e!r}")
            continue
        if answer_matches(response, query):
            tally.add("ok")
        elif response.rcode() == 2:  # SERVFAIL
            tally.add("unanswered", f"{asker.ip} {'TCP' if tcp else 'UDP'} {query.line('view')}: SERVFAIL")
        else:
            tally.add("wrong", f"{asker.ip} {query.line('view')}: {response.to_text()[:300]}")
        time.sleep(0.002)


def _junk(port: int, source: str, stop: threading.Event, counts: dict, seed: int, per_second: int = 300) -> None:
    """The junk client (see the module): datagrams it never reads the answers of, spread evenly
    (``per_second``; bursts of 8 KiB datagrams would overflow the kernel's socket buffer, 208 KiB
    by default, and drop everybody's datagrams there: a flood, not what is measured here), and
    ten junk TCP messages a second whose answers it does read (the server answers FORMERR)."""
    import socket
    import struct

    import dns.edns
    import dns.message

    rng = random.Random(seed)

    def query(name: str, **make) -> bytes:
        return dns.message.make_query(name, "A", **make).to_wire(max_size=65535)

    padded = query("db", use_edns=0, options=[dns.edns.GenericOption(12, b"\0" * 4950)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((source, 0))
        tcp = None
        while not stop.is_set():
            began = time.monotonic()
            for _ in range(per_second // 10):
                kind = rng.random()
                if kind < 0.4:
                    datagram = bytes([rng.randrange(256), rng.randrange(256), rng.randrange(128)]) + rng.randbytes(8189)
                elif kind < 0.6:
                    datagram = query("db") + rng.randbytes(8000)
                elif kind < 0.7:
                    datagram = padded
                elif kind < 0.9:
                    datagram = query(f"junk{rng.randrange(1 << 30)}")
                else:
                    datagram = query(f"junk{rng.randrange(1 << 30)}.example.")
                try:
                    udp.sendto(datagram, ("127.0.0.1", port))
                    counts["junk_datagrams"] += 1
                except OSError:
                    pass
                time.sleep(0.5 / per_second)
            try:
                if tcp is None:
                    tcp = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
                message = query("db") + rng.randbytes(60_000)
                tcp.sendall(struct.pack("!H", len(message)) + message)
                length = struct.unpack("!H", tcp.recv(2, socket.MSG_WAITALL))[0]
                tcp.recv(length, socket.MSG_WAITALL)
                counts["junk_tcp_messages"] += 1
            except (OSError, struct.error):
                if tcp is not None:
                    tcp.close()
                tcp = None
            stop.wait(max(0.0, 0.1 - (time.monotonic() - began)))
        if tcp is not None:
            tcp.close()


def _tcp_hog(port: int, source: str, stop: threading.Event, counts: dict, connections: int = 300,
             every: float = 5.0) -> None:
    """The TCP hog (see the module): ``connections`` connections from one address, each asking
    once per ``every`` seconds (so none is idle long enough to be closed for it), reopened when
    the server closes one; and one that pipelines questions and never reads."""
    import socket
    import struct

    import dns.message

    wire = dns.message.make_query("db", "A").to_wire()
    framed = struct.pack("!H", len(wire)) + wire
    held: list = []
    pipeline = None
    while not stop.is_set():
        began = time.monotonic()
        while len(held) < connections and not stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0)))
                counts["hog_connects"] += 1
            except OSError:
                counts["hog_refused"] += 1
                break
        for sock in list(held):
            try:
                sock.sendall(framed)
                length = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
                sock.recv(length, socket.MSG_WAITALL)
            except (OSError, struct.error):
                counts["hog_closed_by_server"] += 1
                sock.close()
                held.remove(sock)
        try:
            if pipeline is None:
                pipeline = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
                pipeline.setblocking(False)
            for _ in range(2000):
                pipeline.send(framed)
        except BlockingIOError:
            pass
        except OSError:
            if pipeline is not None:
                pipeline.close()
            pipeline = None
        stop.wait(max(0.0, every - (time.monotonic() - began)))
    for sock in held:
        sock.close()
    if pipeline is not None:
        pipeline.close()


def _churn(api, pods: list[Pod], stop: threading.Event, counts: dict, seed: int, interval: float) -> None:
    rng = random.Random(seed)
    present: set[str] = set()
    while not stop.is_set():
        pod = rng.choice(pods)
        try:
            if pod.uid in present:
                _delete(api, pod)
                present.discard(pod.uid)
                counts["deleted"] += 1
            else:
                _create(api, pod)
                present.add(pod.uid)
                counts["created"] += 1
        except Exception as e:  # noqa: BLE001 - the API server is restarting: try again later
            counts["api_errors"] += 1
            if "AlreadyExists" in str(e):
                present.add(pod.uid)
            elif "NotFound" in str(e):
                present.discard(pod.uid)
        stop.wait(interval)


def soak(work: Path, minutes: float = 5.0, stable: int = 20, churn: int = 10, load_threads: int = 4,
         churn_interval: float = 0.1, progress=lambda message: print(f"soak: {message}", file=sys.stderr, flush=True),
         hostile: bool = False) -> dict:
    """Run the soak (see the module docstring); the figures as a JSON-able dict."""
    from kubernetes import client

    from testbed.controlplane import ControlPlane

    binary = KUBEDOCK_SERVER.resolve_binary()
    topology = Topology(stable + churn + 1)
    pods = topology.pods()
    stable_pods, churn_pods, late_pods = pods[: 2 * stable], pods[2 * stable: -2], pods[-2:]
    duration = minutes * 60
    upstream, upstream_process = start_upstream(work / "upstream", core=None)
    try:
        with ControlPlane() as cp:
            with cp.api_client() as api_client:
                api = client.CoreV1Api(api_client)
                api.create_namespace({"metadata": {"name": NAMESPACE}})
                for pod in stable_pods:
                    _create(api, pod)
                url = urlsplit(cp.url)
                with BlackHoleProxy(url.hostname or "127.0.0.1", url.port or 443) as proxy:
                    kubeconfig = json.loads(Path(cp.kubeconfig_path).read_text())
                    for cluster in kubeconfig["clusters"]:
                        cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
                    work.mkdir(parents=True, exist_ok=True)
                    (work / "kubeconfig").write_text(json.dumps(kubeconfig))
                    argv = [binary, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                            "kubedock-dns", "--kubeconfig", str(work / "kubeconfig"), "--namespace", NAMESPACE,
                            "--dns-port", "0", "--dns-interface", "127.0.0.1",
                            "--resolv-conf", str(upstream.resolv_conf), "--ops-port", "0"]
                    if upstream.port != 53:
                        argv += ["--upstream", upstream.hostport]
                    process = launch("kubedock-dns", argv, 0, work / "kubedock-dns", None)
                    try:
                        process.port = wait_for_ports(process.log, ("dns",), process.alive)["dns"]
                        return _run(api, cp, proxy, process, topology, stable_pods, churn_pods, late_pods,
                                    duration, load_threads, churn_interval, progress, hostile)
                    finally:
                        process.stop()
    finally:
        upstream_process.stop()


def _run(api, cp, proxy, process, topology, stable_pods, churn_pods, late_pods, duration, load_threads,
         churn_interval, progress, hostile: bool = False) -> dict:
    probe = topology.queries_for(stable_pods[1])[0]
    deadline = time.monotonic() + 60
    while True:
        try:
            if answer_matches(ask(process.port, probe, "view", stable_pods[1].ip, timeout=0.5), probe):
                break
        except Exception:  # noqa: BLE001
            pass
        if time.monotonic() > deadline or not process.alive():
            raise RuntimeError(f"kubedock-dns never answered:\n{process.log_tail()}")
        time.sleep(0.1)
    progress(f"kubedock-dns answering on port {process.port}; {duration:.0f} s of load and churn")
    tally = _Tally()
    churned = {"created": 0, "deleted": 0, "api_errors": 0}
    stop = threading.Event()
    # Two stable pods may turn hostile (--hostile): their addresses send no load, in either run,
    # so that both runs ask the same questions from the same pods.
    askers = [pod for i, pod in enumerate(stable_pods) if i not in (0, 2)]
    threads = [threading.Thread(target=_load, args=(process, topology, askers, tally, stop, i), daemon=True)
               for i in range(load_threads)]
    threads.append(threading.Thread(target=_churn, args=(api, churn_pods, stop, churned, 99, churn_interval),
                                    daemon=True))
    hostility = {"junk_datagrams": 0, "junk_tcp_messages": 0, "hog_connects": 0, "hog_refused": 0,
                 "hog_closed_by_server": 0}
    if hostile:
        # Two of the stable pods turn hostile; they keep asking their normal questions too.
        threads.append(threading.Thread(target=_junk, args=(process.port, stable_pods[0].ip, stop, hostility, 7),
                                        daemon=True))
        threads.append(threading.Thread(target=_tcp_hog, args=(process.port, stable_pods[2].ip, stop, hostility),
                                        daemon=True))
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(min(10.0, duration / 10))
    rss_start = _rss_kib(process)
    samples = [rss_start]
    faults: dict = {}
    try:
        for fraction, fault in ((1 / 3, "apiserver_restart"), (2 / 3, "watch_black_hole")):
            while time.monotonic() - began < duration * fraction:
                time.sleep(1)
                samples.append(_rss_kib(process))
            at = round(time.monotonic() - began, 1)
            if fault == "apiserver_restart":
                t0 = time.monotonic()
                cp.restart_apiserver(graceful=False)
                faults[fault] = {"at_s": at, "down_s": round(time.monotonic() - t0, 1)}
            else:
                faults[fault] = {"at_s": at, "connections_silenced": proxy.black_hole()}
            progress(f"{fault} at {at} s: {faults[fault]}")
        while time.monotonic() - began < duration:
            time.sleep(1)
            samples.append(_rss_kib(process))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    rss_end = _rss_kib(process)
    # Changes still arrive after the faults: a new network's db, from its own service pod.
    t0 = time.monotonic()
    for pod in late_pods:
        _create(api, pod)
    late_query = topology.queries_for(late_pods[1])[0]
    late_s = None
    while time.monotonic() - t0 < 30:
        try:
            if answer_matches(ask(process.port, late_query, "view", late_pods[1].ip, timeout=0.5), late_query):
                late_s = round(time.monotonic() - t0, 2)
                break
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.05)
    metrics = {}
    return {
        "duration_s": round(time.monotonic() - began, 1),
        "stable_pods": len(stable_pods), "askers": len(askers), "churn_pods": len(churn_pods),
        "queries": tally.sent, "correct": tally.ok, "wrong": tally.wrong, "unanswered": tally.unanswered,
        "wrong_examples": tally.wrong_examples, "unanswered_examples": tally.unanswered_examples,
        "qps": round(tally.sent / max(1.0, duration), 1),
        "churn": churned, "faults": faults, "hostile": hostility if hostile else None,
        "rss_kib_after_warmup": rss_start, "rss_kib_end": rss_end,
        "rss_kib_max": max((s for s in samples if s), default=None),
        "new_network_resolvable_after_s": late_s,
        "watcher_log": {k: len(re.findall(p, process.log.read_text(errors="replace")))
                        for k, p in (("watch_failures", r"pod watch in namespace .* failed"),
                                     ("silent_connections_dropped", r"pod watch silent for"),
                                     ("relists", r"listed \d+ opted-in pods"))},
        **metrics,
    }


def markdown(result: dict, invocation: str) -> str:
    """The soak section of docs/benchmarks.md."""
    mib = lambda kib: "?" if kib is None else f"{kib / 1024:.1f} MiB"  # noqa: E731
    restart = result["faults"].get("apiserver_restart", {})
    hole = result["faults"].get("watch_black_hole", {})
    lines = [
        SOAK_BEGIN,
        "## Soak with faults",
        "",
        f"`{invocation}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (see `bench/soak.py`): "
        f"{result['duration_s']:.0f} s of DNS load from {result.get('askers', result['stable_pods'])} pod addresses while "
        f"{result['churn_pods']} pods of other networks were created and deleted through the real API server "
        f"({result['churn']['created']} creations, {result['churn']['deleted']} deletions); the API server was "
        f"killed and restarted at {restart.get('at_s', '?')} s (down {restart.get('down_s', '?')} s) and the "
        f"watch connection black-holed at {hole.get('at_s', '?')} s.",
        "",
        "| queries | correct | wrong | unanswered | RSS after warm-up | RSS at end | RSS max | new network resolvable after |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['queries']} | {result['correct']} | **{result['wrong']}** | {result['unanswered']} | "
        f"{mib(result['rss_kib_after_warmup'])} | {mib(result['rss_kib_end'])} | {mib(result['rss_kib_max'])} | "
        f"{result['new_network_resolvable_after_s']} s |",
        "",
        f"Watcher log: {result['watcher_log']['watch_failures']} watch failures, "
        f"{result['watcher_log']['silent_connections_dropped']} silent connections dropped, "
        f"{result['watcher_log']['relists']} lists. Unanswered means a timeout (2 s) or SERVFAIL; "
        "wrong means an answer other than the one the pod must get.",
        SOAK_END,
    ]
    return "\n".join(lines) + "\n"


def write_docs(result: dict, path: Path, invocation: str, extra: str = "") -> None:
    """Replace (or append) the soak section of ``path`` (``extra``: more of it, before its end)."""
    text = path.read_text() if path.exists() else ""
    section = markdown(result, invocation)
    if extra:
        section = section.replace(SOAK_END, extra + SOAK_END)
    if SOAK_BEGIN in text and SOAK_END in text:
        before, rest = text.split(SOAK_BEGIN, 1)
        after = rest.split(SOAK_END, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def hostile_markdown(calm: dict, hostile: dict, invocation: str) -> str:
    """The comparison of a soak without and with the hostile clients, for docs/benchmarks.md."""
    mib = lambda kib: "?" if kib is None else f"{kib / 1024:.1f} MiB"  # noqa: E731
    rows = []
    for label, result in (("without", calm), ("with junk and TCP hog", hostile)):
        rows.append(f"| {label} | {result['queries']} | **{result['wrong']}** | **{result['unanswered']}** | "
                    f"{mib(result['rss_kib_after_warmup'])} | {mib(result['rss_kib_end'])} | "
                    f"{mib(result['rss_kib_max'])} |")
    h = hostile["hostile"] or {}
    ratio = (hostile["rss_kib_max"] or 0) / max(1, calm["rss_kib_max"] or 1)
    return "\n".join([
        "",
        "### With a junk client and a TCP hog (issue 19)",
        "",
        f"`{invocation}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the same soak twice, "
        f"{calm['duration_s']:.0f} s each, one load query in ten over TCP; the second time one pod sent "
        f"{h.get('junk_datagrams', '?')} junk datagrams (300 a second, spread evenly: 40% 8 KiB of random "
        f"bytes, 20% a question followed by 8 KB of junk, 10% 5,000-byte padded queries, 30% invented names) "
        f"and {h.get('junk_tcp_messages', '?')} junk 60 KB TCP messages, and another tried to hold 300 TCP "
        f"connections against the cap of 256, asking on each every 5 s ({h.get('hog_connects', '?')} "
        f"connections made, {h.get('hog_closed_by_server', '?')} of them closed by the server: at the cap, or "
        f"to make room for a pod's query) plus one pipelining questions it never read. The old code kept "
        f"every junk query in its cache (an outside review: 56 to 215 MiB after 20,000 of them).",
        "",
        "| run | pod queries | wrong | unanswered | RSS after warm-up | RSS at end | RSS max |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Peak resident memory with the hostile clients: {ratio:.2f}x the run without them.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--stable", type=int, default=20, help="stable networks (two pods each)")
    parser.add_argument("--churn", type=int, default=10, help="churning networks (two pods each)")
    parser.add_argument("--threads", type=int, default=4, help="load threads")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--hostile", action="store_true",
                        help="run twice: without, then with the junk client and the TCP hog, and compare")
    parser.add_argument("--write-docs", action="store_true", help="update the soak section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubedock-dns-soak-"))
    result = soak(work / "calm", args.minutes, args.stable, args.churn, args.threads)
    print(json.dumps(result, indent=2))
    hostile = None
    if args.hostile:
        hostile = soak(work / "hostile", args.minutes, args.stable, args.churn, args.threads, hostile=True)
        print(json.dumps(hostile, indent=2))
    invocation = ("python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.write_docs:
        write_docs(result, REPO / "docs" / "benchmarks.md", invocation,
                   hostile_markdown(result, hostile, invocation) if hostile else "")
    runs = [result] + ([hostile] if hostile else [])
    return 0 if all(r["wrong"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
