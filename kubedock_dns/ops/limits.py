"""Bounds on what clients of a listener can hold: open connections, and log lines when they bite.

Contract
--------
- :class:`ConnectionCap` wraps a server factory (the webhook's, and DNS over TCP): at most
  ``max_connections`` connections are open at once, so a flood of idle or trickling clients
  costs a bounded number of sockets and buffers; and they are shared fairly between source
  addresses.  When the cap is reached, a connection from an address holding fewer connections
  than the busiest address less one takes the place of the busiest address's least recently
  active connection (closed at once); otherwise it is closed as soon as it is accepted, before
  anything is read.  So one address can hold every slot only while nobody else wants one, and
  an address with no connection always gets one while another holds two or more.
- :class:`RateLimitedLog` writes a warning at most once per ``interval`` seconds per kind of
  event, saying how many were suppressed since the last line, so an attack cannot flood the log.

The time limits themselves (a request or a query must arrive whole within a total time, however
its bytes trickle in) live in the protocols that know where a message starts and ends
(:mod:`kubedock_dns.admission.service`, :mod:`kubedock_dns.dns.server`); they report through this log.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from kubedock_dns.ops.logs import WarningLimiter

log = Logger()

__all__ = ["ConnectionCap", "CountedConnection", "RateLimitedLog", "Refused"]


class RateLimitedLog:
    """One warning per ``interval`` seconds per ``kind``, with the count of the ones skipped
    (:class:`kubedock_dns.ops.logs.WarningLimiter` does the limiting), and a count per kind."""

    def __init__(self, clock: Any, interval: float = 60.0) -> None:
        self.interval = interval
        self._limiter = WarningLimiter(log, clock.seconds, interval)
        self.counts: dict[str, int] = {}

    def bite(self, kind: str, text: str) -> None:
        """Count one event of ``kind``; log ``text`` unless one was logged within the interval."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._limiter.warn(kind, "{text}; logged at most once per {interval:.0f}s", text=text,
                           interval=self.interval)


class CountedConnection(ProtocolWrapper):
    """One connection under a :class:`ConnectionCap`: its source address, and when it last
    received bytes (a sequence number of the cap, larger is more recent)."""

    source = ""
    active = 0
    factory: "ConnectionCap"

    def dataReceived(self, data: bytes) -> None:
        self.factory.activity += 1
        self.active = self.factory.activity
        super().dataReceived(data)


class Refused(Protocol):
    """Closes its connection as soon as it is made (a factory may not return None under TLS)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class ConnectionCap(WrappingFactory):
    """``wrapped_factory`` with at most ``max_connections`` open connections, shared fairly
    between source addresses (see the module)."""

    protocol = CountedConnection

    def __init__(self, wrapped_factory: Any, max_connections: int, what: str, limits_log: RateLimitedLog,
                 under_tls: bool = True) -> None:
        super().__init__(wrapped_factory)
        self.max_connections = max_connections
        self.what = what
        self.limits_log = limits_log
        # Under TLS a factory may not return None, so a refused connection gets a protocol that
        # aborts it; a plain TCP listener closes it (a FIN, not a reset) when given None.
        self.under_tls = under_tls
        self.activity = 0  # counts received reads: orders connections by their last one
        self.by_source: dict[str, dict[CountedConnection, None]] = {}
        self.evicted = 0

    def buildProtocol(self, addr: Any) -> Any:
        source = str(getattr(addr, "host", addr))
        if len(self.protocols) >= self.max_connections and not self._make_room(source):
            self.limits_log.bite(
                f"{self.what} connection cap",
                f"{self.what}: refused a connection from {source}: "
                f"{self.max_connections} connections are open already",
            )
            return Refused() if self.under_tls else None
        connection: Any = super().buildProtocol(addr)
        connection.source = source
        self.activity += 1
        connection.active = self.activity
        return connection

    def _make_room(self, source: str) -> bool:
        """Close the least recently active connection of the address holding the most, when
        that is more than ``source`` would hold with one more; whether room was made."""
        mine = len(self.by_source.get(source, ()))
        busiest = max(self.by_source.values(), key=len, default={})
        if len(busiest) <= mine + 1:
            return False
        victim = min(busiest, key=lambda connection: connection.active)
        self.limits_log.bite(
            f"{self.what} fair share",
            f"{self.what}: closed the least recently active of the {len(busiest)} connections of "
            f"{victim.source} to make room for {source} ({mine} open), at the cap of {self.max_connections}",
        )
        self.unregisterProtocol(victim)  # counted out now: the close completes in a later turn
        self.evicted += 1
        transport: Any = victim.transport
        transport.abortConnection()
        return True

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.by_source.setdefault(p.source, {})[p] = None

    def unregisterProtocol(self, p: Any) -> None:
        if p not in self.protocols:
            return  # counted out already (evicted)
        super().unregisterProtocol(p)
        held = self.by_source.get(p.source)
        if held is not None:
            held.pop(p, None)
            if not held:
                del self.by_source[p.source]
