"""One DNS query, from the socket that received it to the one place that writes its reply.

A :class:`Query` is created once per query that leaves the UDP read loop (and per TCP message)
and carried through deciding, holding and forwarding, the way twisted.names carries
``(message, protocol, address)`` and CoreDNS a request value.  It knows how to send its reply
(:meth:`Query.reply`): over TCP as a length-prefixed message on its connection, over UDP as one
datagram from the listening port to the asker's address.  Nothing else writes replies, except the
UDP read loop's prepared answers to repeated questions (:mod:`kubedock_dns.dns.udp`), which never
become a Query at all.
"""

from __future__ import annotations

from typing import Any

from twisted.names import dns


class Query:
    """One query: its bytes, where it came from, and what the server learnt while reading it.

    ``address`` is the asker's (host, port) for UDP and None for TCP; ``host`` is the asker's
    address as received (the connection's peer for TCP); ``started`` is the receipt time when the
    query is one of the timed ones (:class:`~kubedock_dns.ops.latency.Sampler`), else 0.
    ``message`` (twisted.names' parse) is None until it is read; ``source_ip`` (``host``
    canonical), ``name`` (lower case, no trailing dot) and ``qtype`` are set by the full path when
    it reads the query, and read only after (a query the fast path relays never needs them: fewer
    stores per forwarded query).
    """

    __slots__ = ("data", "protocol", "address", "host", "started", "message", "source_ip", "name", "qtype")

    def __init__(self, data: bytes, protocol: Any, address: tuple[str, int] | None, host: str,
                 started: float = 0.0) -> None:
        self.data = data
        self.protocol = protocol
        self.address = address
        self.host = host
        self.started = started
        self.message: dns.Message | None = None
        self.source_ip: str
        self.name: str
        self.qtype: int

    @property
    def over_tcp(self) -> bool:
        return self.address is None

    def parsed(self) -> dns.Message:
        """twisted.names' reading of the query (the full path has one already; a query the fast
        path relayed unparsed is read here, once, only to answer a failure)."""
        if self.message is None:
            message = dns.Message()
            message.fromStr(self.data)  # vetted by the fast path's strict reader already
            self.message = message
        return self.message

    def reply(self, wire: bytes) -> None:
        """Send ``wire`` to the asker; nothing when it went away meanwhile (a closed connection, a
        port that stopped listening while the question was held or forwarded).

        A datagram goes straight to the port's socket: twisted's ``write`` re-validates the
        address three times per datagram, a third of the cost of a relayed query.  One the kernel
        refuses (full buffer, vanished peer) is dropped, as UDP may; the client retries."""
        transport = self.protocol.transport
        if transport is None:
            return
        address = self.address
        if address is None:
            if transport.connected:
                self.protocol.sendString(wire)
            return
        try:
            transport.socket.sendto(wire, address)
        except AttributeError:  # not a real port (in-memory transports in tests)
            transport.write(wire, address)
        except OSError:
            pass
