"""The servers under test and the upstream, as processes on loopback, each pinned to one core.

Each :class:`Server` knows how to obtain its binary, report its version, write its
configuration for a :class:`~bench.topology.Topology` and build its command line.  ``form`` says
which query form it answers (``view``: kubedock-dns, per-source views; ``peer``: names made
unique per network, see :mod:`bench.topology`).  :func:`start` runs one under ``taskset`` and
returns once it answers a probe query; :class:`Process` reads its peak RSS and stops it.

Every server forwards names it does not own to the same upstream, a dnsmasq that answers
``*.example.test`` itself (it never reaches the internet).  Nothing caches forwarded answers:
the upstream gives them TTL 0 (dnsmasq does not cache those) and CoreDNS runs without the
``cache`` plugin, so a forwarded query costs every server one upstream round trip, as it does
kubedock-dns.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dns.message
import dns.query
import dns.rcode

from bench.topology import FORWARDED_ANSWER, FORWARDED_ZONE, TTL, Query, Topology
from testbed.upstream import free_port

REPO = Path(__file__).resolve().parent.parent
DNSMASQ = "/usr/sbin/dnsmasq"
UPSTREAM_ADDRESS = "127.53.53.53"


class Unavailable(Exception):
    """A server's binary is missing or cannot be built; the message says what to do."""


def pinning(core: int | None) -> list[str]:
    """``taskset -c CORE`` when the machine has more than one core, else nothing."""
    if core is None or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(core)]


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


@dataclass
class Upstream:
    """Where every server forwards: ``address:port``, and the resolv.conf naming it."""

    address: str
    port: int
    resolv_conf: Path

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass
class Process:
    """A started server: its process, the port it answers on, its log files."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    port: int
    log: Path

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the server process (the pid taskset exec'd into), in KiB."""
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Server:
    """One server under test: how to obtain, configure and start it."""

    name: str
    form: str  # "view" or "peer"
    obtain: Callable[[], str]  # the binary (or interpreter) path; raises Unavailable
    version: Callable[[str], str]
    configure: Callable[[str, Topology, Path, int, Upstream], list[str]]  # -> argv
    ready_timeout: float = 30.0
    binary: str | None = field(default=None, repr=False)

    def resolve_binary(self) -> str:
        if self.binary is None:
            self.binary = self.obtain()
        return self.binary


# -- dnsmasq ---------------------------------------------------------------------------------

def _dnsmasq_binary() -> str:
    if not os.access(DNSMASQ, os.X_OK):
        raise Unavailable(f"{DNSMASQ} is missing: apt-get install dnsmasq-base")
    return DNSMASQ


def _dnsmasq_version(binary: str) -> str:
    return first_line([binary, "--version"]).replace("  Copyright (c) 2000-2024 Simon Kelley", "")


def _dnsmasq_argv(binary: str, topology: Topology, work: Path, port: int, upstream: Upstream) -> list[str]:
    hosts = work / "peer.hosts"
    conf = work / "dnsmasq-local.conf"
    hosts.write_text(topology.hosts_file())
    conf.write_text(topology.dnsmasq_local_conf())
    return [
        binary, "--keep-in-foreground", f"--conf-file={conf}", "--no-resolv", "--no-hosts",
        "--no-poll", f"--addn-hosts={hosts}", f"--server={upstream.address}#{upstream.port}",
        f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
        # The cache size also sizes dnsmasq's hash table, which holds the hosts-file names too:
        # too small a table makes every local lookup walk long chains.  Forwarded answers are not
        # cached anyway (the upstream gives them TTL 0).
        f"--cache-size={max(10_000, topology.peer_name_count())}", "--no-negcache", f"--local-ttl={TTL}", "--dns-forward-max=1024", "--user=root",
        f"--pid-file={work / 'dnsmasq.pid'}", "--log-facility=-",
    ]


DNSMASQ_SERVER = Server("dnsmasq", "peer", _dnsmasq_binary, _dnsmasq_version, _dnsmasq_argv)


# -- CoreDNS ---------------------------------------------------------------------------------

def coredns_cached_path() -> Path:
    """Where scripts/build-tools.sh puts CoreDNS (its pinned version, or $COREDNS_VERSION)."""
    script = (REPO / "scripts" / "build-tools.sh").read_text()
    pinned = re.search(r"COREDNS_VERSION=\$\{COREDNS_VERSION:-([^}]+)\}", script)
    version = os.environ.get("COREDNS_VERSION") or (pinned.group(1) if pinned else "unknown")
    cache = Path(os.environ.get("KUBEDOCK_DNS_CACHE", Path.home() / ".cache" / "kubedock-dns"))
    return cache / f"coredns-{version}" / "coredns"


