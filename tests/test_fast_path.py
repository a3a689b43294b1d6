"""The wire fast path gives byte-identical answers to the full twisted.names path.

Random topologies and random queries (names in every form glibc sends, all three types, with and
without EDNS, any case) go through both; wherever the fast path answers, its bytes must equal the
full path's, and it must actually answer the common cases.
"""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.reversename
from hypothesis import event, given, settings
from hypothesis import strategies as st

import dataclasses

from kubedock_dns.contract import Deleted, Relisted, Upserted, WatchInterrupted
from kubedock_dns.index import NetworkIndex
from kubedock_dns.resolver import Resolver, ResolverConfig
from kubedock_dns.dns.server import KubedockDNSServerFactory
from kubedock_dns.dns.fastpath import ENTRY_OVERHEAD, FORWARD, FastPath, _size
from tests.podfactory import network_id, record


class CapturingTransport:
    connected = True

    def __init__(self):
        self.written = []

    def write(self, data, addr=None):
        self.written.append(data)


class Proto:
    def __init__(self):
        self.transport = CapturingTransport()

    def sendString(self, data):  # TCP: the length prefix is the protocol's business
        self.transport.written.append(data)


class NoClock:
    def seconds(self):
        return 0.0

    def callLater(self, *a, **k):  # holds are not compared: the fast path never holds
        raise AssertionError("the differential test only compares immediate answers")


class HoldTimer:
    def active(self):
        return True

    def cancel(self):
        pass


class HoldingClock(NoClock):
    """A reactor clock that lets the full path hold a question (and never ends the hold): the
    reference says "held" instead of raising."""

    def __init__(self):
        self.held = 0

    def callLater(self, *a, **k):
        self.held += 1
        return HoldTimer()


class RecordingForwarder:
    """Stands in for the upstream relay: only whether the full path relayed matters here."""

    max_in_flight = 1024
    in_flight = 0

    def __init__(self):
        self.forwarded = []

    def forward_udp(self, data, relay, failed, context):
        self.forwarded.append(data)

    def forward(self, data, over_tcp=False):
        from twisted.internet.defer import Deferred

        self.forwarded.append(data)
        return Deferred()


HELD = "held by the full path"


def full_path_outcome(resolver, wire, host, tcp):
    """What the reference (the full twisted.names path, no fast path) does with the query: the
    reply's bytes, FORWARD, HELD, or None when it drops it."""
    clock, forwarder = HoldingClock(), RecordingForwarder()
    full = KubedockDNSServerFactory(clock, resolver, forwarder=forwarder)
    proto = Proto()
    if tcp:
        full.message_received(wire, proto, host)
    else:
        full.datagram_received(wire, proto, (host, 5353))
    if forwarder.forwarded:
        return FORWARD
    if clock.held:
        return HELD
    if not proto.transport.written:
        return None
    [reply] = proto.transport.written
    return reply


def keep_order(values):
    pass


NETS = [network_id(f"n{i}") for i in range(3)]
NAMES = ["db", "service", "cache", "web"]


@st.composite
def topologies(draw):
    pods = []
    for i in range(draw(st.integers(1, 10))):
        ips = [f"10.1.0.{i + 1}"]
        if draw(st.booleans()):
            ips.append(f"fd00::{i + 1:x}")
        pods.append(record(draw(st.sampled_from(NAMES)), draw(st.lists(st.sampled_from(NETS), min_size=1, max_size=2, unique=True)),
                           aliases=draw(st.lists(st.sampled_from(NAMES), max_size=2)), ips=ips,
                           uid=f"p{i}", namespace="ns", deleting=draw(st.sampled_from([False, False, True])),
                           container_name=draw(st.sampled_from([None, f"/run-{i}", f"/run_{i}"]))))
    return pods


def random_case(draw_name, rng):
    return "".join(c.upper() if rng.random() < 0.3 else c for c in draw_name)


