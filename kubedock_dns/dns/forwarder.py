"""Relaying questions that are not ours to the upstream (cluster) resolvers.

Queries travel as the client sent them; only the message ID is rewritten on the way out and
restored on the way back, so the upstream's answer reaches the client whole (rcode, authority,
additional, EDNS).  One table (:data:`OUTCOME`) says what each upstream outcome means: an answer
is relayed, SERVFAIL, REFUSED and silence move on to the next upstream, and when every upstream
failed the client gets SERVFAIL, never the NXDOMAIN that stock twisted.names would invent.
"""

from __future__ import annotations

import random
import struct
from typing import Any, Callable, Sequence

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

from kubedock_dns.dns.upstreams import Upstream
from kubedock_dns.dns.wire import RCODE_REFUSED, RCODE_SERVFAIL, question_section

log = Logger()

RELAY = "relay"
NEXT = "next"
# upstream rcode -> what to do with it; any rcode not listed is relayed.
OUTCOME = {RCODE_SERVFAIL: NEXT, RCODE_REFUSED: NEXT}


class UpstreamsFailed(Exception):
    """No upstream gave a usable answer; the message lists what each one did."""


class Overloaded(Exception):
    """Too many forwarded queries are in flight."""


def _send_datagram(transport, data: bytes, address) -> bool:
    """One datagram to an upstream, straight to the relay socket (see ``Query.reply`` for why);
    False when the kernel refused it."""
    try:
        transport.socket.sendto(data, address)
    except AttributeError:  # not a real port (in-memory transports in tests)
        transport.write(data, address)
    except OSError:
        return False
    return True


class _PendingQuery:
    __slots__ = ("attempt", "deadline", "question", "address")

    def __init__(self, attempt, deadline, question, address):
        self.attempt = attempt
        self.deadline = deadline
        self.question = question
        self.address = address


