"""The DNS server against bad input and faults, on real sockets (see tests/test_dns_server.py for
the setting): every malformed message gets its RFC answer from both the fast path and the full
path, lookalike digits never crash a PTR question, and a refused TCP upstream logs nothing."""

from __future__ import annotations

import gc
import struct

import dns.message
import dns.rcode
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from kubedock_dns.contract import Upserted
from tests.podfactory import record

from tests.scripted_upstream import closed_port
from tests.test_dns_server import A_DB, A_SVC, B_DB, B_SVC, NET_A, NET_B, NS, DNSServerTestCase, addresses


def _query(name: str = "db", rdtype: str = "A", **make) -> bytes:
    query = dns.message.make_query(name, rdtype, **make)
    query.id = 0x4242
    return query.to_wire()


def _with_counts(wire: bytes, an: int, ns: int, ar: int) -> bytes:
    return wire[:6] + struct.pack("!HHH", an, ns, ar) + wire[12:]


OPT_V0 = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


def _rcode(reply: bytes) -> int:
    """The full (extended) rcode of a reply, reading the OPT record when there is one."""
    message = dns.message.from_wire(reply)
    return message.rcode()


class MalformedSectionsTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_counts_promising_missing_records_get_formerr(self):
        """A header that counts answer, authority or additional records the message does not
        hold is FORMERR (twisted.names alone would read the question and answer it)."""
        plain = _query()
        for counts in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 2)):
            for tcp in (False, True):
                reply = yield self.raw(A_SVC, _with_counts(plain, *counts), tcp=tcp)
                self.assertIsNotNone(reply, counts)
                self.assertEqual((reply[:2], reply[3] & 0xF), (b"\x42\x42", 1), counts)

    @defer.inlineCallbacks
    def test_trailing_bytes_after_the_question_get_formerr(self):
        """Bytes after the last record the header counts make the message malformed."""
        for wire in (_query() + b"\x00", _query() + b"\x00" * 11,
                     _with_counts(_query(), 0, 0, 1) + OPT_V0 + b"junk"):
            reply = yield self.raw(A_SVC, wire)
            self.assertEqual(reply[3] & 0xF, 1)

    @defer.inlineCallbacks
    def test_two_opt_records_get_formerr(self):
        """RFC 6891 6.1.1: more than one OPT record is FORMERR."""
        wire = _with_counts(_query(), 0, 0, 2) + OPT_V0 + OPT_V0
        for tcp in (False, True):
            reply = yield self.raw(A_SVC, wire, tcp=tcp)
            self.assertEqual(reply[3] & 0xF, 1)

    @defer.inlineCallbacks
    def test_edns_version_above_zero_gets_badvers_with_our_opt(self):
        """RFC 6891 6.1.3: an OPT record of version 1 gets BADVERS (extended rcode 16) and an OPT
        record of version 0 (the version this server speaks); no answer records."""
        for name in ("db", "kubernetes.default.svc.cluster.local"):
            wire = _query(name, use_edns=1)
            for tcp in (False, True):
                reply = yield self.raw(A_SVC, wire, tcp=tcp)
                message = dns.message.from_wire(reply)
                self.assertEqual(message.rcode(), dns.rcode.BADVERS)
                self.assertEqual(message.edns, 0)
                self.assertEqual(message.answer, [])
                self.assertEqual(message.id, 0x4242)
        r = yield self.ask(A_SVC, "db", use_edns=0)
        self.assertEqual(addresses(r), [A_DB])

    @defer.inlineCallbacks
    def test_well_formed_records_after_the_question_are_still_answered(self):
        """A query with one version-0 OPT record, exactly as counted, is answered."""
        reply = yield self.raw(A_SVC, _with_counts(_query(), 0, 0, 1) + OPT_V0)
        message = dns.message.from_wire(reply)
        self.assertEqual(message.rcode(), dns.rcode.NOERROR)
        self.assertEqual(addresses(message), [A_DB])


class DNSSECOkTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_the_do_bit_of_the_query_is_copied_into_the_reply(self):
        """RFC 3225 3: a query with EDNS and the DO bit gets an OPT record with DO set, for a local
        answer, NXDOMAIN and BADVERS alike, over UDP and TCP; without DO the reply's OPT has none,
        and the answer is the same either way (twice, so the prepared reply is checked too)."""
        import dns.flags

        for tcp in (False, True):
            for _ in range(2):
                r = yield self.ask(A_SVC, "db", use_edns=0, want_dnssec=True, tcp=tcp)
                self.assertEqual((addresses(r), r.edns, bool(r.ednsflags & dns.flags.DO)), ([A_DB], 0, True))
                r = yield self.ask(A_SVC, "db", use_edns=0, tcp=tcp)
                self.assertEqual((addresses(r), r.edns, bool(r.ednsflags & dns.flags.DO)), ([A_DB], 0, False))
            r = yield self.ask(A_SVC, f"nobody.{NS}.svc.cluster.local", use_edns=0, want_dnssec=True, tcp=tcp)
            self.assertEqual((r.rcode(), bool(r.ednsflags & dns.flags.DO)), (dns.rcode.NXDOMAIN, True))
            reply = yield self.raw(A_SVC, _query("db", use_edns=1, want_dnssec=True), tcp=tcp)
            message = dns.message.from_wire(reply)
            self.assertEqual((message.rcode(), bool(message.ednsflags & dns.flags.DO)), (dns.rcode.BADVERS, True))


def _padded(name: str, size: int) -> bytes:
    """A query for ``name`` whose OPT record carries EDNS padding (RFC 7830) up to ``size`` bytes."""
    import dns.edns

    padding = size - len(_query(name, use_edns=0)) - 4
    query = dns.message.make_query(name, "A", use_edns=0, options=[dns.edns.GenericOption(12, b"\x00" * padding)])
    query.id = 0x4242
    return query.to_wire(max_size=65535)


class OversizeQueryTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_a_query_longer_than_the_bound_is_refused_and_not_kept(self):
        """A well-formed query of 5,000 bytes (a question and EDNS padding) is REFUSED over UDP
        and TCP, held and relayed by nobody (a held or relayed query keeps its bytes); one of
        4,000 bytes is answered as usual."""
        for tcp in (False, True):
            for name in ("db", "nobody", "kubernetes.default.svc.cluster.local"):
                big = _padded(name, 5000)
                self.assertEqual(len(big), 5000)
                reply = yield self.raw(A_SVC, big, tcp=tcp)
                self.assertEqual((reply[:2], reply[3] & 0xF), (b"\x42\x42", dns.rcode.REFUSED), (name, tcp))
            reply = yield self.raw(A_SVC, _padded("db", 4000), tcp=tcp)
            self.assertEqual(addresses(dns.message.from_wire(reply)), [A_DB])
        self.assertEqual(self.server.dns.holding, 0)


class LookalikeDigitsTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_ptr_question_with_a_superscript_digit_gets_a_reply(self):
        """A known pod asking PTR for '\\xb2.0.0.127.in-addr.arpa' ('²' passes isdigit) gets an
        answer (the name is not ours: the upstream's NXDOMAIN), and no traceback is logged."""
        errors = []
        observer = lambda event: errors.append(event) if event.get("isError") or event.get("log_failure") else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        name = b"\x01\xb2\x010\x010\x03127\x07in-addr\x04arpa\x00"
        wire = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 12, 1)
        for tcp in (False, True):
            reply = yield self.raw(A_SVC, wire, tcp=tcp)
            self.assertIsNotNone(reply)
            self.assertEqual(reply[:2], b"\x42\x42")
            self.assertEqual(reply[3] & 0xF, dns.rcode.NXDOMAIN)
        self.assertEqual(errors, [])


class RefusingTCPUpstreamTests(DNSServerTestCase):
    def setUp(self):
        self.upstream_extra = [closed_port()]
        super().setUp()

    @defer.inlineCallbacks
    def test_tcp_forwarding_past_a_refusing_upstream_logs_no_error(self):
        """With a first upstream that refuses TCP connections, TCP questions are answered by
        the next one and nothing lands in the log as an unhandled error."""
        errors = []
        observer = lambda event: errors.append(event) if event.get("isError") or event.get("log_failure") else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for _ in range(3):
            r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local", tcp=True)
            self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])
        gc.collect()  # unhandled errors in Deferreds are logged when the Deferred is collected
        yield defer.succeed(None)
        self.assertEqual([e.get("log_format") for e in errors], [])