@st.composite
def queries(draw, pods):
    qtype = draw(st.sampled_from(["A", "AAAA", "PTR", "MX"]))
    if qtype == "PTR":
        name = dns.reversename.from_address(draw(st.sampled_from([ip for p in pods for ip in p.ips] + ["10.9.9.9"]))).to_text()
    else:
        base = draw(st.sampled_from(NAMES + ["example.com", "ghost", f"run-{draw(st.integers(0, 9))}"]))
        suffix = draw(st.sampled_from(["", ".ns.svc.cluster.local", ".svc.cluster.local", ".cluster.local", "."]))
        name = base + suffix
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    edns = draw(st.sampled_from([False, 0]))
    message = dns.message.make_query(name, qtype, use_edns=edns, payload=draw(st.sampled_from([512, 1232, 4096])),
                                     want_dnssec=edns is not False and draw(st.booleans()))
    message.id = draw(st.integers(0, 65535))
    if draw(st.booleans()):
        message.flags &= ~0x0100  # RD off
    return message.to_wire()


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_fast_path_bytes_equal_full_path_bytes(data):
    """For random topologies and queries, every fast-path answer equals the full path's bytes
    (also as a server with the fast path sends it for a datagram), every question it relays the
    full path relays too, and it does answer: a live pod asking for its own name is a fast-path
    hit in every topology (a fast path that never answered would pass the comparisons alone)."""
    pods = data.draw(topologies())
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    resolver = Resolver(index, ResolverConfig(), shuffle=keep_order)
    fast = FastPath(resolver, NoClock().seconds, shuffle=keep_order)
    served = KubedockDNSServerFactory(NoClock(), resolver, forwarder=None, fast_path=fast)
    questions = [(data.draw(queries(pods)), data.draw(st.sampled_from([ip for p in pods for ip in p.ips])),
                  data.draw(st.booleans())) for _ in range(20)]
    live = [p for p in pods if not p.terminating]
    if live:
        own = data.draw(st.sampled_from(live))
        wire = dns.message.make_query(own.names[0], "A").to_wire()
        reply = fast.answer(wire, own.ips[0], False)
        assert isinstance(reply, bytes), (own, reply)
        assert addresses_in(reply) and own.ips[0] in addresses_in(reply)
        questions.append((wire, own.ips[0], False))
    hits = 0
    for wire, source, tcp in questions:
        reply = fast.answer(wire, source, tcp)
        if reply is None:
            continue
        assert full_path_outcome(resolver, wire, source, tcp) == reply, (wire, source)
        if reply is FORWARD:
            continue
        hits += 1
        if not tcp:
            proto = Proto()
            served.datagram_received(wire, proto, (source, 5353))
            assert proto.transport.written == [reply], (wire, source)
    assert hits >= 1 or not live
    event(f"fast path answered {min(hits, 5)}+ of {len(questions)}")


def addresses_in(reply):
    return [r.address for rrset in dns.message.from_wire(reply).answer for r in rrset]


def test_fast_path_answers_the_common_cases():
    """A, AAAA and PTR from a known asker, with and without EDNS, are answered by the fast path;
    unusual queries are left to the full path."""
    pods = [record("db", [NETS[0]], ips=["10.1.0.1", "fd00::1"], uid="db", namespace="ns"),
            record("app", [NETS[0]], ip="10.1.0.2", uid="app", namespace="ns")]
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    for name, qtype in (("db.ns.svc.cluster.local", "A"), ("db", "AAAA"), ("1.0.1.10.in-addr.arpa", "PTR")):
        for edns in (False, 0):
            wire = dns.message.make_query(name, qtype, use_edns=edns).to_wire()
            reply = fast.answer(wire, "10.1.0.2", False)
            assert isinstance(reply, bytes)
            assert dns.message.from_wire(reply).answer
    assert fast.answer(dns.message.make_query("example.com", "A").to_wire(), "10.1.0.2", False) is FORWARD
    assert fast.answer(dns.message.make_query("db", "MX").to_wire(), "10.1.0.2", False) is None


