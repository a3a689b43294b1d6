"""Ports of a kubedock-dns server started in another process on port 0.

The server logs ``dns listening on HOST:PORT``, ``webhook listening on ...`` and ``ops listening
on ...`` as each listener starts (:mod:`kubedock_dns.tap`, :mod:`kubedock_dns.admission.service`).  A test
bed passes port 0 for each and reads the ports here, so no port is ever chosen ahead of time and
nothing can take it in between.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["bind_udp_and_tcp", "listening_ports", "wait_for_ports"]

_LISTENING = re.compile(r"\b(dns|webhook|ops) listening on (\S*):(\d+)\b")


def listening_ports(log_text: str) -> dict[str, int]:
    """Listener name -> port, from a server's log (the latest line for each wins)."""
    return {m[1]: int(m[3]) for m in _LISTENING.finditer(log_text)}


def wait_for_ports(log_path: Path, names: Iterable[str], alive: Callable[[], bool],
                   timeout: float = 60.0) -> dict[str, int]:
    """The ports of ``names`` once the log at ``log_path`` shows them all; RuntimeError when
    the process exits first or ``timeout`` passes."""
    wanted = set(names)
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        ports = listening_ports(text)
        if wanted <= ports.keys():
            return {name: ports[name] for name in wanted}
        if not alive():
            raise RuntimeError(f"the server exited before it listened on {sorted(wanted - ports.keys())}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not log listening on {sorted(wanted - ports.keys())} "
                               f"within {timeout:.0f}s")
        time.sleep(0.05)


def bind_udp_and_tcp(host: str, attempts: int = 20) -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to one port on ``host``, for a server in this process: UDP
    takes what the kernel gives, TCP the same number; when that one is taken, both are given up
    and the kernel is asked again."""
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        port = int(udp.getsockname()[1])
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp, port
    raise OSError(f"no port free for both UDP and TCP on {host} after {attempts} tries")