def coredns_obtainer(build: bool) -> Callable[[], str]:
    def obtain() -> str:
        cached = coredns_cached_path()
        if cached.is_file() and os.access(cached, os.X_OK):
            return str(cached)
        if not build:
            raise Unavailable(f"CoreDNS is not built yet ({cached}): run bash scripts/build-tools.sh coredns")
        print("bench: building CoreDNS with scripts/build-tools.sh (a few minutes)", file=sys.stderr, flush=True)
        out = subprocess.run(["bash", str(REPO / "scripts" / "build-tools.sh"), "coredns"],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0 and not os.access(cached, os.X_OK):
            tail = "\n".join(out.stderr.splitlines()[-15:])
            raise Unavailable(f"scripts/build-tools.sh coredns failed (rc={out.returncode}):\n{tail}")
        lines = out.stdout.strip().splitlines()
        return lines[-1] if lines and out.returncode == 0 else str(cached)
    return obtain


def _coredns_version(binary: str) -> str:
    out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30)
    return " ".join(out.stdout.split()).rstrip(", ")


def _coredns_argv(binary: str, topology: Topology, work: Path, port: int, upstream: Upstream) -> list[str]:
    hosts = work / "peer.hosts"
    hosts.write_text(topology.hosts_file())
    corefile = work / "Corefile"
    corefile.write_text(
        f""".:{port} {{
    bind 127.0.0.1
    hosts {hosts} {{
        ttl {TTL}
        reload 0
        fallthrough
    }}
    forward . {upstream.hostport} {{
        max_concurrent 1024
    }}
}}
"""
    )
    return [binary, "-conf", str(corefile), "-quiet"]


def coredns_server(build: bool) -> Server:
    return Server("CoreDNS", "peer", coredns_obtainer(build), _coredns_version, _coredns_argv)


# -- the naive twisted.names baseline --------------------------------------------------------

def _python() -> str:
    return sys.executable


def _twisted_version(binary: str) -> str:
    import twisted

    return f"Twisted {twisted.__version__}, Python {sys.version.split()[0]}"


def _naive_argv(binary: str, topology: Topology, work: Path, port: int, upstream: Upstream) -> list[str]:
    hosts = work / "peer.hosts"
    hosts.write_text(topology.hosts_file())
    return [binary, "-m", "bench.naive_twisted", "--hosts", str(hosts), "--port", str(port),
            "--interface", "127.0.0.1", "--upstream", upstream.hostport, "--ttl", str(TTL)]


NAIVE_SERVER = Server("naive twisted.names", "peer", _python, _twisted_version, _naive_argv)


# -- kubedock-dns ----------------------------------------------------------------------------

def _kubedock_binary() -> str:
    plugin = REPO / "twisted" / "plugins" / "kubedock_dns.py"
    if not plugin.is_file() or importlib.util.find_spec("kubedock_dns.tap") is None:
        raise Unavailable("kubedock-dns has no twistd plugin yet (twisted/plugins/kubedock_dns.py, "
                          "kubedock_dns/tap.py)")
    return sys.executable


def _kubedock_version(binary: str) -> str:
    import kubedock_dns

    return f"kubedock-dns {kubedock_dns.__version__} ({_twisted_version(binary)})"


def _kubedock_argv(binary: str, topology: Topology, work: Path, port: int, upstream: Upstream) -> list[str]:
    pods = work / "pods.json"
    pods.write_text(topology.pods_json())
    argv = [binary, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "kubedock-dns", "--pods-file", str(pods), "--dns-port", str(port),
            "--dns-interface", "127.0.0.1", "--resolv-conf", str(upstream.resolv_conf),
            "--ops-port", "0"]
    if upstream.port != 53:
        argv += ["--upstream", upstream.hostport]
    return argv


KUBEDOCK_SERVER = Server("kubedock-dns", "view", _kubedock_binary, _kubedock_version, _kubedock_argv,
                         ready_timeout=90.0)


# -- running ---------------------------------------------------------------------------------

def answer_matches(response: dns.message.Message, query: Query) -> bool:
    """Whether ``response`` is the answer ``query.expect`` asks for (see :class:`Query`)."""
    if response.rcode() != dns.rcode.NOERROR:
        return False
    rdatas = [rd for rrset in response.answer for rd in rrset]
    if query.qtype == "PTR":
        targets = [rd.target.to_text().split(".")[0].lower() for rd in rdatas]
        return bool(targets) and query.expect[0] in targets
    return sorted(rd.to_text() for rd in rdatas) == sorted(query.expect)