def test_not_found_and_held_names_are_left_to_the_full_path():
    """NXDOMAIN (a single-label name no network of the asker holds) and held questions are the
    full path's: the fast path never forwards them, so no Service can answer in their place."""
    pods = [record("app", [NETS[0]], ip="10.1.0.2", uid="app", namespace="ns"),
            record("lonely", [], ip="10.1.0.3", uid="lonely", namespace="ns"),
            record("gone", [NETS[0]], ip="10.1.0.4", uid="gone", namespace="ns", deleting=True)]
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    resolver = Resolver(index, ResolverConfig())
    fast = FastPath(resolver, NoClock().seconds)
    for source, name in (("10.1.0.3", "db"), ("10.1.0.3", "db.ns.svc.cluster.local"),
                         ("10.1.0.2", "gone"), ("10.1.0.2", "db.svc.cluster.local")):
        wire = dns.message.make_query(name, "A").to_wire()
        assert fast.answer(wire, source, False) is None, (source, name)
        full = KubedockDNSServerFactory(NoClock(), resolver, forwarder=None)
        if source == "10.1.0.3":  # nothing can become local: decided at once, NXDOMAIN
            proto = Proto()
            full.datagram_received(wire, proto, (source, 5353))
            [reply] = proto.transport.written
            assert dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN
    assert fast.answer(dns.message.make_query("db", "A").to_wire() + b"junk", "10.1.0.2", False) is None


CHURN_IPS = [f"10.1.0.{i}" for i in range(1, 7)] + ["fd00::1"]
CHURN_NAMES = NAMES + ["api.internal"]  # a dotted name: "some network holds it" matters


@st.composite
def churn_pods(draw, uid):
    phase = draw(st.sampled_from(["Pending", "Running", "Running", "Running", "Succeeded"]))
    ips = draw(st.lists(st.sampled_from(CHURN_IPS), max_size=2, unique=True))
    return dataclasses.replace(
        record(draw(st.sampled_from(CHURN_NAMES)), draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True)),
               aliases=draw(st.lists(st.sampled_from(CHURN_NAMES), max_size=2)), ips=ips, uid=uid,
               namespace=draw(st.sampled_from(["ns", "other"])), phase=phase),
        terminating=draw(st.booleans()) and phase == "Running",
        ready=draw(st.booleans()),
        # Testcontainers sessions: a session's sshd answers host.testcontainers.internal.
        session=draw(st.sampled_from(["", "s1", "s2"])),
        image=draw(st.sampled_from(["busybox", "testcontainers/sshd:1.4.0"])),
    )


