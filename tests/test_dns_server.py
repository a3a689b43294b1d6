"""The DNS server on real sockets: every row of DESIGN section 4, asked with dnspython from
source addresses in 127.0.0.0/8 that stand for pod IPs, with a real dnsmasq as the upstream.

Tests run on the real reactor (trial's TestCase spins it); blocking dnspython calls run in a
thread so the server keeps serving.  The index is changed in the reactor thread, as the watcher's
``callFromThread`` hand-over does in production.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.rrset
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from kubedock_dns.contract import Deleted, Relisted, Upserted
from kubedock_dns.dns.upstreams import parse_upstream
from kubedock_dns.options import Config
from kubedock_dns.tap import build_server
from testbed.upstream import Dnsmasq
from tests.podfactory import network_id, record
from tests.scripted_upstream import ScriptedTCPUpstream, ScriptedUpstream, closed_port

NS = "ci"
NET_A, NET_B, NET_C = network_id("run-a"), network_id("run-b"), network_id("run-c")
A_DB, A_SVC, B_DB, B_SVC = "127.10.1.1", "127.10.1.2", "127.10.2.1", "127.10.2.2"
MULTI = "127.10.3.3"  # a pod in networks C then A
OUTSIDER = "127.10.9.9"  # not a pod


def base_pods():
    return [
        record("db", [NET_A], ip=A_DB, namespace=NS, uid="a-db"),
        record("service", [NET_A], ip=A_SVC, namespace=NS, uid="a-svc"),
        record("db", [NET_B], ip=B_DB, namespace=NS, uid="b-db", container_name="/test_db_b",
               container_id="0123456789ab"),
        record("service", [NET_B], ip=B_SVC, namespace=NS, uid="b-svc"),
        record("multi", [NET_C, NET_A], ip=MULTI, namespace=NS, uid="multi"),
    ]


class DNSServerTestCase(TestCase):
    timeout = 60
    upstream_extra: list[str] = []
    hold_timeout = 1.0
    max_forwards = 1024

    def setUp(self):
        self.dnsmasq = Dnsmasq("127.0.0.1", namespace=NS, ptr_records={"127.10.8.8": "outside.example"})
        self.dnsmasq.start()
        self.addCleanup(self.dnsmasq.close)
        upstreams = tuple(parse_upstream(u) for u in self.upstream_extra + [self.dnsmasq.upstream_arg])
        config = Config(dns_port=0, dns_interface="::", upstreams=upstreams,
                        hold_timeout=self.hold_timeout, forward_timeout=0.5,
                        max_forwards=self.max_forwards, namespace=NS, ops_port=0,
                        ops_interface="127.0.0.1", fast_path=self.fast_path,
                        drain_seconds=0)  # the cleanup stops it at once
        self.server = build_server(config, reactor, pod_source=lambda index: service.Service())
        self.top = self.server.service
        self.index = self.server.index
        self.index.apply([Relisted(tuple(base_pods()))])
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.port = self.server.listeners.port  # the kernel's choice: nothing to race for

    fast_path = True

    def ask(self, source, name, rdtype="A", tcp=False, **make):
        """A real query from ``source`` (a pod address), in a thread."""
        query = dns.message.make_query(name, rdtype, **make)
        send = dns.query.tcp if tcp else dns.query.udp
        return deferToThread(send, query, "127.0.0.1", timeout=5, port=self.port, source=source,
                             ignore_trailing=True)

    def raw(self, source, payload, tcp=False):
        """Send raw bytes; the reply's bytes, or None after a second of silence."""
        def exchange():
            family = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, family) as s:
                s.bind((source, 0))
                s.settimeout(1.0)
                if tcp:
                    s.connect(("127.0.0.1", self.port))
                    s.sendall(struct.pack("!H", len(payload)) + payload)
                    try:
                        length = struct.unpack("!H", s.recv(2))[0]
                        return s.recv(length)
                    except (socket.timeout, struct.error):
                        return None
                s.sendto(payload, ("127.0.0.1", self.port))
                try:
                    return s.recv(65535)
                except socket.timeout:
                    return None
        return deferToThread(exchange)


def addresses(response):
    return sorted(r.address for rrset in response.answer for r in rrset)


class LocalAnswersTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_each_network_resolves_its_own_db_over_udp_and_tcp(self):
        """Two test runs with the same names: each service gets its own db, over UDP and TCP;
        TCP queries are attributed to the connection's peer."""
        for source, expected in ((A_SVC, A_DB), (B_SVC, B_DB)):
            for tcp in (False, True):
                r = yield self.ask(source, "db", tcp=tcp)
                self.assertEqual(r.rcode(), dns.rcode.NOERROR)
                self.assertEqual(addresses(r), [expected])
                self.assertEqual(r.answer[0].ttl, 5)
                self.assertTrue(r.flags & dns.flags.QR)

    @defer.inlineCallbacks
    def test_search_suffixed_name_is_answered_under_the_name_as_asked(self):
        """glibc's first try, db.<ns>.svc.cluster.local, is answered locally (never the
        cluster's Service called db), with the question's case echoed."""
        r = yield self.ask(B_SVC, "Db.CI.svc.Cluster.Local")
        self.assertEqual(addresses(r), [B_DB])
        self.assertEqual(r.answer[0].name.to_text(), "Db.CI.svc.Cluster.Local.")
        self.assertNotIn(self.dnsmasq.service_ip, addresses(r))

    @defer.inlineCallbacks
    def test_missing_family_and_other_types_are_nodata_not_nxdomain(self):
        """AAAA of an IPv4-only pod, and MX, answer NOERROR with no records."""
        for rdtype in ("AAAA", "MX", "TXT"):
            r = yield self.ask(A_SVC, "db", rdtype)
            self.assertEqual(r.rcode(), dns.rcode.NOERROR, rdtype)
            self.assertEqual(r.answer, [], rdtype)

    @defer.inlineCallbacks
    def test_answers_carry_aa_and_ra_no_soa_and_our_opt_record(self):
        """docs/design.md, "Answers": AA and RA set (RA also when the query did not ask for
        recursion), no SOA in the authority section for NODATA or NXDOMAIN (nothing a client
        would cache for long), and an OPT record advertising 1232 bytes exactly when the query
        had one, whatever size the client advertised; over UDP and TCP."""
        for tcp in (False, True):
            for make in ({}, {"use_edns": 0, "payload": 4096}, {"use_edns": 0, "payload": 512}):
                for name, rdtype, rcode in (("db", "A", dns.rcode.NOERROR), ("db", "AAAA", dns.rcode.NOERROR),
                                            ("nosuch", "A", dns.rcode.NXDOMAIN)):
                    what = (name, rdtype, tcp, make)
                    r = yield self.ask(A_SVC, name, rdtype, tcp=tcp, **make)
                    self.assertEqual(r.rcode(), rcode, what)
                    self.assertTrue(r.flags & dns.flags.AA, what)
                    self.assertTrue(r.flags & dns.flags.RA, what)
                    self.assertEqual(r.authority, [], what)
                    if make:
                        self.assertEqual((r.edns, r.payload), (0, 1232), what)
                    else:
                        self.assertEqual(r.edns, -1, what)  # no OPT record
            query = dns.message.make_query("db", "A")
            query.flags &= ~dns.flags.RD
            send = dns.query.tcp if tcp else dns.query.udp
            r = yield deferToThread(send, query, "127.0.0.1", timeout=5, port=self.port, source=A_SVC)
            self.assertTrue(r.flags & dns.flags.RA and not r.flags & dns.flags.RD, r.flags)

    @defer.inlineCallbacks
    def test_dual_stack_pod_answers_a_and_aaaa(self):
        """A pod with an IPv4 and an IPv6 address answers each family with its own record."""
        self.index.apply([Upserted(record("v6db", [NET_A], ips=["127.10.1.9", "fd00::9"], namespace=NS, uid="v6"))])
        r = yield self.ask(A_SVC, "v6db", "AAAA")
        self.assertEqual([x.address for x in r.answer[0]], ["fd00::9"])
        r = yield self.ask(A_SVC, "v6db")
        self.assertEqual(addresses(r), ["127.10.1.9"])

    @defer.inlineCallbacks
    def test_asker_in_several_networks_gets_the_first_network_that_has_the_name(self):
        """multi is in C then A; C has no db, so A's db answers; nothing of B ever does."""
        r = yield self.ask(MULTI, "db")
        self.assertEqual(addresses(r), [A_DB])
        self.index.apply([Upserted(record("db", [NET_C], ip="127.10.3.1", namespace=NS, uid="c-db"))])
        r = yield self.ask(MULTI, "db")
        self.assertEqual(addresses(r), ["127.10.3.1"])

    @defer.inlineCallbacks
    def test_name_dot_network_short_id(self):
        """``db.<short network id>`` resolves inside that network only for its members."""
        r = yield self.ask(MULTI, f"db.{NET_A[:12]}")
        self.assertEqual(addresses(r), [A_DB])
        r = yield self.ask(A_SVC, f"db.{NET_B[:12]}")
        self.assertNotIn(B_DB, addresses(r))

    @defer.inlineCallbacks
    def test_container_name_and_short_id_resolve(self):
        """Docker resolves the container name and short ID as well as aliases."""
        for name in ("test_db_b", "0123456789ab"):
            r = yield self.ask(B_SVC, name)
            self.assertEqual(addresses(r), [B_DB])
        r = yield self.ask(A_SVC, "test_db_b")
        self.assertNotIn(B_DB, addresses(r))

    @defer.inlineCallbacks
    def test_reverse_lookup_inside_and_outside_the_askers_networks(self):
        """PTR of a peer gives its primary name; PTR of another network's pod is forwarded
        (the upstream knows nothing of it) and never reveals the name."""
        r = yield self.ask(A_SVC, dns.reversename.from_address(A_DB), "PTR")
        self.assertEqual([x.target.to_text() for x in r.answer[0]], ["db."])
        r = yield self.ask(A_SVC, dns.reversename.from_address(B_DB), "PTR")
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        r = yield self.ask(A_SVC, dns.reversename.from_address("127.10.8.8"), "PTR")
        self.assertEqual([x.target.to_text() for x in r.answer[0]], ["outside.example."])

    @defer.inlineCallbacks
    def test_unknown_asker_gets_a_plain_forwarder(self):
        """An address that is no pod of ours never sees a network's names."""
        r = yield self.ask(OUTSIDER, "db")
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        r = yield self.ask(OUTSIDER, f"db.{NS}.svc.cluster.local")
        self.assertEqual(addresses(r), [self.dnsmasq.service_ip])
        r = yield self.ask(OUTSIDER, dns.reversename.from_address(A_DB), "PTR")
        self.assertEqual(r.answer, [])

    @defer.inlineCallbacks
    def test_several_pods_with_one_alias_all_answer_shuffled(self):
        """Every pod carrying an alias is returned, in varying order."""
        pods = [record(f"w{i}", [NET_A], aliases=["web"], ip=f"127.10.4.{i}", namespace=NS, uid=f"w{i}")
                for i in range(1, 7)]
        self.index.apply([Upserted(p) for p in pods])
        orders = set()
        for _ in range(8):
            r = yield self.ask(A_SVC, "web")
            orders.add(tuple(x.address for x in r.answer[0]))
        self.assertEqual({tuple(sorted(o)) for o in orders}, {tuple(sorted(p.ips[0] for p in pods))})
        self.assertGreater(len(orders), 1)

    @defer.inlineCallbacks
    def test_repeated_questions_are_counted_and_timed_like_the_first(self):
        """A question asked again is answered from prepared bytes inside the UDP port's read loop;
        it still counts as a UDP query, a fast-path and a local answer, and one query in 16 is
        timed, so the metrics a dashboard shows do not depend on which path answered."""
        if not self.fast_path:
            self.skipTest("--no-fast-path: nothing is prepared")
        factory = self.server.dns
        before, timed = factory.counts(), factory.sampler.answers.count
        for _ in range(32):
            r = yield self.ask(B_SVC, "db")
            self.assertEqual(addresses(r), [B_DB])
        after = factory.counts()
        self.assertEqual({k: after[k] - before[k] for k in ("queries_udp", "fast_path", "answered_local")},
                         {"queries_udp": 32, "fast_path": 32, "answered_local": 32})
        self.assertEqual(factory.sampler.answers.count - timed, 32 // factory.sampler.every)

    @defer.inlineCallbacks
    def test_deleted_and_finished_pods_stop_answering(self):
        """Deletion and phase Succeeded remove a pod's names at once."""
        self.index.apply([Deleted("a-db")])
        r = yield self.ask(A_SVC, "db", **{})
        self.assertNotIn(A_DB, addresses(r))
        import dataclasses
        finished = dataclasses.replace(base_pods()[2], phase="Succeeded")
        self.index.apply([Upserted(finished)])
        r = yield self.ask(B_SVC, "db")
        self.assertNotIn(B_DB, addresses(r))


class TruncationTests(DNSServerTestCase):
    def setUp(self):
        super().setUp()
        self.index.apply([Upserted(record(f"m{i}", [NET_A], aliases=["many"], ip=f"127.10.5.{i}",
                                          namespace=NS, uid=f"m{i}")) for i in range(1, 61)])

    @defer.inlineCallbacks
    def test_large_answers_truncate_over_udp_and_travel_whole_over_tcp(self):
        """60 addresses exceed 512 bytes: plain UDP gets TC and no partial records, EDNS with a
        large buffer and TCP get all 60."""
        r = yield self.ask(A_SVC, "many")
        self.assertTrue(r.flags & dns.flags.TC)
        self.assertEqual(r.answer, [])
        r = yield self.ask(A_SVC, "many", use_edns=0, payload=4096)
        self.assertFalse(r.flags & dns.flags.TC)
        self.assertEqual(len(addresses(r)), 60)
        self.assertEqual(r.edns, 0)
        r = yield self.ask(A_SVC, "many", tcp=True)
        self.assertEqual(len(addresses(r)), 60)

    @defer.inlineCallbacks
    def test_small_edns_buffer_is_respected(self):
        """An EDNS buffer below the answer size truncates too (512 is the floor)."""
        r = yield self.ask(A_SVC, "many", use_edns=0, payload=600)
        self.assertTrue(r.flags & dns.flags.TC)


class HoldTests(DNSServerTestCase):
    hold_timeout = 1.5

    def starting(self, name: str, network: str = NET_A, uid: str | None = None) -> None:
        """A pod of ``network`` that will answer to ``name`` once it runs (Pending, no address)."""
        self.index.apply([Upserted(record(name, [network], phase="Pending", namespace=NS, uid=uid or f"start-{name}"))])

    @defer.inlineCallbacks
    def test_a_peer_being_started_is_resolved_by_the_held_question(self):
        """A container that looks up a peer whose pod is being started (not Running yet) gets the
        peer's address as soon as the index learns it, not an error."""
        self.starting("cache", uid="a-cache")
        started = time.monotonic()
        pending = self.ask(A_SVC, f"cache.{NS}.svc.cluster.local")
        yield task.deferLater(reactor, 0.4, lambda: None)
        self.index.apply([Upserted(record("cache", [NET_A], ip="127.10.1.7", namespace=NS, uid="a-cache"))])
        r = yield pending
        self.assertEqual(addresses(r), ["127.10.1.7"])
        self.assertLess(time.monotonic() - started, 1.4)
        self.assertEqual(self.server.dns.counters.held, 1)

    @defer.inlineCallbacks
    def test_a_miss_with_nothing_starting_is_answered_at_once(self):
        """Nothing of the asker's networks will answer to the name: NXDOMAIN (or the upstream's
        answer, for a dotted name) at once, never held, whatever other networks hold or start:
        a name another run uses is answered exactly like one nobody uses."""
        self.starting("queue", network=NET_B)
        for name in ("nobody", "test_db_b", "queue", f"test_db_b.{NS}.svc.cluster.local"):
            r = yield self.ask(A_SVC, name)
            self.assertEqual((r.rcode(), r.answer), (dns.rcode.NXDOMAIN, []), name)
        self.assertEqual(self.server.dns.counters.held, 0)

    @defer.inlineCallbacks
    def test_a_name_that_never_appears_costs_one_hold_not_one_per_suffix(self):
        """A peer that does not start in time: after one bounded hold the name is NXDOMAIN; the
        next search suffixes glibc tries are answered at once."""
        self.starting("ghost")
        started = time.monotonic()
        r = yield self.ask(A_SVC, f"ghost.{NS}.svc.cluster.local")
        first = time.monotonic() - started
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        self.assertGreaterEqual(first, 1.4)
        started = time.monotonic()
        for name in ("ghost.svc.cluster.local", "ghost.cluster.local", "ghost"):
            r = yield self.ask(A_SVC, name)
            self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        self.assertLess(time.monotonic() - started, 1.4)

    @defer.inlineCallbacks
    def test_a_peer_in_another_network_does_not_end_the_hold(self):
        """The name appearing in someone else's network is no answer for this asker."""
        self.starting("late")
        pending = self.ask(A_SVC, "late")
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.index.apply([Upserted(record("late", [NET_B], ip="127.10.2.9", namespace=NS, uid="b-late"))])
        r = yield pending
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(self.server.dns.counters.hold_expired, 1)

    @defer.inlineCallbacks
    def test_unknown_asker_waits_for_its_own_pod_to_get_its_address(self):
        """A pod asking before the index knows its IP is answered from its networks once the
        index does."""
        waiting = record("newbie", [NET_B], phase="Pending", namespace=NS, uid="newbie")
        self.index.apply([Upserted(waiting)])
        pending = self.ask("127.10.2.50", "db")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.index.apply([Upserted(record("newbie", [NET_B], ip="127.10.2.50", namespace=NS, uid="newbie"))])
        r = yield pending
        self.assertEqual(addresses(r), [B_DB])

    @defer.inlineCallbacks
    def test_holds_are_bounded_and_overflow_is_answered_at_once(self):
        """Past the bound on held questions, a question that would be held is decided at once
        (NXDOMAIN) instead of piling up."""
        self.starting("nobody-1")
        self.starting("nobody-2")
        self.server.dns.holds.max_held = 1
        started = time.monotonic()
        first = self.ask(A_SVC, "nobody-1")
        yield task.deferLater(reactor, 0.2, lambda: None)
        second = yield self.ask(A_SVC, "nobody-2")
        self.assertEqual(second.rcode(), dns.rcode.NXDOMAIN)
        self.assertLess(time.monotonic() - started, 1.2)
        self.assertEqual(self.server.dns.counters.hold_overflow, 1)
        r = yield first
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(self.server.dns.holding, 0)

    @defer.inlineCallbacks
    def test_not_synced_index_answers_servfail_after_the_hold(self):
        """Until the first complete list arrives, local answers are unknown: SERVFAIL."""
        self.index.synced = False
        r = yield self.ask(A_SVC, "db")
        self.assertEqual(r.rcode(), dns.rcode.SERVFAIL)


class MissingContainerTests(DNSServerTestCase):
    """Docker's view of a name no container of the asker's networks holds: not found."""

    hold_timeout = 0.5

    def upstream_asked(self, name):
        return [q for q in self.dnsmasq.queries() if q.name.rstrip(".").lower() == name]

    @defer.inlineCallbacks
    def test_removed_container_is_nxdomain_and_no_service_stands_in(self):
        """After ``docker rm -f db`` run A's ``db`` in every search form is NXDOMAIN (AA, after
        one hold), never the namespace's Service ``db`` of the cluster DNS, which is not even
        asked; run B still gets its own ``db``."""
        self.index.apply([Deleted("a-db")])
        decoy = f"db.{NS}.svc.cluster.local"
        for tcp in (False, True):
            for name in (decoy, "db.svc.cluster.local", "db.cluster.local", "db"):
                r = yield self.ask(A_SVC, name, tcp=tcp)
                self.assertEqual((r.rcode(), r.answer), (dns.rcode.NXDOMAIN, []), name)
                self.assertTrue(r.flags & dns.flags.AA)
        self.assertEqual(self.upstream_asked(decoy), [])
        r = yield self.ask(B_SVC, decoy)
        self.assertEqual(addresses(r), [B_DB])
        self.assertEqual(self.server.dns.counters.nxdomain, 8)

    @defer.inlineCallbacks
    def test_terminating_pod_is_not_found_at_once_but_still_asks(self):
        """A pod with a deletion timestamp (kubedock deletes with the default grace period) no
        longer answers: its peers get NXDOMAIN, not its address; it still resolves its peers."""
        import dataclasses
        self.index.apply([Upserted(dataclasses.replace(base_pods()[0], terminating=True))])
        r = yield self.ask(A_SVC, "db")
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN)
        r = yield self.ask(A_SVC, dns.reversename.from_address(A_DB), "PTR")
        self.assertEqual(r.answer, [])
        r = yield self.ask(A_DB, "service")
        self.assertEqual(addresses(r), [A_SVC])

    @defer.inlineCallbacks
    def test_outside_and_multi_label_names_are_still_forwarded(self):
        """Multi-label names are not ours to deny: ``kubernetes.default`` reaches the cluster DNS."""
        r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local")
        self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])

    @defer.inlineCallbacks
    def test_ptr_answers_the_container_name(self):
        """A reverse lookup answers the container's name, as Docker does."""
        self.index.apply([Upserted(record("cache", [NET_A], ip="127.10.1.8", namespace=NS, uid="a-cache",
                                          container_name="/run-a-cache"))])
        r = yield self.ask(A_SVC, dns.reversename.from_address("127.10.1.8"), "PTR")
        self.assertEqual([x.target.to_text() for x in r.answer[0]], ["run-a-cache."])