def ask(port: int, query: Query, form: str, source: str | None = None, timeout: float = 2.0,
        tcp: bool = False) -> dns.message.Message:
    name, qtype = query.line(form).split()
    message = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, "127.0.0.1", port=port, timeout=timeout, source=source)


def wait_answering(process: Process, probe: Query, form: str, source: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with rc={process.popen.returncode}:\n{process.log_tail()}")
        try:
            response = ask(process.port, probe, form, source, timeout=0.5)
            if answer_matches(response, probe):
                return
            last = response
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last = e
        time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"{process.name} did not answer {probe.line(form)!r} within {timeout:.0f} s "
                       f"(last: {last!r}):\n{process.log_tail()}")


def launch(name: str, argv: list[str], port: int, work: Path, core: int | None) -> Process:
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "wb") as out:
        popen = subprocess.Popen(pinning(core) + argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=str(work), env=env)
    return Process(name, pinning(core) + argv, popen, port, log)


def port_was_taken(process: Process) -> bool:
    """Whether ``process`` failed because its port was taken (it was free when chosen: another
    process took it in between)."""
    return not process.alive() and "in use" in process.log_tail(50).lower()


def start(server: Server, topology: Topology, work: Path, upstream: Upstream, core: int | None) -> Process:
    """Start ``server`` serving ``topology`` on a free loopback port; return once it answers.
    A port taken by another process before the server bound it is chosen again (3 tries)."""
    binary = server.resolve_binary()
    work.mkdir(parents=True, exist_ok=True)
    source = topology.sources(1)[0]
    probe = topology.queries_for(source)[0]
    for attempt in range(3):
        port = free_port()
        argv = server.configure(binary, topology, work, port, upstream)
        process = launch(server.name, argv, port, work, core)
        try:
            wait_answering(process, probe, server.form, source.ip, server.ready_timeout)
        except RuntimeError:
            if attempt < 2 and port_was_taken(process):
                continue
            raise
        return process
    raise AssertionError("unreachable")


def start_upstream(work: Path, core: int | None) -> tuple[Upstream, Process]:
    """The stand-in cluster DNS: a dnsmasq answering ``*.example.test`` with FORWARDED_ANSWER, TTL 0.

    It listens on 127.53.53.53 port 53 when it may (root), so a plain resolv.conf names it; else
    on a free port (servers then get ``--upstream``/``--server`` with the port)."""
    binary = _dnsmasq_binary()
    port = 53 if os.geteuid() == 0 else free_port(UPSTREAM_ADDRESS)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((UPSTREAM_ADDRESS, port))
    except OSError:
        port = free_port(UPSTREAM_ADDRESS)  # the check below starts it again if this one is taken too
    resolv = work / "resolv.conf"
    work.mkdir(parents=True, exist_ok=True)
    resolv.write_text(f"nameserver {UPSTREAM_ADDRESS}\n")
    argv = [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", f"--address=/{FORWARDED_ZONE}/{FORWARDED_ANSWER}", f"--port={port}",
            f"--listen-address={UPSTREAM_ADDRESS}", "--bind-interfaces", "--cache-size=0",
            "--local-ttl=0", "--user=root", f"--pid-file={work / 'upstream.pid'}",
            "--log-facility=-"]
    process = launch("upstream dnsmasq", argv, port, work, core)
    probe = Query("forwarded", "A", f"probe.{FORWARDED_ZONE}.", f"probe.{FORWARDED_ZONE}.",
                  (FORWARDED_ANSWER,), "probe")
    # The upstream listens on its own address: probe it there.
    deadline = time.monotonic() + 15
    while True:
        try:
            m = dns.query.udp(dns.message.make_query(probe.view_name, "A"), UPSTREAM_ADDRESS, port=port, timeout=0.5)
            if answer_matches(m, probe):
                break
        except Exception:  # noqa: BLE001
            pass
        if port_was_taken(process) and time.monotonic() < deadline:
            port = free_port(UPSTREAM_ADDRESS)  # taken by another process meanwhile: choose again
            argv = [a if not a.startswith("--port=") else f"--port={port}" for a in argv]
            process = launch("upstream dnsmasq", argv, port, work, core)
            continue
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"upstream dnsmasq did not start:\n{process.log_tail()}")
        time.sleep(0.1)
    return Upstream(UPSTREAM_ADDRESS, port, resolv), process
