"""A real dnsmasq playing the cluster DNS (the upstream kubedock-dns forwards to).

Contract
--------
``Dnsmasq`` (a context manager) runs Debian's ``/usr/sbin/dnsmasq`` (package ``dnsmasq-base``)
in the foreground, bound to one address and port only (``--bind-interfaces --listen-address``),
with local data only: ``--no-resolv --no-hosts``, no ``server=`` line and ``--local=/#/``, so it
never forwards anything off the machine and answers every name it does not hold with NXDOMAIN
(it refuses nothing). Records, by default (cluster domain ``cluster.local``):

- ``kubernetes.default.svc.<domain>`` A ``10.96.0.1`` (and its PTR), the name an opted-in pod
  asks when it wants the real cluster DNS;
- ``db.<namespace>.svc.<domain>`` A ``10.96.7.7`` (and its PTR): a Service named like a
  Docker alias, so a test can prove kubedock-dns answers ``db`` itself and never falls through;
- whatever ``records`` (name -> IP or IPs) and ``ptr_records`` (IP -> name) add.

The listen address defaults to a fresh ``127.53.<x>.<y>`` on port 53 when root (so a plain
resolv.conf can point at it and parallel instances do not collide), else ``127.0.0.1`` on a free
unprivileged port. ``start`` returns only once it answers a query (dnspython); ``close`` kills
it. ``queries()`` parses its query log: which name, which type, from which client address.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import dns.exception
import dns.message
import dns.query
import dns.rcode

__all__ = ["DNSMASQ", "Dnsmasq", "DnsmasqError", "QueryLogEntry", "free_port"]

DNSMASQ = "/usr/sbin/dnsmasq"


class DnsmasqError(RuntimeError):
    """dnsmasq is missing, did not start, or did not answer; the message carries its output."""


@dataclass(frozen=True)
class QueryLogEntry:
    """One line ``query[A] name from 10.244.3.2`` of dnsmasq's log."""

    qtype: str
    name: str
    client: str


_QUERY_LINE = re.compile(r"query\[(?P<qtype>[A-Za-z0-9]+)\] (?P<name>\S+) from (?P<client>\S+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now, for a server in another process.

    Another process may take it before that server binds it: callers must retry with a new
    port when the server reports the address in use (as :meth:`Dnsmasq.start` does).  Servers
    in this process bind port 0 instead and read the port the kernel gave."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both UDP and TCP on {host}")


def _reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


