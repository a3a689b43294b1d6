"""The DNS server: twisted.names protocols and a factory that know who is asking.

Stock twisted.names hands resolvers the question only; here every query becomes one
:class:`~kubedock_dns.dns.query.Query` that keeps the asker's address (UDP: the datagram's
source; TCP: the connection's peer), is answered from prepared bytes by the fast path when it
can be, and otherwise is read strictly, decided by :class:`~kubedock_dns.resolver.Resolver`, held
(:mod:`kubedock_dns.dns.holds`) or relayed through the :class:`~kubedock_dns.dns.forwarder.Forwarder`,
and replied to through :meth:`Query.reply <kubedock_dns.dns.query.Query.reply>`.  This module owns
the mapping from every outcome to an rcode.

Malformed input never raises out of a protocol: a datagram too short for a header, or a response
(QR set), is dropped; an unknown opcode gets NOTIMP; anything else unreadable gets FORMERR, and so
does a message holding other records than its header counts, bytes after them, or two OPT
records; an EDNS version above 0 gets BADVERS (RFC 6891).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.logger import Logger
from twisted.names import dns
from twisted.names import server as names_server
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from kubedock_dns.contract import canonical_ip
from kubedock_dns.dns.fastpath import ANSWERED, FORWARD, NODATA, OVER_TCP, RELAYED, FastPath
from kubedock_dns.dns.forwarder import Forwarder, Overloaded, UpstreamsFailed
from kubedock_dns.dns.holds import Holds
from kubedock_dns.dns.query import Query
from kubedock_dns.dns.replies import badvers_reply, edns_payload_size, encode_answer, error_reply
from kubedock_dns.dns.udp import ReadLoopHook
from kubedock_dns.dns.wire import (
    CLASS_IN,
    FLAG_QR,
    HEADER,
    MAX_QUERY_BYTES,
    OPCODE_QUERY,
    OTHER_TYPE_SLOT,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_OK,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TCP_LIMIT,
    TYPE_SLOT_NAMES,
    TYPE_SLOTS,
    UDP_PLAIN_LIMIT,
    WireError,
    parse_question,
    qtype_name,
    rcode_name,
    scan_records,
)
from kubedock_dns.ops.latency import Sampler
from kubedock_dns.ops.limits import RateLimitedLog
from kubedock_dns.ops.logs import WarningLimiter
from kubedock_dns.resolver import Answer, Decision, Forward, Hold, NotFound, Resolver, ServFail

log = Logger()


def outcome_name(decision: Decision) -> str:
    """answered, nodata, nxdomain, forward, hold or servfail: the ``outcome`` of log events."""
    if isinstance(decision, Answer):
        return "answered" if decision.values else "nodata"
    if isinstance(decision, NotFound):
        return "nxdomain"
    return type(decision).__name__.lower()


@dataclass
class Counters:
    """Monotonic counters of the full path (the fast path keeps its own), plain integers so that
    a count costs one addition; turned into the exported series, with their labels, only when
    asked (:meth:`KubedockDNSServerFactory.counts`, ``requests``, ``responses``).  Each reply the
    server writes itself is counted under exactly one outcome; relayed answers are counted by rcode
    (``KubedockDNSServerFactory.relayed_rcodes``)."""

    queries_udp: int = 0
    queries_tcp: int = 0
    answered_local: int = 0
    answered_nodata: int = 0
    nxdomain: int = 0
    forwarded: int = 0  # relays started (each ends relayed, upstream_failed or refused)
    servfail: int = 0  # decided locally: index not synced, a duplicate address
    upstream_failed: int = 0  # every upstream failed (or forwarding raised): SERVFAIL
    refused: int = 0
    formerr: int = 0
    badvers: int = 0
    notimp: int = 0
    dropped: int = 0
    held: int = 0
    hold_overflow: int = 0
    hold_expired: int = 0
    truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# (outcome label, rcode) of each reply the server writes itself, from the counter that counts it.
RESPONSE_OUTCOMES: dict[str, tuple[str, int]] = {
    "answered_local": ("answered", RCODE_OK),
    "answered_nodata": ("nodata", RCODE_OK),
    "nxdomain": ("nxdomain", RCODE_NXDOMAIN),
    "servfail": ("servfail", RCODE_SERVFAIL),
    "upstream_failed": ("upstream_failed", RCODE_SERVFAIL),
    "refused": ("overloaded", RCODE_REFUSED),
    "formerr": ("malformed", RCODE_FORMERR),
    "notimp": ("malformed", RCODE_NOTIMP),
    "badvers": ("malformed", RCODE_BADVERS),
}
# Every outcome label value of kubedock_dns_responses_total ("forwarded": an upstream's answer).
OUTCOMES = tuple(dict.fromkeys(outcome for outcome, _ in RESPONSE_OUTCOMES.values())) + ("forwarded",)
# Relayed rcodes exported even while zero, so that rate() sees their first increase.
_RELAYED_ALWAYS = (RCODE_OK, RCODE_NXDOMAIN)


class QueryDatagramProtocol(dns.DNSDatagramProtocol):
    """UDP: every datagram is a query from ``addr``; none is a response to us."""

    noisy = False

    def datagramReceived(self, data: bytes, addr) -> None:
        self.controller.datagram_received(data, self, addr)


class QueryStreamProtocol(dns.DNSProtocol, TimeoutMixin):
    """TCP: queries are attributed to the connection's peer address.

    Time: an idle connection is closed after ``IDLE_SECONDS`` (RFC 7766 asks servers to time idle
    clients out), and one whose started message is not whole within ``MESSAGE_SECONDS`` (however
    its bytes trickle in: the idle timer restarts with every byte, this one does not) is closed too.

    Memory: one connection holds at most one message being received (``MAX_LENGTH``), at most
    ``MAX_OUTSTANDING`` questions being held or relayed (reading pauses until one is answered),
    and its unread answers: once the transport's buffer passes its size (64 KiB) reading pauses
    until the client reads, and a client that lets ``MAX_UNREAD_BYTES`` more pile up (answers to
    questions already in flight) is disconnected.
    """

    IDLE_SECONDS = 30
    MESSAGE_SECONDS = 10
    MAX_LENGTH = 65535  # what a two-byte length prefix allows
    MAX_OUTSTANDING = 16
    MAX_UNREAD_BYTES = 128 * 1024

    _message_deadline: Any = None
    _buffered = 0  # bytes received and not yet handed on as whole messages (length prefixes included)
    outstanding = 0  # questions read and not answered yet
    _output_full = False  # the transport's buffer is past its size: the client is not reading
    _unread = 0  # bytes of answers written while the output was full

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.IDLE_SECONDS)
        transport: Any = self.transport
        # The transport tells its producer when its buffer fills up and drains: this protocol,
        # which then stops and resumes reading.
        transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if data:
            self.resetTimeout()
        self._buffered += len(data)
        super().dataReceived(data)
        if self._buffered and not self.paused:  # part of a message: it must be whole in time
            if self._message_deadline is None and self.transport is not None:
                self._message_deadline = self.factory.reactor.callLater(self.MESSAGE_SECONDS, self._too_slow)
        else:
            self._cancel_deadline()  # nothing started, or the rest waits for us, not the client

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop reading until the client reads."""
        self._output_full = True
        self._follow_limits()

    def resumeProducing(self) -> None:
        """The transport's buffer drained."""
        self._output_full = False
        self._unread = 0
        self._follow_limits()

    def stopProducing(self) -> None:
        self.paused = True

    def _follow_limits(self) -> None:
        """Read while the client reads its answers and has few enough questions in flight."""
        wanted = self._output_full or self.outstanding >= self.MAX_OUTSTANDING
        if wanted and not self.paused:
            super().pauseProducing()
            self._cancel_deadline()
        elif not wanted and self.paused and getattr(self.transport, "connected", False):
            super().resumeProducing()  # also hands on the messages read meanwhile

    def _cancel_deadline(self) -> None:
        deadline, self._message_deadline = self._message_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._message_deadline = None
        assert self.transport is not None
        peer: Any = self.transport.getPeer()
        self.factory.limits_log.bite(
            "dns tcp slow message",
            f"DNS over TCP: closed the connection of {peer.host}: a message did not arrive whole "
            f"within {self.MESSAGE_SECONDS}s",
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self._cancel_deadline()
        super().connectionLost(reason)

    def stringReceived(self, data: bytes) -> None:
        self._buffered -= 2 + len(data)
        assert self.transport is not None
        peer: Any = self.transport.getPeer()
        # Every message but one too short for a header or a response gets exactly one answer
        # (the server drops those two): count it in flight until then.
        answered = len(data) >= 12 and not data[2] & 0x80
        if answered:
            self.outstanding += 1
        self.controller.message_received(data, self, peer.host)
        if answered and self.outstanding >= self.MAX_OUTSTANDING:
            self._follow_limits()  # after the answers given at once: those resumed nothing

    def sendString(self, string: bytes) -> None:
        self.outstanding -= 1
        transport: Any = self.transport
        if self._output_full:
            self._unread += len(string)
            if self._unread > self.MAX_UNREAD_BYTES:
                self.factory.limits_log.bite(
                    "dns tcp unread answers",
                    f"DNS over TCP: closed the connection of {transport.getPeer().host}: it left more "
                    f"than {self.MAX_UNREAD_BYTES} bytes of answers unread",
                )
                transport.abortConnection()
                return
        super().sendString(string)
        if self.paused and not self._output_full and self.outstanding < self.MAX_OUTSTANDING:
            self.factory.reactor.callLater(0, self._follow_limits)  # not from within a read


class KubedockDNSServerFactory(names_server.DNSServerFactory):
    """Answers from the asker's networks; holds, forwards or fails per DESIGN section 4.

    Entry points: :meth:`datagram_received` (a UDP query; the real port's read loop uses
    :meth:`read_loop_hook` instead) and :meth:`message_received` (a TCP query).  The TCP
    connection cap is the listener's (:class:`kubedock_dns.ops.limits.ConnectionCap`)."""

    protocol = QueryStreamProtocol

    def __init__(self, reactor, resolver: Resolver, forwarder: Forwarder | None,
                 fast_path: FastPath | None = None, max_held: int = 4096,
                 latency_sample_every: int = 16, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.limits_log = RateLimitedLog(reactor)
        self.reactor = reactor
        self.resolver = resolver
        self.forwarder = forwarder
        self.counters = Counters()
        # Questions by type (index: dns.wire.TYPE_SLOTS) that the full path read, per transport;
        # the fast path counts those it answers or relays, the rest is "other".
        self.udp_types = [0] * len(TYPE_SLOT_NAMES)
        self.tcp_types = [0] * len(TYPE_SLOT_NAMES)
        self.relayed_rcodes = [0] * 16  # upstream answers relayed, by their header rcode
        self.fast_path = fast_path
        self.holds = Holds(reactor, resolver, self._decided, self._hold_expired, max_held)
        self.sampler = Sampler(latency_sample_every, clock)
        self.warnings = WarningLimiter(log, reactor.seconds)
        # Bound once: a bound method made per forwarded query costs an allocation each time.
        self._on_relayed = self._relayed
        self._on_forward_failed = self._forward_failed
        # One asker may not take every forwarding slot with a flood of slow outside names: once a
        # quarter of the slots are taken, queries forwarded are counted per asker address (only
        # then: counting every one costs the common case), and an asker holding a quarter of the
        # slots among those is refused.  A flooder thus holds at most half, the others the rest.
        self._forwarding: dict[str, int] = {}  # asker address -> its counted queries in flight
        self._counted: set[Query] = set()  # the queries counted there
        self.max_forwards_per_asker = max(1, forwarder.max_in_flight // 4) if forwarder is not None else 0

    def buildProtocol(self, addr):
        p = self.protocol(self, self.reactor)
        p.factory = self
        return p

    @property
    def holding(self) -> int:
        """Questions being held right now."""
        return len(self.holds)

    @property
    def forwarding(self) -> int:
        """Questions being forwarded right now that are counted per asker (see __init__)."""
        return len(self._counted)

    def _with_fast_path(self) -> dict[str, int]:
        """The full path's counters with the fast path's answers added to ``answered_local``
        (with records) and ``answered_nodata``."""
        values = self.counters.as_dict()
        fast = self.fast_path
        if fast is not None:
            for offset in (0, OVER_TCP):
                values["answered_local"] += sum(fast.counts[offset + ANSWERED : offset + NODATA])
                values["answered_nodata"] += sum(fast.counts[offset + NODATA : offset + RELAYED])
        return values

    def counts(self) -> dict[str, int]:
        """Every unlabelled counter under its exported name: the full path's and the fast path's
        answers, the fast path's answers and relays as ``fast_path``; ``servfail`` counts every
        SERVFAIL the server wrote (``upstream_failed`` included), as the deprecated metric of that
        name always did."""
        values = self._with_fast_path()
        fast = self.fast_path
        values["fast_path"] = fast.answered + fast.relayed if fast is not None else 0
        values["servfail"] += values.pop("upstream_failed")
        return values

    def requests(self) -> dict[tuple[str, str], int]:
        """(proto, type) -> queries received: every count of :meth:`counts`' ``queries_udp`` and
        ``queries_tcp`` under the question's type, "other" for types not counted by name and
        queries whose question could not be read.  Every pair is present."""
        fast = self.fast_path
        found: dict[tuple[str, str], int] = {}
        for proto, total, types, offset in (("udp", self.counters.queries_udp, self.udp_types, 0),
                                            ("tcp", self.counters.queries_tcp, self.tcp_types, OVER_TCP)):
            typed = list(types)
            if fast is not None:
                counts = fast.counts
                for slot in range(len(typed)):
                    at = offset + slot
                    typed[slot] += counts[at + ANSWERED] + counts[at + NODATA] + counts[at + RELAYED]
            typed[OTHER_TYPE_SLOT] += total - sum(typed)
            found.update(((proto, name), n) for name, n in zip(TYPE_SLOT_NAMES, typed))
        return found

    def responses(self) -> dict[tuple[str, str], int]:
        """(rcode name, outcome) -> replies sent: what the server wrote itself under its outcome
        (answered, nodata, nxdomain, servfail, upstream_failed, overloaded, malformed) and the
        upstreams' answers relayed (outcome ``forwarded``) under their rcode.  Dropped queries
        get no reply and are not here; read-loop and fast-path answers are ``answered``."""
        counts = self._with_fast_path()
        found: dict[tuple[str, str], int] = {}
        for counter, (outcome, rcode) in RESPONSE_OUTCOMES.items():
            found[(rcode_name(rcode), outcome)] = counts[counter]
        for rcode, n in enumerate(self.relayed_rcodes):
            if n or rcode in _RELAYED_ALWAYS:
                found[(rcode_name(rcode), "forwarded")] = n
        return found

    # -- reception ---------------------------------------------------------------------------------

    def read_loop_hook(self) -> ReadLoopHook:
        """What the UDP port's read loop (:mod:`kubedock_dns.dns.udp`) may use of this server."""
        fast = self.fast_path
        return ReadLoopHook(replies=fast.replies if fast is not None else {}, sampler=self.sampler,
                            missed=self._receive, read=self._datagrams_read,
                            counts=fast.counts if fast is not None else [])

    def _datagrams_read(self, datagrams: int) -> None:
        self.counters.queries_udp += datagrams

    def datagram_received(self, data: bytes, protocol, address) -> None:
        """One datagram from ``address``, not counted yet."""
        counters = self.counters
        number = counters.queries_udp = counters.queries_udp + 1
        self._receive(Query(data, protocol, address, address[0], self.sampler.start(number)))

    def message_received(self, data: bytes, protocol, host: str) -> None:
        """One TCP message from the connection's peer ``host``."""
        counters = self.counters
        number = counters.queries_tcp = counters.queries_tcp + 1
        self._receive(Query(data, protocol, None, host, self.sampler.start(number)))

    def _receive(self, query: Query) -> None:
        """Answer or relay ``query`` from the fast path, else read it strictly and decide."""
        fast = self.fast_path
        if fast is not None:
            reply = fast.answer(query.data, query.host, query.address is None)
            if reply is not None:
                if reply is FORWARD:
                    return self._forward(query)
                query.reply(reply)  # type: ignore[arg-type]  # bytes
                if query.started:
                    self.sampler.answered(query.started)
                return
        self._full_path(query)

    def _full_path(self, query: Query) -> None:
        """Read the query strictly with twisted.names and decide (everything the fast path left)."""
        counters = self.counters
        data = query.data
        if len(data) < 12:
            counters.dropped += 1
            return
        _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
        if flags & FLAG_QR:
            counters.dropped += 1  # a response: answering it could start a loop
            return
        try:
            query.source_ip = canonical_ip(query.host)
        except ValueError:
            counters.dropped += 1
            return
        if (flags >> 11) & 0xF != OPCODE_QUERY:  # the opcode
            counters.notimp += 1
            return query.reply(error_reply(data, RCODE_NOTIMP))
        if len(data) > MAX_QUERY_BYTES:
            counters.refused += 1  # held or relayed, it would keep its bytes: see wire.MAX_QUERY_BYTES
            return query.reply(error_reply(data, RCODE_REFUSED))
        if qdcount != 1:
            counters.formerr += 1
            return query.reply(error_reply(data, RCODE_FORMERR))
        message = dns.Message()
        try:
            # Strict and bounded, and the message must hold exactly what its header counts:
            # twisted.names' parser is lenient about missing records and trailing bytes.
            end, qname, qtype, qclass = parse_question(data)
            (self.udp_types if query.address is not None else self.tcp_types)[
                TYPE_SLOTS.get(qtype, OTHER_TYPE_SLOT)] += 1
            edns_versions = scan_records(data, end, ancount, nscount, arcount)
            if len(edns_versions) > 1:
                raise WireError("more than one OPT record")  # RFC 6891 6.1.1
            message.fromStr(data)
            if len(message.queries) != 1:
                raise WireError("no question")
        except Exception:  # WireError, or twisted.names' EOFError, ValueError, struct.error...
            counters.formerr += 1
            return query.reply(error_reply(data, RCODE_FORMERR))
        query.message = message
        if edns_versions and edns_versions[0] != 0:
            counters.badvers += 1  # RFC 6891 6.1.3: we speak EDNS version 0 only
            return query.reply(badvers_reply(message))
        # The strict reader's question: the same name (lower-cased) and type twisted.names read.
        query.name = qname.decode("latin-1")
        query.qtype = qtype
        if qclass != CLASS_IN:
            if self.verbose:
                self._log_decision(query, Forward("class is not IN"))
            return self._forward(query)
        now = self.reactor.seconds()
        decision = self.resolver.decide(query.source_ip, query.name, query.qtype, now=now)
        if isinstance(decision, Hold):
            if self.holds.full or self.holds.full_for(query.source_ip):
                self.counters.hold_overflow += 1
                decision = self.resolver.decide(query.source_ip, query.name, query.qtype, held=True, now=now)
            else:
                self.counters.held += 1
                if self.verbose:
                    self._log_decision(query, decision)
                self.holds.hold(query, decision)
                return
        self._decided(query, decision)

    def _hold_expired(self) -> None:
        self.counters.hold_expired += 1

    def _decided(self, query: Query, decision: Decision) -> None:
        if self.verbose:
            self._log_decision(query, decision)
        self._respond(query, decision)

    def _log_decision(self, query: Query, decision: Decision) -> None:
        """One structured debug line per decision (--verbose): every field is an event field."""
        log.debug(
            "{client} asked {name} {qtype}: {outcome} {detail}",
            client=query.source_ip, name=query.name, qtype=qtype_name(query.qtype), outcome=outcome_name(decision),
            network=getattr(decision, "network", "") or None,
            records=list(decision.values) if isinstance(decision, Answer) else None,
            reason=getattr(decision, "reason", None),
            detail=(f"from {decision.source}: {', '.join(decision.values) or 'no record of that type'}"
                    if isinstance(decision, Answer) else f"({decision.reason})"),
        )

    # -- answering ---------------------------------------------------------------------------------

    def _respond(self, query: Query, decision: Decision) -> None:
        counters = self.counters
        if isinstance(decision, Answer):
            if decision.values:
                counters.answered_local += 1
            else:
                counters.answered_nodata += 1
            self._answer(query, RCODE_OK, decision)
            if query.started:
                self.sampler.answered(query.started)
        elif isinstance(decision, Forward):
            self._forward(query)
        elif isinstance(decision, NotFound):
            counters.nxdomain += 1
            self._answer(query, RCODE_NXDOMAIN, None)
            if query.started:
                self.sampler.answered(query.started)
        else:
            assert isinstance(decision, ServFail)
            counters.servfail += 1
            self._answer(query, RCODE_SERVFAIL, None)

    def _answer(self, query: Query, rcode: int, decision: Answer | None) -> None:
        message = query.message or query.parsed()  # read by the full path, or now for a relayed one
        edns = edns_payload_size(message) if message.additional else None
        if query.address is None:
            limit = TCP_LIMIT
        else:
            limit = edns if edns is not None else UDP_PLAIN_LIMIT
        wire, truncated = encode_answer(message, edns, rcode, decision, self.resolver.config.ttl, limit)
        if truncated:
            self.counters.truncated += 1
        query.reply(wire)

    # -- forwarding --------------------------------------------------------------------------------

    def _forward(self, query: Query) -> None:
        """Relay the query to the upstreams; their answer, or our failure, goes to the asker."""
        self.counters.forwarded += 1
        assert self.forwarder is not None, "a server without a forwarder answers only local names"
        if self.forwarder.in_flight >= self.max_forwards_per_asker:  # busy: count per asker
            forwarding, host = self._forwarding, query.host
            count = forwarding.get(host, 0)
            if count >= self.max_forwards_per_asker:
                self.counters.refused += 1
                self.limits_log.bite("forwards per asker", f"REFUSED a question of {host}: {count} of its "
                                     f"questions are being forwarded already (its share of --max-forwards)")
                return self._answer(query, RCODE_REFUSED, None)
            forwarding[host] = count + 1
            self._counted.add(query)
        if query.address is None:
            self.forwarder.forward(query.data, over_tcp=True).addCallbacks(
                self._relayed, lambda failure: self._forward_failed(failure.value, query),
                callbackArgs=(query,))
        else:
            # No Deferred per UDP query: its creation and callback chain were a tenth of the
            # server's instructions for a relayed query (bench.cost).
            self.forwarder.forward_udp(query.data, self._on_relayed, self._on_forward_failed, query)

    def _uncount(self, query: Query) -> None:
        if query in self._counted:
            self._counted.discard(query)
            forwarding, host = self._forwarding, query.host
            left = forwarding[host] - 1
            if left:
                forwarding[host] = left
            else:
                del forwarding[host]

    def _relayed(self, answer: bytes, query: Query) -> None:
        if self._counted:
            self._uncount(query)
        self.relayed_rcodes[answer[3] & 0x0F] += 1  # the forwarder passes only whole headers on
        query.reply(answer)
        if query.started:
            self.sampler.forwarded(query.started)

    def _forward_failed(self, reason: Exception, query: Query) -> None:
        if self._counted:
            self._uncount(query)
        counters = self.counters
        if isinstance(reason, Overloaded):
            counters.refused += 1
            self.warnings.warn(
                "overloaded", "REFUSED: {why}; raise --max-forwards or find the client flooding "
                "outside names", why=str(reason))
            self._answer(query, RCODE_REFUSED, None)
        elif isinstance(reason, UpstreamsFailed):
            self.warnings.warn(
                "upstreams-failed", "SERVFAIL for a forwarded question: no upstream answered "
                "({why}); check the cluster DNS and --upstream / --resolv-conf", why=str(reason))
            counters.upstream_failed += 1
            self._answer(query, RCODE_SERVFAIL, None)
        else:
            log.failure("forwarding failed", Failure(reason))
            counters.upstream_failed += 1
            self._answer(query, RCODE_SERVFAIL, None)
        if query.started:
            self.sampler.forwarded(query.started)