class MissingContainerFullPathTests(MissingContainerTests):
    """Full path only."""

    fast_path = False


class ForwardSingleLabelTests(DNSServerTestCase):
    hold_timeout = 0.5

    def setUp(self):
        super().setUp()
        self.server.dns.resolver.config = dataclasses.replace(
            self.server.dns.resolver.config, forward_single_label=True)

    @defer.inlineCallbacks
    def test_option_lets_the_namespace_service_answer(self):
        """With --forward-single-label a missing container name falls through to the
        namespace's Service, as the user asked (the risk the option documents)."""
        self.index.apply([Deleted("a-db")])
        r = yield self.ask(A_SVC, f"db.{NS}.svc.cluster.local")
        self.assertEqual(addresses(r), [self.dnsmasq.service_ip])


class UnknownAskerTests(DNSServerTestCase):
    hold_timeout = 1.5

    def setUp(self):
        super().setUp()
        self.index.apply([Upserted(record("newbie", [NET_B], phase="Pending", namespace=NS, uid="newbie"))])

    @defer.inlineCallbacks
    def test_outside_names_wait_for_the_askers_address_then_go_out(self):
        """An unknown source's outside name is held like any name while some pod awaits its IP
        (which names could become local would tell other networks' names): it is answered as soon
        as the source's address is indexed (here: as a pod of B), by the cluster DNS; the same
        name from a source that stays unknown is held once, then forwarded at once."""
        pending = self.ask("127.10.2.50", "kubernetes.default.svc.cluster.local")
        yield task.deferLater(reactor, 0.3, lambda: None)
        started = time.monotonic()
        self.index.apply([Upserted(record("newbie", [NET_B], ip="127.10.2.50", namespace=NS, uid="newbie"))])
        r = yield pending
        self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])
        self.assertLess(time.monotonic() - started, 1.0)
        self.index.apply([Upserted(record("other", [NET_B], phase="Pending", namespace=NS, uid="other"))])
        for _ in range(3):
            r = yield self.ask(OUTSIDER, "kubernetes.default.svc.cluster.local")
            self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])
        counters = self.server.dns.counters
        self.assertEqual((counters.held, counters.hold_expired), (2, 1))

    @defer.inlineCallbacks
    def test_a_name_that_could_become_local_is_held_once_per_asker_and_name(self):
        """``db`` from an unknown source is held once (it may be the pod awaiting its IP); asked
        again, and in its other search forms, it is forwarded at once."""
        started = time.monotonic()
        r = yield self.ask(OUTSIDER, f"db.{NS}.svc.cluster.local")
        self.assertGreaterEqual(time.monotonic() - started, 1.4)
        self.assertEqual(addresses(r), [self.dnsmasq.service_ip])  # a plain forwarder for a non-pod
        for name in (f"db.{NS}.svc.cluster.local", "db.svc.cluster.local", "db"):
            yield self.ask(OUTSIDER, name)
        self.assertEqual(self.server.dns.counters.held, 1)

    @defer.inlineCallbacks
    def test_held_question_is_decided_when_the_askers_ip_is_indexed(self):
        """The moment the pod that awaited its address gets the asker's IP, its held question is
        answered from its network, well before the hold bound."""
        pending = self.ask("127.10.2.50", "db")
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.index.apply([Upserted(record("newbie", [NET_B], ip="127.10.2.50", namespace=NS, uid="newbie"))])
        r = yield pending
        self.assertEqual(addresses(r), [B_DB])
        counters = self.server.dns.counters
        self.assertEqual((counters.held, counters.hold_expired), (1, 0))  # decided, not timed out


