"""The DNS server: twisted.names protocols and factory that know who is asking.

Stock twisted.names hands resolvers the question only; here the factory keeps the asker's address
(UDP: the datagram's source; TCP: the connection's peer), asks :class:`~kubedock_dns.resolver.Resolver`
what to do, holds questions whose answer may be about to appear, relays the rest through the
:class:`~kubedock_dns.forwarder.Forwarder`, and owns the mapping from every outcome to an rcode.

Malformed input never raises out of a protocol: a datagram too short for a header, or a response
(QR set), is dropped; an unknown opcode gets NOTIMP; anything else unreadable gets FORMERR, and so
does a message holding other records than its header counts, bytes after them, or two OPT
records; an EDNS version above 0 gets BADVERS (RFC 6891).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import server as names_server
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from kubedock_dns.contract import canonical_ip
from kubedock_dns.limits import RateLimitedLog
# SERVER_UDP_PAYLOAD is 1232, the DNS flag day 2020 size: no IP fragmentation on common paths.
from kubedock_dns.fastpath import FORWARD
from kubedock_dns.wire import (
    SERVER_UDP_PAYLOAD,
    TCP_LIMIT,
    UDP_PLAIN_LIMIT,
    WireError,
    parse_question,
    scan_records,
)
from kubedock_dns.forwarder import Forwarder, Overloaded, UpstreamsFailed, send_datagram
from kubedock_dns.latency import DNS_BUCKETS, LatencyHistogram
from kubedock_dns.logs import WarningLimiter
from kubedock_dns.resolver import (
    TYPE_A,
    TYPE_AAAA,
    Answer,
    Decision,
    Forward,
    Hold,
    NotFound,
    Resolver,
    ServFail,
)

QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
               33: "SRV", 65: "HTTPS", 255: "ANY"}


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def outcome_name(decision: Decision) -> str:
    """answered, nodata, nxdomain, forward, hold or servfail: the ``outcome`` of log events."""
    if isinstance(decision, Answer):
        return "answered" if decision.values else "nodata"
    if isinstance(decision, NotFound):
        return "nxdomain"
    return type(decision).__name__.lower()

log = Logger()

CLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 2, 3, 4, 5
_HEADER = struct.Struct("!6H")


@dataclass
class Counters:
    """Monotonic counters, exported by the ops endpoint."""

    queries_udp: int = 0
    queries_tcp: int = 0
    answered_local: int = 0
    answered_nodata: int = 0
    nxdomain: int = 0
    forwarded: int = 0
    servfail: int = 0
    refused: int = 0
    formerr: int = 0
    badvers: int = 0
    notimp: int = 0
    dropped: int = 0
    held: int = 0
    hold_overflow: int = 0
    hold_expired: int = 0
    truncated: int = 0
    fast_path: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def error_reply(data: bytes, rcode: int) -> bytes:
    """A header-only reply to a query we cannot or will not read: same ID, opcode and RD."""
    qid, flags = struct.unpack("!HH", data[:4])
    return _HEADER.pack(qid, 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


def encode_answer(query: dns.Message, edns_payload: int | None, rcode: int, decision: Answer | None,
                  ttl: int, limit: int) -> tuple[bytes, bool]:
    """The wire form of our own answer to ``query``, truncated (TC, no answers) past ``limit``.

    Returns the bytes and whether they were truncated.  The fast path in :mod:`kubedock_dns.fastpath`
    must produce the same bytes; a differential test holds the two together.
    """
    question = query.queries[0]
    # Our own answers and our NXDOMAIN (a container name no network of the asker holds) are
    # authoritative; failures are not.
    response = dns.Message(
        id=query.id, answer=True, opCode=dns.OP_QUERY, auth=decision is not None or rcode == RCODE_NXDOMAIN,
        recDes=query.recDes, recAv=1, rCode=rcode, maxSize=0,
    )
    response.queries = [question]
    if decision is not None:
        owner = question.name.name
        for value in decision.values:
            payload: dns.IEncodableRecord
            if decision.qtype == TYPE_A:
                payload = dns.Record_A(value, ttl)
            elif decision.qtype == TYPE_AAAA:
                payload = dns.Record_AAAA(value, ttl)
            else:
                payload = dns.Record_PTR(value.encode("ascii"), ttl)
            response.answers.append(dns.RRHeader(owner, decision.qtype, CLASS_IN, ttl, payload, auth=True))
    if edns_payload is not None:
        opt = dns._OPTHeader(udpPayloadSize=SERVER_UDP_PAYLOAD, version=0)
        response.additional.append(opt)  # type: ignore[arg-type]  # encodes like an RRHeader
    wire = response.toStr()
    if len(wire) <= limit:
        return wire, False
    response.answers = []
    response.trunc = 1
    return response.toStr(), True


def badvers_reply(query: dns.Message) -> bytes:
    """RFC 6891 6.1.3: the question echoed, extended rcode BADVERS (16), and our OPT record
    saying which version we do speak (0)."""
    response = dns.Message(id=query.id, answer=True, opCode=dns.OP_QUERY, recDes=query.recDes,
                           recAv=1, rCode=dns.EBADVERSION & 0xF, maxSize=0)
    response.queries = list(query.queries)
    opt = dns._OPTHeader(udpPayloadSize=SERVER_UDP_PAYLOAD, extendedRCODE=dns.EBADVERSION >> 4, version=0)
    response.additional.append(opt)  # type: ignore[arg-type]  # encodes like an RRHeader
    return response.toStr()


def edns_payload_size(message: dns.Message) -> int | None:
    """The client's advertised UDP payload size, or None when the query has no OPT record."""
    for record in message.additional:
        if record.type == dns.OPT:
            return max(UDP_PLAIN_LIMIT, record.cls)
    return None