# The same behaviour through the full twisted.names path alone (no wire fast path).
for _case in (MalformedSectionsTests, DNSSECOkTests, OversizeQueryTests, LookalikeDigitsTests):
    _name = _case.__name__.replace("Tests", "FullPathTests")
    globals()[_name] = type(_name, (_case,), {"fast_path": False, "__doc__": "Full path only."})
del _case, _name


class TCPLimitsTests(DNSServerTestCase):
    def setUp(self):
        from kubedock_dns.dns.server import QueryStreamProtocol

        self.patch(QueryStreamProtocol, "MESSAGE_SECONDS", 1)
        super().setUp()
        self.server.listeners.tcp_cap.max_connections = 3
        self.warnings = []

        def observer(event):
            if "at most once per" in str(event.get("log_format", "")):
                self.warnings.append(event["text"])

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def test_a_trickled_query_is_cut_off_after_the_total_time(self):
        """A TCP client sending its query a byte every 0.2 s (each byte restarts the 30 s idle
        timer) is disconnected once the message is not whole within the total time; the cut
        is logged."""
        import socket
        import time

        wire = struct.pack("!H", len(_query())) + _query()

        def trickle():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                started = time.monotonic()
                try:
                    for byte in wire:
                        s.sendall(bytes([byte]))
                        time.sleep(0.2)
                    return s.recv(100), time.monotonic() - started
                except (ConnectionResetError, BrokenPipeError):
                    return b"", time.monotonic() - started

        from twisted.internet.threads import deferToThread
        data, took = yield deferToThread(trickle)
        self.assertEqual(data, b"")
        self.assertLess(took, 4)  # the whole message would take 6 s; the cut comes after 1 s
        self.assertTrue(any("did not arrive whole" in w for w in self.warnings), self.warnings)

    @defer.inlineCallbacks
    def test_connections_past_the_cap_are_closed_and_logged_once(self):
        """With the cap at 3 open TCP connections, all from one address, more from that address
        are closed at once (logged once), and the held ones are still answered."""
        import socket

        from twisted.internet.threads import deferToThread

        def scenario():
            held = [socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(A_SVC, 0))
                    for _ in range(3)]
            try:
                import time
                time.sleep(0.2)
                refused = []
                for _ in range(3):  # more from the address holding every slot
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                                  source_address=(A_SVC, 0)) as extra:
                        try:
                            extra.sendall(struct.pack("!H", len(_query())) + _query())
                            refused.append(extra.recv(2) == b"")
                        except (ConnectionResetError, BrokenPipeError):
                            refused.append(True)
                s = held[0]
                s.sendall(struct.pack("!H", len(_query())) + _query())
                length = struct.unpack("!H", s.recv(2))[0]
                return refused, s.recv(length)
            finally:
                for s in held:
                    s.close()

        refused, reply = yield deferToThread(scenario)
        self.assertEqual(refused, [True, True, True])
        self.assertEqual(addresses(dns.message.from_wire(reply)), [A_DB])
        self.assertEqual(sum("connections are open already" in w for w in self.warnings), 1)


    @defer.inlineCallbacks
    def test_another_address_gets_a_slot_while_one_address_holds_them_all(self):
        """One address holds every slot (the cap is 3), each connection asking now and then; a
        pod at another address still gets its TCP answer: the least recently active connection
        of the busy address is closed for it, and the busy address's other connections keep
        answering.  The cap holds throughout, and the eviction is logged."""
        import socket
        import time

        from twisted.internet.threads import deferToThread

        wire = struct.pack("!H", len(_query())) + _query()

        def exchange(s):
            s.sendall(wire)
            length = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            return dns.message.from_wire(s.recv(length, socket.MSG_WAITALL))

        def scenario():
            hog = [socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(A_SVC, 0))
                   for _ in range(3)]
            try:
                for s in hog:  # the first is now the least recently active
                    exchange(s)
                    time.sleep(0.05)
                with socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                              source_address=(B_SVC, 0)) as pod:
                    answer = exchange(pod)
                    open_now = len(self.server.listeners.tcp_cap.protocols)
                    try:
                        first = hog[0].recv(1)  # closed for the pod
                    except ConnectionResetError:
                        first = b""  # aborted: a reset
                    others = [addresses(exchange(s)) for s in hog[1:]]
                return answer, open_now, first, others
            finally:
                for s in hog:
                    s.close()

        answer, open_now, first, others = yield deferToThread(scenario)  # a reset of the pod's raises
        self.assertEqual(addresses(answer), [B_DB])
        self.assertEqual(open_now, 3)
        self.assertEqual(first, b"")
        self.assertEqual(others, [[A_DB], [A_DB]])
        self.assertTrue(any("to make room for" in w for w in self.warnings), self.warnings)


class BurstTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_a_burst_of_mixed_datagrams_is_answered_one_by_one(self):
        """Datagrams sent back to back reach the UDP port's read loop many at a time: repeated
        questions (answered from prepared bytes), other questions and junk too short for a header,
        interleaved. Every question gets exactly its own answer, junk gets none, and the counters
        add up as if each had come alone."""
        import socket

        from twisted.internet.threads import deferToThread

        factory = self.server.dns
        before = factory.counts()
        expected: dict[int, list[str]] = {}
        datagrams = []
        for i in range(150):
            if i % 3 == 1:
                datagrams.append(b"\x00\x01")  # junk: dropped without a reply
                continue
            name, address = ("db", A_DB) if i % 3 == 0 else ("service", A_SVC)
            query = dns.message.make_query(name, "A")
            query.id = i
            expected[i] = [address]
            datagrams.append(query.to_wire())

        def burst() -> dict[int, list[dns.message.Message]]:
            replies: dict[int, list[dns.message.Message]] = {}
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                s.bind((A_SVC, 0))
                for datagram in datagrams:
                    s.sendto(datagram, ("127.0.0.1", self.port))
                s.settimeout(2.0)
                while sum(map(len, replies.values())) < len(expected):
                    try:
                        reply = dns.message.from_wire(s.recv(65535))
                    except socket.timeout:
                        break
                    replies.setdefault(reply.id, []).append(reply)
                s.settimeout(0.3)  # anything more (a reply to junk, a second reply) arrives now
                try:
                    while True:
                        reply = dns.message.from_wire(s.recv(65535))
                        replies.setdefault(reply.id, []).append(reply)
                except socket.timeout:
                    pass
            return replies

        replies = yield deferToThread(burst)
        self.assertEqual(sorted(replies), sorted(expected))
        self.assertEqual({i: [addresses(r) for r in rs] for i, rs in replies.items()},
                         {i: [a] for i, a in expected.items()})
        after = factory.counts()
        self.assertEqual((after["queries_udp"] - before["queries_udp"], after["dropped"] - before["dropped"],
                          after["answered_local"] - before["answered_local"]), (150, 50, 100))


def _cached_bytes(replies: dict) -> int:
    """What the prepared replies hold in query and reply bytes (the test's own count)."""
    return sum(len(key[2]) + (len(value) if isinstance(value, bytes) else 0) for key, value in replies.items())


class JunkDoesNotFillMemoryTests(DNSServerTestCase):
    """Queries the cache cannot answer are never stored: junk costs no memory after it is read."""

    @defer.inlineCallbacks
    def test_junk_datagrams_and_messages_are_not_kept(self):
        """2,000 junk 8 KiB datagrams (random bytes, and a good question followed by junk) and 200
        junk 60 KB TCP messages from one pod leave the prepared replies under 1 MiB, and another
        pod's prepared answer is still there (answered without a new decision)."""
        import os
        import socket

        from twisted.internet.threads import deferToThread

        if not self.fast_path:
            self.skipTest("--no-fast-path: nothing is prepared")
        fast = self.server.dns.fast_path
        r = yield self.ask(B_SVC, "db")
        self.assertEqual(addresses(r), [B_DB])
        warm = [k for k in fast.replies if k[0].endswith(B_SVC)]
        self.assertEqual(len(warm), 1)

        def flood():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((A_SVC, 0))
                for i in range(2000):
                    junk = os.urandom(8192) if i % 2 else _query() + os.urandom(8192 - len(_query()))
                    s.sendto(bytes([junk[0], junk[1], junk[2] & 0x7F]) + junk[3:], ("127.0.0.1", self.port))
                    if i % 20 == 19:
                        # Let the server read: 20 of them fill most of the kernel's 208 KiB socket
                        # buffer, and a full buffer drops datagrams (a flood is not what is tested).
                        time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", self.port), source_address=(A_SVC, 0)) as s:
                for i in range(200):
                    junk = _query() + os.urandom(60_000)
                    s.sendall(struct.pack("!H", len(junk)) + junk)
                    length = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
                    s.recv(length, socket.MSG_WAITALL)

        import time
        before = self.server.dns.counts()
        yield deferToThread(flood)
        # Every junk TCP message was answered (FORMERR) before the next was sent; the datagrams
        # are read by now too (positive control: they were counted).
        after = self.server.dns.counts()
        self.assertGreater(after["queries_udp"] - before["queries_udp"], 1000)
        self.assertEqual(after["queries_tcp"] - before["queries_tcp"], 200)
        self.assertLess(_cached_bytes(fast.replies), 1 << 20)
        self.assertIn(warm[0], fast.replies)