class ForwardingTests(DNSServerTestCase):
    @defer.inlineCallbacks
    def test_outside_names_are_relayed_whole(self):
        """The upstream's answer reaches the client unchanged except for nothing at all: same
        rcode, sections and flags as asking the upstream directly."""
        for name in ("kubernetes.default.svc.cluster.local", "nowhere.example"):
            via = yield self.ask(A_SVC, name)
            direct = yield deferToThread(dns.query.udp, dns.message.make_query(name, "A"),
                                         *self.dnsmasq.address[:1], timeout=5, port=self.dnsmasq.port)
            self.assertEqual(via.rcode(), direct.rcode())
            self.assertEqual(via.answer, direct.answer)
            self.assertEqual(via.authority, direct.authority)
            self.assertEqual(via.flags, direct.flags)

    @defer.inlineCallbacks
    def test_forwarding_over_tcp(self):
        """TCP questions are forwarded over TCP."""
        r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local", tcp=True)
        self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])


class FailoverTests(DNSServerTestCase):
    def setUp(self):
        self.servfail = ScriptedUpstream(rcode=2)
        self.refused = ScriptedUpstream(rcode=5)
        self.silent = ScriptedUpstream(silent=True)
        for u in (self.servfail, self.refused, self.silent):
            self.addCleanup(u.close)
        self.upstream_extra = [self.servfail.upstream_arg, self.refused.upstream_arg,
                               closed_port(), self.silent.upstream_arg]
        super().setUp()

    @defer.inlineCallbacks
    def test_servfail_refused_down_and_slow_upstreams_are_skipped(self):
        """Each upstream of the resolv.conf is tried in turn; the working one answers."""
        r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local")
        self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])
        self.assertEqual((self.servfail.received, self.refused.received, self.silent.received), (1, 1, 1))


