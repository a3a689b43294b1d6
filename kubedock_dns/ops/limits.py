"""Bounds on what clients of a listener can hold: open connections, and log lines when they bite.

Contract
--------
- :class:`ConnectionCap` wraps a server factory (the webhook's, and DNS over TCP): at most
  ``max_connections`` connections are open at once; one more is closed as soon as it is
  accepted (before anything is read), so a flood of idle or trickling clients costs a bounded
  number of sockets and buffers.
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

__all__ = ["ConnectionCap", "RateLimitedLog", "Refused"]


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


class _Counted(ProtocolWrapper):
    pass


class Refused(Protocol):
    """Closes its connection as soon as it is made (a factory may not return None under TLS)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class ConnectionCap(WrappingFactory):
    """``wrapped_factory`` with at most ``max_connections`` open connections (see the module)."""

    protocol = _Counted

    def __init__(self, wrapped_factory: Any, max_connections: int, what: str, limits_log: RateLimitedLog,
                 under_tls: bool = True) -> None:
        super().__init__(wrapped_factory)
        self.max_connections = max_connections
        self.what = what
        self.limits_log = limits_log
        # Under TLS a factory may not return None, so a refused connection gets a protocol that
        # aborts it; a plain TCP listener closes it (a FIN, not a reset) when given None.
        self.under_tls = under_tls

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.max_connections:
            self.limits_log.bite(
                f"{self.what} connection cap",
                f"{self.what}: refused a connection from {getattr(addr, 'host', addr)}: "
                f"{self.max_connections} connections are open already",
            )
            return Refused() if self.under_tls else None
        return super().buildProtocol(addr)