class TCPBuffersTests(DNSServerTestCase):
    """What one TCP connection can make the server hold is bounded, whatever its client does."""

    def setUp(self):
        super().setUp()
        self.index.apply([Upserted(record(f"m{i}", [NET_A], aliases=["many"], ip=f"127.10.5.{i}",
                                          namespace=NS, uid=f"m{i}")) for i in range(1, 61)])

    @defer.inlineCallbacks
    def test_a_client_that_never_reads_stops_being_read(self):
        """A client pipelining questions with large answers (60 addresses, about 1 KB each) and
        never reading them: once its unread answers fill the connection's buffer, the server
        stops reading from it, so neither the answers nor the questions pile up in memory."""
        import socket
        import time

        from twisted.internet.threads import deferToThread

        wire = _query("many")
        framed = struct.pack("!H", len(wire)) + wire

        def hog():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning: it never reads
                s.bind((A_SVC, 0))
                s.connect(("127.0.0.1", self.port))
                s.setblocking(False)
                sent, deadline = 0, time.monotonic() + 3
                while time.monotonic() < deadline and sent < 20_000:
                    try:
                        s.send(framed)
                        sent += 1
                    except BlockingIOError:
                        time.sleep(0.05)
                time.sleep(0.5)
                return sent

        before = self.server.dns.counts()["queries_tcp"]
        sent = yield deferToThread(hog)
        read = self.server.dns.counts()["queries_tcp"] - before
        # 20,000 answers are 20 MB: the kernel's buffers on both sides take a few MB of them
        # (the server's send buffer grows to tcp_wmem's 4 MB), the server's own 64 KiB more.
        self.assertGreater(read, 10)  # positive control: it was served until its buffer filled
        self.assertLess(read, sent / 2, f"the server read {read} of the {sent} questions it was sent")
        r = yield self.ask(B_SVC, "db", tcp=True)  # and others are served meanwhile
        self.assertEqual(addresses(r), [B_DB])

    @defer.inlineCallbacks
    def test_a_connection_has_a_bounded_number_of_questions_in_flight(self):
        """50 pipelined questions that are held (an unknown asker while a pod awaits its address):
        the server holds at most MAX_OUTSTANDING of them for the connection and reads the rest
        only as those are answered; all 50 are answered in the end."""
        import socket

        from twisted.internet.threads import deferToThread

        from kubedock_dns.dns.server import QueryStreamProtocol

        self.index.apply([Upserted(record("newbie", [NET_B], phase="Pending", namespace=NS, uid="newbie"))])
        outsider = "127.10.9.9"

        def pipeline():
            with socket.create_connection(("127.0.0.1", self.port), source_address=(outsider, 0), timeout=20) as s:
                for i in range(50):
                    wire = _query(f"held{i}")
                    s.sendall(struct.pack("!H", len(wire)) + wire)
                replies = 0
                while replies < 50:
                    length = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
                    s.recv(length, socket.MSG_WAITALL)
                    replies += 1
                return replies

        answering = deferToThread(pipeline)
        yield task.deferLater(reactor, 0.5, lambda: None)
        holding = self.server.dns.holding
        replies = yield answering
        self.assertEqual(replies, 50)
        self.assertEqual(holding, QueryStreamProtocol.MAX_OUTSTANDING)