class UnusableTCPAnswersTests(DNSServerTestCase):
    """Over TCP an upstream's answer is checked as over UDP before it is relayed: one too short to
    carry a header, one to another message ID and one to another question are each the next
    upstream's turn, never the client's answer."""

    def setUp(self):
        def other_question(query: bytes) -> bytes:
            other = dns.message.make_query("elsewhere.example", "A")
            other.id = struct.unpack("!H", query[:2])[0]
            answer = dns.message.make_response(other)
            answer.answer.append(dns.rrset.from_text("elsewhere.example.", 30, "IN", "A", "203.0.113.9"))
            return answer.to_wire()

        def other_id(query: bytes) -> bytes:
            answer = dns.message.make_response(dns.message.from_wire(query))
            answer.id ^= 0x5A5A
            answer.answer.append(dns.rrset.from_text(answer.question[0].name, 30, "IN", "A", "203.0.113.8"))
            return answer.to_wire()

        self.bad = [ScriptedTCPUpstream(lambda query: b"\x00"), ScriptedTCPUpstream(other_id),
                    ScriptedTCPUpstream(other_question)]
        for upstream in self.bad:
            self.addCleanup(upstream.close)
        self.upstream_extra = [upstream.upstream_arg for upstream in self.bad]
        super().setUp()

    @defer.inlineCallbacks
    def test_short_foreign_and_mismatched_answers_move_on_to_the_next_upstream(self):
        r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local", tcp=True)
        self.assertEqual(r.rcode(), dns.rcode.NOERROR)
        self.assertEqual(addresses(r), [self.dnsmasq.kubernetes_ip])
        self.assertEqual([upstream.received for upstream in self.bad], [1, 1, 1])