class Dnsmasq:
    """dnsmasq as the cluster DNS upstream; see the module docstring.

    ``listen_ip``/``port``: where it listens (defaults above). ``namespace``/``cluster_domain``
    shape the default records; ``service_name``/``service_ip`` the decoy Service;
    ``records`` maps names to one IP or a list (A or AAAA by family); ``ptr_records`` maps IPs
    to names. ``ttl`` is the TTL of local answers.
    """

    def __init__(self, listen_ip: str | None = None, port: int | None = None, *,
                 namespace: str = "default", cluster_domain: str = "cluster.local",
                 service_name: str = "db", service_ip: str = "10.96.7.7",
                 kubernetes_ip: str = "10.96.0.1",
                 records: Mapping[str, str | Sequence[str]] | None = None,
                 ptr_records: Mapping[str, str] | None = None, ttl: int = 30,
                 binary: str = DNSMASQ, start_timeout: float = 10.0) -> None:
        root = os.geteuid() == 0
        # Addresses and ports we chose may be taken by another process before dnsmasq binds
        # them: start() then chooses again.  Ones the caller gave are used as given.
        self._chosen_ip = listen_ip is None
        self._chosen_port = port is None
        if listen_ip is None:
            listen_ip = (f"127.53.{secrets.randbelow(254) + 1}.{secrets.randbelow(253) + 2}"
                         if root else "127.0.0.1")
        if port is None:
            port = 53 if root and listen_ip != "127.0.0.1" else free_port(listen_ip)
        self.listen_ip = listen_ip
        self.port = port
        self.binary = binary
        self.start_timeout = start_timeout
        self.kubernetes_name = f"kubernetes.default.svc.{cluster_domain}"
        self.kubernetes_ip = kubernetes_ip
        self.service_name = f"{service_name}.{namespace}.svc.{cluster_domain}"
        self.service_ip = service_ip
        self.records: dict[str, list[str]] = {
            self.kubernetes_name: [kubernetes_ip],
            self.service_name: [service_ip],
        }
        for name, ips in (records or {}).items():
            self.records[name.rstrip(".")] = [ips] if isinstance(ips, str) else list(ips)
        self.ptr_records = dict(ptr_records or {})
        self.ttl = ttl
        self._proc: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._log_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- life cycle

    @property
    def address(self) -> tuple[str, int]:
        """(IP, port) it answers on."""
        return (self.listen_ip, self.port)

    @property
    def upstream_arg(self) -> str:
        """``HOST:PORT`` for kubedock-dns's ``--upstream``."""
        return f"{self.listen_ip}:{self.port}"

    def argv(self) -> list[str]:
        """The full dnsmasq command line."""
        argv = [
            self.binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            "--bind-interfaces", f"--listen-address={self.listen_ip}", f"--port={self.port}",
            "--pid-file=", "--conf-file=/dev/null", "--log-facility=-", "--log-queries",
            "--local=/#/", f"--local-ttl={self.ttl}", "--cache-size=0",
        ]
        if os.geteuid() == 0:
            argv.append("--user=root")  # keep stderr logging; never hands out privileges anyway
        for name, ips in self.records.items():
            argv.append(f"--host-record={name},{','.join(ips)}")
        for ip, name in self.ptr_records.items():
            argv.append(f"--ptr-record={_reverse_name(ip)},{name.rstrip('.')}")
        return argv

    def start(self) -> "Dnsmasq":
        """Start dnsmasq and wait until it answers ``kubernetes.default.svc...``.

        When the address or port was chosen here and turns out to be in use by another process,
        another is chosen and dnsmasq started again (up to five times)."""
        for attempt in range(5):
            try:
                return self._start_once()
            except DnsmasqError as e:
                if "in use" not in str(e) or not (self._chosen_ip or self._chosen_port) or attempt == 4:
                    raise
                with self._log_lock:
                    self._log.clear()
                if self._chosen_ip:
                    self.listen_ip = f"127.53.{secrets.randbelow(254) + 1}.{secrets.randbelow(253) + 2}"
                if self._chosen_port:
                    self.port = free_port(self.listen_ip)
        raise AssertionError("unreachable")

    def _start_once(self) -> "Dnsmasq":
        if self._proc is not None:
            return self
        if not os.access(self.binary, os.X_OK):
            raise DnsmasqError(f"{self.binary} not found: install the Debian package "
                               "dnsmasq-base (apt-get install dnsmasq-base)")
        self._proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        self._reader = threading.Thread(target=self._read_log, daemon=True,
                                        name=f"dnsmasq-log-{self.port}")
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        query = dns.message.make_query(self.kubernetes_name, "A")
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._reader.join(timeout=2)
                output = "\n".join(self.log_lines())
                self._proc = None
                raise DnsmasqError(f"dnsmasq exited with code {rc} on "
                                   f"{self.listen_ip}:{self.port}:\n{output}")
            try:
                answer = dns.query.udp(query, self.listen_ip, port=self.port, timeout=0.2)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return self
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise DnsmasqError(f"dnsmasq on {self.listen_ip}:{self.port} did not answer "
                                   f"within {self.start_timeout}s:\n" + "\n".join(self.log_lines()))
            time.sleep(0.05)

    def _read_log(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        for line in proc.stderr:
            with self._log_lock:
                self._log.append(line.rstrip("\n"))

    def close(self) -> None:
        """Stop dnsmasq. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=2)

    def __enter__(self) -> "Dnsmasq":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observations

    def log_lines(self) -> list[str]:
        """Everything dnsmasq logged so far."""
        with self._log_lock:
            return list(self._log)

    def queries(self) -> list[QueryLogEntry]:
        """The queries it received, in order, with the client address it saw."""
        out = []
        for line in self.log_lines():
            match = _QUERY_LINE.search(line)
            if match:
                out.append(QueryLogEntry(match["qtype"], match["name"], match["client"]))
        return out

    def write_resolv_conf(self, path: str | os.PathLike[str]) -> Path:
        """Write a resolv.conf naming it as the only nameserver (for ``--resolv-conf``).

        resolv.conf cannot carry a port: when it listens elsewhere than 53, use
        ``upstream_arg`` with ``--upstream`` instead (this raises ValueError).
        """
        if self.port != 53:
            raise ValueError(f"dnsmasq listens on port {self.port}; resolv.conf can only name "
                             f"port 53 servers: pass --upstream {self.upstream_arg} instead")
        path = Path(path)
        path.write_text(f"# kubedock-dns test bed: dnsmasq as the cluster DNS\n"
                        f"nameserver {self.listen_ip}\n")
        return path
