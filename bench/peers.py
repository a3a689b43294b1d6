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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import dns.message
import dns.name
import dns.query
import dns.rcode

from bench.topology import FORWARDED_ANSWER, FORWARDED_ZONE, SEARCH_SUFFIX, TTL, Pod, Query, Topology
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
    """A started server: its process, the port it answers on, its log files.

    ``addresses`` maps a source pod address to the server address it asks (default 127.0.0.1):
    aardvark-dns answers each network on that network's gateway.  ``pid_file`` names where a
    server that forks into the background (aardvark-dns) writes the pid of the serving process;
    that process, not the one started, is measured and stopped."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    port: int
    log: Path
    addresses: dict[str, str] = field(default_factory=dict)
    pid_file: Path | None = None

    def address(self, source: str | None) -> str:
        return self.addresses.get(source or "", "127.0.0.1")

    @property
    def pid(self) -> int:
        """The serving process: the one started, or the daemon named in ``pid_file``."""
        if self.pid_file is None:
            return self.popen.pid
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return -1

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the server process (the pid taskset exec'd into, or the daemon), in KiB."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else None

    def alive(self) -> bool:
        if self.popen.poll() is None:
            return True  # a forking server's parent waits until its daemon is ready
        if self.pid_file is None:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def stop(self) -> None:
        if self.pid_file is not None:
            self._stop_daemon()
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def _stop_daemon(self) -> None:
        pid = self.pid
        if pid <= 0:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
            if not Path(f"/proc/{pid}").exists():
                return

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
    tcp: bool = True  # whether it answers over TCP too (aardvark-dns 1.4 is UDP only)
    # The server address each source pod asks (default 127.0.0.1 for every source).
    address_for: Callable[[Topology, Pod], str] | None = None
    pid_file: str | None = None  # a forking server's pid file, relative to its work directory
    # A defect of the server's own, documented upstream, that the answer check reports instead of
    # failing the server: (response, query) -> what is wrong, or None when it is not that defect.
    known_defect: Callable[[dns.message.Message, Query], str | None] | None = None
    notes: tuple[str, ...] = ()  # how the server behaves that its figures include (reported)
    # The most networks it can serve on this kind of machine, and why (None: no known limit).
    max_networks: tuple[int, str] | None = None

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


# -- aardvark-dns ----------------------------------------------------------------------------

AARDVARK = "/usr/lib/podman/aardvark-dns"


def _aardvark_binary() -> str:
    if not os.access(AARDVARK, os.X_OK):
        raise Unavailable(f"{AARDVARK} is missing: apt-get install aardvark-dns")
    return AARDVARK


def _aardvark_version(binary: str) -> str:
    return first_line([binary, "--version"])


def _aardvark_address(topology: Topology, source: Pod) -> str:
    return topology.gateway(source.network)


def _aardvark_argv(binary: str, topology: Topology, work: Path, port: int, upstream: Upstream) -> list[str]:
    # aardvark-dns 1.4 forwards to port 53 only (its resolv.conf's or the network's DNS servers).
    if upstream.port != 53:
        raise Unavailable("aardvark-dns forwards to port 53 only: the upstream needs port 53 (run as root)")
    config = work / "aardvark"
    if config.exists():
        shutil.rmtree(config)
    config.mkdir(parents=True)
    for network, text in topology.aardvark_configs(upstream.address).items():
        (config / network).write_text(text)
    # As netavark runs it, with the pods' search suffix as the search domain aardvark strips
    # (podman's is dns.podman); ``run`` forks the server into the background and returns.
    return [binary, "--config", str(config), "--port", str(port),
            "--filter-search-domain", f".{SEARCH_SUFFIX}", "run"]


def _aardvark_root_owned_ptr(response: dns.message.Message, query: Query) -> str | None:
    if (query.qtype == "PTR" and response.answer and all(r.name == dns.name.root for r in response.answer)
            and answer_matches(response, query, owner=False)):
        return ("PTR answers are owned by the root name '.' instead of the question's name "
                "(aardvark-dns 1.4 sets no owner on them); their targets are right")
    return None


AARDVARK_SERVER = Server("aardvark-dns", "view", _aardvark_binary, _aardvark_version, _aardvark_argv,
                         tcp=False, address_for=_aardvark_address, pid_file="aardvark/aardvark.pid",
                         known_defect=_aardvark_root_owned_ptr, notes=(
                             "no TCP listener (aardvark-dns 1.4 serves UDP only): checked and measured over UDP",
                             "after answering a PTR question for a container it also forwards the question "
                             "upstream and relays that answer as a second reply (here REFUSED); dnsperf takes "
                             "the first, the forward is part of its cost",
                             "one thread with its own tokio runtime per network gateway address",
                         ), max_networks=(1000, (
                             "it starts an OS thread with its own tokio runtime (3 threads) per network: with "
                             "5,000 networks about 15,000 threads and 60,000 memory maps (vm.max_map_count is "
                             "65,530), 357 MiB RSS, and 2-5 of the 5,000 listeners failed to start here")))


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

def answer_matches(response: dns.message.Message, query: Query, owner: bool = True) -> bool:
    """Whether ``response`` is the answer ``query.expect`` asks for (see :class:`Query`), its
    records owned by the question's name (``owner=False`` skips that check)."""
    if response.rcode() != dns.rcode.NOERROR:
        return False
    if owner and response.question and any(rrset.name != response.question[0].name for rrset in response.answer):
        return False
    rdatas = [rd for rrset in response.answer for rd in rrset]
    if query.qtype == "PTR":
        targets = [rd.target.to_text().split(".")[0].lower() for rd in rdatas]
        return bool(targets) and query.expect[0] in targets
    return sorted(rd.to_text() for rd in rdatas) == sorted(query.expect)