class AllUpstreamsFailTests(DNSServerTestCase):
    def setUp(self):
        self.bad = ScriptedUpstream(rcode=2)
        self.addCleanup(self.bad.close)
        super().setUp()
        self.server.dns.forwarder.upstreams = (parse_upstream(self.bad.upstream_arg),
                                                    parse_upstream(closed_port()))

    @defer.inlineCallbacks
    def test_servfail_when_every_upstream_fails_never_nxdomain(self):
        """Failure is SERVFAIL (retryable), not a cacheable NXDOMAIN."""
        r = yield self.ask(A_SVC, "kubernetes.default.svc.cluster.local")
        self.assertEqual(r.rcode(), dns.rcode.SERVFAIL)


class OverloadTests(DNSServerTestCase):
    max_forwards = 2

    def setUp(self):
        self.silent = ScriptedUpstream(silent=True)
        self.addCleanup(self.silent.close)
        super().setUp()
        self.server.dns.forwarder.upstreams = (parse_upstream(self.silent.upstream_arg),)
        self.server.dns.max_forwards_per_asker = 100  # the global bound alone (ForwardShareTests: the share)

    @defer.inlineCallbacks
    def test_too_many_forwards_in_flight_are_refused(self):
        """Past the bound on forwarded queries in flight, new ones get REFUSED at once."""
        results = yield defer.gatherResults([self.ask(A_SVC, f"x{i}.example") for i in range(6)])
        rcodes = sorted(r.rcode() for r in results)
        self.assertEqual(rcodes.count(dns.rcode.REFUSED), 4)
        self.assertEqual(rcodes.count(dns.rcode.SERVFAIL), 2)
        self.assertEqual(self.server.dns.forwarder.refused_overload, 4)