@st.composite
def churn_queries(draw):
    qtype = draw(st.sampled_from(["A", "AAAA", "PTR"]))
    if qtype == "PTR":
        name = dns.reversename.from_address(draw(st.sampled_from(CHURN_IPS + ["10.9.9.9"]))).to_text()
    else:
        base = draw(st.sampled_from(CHURN_NAMES + ["example.com", "db." + NETS[1][:12],
                                                   "host.testcontainers.internal"]))
        name = base + draw(st.sampled_from(["", ".ns.svc.cluster.local", ".svc.cluster.local"]))
    wire = dns.message.make_query(name, qtype, use_edns=draw(st.sampled_from([False, 0]))).to_wire()
    return wire, draw(st.sampled_from(CHURN_IPS + ["10.9.9.9"])), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_cached_answers_follow_every_index_change(data):
    """Under random churn (phases, addresses shared by two pods, networks, names, deletions, pods
    awaiting their address or otherwise not answering yet, relists, a watch losing changes,
    Testcontainers sessions and their sshd pods), with budgets small enough to evict, every answer
    the fast path gives from its cache is what the full path (the reference) does now: the same
    bytes, or a relay where it relays; and whatever it gives, a fast path with nothing cached gives
    the same (a stale "full path decides" costs no correctness, but the cache must still not
    outlive a change).  A change drops every entry it can affect."""
    uids = [f"p{i}" for i in range(6)]
    pods = {uid: data.draw(churn_pods(uid)) for uid in uids[:3]}
    index = NetworkIndex(require_ready=data.draw(st.booleans()))
    index.apply([Relisted(tuple(pods.values()))])
    resolver = Resolver(index, ResolverConfig(), shuffle=keep_order)
    # Small budgets sometimes, so that evictions interleave with invalidations.
    budget = data.draw(st.sampled_from([(1 << 25, 1 << 18), (6000, 2500)]))
    fast = FastPath(resolver, NoClock().seconds, shuffle=keep_order, max_bytes=budget[0], max_asker_bytes=budget[1])
    asked = data.draw(st.lists(churn_queries(), min_size=5, max_size=15))

    def check_against_the_references():
        fresh = FastPath(resolver, NoClock().seconds, shuffle=keep_order)  # nothing cached
        for wire, host, tcp in asked:
            cached = fast.answer(wire, host, tcp)
            assert cached == fresh.answer(wire, host, tcp), (wire, host, tcp)
            if cached is not None:
                assert cached == full_path_outcome(resolver, wire, host, tcp), (wire, host, tcp)

    for _ in range(data.draw(st.integers(1, 8))):
        check_against_the_references()
        kind = data.draw(st.sampled_from(["upsert", "upsert", "delete", "relist", "interrupt"]))
        if kind == "interrupt":
            index.apply([WatchInterrupted()])
        elif kind == "upsert":
            uid = data.draw(st.sampled_from(uids))
            pods[uid] = data.draw(churn_pods(uid))
            index.apply([Upserted(pods[uid])])
        elif kind == "delete" and pods:
            uid = data.draw(st.sampled_from(sorted(pods)))
            del pods[uid]
            index.apply([Deleted(uid)])
        else:
            kept = data.draw(st.lists(st.sampled_from(uids), unique=True))
            pods = {uid: pods.get(uid) or data.draw(churn_pods(uid)) for uid in kept}
            index.apply([Relisted(tuple(pods.values()))])
    check_against_the_references()
    assert fast.bytes == sum(ENTRY_OVERHEAD + len(k[2]) + _size(v) for k, v in fast.replies.items()) <= budget[0]
    assert set(fast._facts) == set(fast.replies)
    assert all(key in fast.replies for keys in fast._dependents.values() for key in keys)


def test_a_change_keeps_the_answers_of_other_networks_askers():
    """A pod changing in one network drops only the cached answers of that network's askers;
    an asker in another network keeps its prepared answers."""
    pods = [record("db", [NETS[0]], ip="10.1.0.1", uid="db0", namespace="ns"),
            record("app", [NETS[0]], ip="10.1.0.2", uid="app0", namespace="ns"),
            record("db", [NETS[1]], ip="10.1.1.1", uid="db1", namespace="ns"),
            record("app", [NETS[1]], ip="10.1.1.2", uid="app1", namespace="ns")]
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    query = dns.message.make_query("db.ns.svc.cluster.local", "A").to_wire()
    for asker in ("10.1.0.2", "10.1.1.2"):
        fast.answer(query, asker, False)
    index.apply([Upserted(dataclasses.replace(pods[2], ips=("10.1.1.9",)))])
    assert fast.invalidated == 1
    assert dns.message.from_wire(fast.answer(query, "10.1.1.2", False)).answer[0][0].address == "10.1.1.9"
    assert dns.message.from_wire(fast.answer(query, "10.1.0.2", False)).answer[0][0].address == "10.1.0.1"


def test_a_second_claim_on_an_answer_address_drops_that_answer():
    """A pod in another network taking over an answering pod's address turns that answer into a
    conflict (SERVFAIL from the full path): the cached answer must not outlive it."""
    pods = [record("db", [NETS[0]], ip="10.1.0.1", uid="db0", namespace="ns"),
            record("app", [NETS[0]], ip="10.1.0.2", uid="app0", namespace="ns")]
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    query = dns.message.make_query("db", "A").to_wire()
    assert isinstance(fast.answer(query, "10.1.0.2", False), bytes)
    index.apply([Upserted(record("intruder", [NETS[1]], ip="10.1.0.1", uid="intruder", namespace="ns"))])
    assert fast.answer(query, "10.1.0.2", False) is None  # the full path answers SERVFAIL


