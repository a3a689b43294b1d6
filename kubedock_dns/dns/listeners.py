"""The DNS server's listeners: UDP and TCP on one port number, the TCP side behind a connection cap.

:class:`DNSListeners` binds UDP first (an :class:`~kubedock_dns.dns.udp.AnsweringPort` fed by the
server's :meth:`read loop hook <kubedock_dns.dns.server.KubedockDNSServerFactory.read_loop_hook>`),
then TCP on the same number; port 0 lets the kernel choose, and when another process holds that
TCP port both are given up and the kernel is asked again (a few times).  TCP connections past
``max_tcp_connections`` are closed when accepted (:class:`kubedock_dns.ops.limits.ConnectionCap`,
the same cap the webhook uses).  Each start logs ``dns listening on HOST:PORT``: tests and tools
that start the server on port 0 read the port from there.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from kubedock_dns.dns.server import KubedockDNSServerFactory, QueryDatagramProtocol
from kubedock_dns.dns.udp import listen_answering_udp
from kubedock_dns.ops.limits import ConnectionCap

log = Logger()

MAX_TCP_CONNECTIONS = 256


class DNSListeners(service.Service):
    """The DNS server's UDP and TCP ports (see the module).  ``port`` is the bound port while
    running; ``tcp_cap`` the TCP connection cap (its ``max_connections`` may be changed)."""

    attempts = 20

    def __init__(self, reactor: Any, port: int, interface: str, server: KubedockDNSServerFactory,
                 max_tcp_connections: int = MAX_TCP_CONNECTIONS) -> None:
        self.reactor = reactor
        self.requested = port
        self.interface = interface
        self.server = server
        self.tcp_cap = ConnectionCap(server, max_tcp_connections, "DNS over TCP", server.limits_log, under_tls=False)
        self.port = 0
        self._udp: Any = None
        self._tcp: Any = None

    def startService(self) -> None:
        for attempt in range(self.attempts):
            # A fresh protocol each time: one given up is detached only in a later reactor turn.
            udp = listen_answering_udp(self.reactor, self.requested, QueryDatagramProtocol(self.server, self.reactor),
                                       self.interface, self.server.read_loop_hook())
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self.tcp_cap, interface=self.interface)
            except CannotListenError:
                udp.stopListening()
                if self.requested or attempt == self.attempts - 1:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        super().startService()
        log.info("dns listening on {interface}:{port} (UDP and TCP)", interface=self.interface or "*",
                 port=self.port)

    def stopService(self):
        super().stopService()
        listening = [p for p in (self._udp, self._tcp) if p is not None]
        self._udp = self._tcp = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])