class ForwardShareTests(DNSServerTestCase):
    max_forwards = 8  # a share of 2 per asker

    def setUp(self):
        self.silent = ScriptedUpstream(silent=True)
        self.addCleanup(self.silent.close)
        super().setUp()
        self.server.dns.forwarder.upstreams = (parse_upstream(self.silent.upstream_arg),)

    @defer.inlineCallbacks
    def test_one_asker_cannot_take_every_forward(self):
        """An asker flooding outside names that take long to answer holds at most half of
        --max-forwards (a quarter before they are counted per asker, a quarter after): its own
        questions past that are REFUSED at once, and another pod's outside names are still
        forwarded (here: SERVFAIL when the silent upstream times out), never REFUSED."""
        flood = [self.ask(A_SVC, f"x{i}.example") for i in range(10)]
        yield task.deferLater(reactor, 0.2, lambda: None)
        other = yield defer.gatherResults([self.ask(B_SVC, f"y{i}.example") for i in range(2)])
        flooded = yield defer.gatherResults(flood)
        self.assertEqual(sorted(r.rcode() for r in flooded).count(dns.rcode.REFUSED), 6)
        self.assertEqual([r.rcode() for r in other], [dns.rcode.SERVFAIL] * 2)
        self.assertEqual((self.server.dns.forwarding, self.server.dns.forwarder.refused_overload), (0, 0))