class _UDPRelay(protocol.DatagramProtocol):
    """One socket per address family, shared by every forwarded UDP query.

    Replies are matched on ID, upstream address and question; anything else is ignored.
    """

    noisy = False

    def __init__(self, reactor: IReactorTime, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        # qid -> query; insertion order is deadline order, since every query waits ``timeout``.
        self.pending: dict[int, _PendingQuery] = {}
        self._sweeper = task.LoopingCall(self.expire)
        self._sweeper.clock = reactor

    def startProtocol(self) -> None:
        # One timer for all queries instead of a DelayedCall each: expiry is checked every
        # twentieth of the timeout, so a silent upstream is given up on within 5% of it.
        self._sweeper.start(self.timeout / 20, now=False)

    def stopProtocol(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    def send(self, attempt: "_UDPAttempt", upstream: Upstream) -> None:
        pending = self.pending
        qid = random.getrandbits(16)
        while qid in pending:
            qid = random.getrandbits(16)
        address = (upstream.host, upstream.port)
        pending[qid] = _PendingQuery(attempt, self.reactor.seconds() + self.timeout, attempt.question, address)
        if not _send_datagram(self.transport, _ID.pack(qid) + attempt.query[2:], address):
            del pending[qid]
            attempt.failed("the datagram could not be sent")

    def expire(self) -> None:
        """Give up on every query whose upstream stayed silent past the timeout."""
        now = self.reactor.seconds()
        pending = self.pending
        while pending:
            qid = next(iter(pending))
            if pending[qid].deadline > now:
                break
            pending.pop(qid).attempt.failed("no answer within the forward timeout")

    def datagramReceived(self, data: bytes, addr) -> None:
        if len(data) < 12 or not data[2] & 0x80:
            return
        qid = _ID.unpack_from(data)[0]
        pending = self.pending.get(qid)
        if pending is None or (addr[0], addr[1]) != pending.address:
            return
        question = pending.question
        if data[12 : 12 + len(question)].lower() != question:
            return
        del self.pending[qid]
        pending.attempt.answered(data)


_ID = struct.Struct("!H")


class _UDPAttempt:
    """One forwarded UDP question walking through the upstreams in order; it ends by calling
    ``on_answer(relayed bytes, context)`` or ``on_failure(UpstreamsFailed, context)``."""

    __slots__ = ("forwarder", "query", "question", "on_answer", "on_failure", "context", "position", "outcomes")

    def __init__(self, forwarder: "Forwarder", query: bytes, on_answer: Callable[[bytes, Any], object],
                 on_failure: Callable[[Exception, Any], object], context: Any) -> None:
        self.forwarder = forwarder
        self.query = query
        self.question = question_section(query)
        self.on_answer = on_answer
        self.on_failure = on_failure
        self.context = context
        self.position = -1
        self.outcomes: list[str] = []

    def next(self) -> None:
        forwarder = self.forwarder
        self.position += 1
        if self.position >= len(forwarder.upstreams):
            forwarder.in_flight -= 1
            forwarder.failed += 1
            self.on_failure(UpstreamsFailed("; ".join(self.outcomes)), self.context)
            return
        upstream = forwarder.upstreams[self.position]
        forwarder._relays[6 if ":" in upstream.host else 4].send(self, upstream)

    def answered(self, answer: bytes) -> None:
        rcode = answer[3] & 0x0F
        if OUTCOME.get(rcode, RELAY) == NEXT:
            self.failed(f"rcode {rcode}")
            return
        self.forwarder.in_flight -= 1
        self.on_answer(self.query[:2] + answer[2:], self.context)

    def failed(self, why: str) -> None:
        self.outcomes.append(f"{self.forwarder.upstreams[self.position]}: {why}")
        self.next()


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


def _unusable_tcp_answer(query: bytes, answer: bytes) -> str | None:
    """Why an upstream's TCP answer to ``query`` (sent with the client's ID) must not reach the
    client, or None: the checks the UDP relay makes of every datagram, then :data:`OUTCOME`."""
    if len(answer) < 12 or not answer[2] & 0x80:
        return "a reply too short for a header, or not a response"
    if answer[:2] != query[:2]:
        return "an answer to another message ID"
    question = question_section(query)
    if answer[12 : 12 + len(question)].lower() != question:
        return "an answer to another question"
    rcode = answer[3] & 0x0F
    if OUTCOME.get(rcode, RELAY) == NEXT:
        return f"rcode {rcode}"
    return None


def _close_connection(proto: _TCPQuery | None) -> None:
    if proto is not None and proto.transport is not None:
        proto.transport.loseConnection()


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
            relay = _UDPRelay(self.reactor, self.timeout)
            self.reactor.listenUDP(0, relay, interface="::" if family == 6 else "0.0.0.0")
            self._relays[family] = relay

    def stop(self) -> defer.Deferred:
        stops = []
        for relay in self._relays.values():
            pending = list(relay.pending.values())
            relay.pending.clear()
            for query in pending:
                query.attempt.on_failure(UpstreamsFailed("the server is stopping"), query.attempt.context)
            if relay.transport is not None:
                stops.append(defer.maybeDeferred(relay.transport.stopListening))
        self._relays.clear()
        return defer.gatherResults(stops)

    def forward(self, query: bytes, over_tcp: bool = False) -> defer.Deferred:
        """The upstream's whole answer to ``query`` with the client's ID restored.

        Fails with :class:`Overloaded` or :class:`UpstreamsFailed`.  ``query`` has been checked
        to hold exactly one well-formed question.
        """
        if over_tcp:
            if self.in_flight >= self.max_in_flight:
                self.refused_overload += 1
                return defer.fail(Overloaded(f"{self.in_flight} forwarded queries in flight"))
            self.in_flight += 1
            return self._forward_tcp(query)
        result: defer.Deferred = defer.Deferred()
        self.forward_udp(query, lambda answer, _: result.callback(answer),
                         lambda reason, _: result.errback(reason), None)
        return result

    def forward_udp(self, query: bytes, on_answer: Callable[[bytes, Any], object],
                    on_failure: Callable[[Exception, Any], object], context: Any) -> None:
        """:meth:`forward` over UDP without a Deferred (the server's per-query path): exactly one
        of ``on_answer(answer, context)`` (the upstream's answer, the client's ID restored) or
        ``on_failure(reason, context)`` (:class:`Overloaded`, at once, or :class:`UpstreamsFailed`)
        is called; ``context`` is the caller's (its query), so that no closure is made per query."""
        if self.in_flight >= self.max_in_flight:
            self.refused_overload += 1
            on_failure(Overloaded(f"{self.in_flight} forwarded queries in flight"), context)
            return
        self.in_flight += 1
        _UDPAttempt(self, query, on_answer, on_failure, context).next()

    @defer.inlineCallbacks
    def _forward_tcp(self, query: bytes):
        outcomes = []
        try:
            for upstream in self.upstreams:
                try:
                    answer = yield self._ask_tcp(query, upstream)
                except Exception as failure:  # timeout, refused connection, reset: try the next
                    outcomes.append(f"{upstream}: {failure}")
                    continue
                unusable = _unusable_tcp_answer(query, answer)
                if unusable:
                    outcomes.append(f"{upstream}: {unusable}")
                    continue
                return answer
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
            # ``connecting`` carries None after a failed connection (``fail`` consumed the error);
            # a connection that succeeds only after our timeout is closed as soon as it exists.
            connecting.addCallback(_close_connection)
            return result

        return d.addBoth(finish)
