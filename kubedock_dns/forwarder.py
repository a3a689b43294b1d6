"""Relaying questions that are not ours to the upstream (cluster) resolvers.

Queries travel as the client sent them; only the message ID is rewritten on the way out and
restored on the way back, so the upstream's answer reaches the client whole (rcode, authority,
additional, EDNS).  One table (:data:`OUTCOME`) says what each upstream outcome means: an answer
is relayed, SERVFAIL, REFUSED and silence move on to the next upstream, and when every upstream
failed the client gets SERVFAIL, never the NXDOMAIN that stock twisted.names would invent.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass
from typing import Sequence

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

log = Logger()

RCODE_SERVFAIL = 2
RCODE_REFUSED = 5
RELAY = "relay"
NEXT = "next"
# upstream rcode -> what to do with it; any rcode not listed is relayed.
OUTCOME = {RCODE_SERVFAIL: NEXT, RCODE_REFUSED: NEXT}


class UpstreamsFailed(Exception):
    """No upstream gave a usable answer; the message lists what each one did."""


class Overloaded(Exception):
    """Too many forwarded queries are in flight."""


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``host``, ``host:port`` or ``[v6]:port``; raises ValueError naming the text."""
    host, port = text.strip(), 53
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            port = int(rest.lstrip(":"))
    elif host.count(":") == 1:
        host, port_text = host.split(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # raises ValueError for names: upstreams must be addresses
    if not 0 < port < 65536:
        raise ValueError(f"upstream {text!r}: port out of range")
    return Upstream(host, port)


def upstreams_from_resolv_conf(text: str) -> list[Upstream]:
    """Every ``nameserver`` of a resolv.conf, in order."""
    found = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(Upstream(str(ipaddress.ip_address(parts[1].split("%")[0]))))
            except ValueError:
                log.warn("ignoring nameserver {value!r}: not an address", value=parts[1])
    return found


def question_section(message: bytes) -> bytes:
    """The raw bytes of the first question (name, type, class), lower-cased for comparison."""
    offset = 12
    while True:
        length = message[offset]
        if length & 0xC0:
            raise ValueError("compressed question name")
        offset += 1 + length
        if length == 0:
            break
    return message[12 : offset + 4].lower()


class _PendingQuery:
    __slots__ = ("deferred", "timer", "question", "upstream")

    def __init__(self, deferred, timer, question, upstream):
        self.deferred = deferred
        self.timer = timer
        self.question = question
        self.upstream = upstream


class _UDPRelay(protocol.DatagramProtocol):
    """One socket per address family, shared by every forwarded UDP query."""

    noisy = False

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.pending: dict[int, _PendingQuery] = {}

    def send(self, query: bytes, upstream: Upstream, timeout: float) -> defer.Deferred:
        while True:
            qid = random.getrandbits(16)
            if qid not in self.pending:
                break
        d: defer.Deferred = defer.Deferred()
        timer = self.reactor.callLater(timeout, self._timed_out, qid)
        self.pending[qid] = _PendingQuery(d, timer, question_section(query), upstream)
        assert self.transport is not None
        self.transport.write(struct.pack("!H", qid) + query[2:], (upstream.host, upstream.port))
        return d

    def _timed_out(self, qid: int) -> None:
        pending = self.pending.pop(qid, None)
        if pending is not None:
            pending.deferred.errback(error.TimeoutError(f"no answer from {pending.upstream}"))

    def datagramReceived(self, data: bytes, addr) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            return
        (qid,) = struct.unpack("!H", data[:2])
        pending = self.pending.get(qid)
        if pending is None or (addr[0], addr[1]) != (pending.upstream.host, pending.upstream.port):
            return
        try:
            if question_section(data) != pending.question:
                return
        except (IndexError, ValueError):
            return
        del self.pending[qid]
        pending.timer.cancel()
        pending.deferred.callback(data)


class _TCPQuery(Int16StringReceiver):
    def __init__(self, query: bytes, deferred: defer.Deferred) -> None:
        self.query = query
        self.deferred = deferred

    def connectionMade(self) -> None:
        self.sendString(self.query)

    def stringReceived(self, data: bytes) -> None:
        if not self.deferred.called:
            self.deferred.callback(data)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


class Forwarder:
    """Sends queries to each upstream in turn until one answers usefully."""

    def __init__(
        self,
        reactor,
        upstreams: Sequence[Upstream],
        timeout: float = 2.0,
        max_in_flight: int = 1024,
    ) -> None:
        if not upstreams:
            raise ValueError("no upstream nameserver: give --upstream or a resolv.conf with nameservers")
        self.reactor = reactor
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.refused_overload = 0
        self.failed = 0
        self._relays: dict[int, _UDPRelay] = {}

    def start(self) -> None:
        for family in {6 if ":" in u.host else 4 for u in self.upstreams}:
            relay = _UDPRelay(self.reactor)
            self.reactor.listenUDP(0, relay, interface="::" if family == 6 else "0.0.0.0")
            self._relays[family] = relay

    def stop(self) -> defer.Deferred:
        stops = []
        for relay in self._relays.values():
            for pending in list(relay.pending.values()):
                pending.timer.cancel()
            relay.pending.clear()
            if relay.transport is not None:
                stops.append(defer.maybeDeferred(relay.transport.stopListening))
        self._relays.clear()
        return defer.gatherResults(stops)

    @defer.inlineCallbacks
    def forward(self, query: bytes, over_tcp: bool = False):
        """The upstream's whole answer to ``query`` with the client's ID restored.

        Fails with :class:`Overloaded` or :class:`UpstreamsFailed`.
        """
        if self.in_flight >= self.max_in_flight:
            self.refused_overload += 1
            raise Overloaded(f"{self.in_flight} forwarded queries in flight")
        self.in_flight += 1
        outcomes = []
        try:
            for upstream in self.upstreams:
                try:
                    if over_tcp:
                        answer = yield self._ask_tcp(query, upstream)
                    else:
                        relay = self._relays[6 if ":" in upstream.host else 4]
                        answer = yield relay.send(query, upstream, self.timeout)
                except Exception as failure:  # timeout, refused connection, reset: try the next
                    outcomes.append(f"{upstream}: {failure}")
                    continue
                rcode = answer[3] & 0x0F
                if OUTCOME.get(rcode, RELAY) == NEXT:
                    outcomes.append(f"{upstream}: rcode {rcode}")
                    continue
                return query[:2] + answer[2:]
        finally:
            self.in_flight -= 1
        self.failed += 1
        raise UpstreamsFailed("; ".join(outcomes))

    def _ask_tcp(self, query: bytes, upstream: Upstream) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        creator = protocol.ClientCreator(self.reactor, _TCPQuery, query, d)
        connecting = creator.connectTCP(upstream.host, upstream.port, timeout=self.timeout)

        def fail(reason) -> None:
            if not d.called:
                d.errback(reason)

        connecting.addErrback(fail)
        timer = self.reactor.callLater(self.timeout, fail, error.TimeoutError(str(upstream)))

        def finish(result):
            if timer.active():
                timer.cancel()
            connecting.addCallback(lambda proto: proto.transport.loseConnection())
            return result

        return d.addBoth(finish)