class IdleTCPTests(DNSServerTestCase):
    def setUp(self):
        from kubedock_dns.dns.server import QueryStreamProtocol

        self.patch(QueryStreamProtocol, "IDLE_SECONDS", 0.5)
        super().setUp()

    @defer.inlineCallbacks
    def test_idle_tcp_connections_are_closed_by_the_server(self):
        """A TCP client that connects and stays silent is disconnected (RFC 7766)."""
        def idle_client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                started = time.monotonic()
                return s.recv(1), time.monotonic() - started
        data, waited = yield deferToThread(idle_client)
        self.assertEqual(data, b"")
        self.assertLess(waited, 3)


class MalformedInputTests(DNSServerTestCase):
    def exchange_then_probe(self, source, payloads, tcp=False):
        """Send ``payloads`` and then a good query (ID 0xBEEF) on one socket or connection; the
        replies received up to and including the good query's.  The server reads one socket in
        order, so a reply to any payload would arrive before the probe's: a list holding only
        the probe's reply proves the payloads got none, with no waiting for silence."""
        probe = dns.message.make_query("db", "A")
        probe.id = 0xBEEF
        messages = [*payloads, probe.to_wire()]

        def exchange():
            family = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
            replies = []
            with socket.socket(socket.AF_INET, family) as s:
                s.bind((source, 0))
                s.settimeout(10.0)
                if tcp:
                    s.connect(("127.0.0.1", self.port))
                    s.sendall(b"".join(struct.pack("!H", len(m)) + m for m in messages))
                    stream = s.makefile("rb")
                    while not replies or replies[-1][:2] != b"\xbe\xef":
                        length = struct.unpack("!H", stream.read(2))[0]
                        replies.append(stream.read(length))
                    return replies
                for m in messages:
                    s.sendto(m, ("127.0.0.1", self.port))
                while not replies or replies[-1][:2] != b"\xbe\xef":
                    replies.append(s.recv(65535))
                return replies
        return deferToThread(exchange)

    @defer.inlineCallbacks
    def test_malformed_packets_get_rfc_answers_or_silence_and_never_crash(self):
        """Short garbage and responses are dropped (over UDP and TCP); other opcodes get NOTIMP;
        two questions or a broken question get FORMERR (over UDP and TCP); the server keeps
        answering afterwards."""
        good = dns.message.make_query("db", "A")
        good.id = 0x1234
        wire = good.to_wire()
        response = wire[:2] + bytes([wire[2] | 0x80]) + wire[3:]
        for tcp in (False, True):
            replies = yield self.exchange_then_probe(A_SVC, [b"\x01\x02\x03", response,
                                                             b"\x00\x07" + b"\xff" * 30], tcp=tcp)
            self.assertEqual(len(replies), 1, f"a dropped message was answered (tcp={tcp}): {replies}")
            self.assertEqual(addresses(dns.message.from_wire(replies[0])), [A_DB])
        status = wire[:2] + bytes([(wire[2] & 0x87) | (2 << 3)]) + wire[3:]
        reply = yield self.raw(A_SVC, status)
        self.assertEqual((reply[:2], reply[3] & 0xF, reply[2] & 0x80), (b"\x12\x34", 4, 0x80))
        two = wire[:4] + b"\x00\x02" + wire[6:]
        cut = wire[:-3]
        loop = wire[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"
        for tcp in (False, True):
            for broken in (two, cut, loop):
                reply = yield self.raw(A_SVC, broken, tcp=tcp)
                self.assertIsNotNone(reply, f"no FORMERR for {broken!r} (tcp={tcp})")
                self.assertEqual((reply[:2], reply[3] & 0xF, reply[2] & 0x80), (b"\x12\x34", 1, 0x80),
                                 f"{broken!r} (tcp={tcp})")
        r = yield self.ask(A_SVC, "db")
        self.assertEqual(addresses(r), [A_DB])


# The same behaviour through the full twisted.names path alone (no wire fast path).
for _case in (LocalAnswersTests, TruncationTests, MalformedInputTests, ForwardingTests):
    _name = _case.__name__.replace("Tests", "FullPathTests")
    globals()[_name] = type(_name, (_case,), {"fast_path": False, "__doc__": "Full path only."})
del _case, _name