def ask(port: int, query: Query, form: str, source: str | None = None, timeout: float = 2.0,
        tcp: bool = False, server: str = "127.0.0.1") -> dns.message.Message:
    name, qtype = query.line(form).split()
    message = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(message, server, port=port, timeout=timeout, source=source)


def wait_answering(process: Process, probe: Query, form: str, source: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with rc={process.popen.returncode}:\n{process.log_tail()}")
        try:
            response = ask(process.port, probe, form, source, timeout=0.5, server=process.address(source))
            if answer_matches(response, probe):
                return
            last = response
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last = e
        time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"{process.name} did not answer {probe.line(form)!r} within {timeout:.0f} s "
                       f"(last: {last!r}):\n{process.log_tail()}")


def udp_listeners(port: int) -> int:
    """How many UDP sockets of this network namespace are bound to ``port`` (/proc/net/udp)."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    suffix = f":{port:04X}"
    return sum(1 for line in lines if line.split()[1].endswith(suffix))


def wait_listening(process: Process, timeout: float) -> None:
    """Wait until a server listening on several addresses (one per network) has bound all of them:
    aardvark-dns starts one thread per network, and answers the first while others still start."""
    wanted = len(set(process.addresses.values()))
    deadline = time.monotonic() + timeout
    while (bound := udp_listeners(process.port)) < wanted:
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{process.name} listens on {bound} of its {wanted} addresses after "
                               f"{timeout:.0f} s:\n{process.log_tail()}")
        time.sleep(0.1)


def launch(name: str, argv: list[str], port: int, work: Path, core: int | None,
           addresses: dict[str, str] | None = None, pid_file: Path | None = None) -> Process:
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "wb") as out:
        popen = subprocess.Popen(pinning(core) + argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=str(work), env=env)
    return Process(name, pinning(core) + argv, popen, port, log, addresses or {}, pid_file)


def port_was_taken(process: Process) -> bool:
    """Whether ``process`` failed because its port was taken (it was free when chosen: another
    process took it in between)."""
    return not process.alive() and "in use" in process.log_tail(50).lower()


def start(server: Server, topology: Topology, work: Path, upstream: Upstream, core: int | None, *,
          wrapper: Sequence[str] = (), extra: Sequence[str] = (), label: str = "",
          ready_timeout: float | None = None) -> Process:
    """Start ``server`` serving ``topology`` on a free loopback port; return once it answers.
    A port taken by another process before the server bound it is chosen again (3 tries).
    ``wrapper`` goes before the server's command (a profiler), ``extra`` after its arguments;
    ``label`` is added to its name (logs, errors)."""
    ready_timeout = ready_timeout or server.ready_timeout
    binary = server.resolve_binary()
    work.mkdir(parents=True, exist_ok=True)
    source = topology.sources(1)[0]
    probe = topology.queries_for(source)[0]
    addresses = ({pod.ip: server.address_for(topology, pod) for pod in topology.pods()}
                 if server.address_for else {})
    for attempt in range(3):
        port = free_port()
        argv = [*wrapper, *server.configure(binary, topology, work, port, upstream), *extra]
        process = launch(server.name + label, argv, port, work, core, addresses,
                         work / server.pid_file if server.pid_file else None)
        try:
            wait_answering(process, probe, server.form, source.ip, ready_timeout)
            if addresses:
                wait_listening(process, ready_timeout)
        except RuntimeError:
            if attempt < 2 and port_was_taken(process):
                continue
            raise
        return process
    raise AssertionError("unreachable")


def _upstream_address(skip: set[str]) -> tuple[str, int]:
    """An address in 127.53.53.0/24 whose port 53 is free (root), else 127.53.53.53 and a free port.

    Port 53, because a plain resolv.conf can then name the upstream and aardvark-dns forwards to
    port 53 only; not always 127.53.53.53, because another benchmark on a shared machine may hold it."""
    if os.geteuid() == 0:
        for last in range(53, 85):
            address = f"127.53.53.{last}"
            if address in skip:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((address, 53))
            except OSError:
                continue
            return address, 53
    return UPSTREAM_ADDRESS, free_port(UPSTREAM_ADDRESS)


def start_upstream(work: Path, core: int | None) -> tuple[Upstream, Process]:
    """The stand-in cluster DNS: a dnsmasq answering ``*.example.test`` with FORWARDED_ANSWER, TTL 0.

    It listens on port 53 of an address in 127.53.53.0/24 when it may (root), so a plain
    resolv.conf names it; else on a free port (servers then get ``--upstream``/``--server`` with
    the port)."""
    binary = _dnsmasq_binary()
    tried: set[str] = set()
    address, port = _upstream_address(tried)
    resolv = work / "resolv.conf"
    work.mkdir(parents=True, exist_ok=True)

    def run(address: str, port: int) -> Process:
        tried.add(address)
        resolv.write_text(f"nameserver {address}\n")
        argv = [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--no-poll", f"--address=/{FORWARDED_ZONE}/{FORWARDED_ANSWER}", f"--port={port}",
                f"--listen-address={address}", "--bind-interfaces", "--cache-size=0",
                "--local-ttl=0", "--user=root", f"--pid-file={work / 'upstream.pid'}",
                "--log-facility=-"]
        return launch("upstream dnsmasq", argv, port, work, core)

    process = run(address, port)
    probe = Query("forwarded", "A", f"probe.{FORWARDED_ZONE}.", f"probe.{FORWARDED_ZONE}.",
                  (FORWARDED_ANSWER,), "probe")
    # The upstream listens on its own address: probe it there.
    deadline = time.monotonic() + 15
    while True:
        try:
            m = dns.query.udp(dns.message.make_query(probe.view_name, "A"), address, port=port, timeout=0.5)
            if answer_matches(m, probe):
                break
        except Exception:  # noqa: BLE001
            pass
        if port_was_taken(process) and time.monotonic() < deadline:
            address, port = _upstream_address(tried)  # taken by another process meanwhile: choose again
            process = run(address, port)
            continue
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"upstream dnsmasq did not start:\n{process.log_tail()}")
        time.sleep(0.1)
    return Upstream(address, port, resolv), process