def test_a_dotted_name_elsewhere_stays_forwarded_one_starting_here_is_held():
    """A dotted name no network of the asker holds is forwarded, and stays forwarded when another
    network starts holding it (that network's names are none of the asker's business); once a pod
    of the asker's own network will answer to it, the cached FORWARD goes (the question is held)."""
    pods = [record("app", [NETS[0]], ip="10.1.0.2", uid="app0", namespace="ns")]
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    query = dns.message.make_query("api.internal", "A").to_wire()
    assert fast.answer(query, "10.1.0.2", False) is FORWARD
    index.apply([Upserted(record("api.internal", [NETS[1]], ip="10.1.1.1", uid="api", namespace="ns"))])
    assert fast.answer(query, "10.1.0.2", False) is FORWARD and fast.invalidated == 0
    index.apply([Upserted(record("api.internal", [NETS[0]], phase="Pending", uid="api0", namespace="ns"))])
    assert fast.answer(query, "10.1.0.2", False) is None  # held by the full path


def many_pods(count: int = 100):
    """``count`` pods in 50 networks, each asking from its own address."""
    nets = [network_id(f"mem{i}") for i in range(50)]
    return [record("db", [nets[i % 50]], ip=f"10.1.{i // 250}.{i % 250 + 1}", uid=f"p{i}", namespace="ns")
            for i in range(count)]


def everyday_queries() -> list[bytes]:
    return [dns.message.make_query(name, qtype, use_edns=edns).to_wire()
            for name in ("db", "db.ns.svc.cluster.local", "ghost.example.com", "x.example")
            for qtype in ("A", "AAAA") for edns in (False, 0)]


def test_the_byte_count_covers_what_kept_entries_hold():
    """The fast path's own byte count of its kept entries (the bound is stated in it) is no less
    than the memory they take, measured with tracemalloc (every structure the entries keep alive:
    keys, replies, fact lists and sets, the per-asker index), and not far above it."""
    import gc
    import tracemalloc

    pods = many_pods()
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    queries = everyday_queries()
    hosts = [p.ips[0] for p in pods] + [f"10.2.0.{i}" for i in range(1, 100)]  # pods, and strangers
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for host in hosts:
            for query in queries:
                fast.answer(query, "".join(list(host)), False)  # a fresh string per query, as recvfrom gives
        gc.collect()
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(fast.replies) > 2000
    assert measured <= fast.bytes <= 2 * measured, (measured, fast.bytes, len(fast.replies))


def test_one_askers_questions_never_push_out_another_askers_answers():
    """110,000 different forwarded names from one address (more entries than the old count bound
    of 100,000, which then emptied the whole cache) leave another pod's prepared answer in place;
    the flooding address holds at most its share, and the whole at most the budget."""
    pods = many_pods(2)
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds)
    warm = dns.message.make_query("db", "A").to_wire()
    assert isinstance(fast.answer(warm, pods[0].ips[0], False), bytes)
    flooder = pods[1].ips[0]
    for i in range(110_000):
        assert fast.answer(dns.message.make_query(f"x{i}.example", "A").to_wire(), flooder, False) is FORWARD
    assert (pods[0].ips[0], False, warm[2:]) in fast.replies
    own = sum(1 for key in fast.replies if key[0] == flooder)
    assert 0 < own * ENTRY_OVERHEAD <= fast.max_asker_bytes
    assert fast.bytes <= fast.max_bytes and fast.evicted > 0


def test_past_the_whole_budget_the_first_askers_go_first():
    """With a budget of a few shares, askers beyond it push out the askers that stored first, a
    share at a time; the count never passes the budget and the newest askers stay warm."""
    pods = many_pods(60)
    index = NetworkIndex()
    index.apply([Relisted(tuple(pods))])
    fast = FastPath(Resolver(index, ResolverConfig()), NoClock().seconds, max_bytes=40 * 1024,
                    max_asker_bytes=8 * 1024)
    queries = everyday_queries()
    for pod in pods:
        for query in queries:
            fast.answer(query, pod.ips[0], False)
            assert fast.bytes <= fast.max_bytes
    kept = {key[0] for key in fast.replies}
    assert pods[-1].ips[0] in kept and pods[0].ips[0] not in kept
    assert fast.bytes == sum(ENTRY_OVERHEAD + len(key[2]) + _size(value) for key, value in fast.replies.items())