class QueryDatagramProtocol(dns.DNSDatagramProtocol):
    """UDP: every datagram is a query from ``addr``; none is a response to us."""

    noisy = False

    def datagramReceived(self, data: bytes, addr) -> None:
        self.controller.datagram_received(data, self, addr)


class QueryStreamProtocol(dns.DNSProtocol, TimeoutMixin):
    """TCP: queries are attributed to the connection's peer address.  An idle connection is
    closed after ``IDLE_SECONDS`` (RFC 7766 asks servers to time idle clients out), and one whose
    started message is not whole within ``MESSAGE_SECONDS`` (however its bytes trickle in: the
    idle timer restarts with every byte, this one does not) is closed too."""

    IDLE_SECONDS = 30
    MESSAGE_SECONDS = 10

    _message_deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.tcp_open += 1
        self.setTimeout(self.IDLE_SECONDS)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)
        if self._unprocessed:  # part of a message: it must be whole in time
            if self._message_deadline is None and self.transport is not None:
                self._message_deadline = self.factory.reactor.callLater(self.MESSAGE_SECONDS, self._too_slow)
        else:
            self._cancel_deadline()

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
        self.factory.tcp_open -= 1
        super().connectionLost(reason)

    def stringReceived(self, data: bytes) -> None:
        assert self.transport is not None
        peer: Any = self.transport.getPeer()
        self.controller.query_received(data, self, None, peer.host)


class KubedockDNSServerFactory(names_server.DNSServerFactory):
    """Answers from the asker's networks; holds, forwards or fails per DESIGN section 4."""

    protocol = QueryStreamProtocol

    def __init__(self, reactor, resolver: Resolver, forwarder: Forwarder,
                 fast_path=None, max_held: int = 4096, max_tcp_connections: int = 256,
                 latency_sample_every: int = 16, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.max_tcp_connections = max_tcp_connections
        self.tcp_open = 0
        self.limits_log = RateLimitedLog(reactor)
        self.reactor = reactor
        self.resolver = resolver
        self.forwarder = forwarder
        self.counters = Counters()
        self.fast_path = fast_path
        self.holding = 0
        self.max_held = max_held
        # Receipt to reply, for one query in ``latency_sample_every`` (docs/metrics.md: timing
        # every query costs fast-path QPS).  Local answers include any hold; forwarded ones any
        # upstream that failed before one answered.
        # Query number & mask == 0 picks one in N (N a power of two) from the counter the query
        # increments anyway: the untimed queries pay one AND.  Mask -1 never matches: off.
        if latency_sample_every < 0 or latency_sample_every & (latency_sample_every - 1):
            raise ValueError(f"latency_sample_every must be 0 (off) or a power of two, got {latency_sample_every}")
        self.sample_every = latency_sample_every
        self.sample_mask = latency_sample_every - 1 if latency_sample_every else -1
        self.clock = clock
        self.answer_latency = LatencyHistogram(DNS_BUCKETS)
        self.forward_latency = LatencyHistogram(DNS_BUCKETS)
        self.warnings = WarningLimiter(log, reactor.seconds)

    def buildProtocol(self, addr):
        if self.tcp_open >= self.max_tcp_connections:
            self.limits_log.bite(
                "dns tcp connection cap",
                f"DNS over TCP: refused a connection from {getattr(addr, 'host', addr)}: "
                f"{self.max_tcp_connections} connections are open already",
            )
            return None  # the reactor closes it at once
        p = self.protocol(self, self.reactor)
        p.factory = self
        return p

    # -- reception ---------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, proto, address) -> None:
        """One datagram handed over by the protocol.  The real port
        (:class:`~kubedock_dns.udp_port.AnsweringPort`) counts datagrams and answers repeated
        questions itself, and hands the rest to :meth:`counted_query`."""
        counters = self.counters
        number = counters.queries_udp = counters.queries_udp + 1
        self.counted_query(data, proto, address, address[0], 0.0 if number & self.sample_mask else self.clock())

    def query_received(self, data: bytes, proto, address, host: str) -> None:
        counters = self.counters
        if address is None:
            number = counters.queries_tcp = counters.queries_tcp + 1
        else:
            number = counters.queries_udp = counters.queries_udp + 1
        self.counted_query(data, proto, address, host, 0.0 if number & self.sample_mask else self.clock())

    def counted_query(self, data: bytes, proto, address, host: str, started: float) -> None:
        """Answer, relay or decide one query already counted (``address`` None: over TCP;
        ``started``: its receipt time when it is one of the timed ones, else 0)."""
        if self.fast_path is not None:
            reply = self.fast_path.answer(data, host, address is None)
            if reply is not None:
                counters = self.counters
                counters.fast_path += 1
                if reply is FORWARD:
                    return self._forward(None, data, proto, address, started)
                counters.answered_local += 1
                self._write(proto, address, reply)
                if started:
                    self.answer_latency.observe(self.clock() - started)
                return
        self._full_path(data, proto, address, host, started)

    def _full_path(self, data: bytes, proto, address, host: str, started: float) -> None:
        """Read ``data`` strictly with twisted.names and decide (everything the fast path left)."""
        counters = self.counters
        if len(data) < 12:
            counters.dropped += 1
            return
        _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if flags & 0x8000:
            counters.dropped += 1  # a response: answering it could start a loop
            return
        try:
            source_ip = canonical_ip(host)
        except ValueError:
            counters.dropped += 1
            return
        if (flags >> 11) & 0xF != dns.OP_QUERY:
            counters.notimp += 1
            return self._write(proto, address, error_reply(data, RCODE_NOTIMP))
        if qdcount != 1:
            counters.formerr += 1
            return self._write(proto, address, error_reply(data, RCODE_FORMERR))
        message = dns.Message()
        try:
            # Strict and bounded, and the message must hold exactly what its header counts:
            # twisted.names' parser is lenient about missing records and trailing bytes.
            end = parse_question(data)[0]
            edns_versions = scan_records(data, end, ancount, nscount, arcount)
            if len(edns_versions) > 1:
                raise WireError("more than one OPT record")  # RFC 6891 6.1.1
            message.fromStr(data)
            if len(message.queries) != 1:
                raise WireError("no question")
        except Exception:  # WireError, or twisted.names' EOFError, ValueError, struct.error...
            counters.formerr += 1
            return self._write(proto, address, error_reply(data, RCODE_FORMERR))
        if edns_versions and edns_versions[0] != 0:
            counters.badvers += 1  # RFC 6891 6.1.3: we speak EDNS version 0 only
            return self._write(proto, address, badvers_reply(message))
        self._handle(message, data, proto, address, source_ip, started)

    def _handle(self, message: dns.Message, data: bytes, proto, address, source_ip: str,
                started: float = 0.0) -> None:
        question = message.queries[0]
        name = question.name.name.lower().decode("latin-1")
        if question.cls != CLASS_IN:
            if self.verbose:
                self._log_decision(source_ip, name, question.type, Forward("class is not IN"))
            return self._forward(message, data, proto, address, started)
        now = self.reactor.seconds()
        decision = self.resolver.decide(source_ip, name, question.type, now=now)
        if isinstance(decision, Hold):
            if self.holding >= self.max_held:
                # A flood of questions for names that do not exist must not pile up: past the
                # bound they are decided as if their hold had already expired.
                self.counters.hold_overflow += 1
                decision = self.resolver.decide(source_ip, name, question.type, held=True, now=now)
            else:
                self.counters.held += 1
                if self.verbose:
                    self._log_decision(source_ip, name, question.type, decision)
                self._hold(source_ip, name, question.type, decision).addCallback(
                    self._decided, source_ip, name, question.type, message, data, proto, address, started
                )
                return
        self._decided(decision, source_ip, name, question.type, message, data, proto, address, started)

    def _decided(self, decision: Decision, source_ip: str, name: str, qtype: int, message: dns.Message,
                 data: bytes, proto, address, started: float) -> None:
        if self.verbose:
            self._log_decision(source_ip, name, qtype, decision)
        self._respond(decision, message, data, proto, address, started)

    def _log_decision(self, source_ip: str, name: str, qtype: int, decision: Decision) -> None:
        """One structured debug line per decision (--verbose): every field is an event field."""
        outcome = outcome_name(decision)
        log.debug(
            "{client} asked {name} {qtype}: {outcome} {detail}",
            client=source_ip, name=name, qtype=qtype_name(qtype), outcome=outcome,
            network=getattr(decision, "network", "") or None,
            records=list(decision.values) if isinstance(decision, Answer) else None,
            reason=getattr(decision, "reason", None),
            detail=(f"from {decision.source}: {', '.join(decision.values) or 'no record of that type'}"
                    if isinstance(decision, Answer) else f"({decision.reason})"),
        )

    # -- holding -----------------------------------------------------------------------------------

    def _hold(self, source_ip: str, name: str, qtype: int, first: Hold) -> defer.Deferred:
        """Fires with a final decision: on the first index change that settles the question, or,
        after the hold bound, with whatever the index says then."""
        resolver, index = self.resolver, self.resolver.index
        result: defer.Deferred = defer.Deferred()
        self.holding += 1

        def on_change() -> None:
            decision = resolver.decide(source_ip, name, qtype, now=self.reactor.seconds())
            if isinstance(decision, Hold):
                index.when_changed(on_change)
                return
            timer.cancel()
            self.holding -= 1
            result.callback(decision)

        def on_timeout() -> None:
            index.forget_listener(on_change)
            now = self.reactor.seconds()
            if first.miss_key is not None:
                resolver.misses.remember(first.miss_key, now)
            self.counters.hold_expired += 1
            self.holding -= 1
            result.callback(resolver.decide(source_ip, name, qtype, held=True, now=now))

        index.when_changed(on_change)
        timer = self.reactor.callLater(resolver.config.hold_seconds, on_timeout)
        return result

    # -- answering ---------------------------------------------------------------------------------

    def _respond(self, decision: Decision, message: dns.Message, data: bytes, proto, address,
                 started: float = 0.0) -> None:
        if isinstance(decision, Answer):
            counters = self.counters
            if decision.values:
                counters.answered_local += 1
            else:
                counters.answered_nodata += 1
            self._write_answer(message, proto, address, RCODE_OK, decision)
            if started:
                self.answer_latency.observe(self.clock() - started)
        elif isinstance(decision, Forward):
            self._forward(message, data, proto, address, started)
        elif isinstance(decision, NotFound):
            self.counters.nxdomain += 1
            self._write_answer(message, proto, address, RCODE_NXDOMAIN, None)
            if started:
                self.answer_latency.observe(self.clock() - started)
        else:
            assert isinstance(decision, ServFail)
            self.counters.servfail += 1
            self._write_answer(message, proto, address, RCODE_SERVFAIL, None)

    def _write_answer(self, message, proto, address, rcode: int, decision: Answer | None) -> None:
        edns = edns_payload_size(message)
        if address is None:
            limit = TCP_LIMIT
        else:
            limit = edns if edns is not None else UDP_PLAIN_LIMIT
        wire, truncated = encode_answer(message, edns, rcode, decision, self.resolver.config.ttl, limit)
        if truncated:
            self.counters.truncated += 1
        self._write(proto, address, wire)

    def _forward(self, message: dns.Message | None, data: bytes, proto, address, started: float = 0.0) -> None:
        """Relay ``data``; ``message`` (its parsed form) is needed only to answer a failure."""
        self.counters.forwarded += 1

        def relay(answer: bytes) -> None:
            self._write(proto, address, answer)
            if started:
                self.forward_latency.observe(self.clock() - started)

        def failed(reason: Exception) -> None:
            nonlocal message
            if message is None:
                message = dns.Message()
                message.fromStr(data)  # the fast path vetted it already
            if isinstance(reason, Overloaded):
                self.counters.refused += 1
                self.warnings.warn(
                    "overloaded", "REFUSED: {why}; raise --max-forwards or find the client flooding "
                    "outside names", why=str(reason))
                self._write_answer(message, proto, address, RCODE_REFUSED, None)
            elif isinstance(reason, UpstreamsFailed):
                self.warnings.warn(
                    "upstreams-failed", "SERVFAIL for a forwarded question: no upstream answered "
                    "({why}); check the cluster DNS and --upstream / --resolv-conf", why=str(reason))
                self.counters.servfail += 1
                self._write_answer(message, proto, address, RCODE_SERVFAIL, None)
            else:
                log.failure("forwarding failed", Failure(reason))
                self.counters.servfail += 1
                self._write_answer(message, proto, address, RCODE_SERVFAIL, None)
            if started:
                self.forward_latency.observe(self.clock() - started)

        if address is None:
            self.forwarder.forward(data, over_tcp=True).addCallbacks(relay, lambda f: failed(f.value))
        else:
            # No Deferred per UDP query: its creation and callback chain were a tenth of the
            # server's instructions for a relayed query (bench.cost).
            self.forwarder.forward_udp(data, relay, failed)

    @staticmethod
    def _write(proto, address, wire: bytes) -> None:
        transport = proto.transport
        if transport is None:
            return  # the client went away while we held or forwarded its question
        if address is None:
            if transport.connected:
                proto.sendString(wire)
        else:
            send_datagram(transport, wire, address)
