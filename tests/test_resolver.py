"""Resolver decisions (DESIGN section 4), from the asker's address and the question alone."""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kubedock_dns.contract import Relisted
from kubedock_dns.index import NetworkIndex
from kubedock_dns.resolver import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_PTR,
    Answer,
    Forward,
    Hold,
    NotFound,
    Resolver,
    ResolverConfig,
    ServFail,
)
from tests.podfactory import network_id, record

TYPE_MX = 15
NET_A, NET_B = network_id("a"), network_id("b")


def resolver_with(*records, synced=True, **config) -> Resolver:
    index = NetworkIndex()
    if synced:
        index.apply([Relisted(tuple(records))])
    return Resolver(index, ResolverConfig(**config))


def two_runs() -> Resolver:
    return resolver_with(
        record("db", [NET_A], ip="10.0.1.1", namespace="ci"),
        record("service", [NET_A], ip="10.0.1.2", namespace="ci"),
        record("db", [NET_B], ip="10.0.2.1", namespace="ci"),
        record("service", [NET_B], ip="10.0.2.2", namespace="ci"),
    )


def test_each_run_resolves_its_own_db():
    """Same hostnames in two networks: each asker gets its own network's pod."""
    r = two_runs()
    assert r.decide("10.0.1.2", "db", TYPE_A) == Answer(TYPE_A, ("10.0.1.1",), NET_A)
    assert r.decide("10.0.2.2", "db", TYPE_A) == Answer(TYPE_A, ("10.0.2.1",), NET_B)


def test_cluster_search_suffixes_are_stripped():
    """glibc's search-suffixed forms resolve locally and never fall through to a Service."""
    r = two_runs()
    for name in ("db.ci.svc.cluster.local", "db.svc.cluster.local", "db.cluster.local"):
        assert r.decide("10.0.2.2", name, TYPE_A).values == ("10.0.2.1",)
    assert isinstance(r.decide("10.0.2.2", "db.other.svc.cluster.local", TYPE_A), Forward)


def test_name_dot_network_selects_that_network_only_if_asker_is_in_it():
    """``db.<short network id>`` resolves in that network, and only for its members."""
    r = two_runs()
    assert r.decide("10.0.1.2", f"db.{NET_A[:12]}", TYPE_A).values == ("10.0.1.1",)
    assert isinstance(r.decide("10.0.1.2", f"db.{NET_B[:12]}", TYPE_A), Forward)


def test_nodata_for_missing_family_and_other_types():
    """A known name without an address of the asked family, or any other type, is NODATA."""
    r = two_runs()
    assert r.decide("10.0.1.2", "db", TYPE_AAAA) == Answer(TYPE_AAAA, (), NET_A)
    assert r.decide("10.0.1.2", "db", TYPE_MX) == Answer(TYPE_MX, (), NET_A)


def test_ptr_only_within_the_askers_networks():
    """Reverse lookups answer the primary name for members, and are forwarded otherwise."""
    r = two_runs()
    assert r.decide("10.0.1.2", "1.1.0.10.in-addr.arpa", TYPE_PTR) == Answer(TYPE_PTR, ("db",))
    assert isinstance(r.decide("10.0.1.2", "1.2.0.10.in-addr.arpa", TYPE_PTR), Forward)


def test_unknown_asker_is_plainly_forwarded():
    """A pod that is not ours gets the upstream's answers, never a network's names."""
    r = two_runs()
    assert isinstance(r.decide("10.9.9.9", "db", TYPE_A), Forward)


def test_unknown_asker_is_held_while_an_opted_in_pod_awaits_its_ip():
    """The asker may be a pod whose address the index has not seen yet."""
    r = resolver_with(record("db", [NET_A], phase="Pending"))
    assert isinstance(r.decide("10.9.9.9", "db", TYPE_A), Hold)
    assert isinstance(r.decide("10.9.9.9", "db", TYPE_A, held=True), Forward)


def test_not_synced_is_not_not_found():
    """Before the first complete list, questions wait, then get SERVFAIL."""
    r = resolver_with(synced=False)
    assert isinstance(r.decide("10.0.1.2", "db", TYPE_A), Hold)
    assert isinstance(r.decide("10.0.1.2", "db", TYPE_A, held=True), ServFail)


def test_a_name_a_peer_will_answer_to_soon_is_held_once_then_not_found():
    """A pod of the asker's network that will answer to ``cache`` (Pending, no address yet)
    holds the question; if it does not start in time the name is NXDOMAIN in every search form,
    after one hold per asker (not one per search suffix): never forwarded, so no Service of the
    namespace can stand in for the missing container."""
    r = resolver_with(*two_runs().index.pods(), record("cache", [NET_A], phase="Pending", namespace="ci"))
    first = r.decide("10.0.1.2", "cache.ci.svc.cluster.local", TYPE_A, now=100.0)
    assert isinstance(first, Hold)
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A, held=True, now=101.5), NotFound)
    r.misses.remember(first.miss_key, 101.5)
    for name in ("cache.svc.cluster.local", "cache.cluster.local", "cache"):
        assert isinstance(r.decide("10.0.1.2", name, TYPE_A, now=101.6), NotFound), name
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A, now=200.0), Hold)


def test_a_name_nothing_of_the_askers_networks_will_answer_to_is_not_found_at_once():
    """Nothing of the asker's networks carries ``cache`` and the watch is current: NXDOMAIN at
    once in every search form, as Docker answers (no hold: a test checking that a name is absent
    does not wait)."""
    r = two_runs()
    for name in ("cache.ci.svc.cluster.local", "cache.svc.cluster.local", "cache.cluster.local", "cache"):
        assert isinstance(r.decide("10.0.1.2", name, TYPE_A, now=100.0), NotFound), name


def test_removed_container_name_is_not_found_not_forwarded():
    """After ``docker rm -f db`` the name ``db`` is NXDOMAIN at once for the run that had it,
    whatever search form glibc sends, while the other run still resolves its own ``db``."""
    r = two_runs()
    db_a = next(p for p in r.index.pods() if p.names[0] == "db" and p.networks == (NET_A,))
    from kubedock_dns.contract import Deleted
    r.index.apply([Deleted(db_a.uid)])
    for name in ("db", "db.ci.svc.cluster.local", "db.svc.cluster.local", "db.cluster.local"):
        assert isinstance(r.decide("10.0.1.2", name, TYPE_A), NotFound), name
        assert isinstance(r.decide("10.0.1.2", name, TYPE_AAAA), NotFound), name
    assert r.decide("10.0.2.2", "db", TYPE_A).values == ("10.0.2.1",)


def test_option_lets_single_label_names_through_to_the_cluster_dns():
    """With ``forward_single_label`` a missing single-label name goes to the cluster DNS (where
    a namespace Service may answer it): at once, or after the hold when a peer will answer to it."""
    r = resolver_with(record("service", [NET_A], ip="10.0.1.2", namespace="ci"),
                      record("cache", [NET_A], phase="Pending", namespace="ci"), forward_single_label=True)
    assert isinstance(r.decide("10.0.1.2", "db", TYPE_A), Forward)
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A), Hold)
    assert isinstance(r.decide("10.0.1.2", "cache.ci.svc.cluster.local", TYPE_A, held=True), Forward)


def test_asker_on_no_network_gets_not_found_without_holding():
    """A pod on no (resolved) network can have no local names: nothing is held; single-label
    names are NXDOMAIN (no Service stands in), other names are forwarded."""
    r = resolver_with(record("lonely", [], ip="10.0.3.1"), record("db", [NET_A], ip="10.0.1.1"))
    assert isinstance(r.decide("10.0.3.1", "db", TYPE_A), NotFound)
    assert isinstance(r.decide("10.0.3.1", "db.svc.cluster.local", TYPE_A), NotFound)
    assert isinstance(r.decide("10.0.3.1", "example.com", TYPE_A), Forward)


def test_default_bridge_network_resolves_nothing():
    """On a network named as never resolved (kubedock's ``bridge``), as on Docker's default
    bridge, containers do not resolve each other; a second, user-defined network still does."""
    bridge = network_id("bridge")
    index = NetworkIndex(unresolved_networks=[bridge])
    index.apply([Relisted((record("a", [bridge], ip="10.0.4.1"), record("b", [bridge], ip="10.0.4.2"),
                           record("c", [bridge, NET_A], ip="10.0.4.3"),
                           record("d", [NET_A], ip="10.0.4.4")))])
    r = Resolver(index, ResolverConfig())
    assert isinstance(r.decide("10.0.4.1", "b", TYPE_A), NotFound)
    assert isinstance(r.decide("10.0.4.1", "2.4.0.10.in-addr.arpa", TYPE_PTR), Forward)
    assert isinstance(r.decide("10.0.4.3", "a", TYPE_A), NotFound)
    assert r.decide("10.0.4.3", "d", TYPE_A).values == ("10.0.4.4",)
    assert r.decide("10.0.4.4", "c", TYPE_A).values == ("10.0.4.3",)


def test_ptr_answers_the_container_name():
    """Reverse lookups answer the container's name (Docker's answer) when it is a valid DNS
    name, else the hostname."""
    r = resolver_with(record("db", [NET_A], ip="10.0.1.1", container_name="/run_a_db"),
                      record("app", [NET_A], ip="10.0.1.2", container_name="/app:latest"))
    assert r.decide("10.0.1.2", "1.1.0.10.in-addr.arpa", TYPE_PTR) == Answer(TYPE_PTR, ("run_a_db",))
    assert r.decide("10.0.1.1", "2.1.0.10.in-addr.arpa", TYPE_PTR) == Answer(TYPE_PTR, ("app",))


def test_terminating_pod_is_not_found_but_still_asks():
    """A pod being deleted is no longer answered for, while it still resolves its peers."""
    r = resolver_with(record("db", [NET_A], ip="10.0.1.1", deleting=True),
                      record("app", [NET_A], ip="10.0.1.2"))
    assert isinstance(r.decide("10.0.1.2", "db", TYPE_A, held=True), NotFound)
    assert r.decide("10.0.1.1", "app", TYPE_A).values == ("10.0.1.2",)


def test_unknown_asker_is_held_once_per_name_whatever_the_name():
    """While a pod awaits its address, an unknown asker may be that pod: each of its questions
    is held once per (asker, name), outside names and names no network holds alike (which names
    could become local would tell other networks' names), then forwarded at once; with no pod
    awaiting its address it is a plain forwarder."""
    r = resolver_with(record("db", [NET_A], aliases=["db.internal"], ip="10.0.1.1", namespace="ci"),
                      record("late", [NET_A], phase="Pending", namespace="ci"))
    asked = [("example.com", TYPE_A), ("kubernetes.default.svc.cluster.local", TYPE_A),
             ("cache.ci.svc.cluster.local", TYPE_A), ("db.internal", TYPE_A), ("nothing.internal", TYPE_A),
             ("1.1.0.10.in-addr.arpa", TYPE_PTR), ("4.3.2.1.in-addr.arpa", TYPE_PTR)]
    for name, qtype in asked:
        first = r.decide("10.9.9.9", name, qtype, now=10.0)
        assert isinstance(first, Hold) and first.reason == "unknown asker while opted-in pods wait for their address"
        r.misses.remember(first.miss_key, 11.5)
        again = r.decide("10.9.9.9", name, qtype, now=12.0)
        assert isinstance(again, Forward) and not again.cacheable, name
    for other_suffix in ("cache", "cache.svc.cluster.local"):  # one hold per name, not per suffix
        assert isinstance(r.decide("10.9.9.9", other_suffix, TYPE_A, now=12.0), Forward)
    plain = resolver_with(record("db", [NET_A], aliases=["db.internal"], ip="10.0.1.1", namespace="ci"))
    for name, qtype in asked:
        assert plain.decide("10.9.9.9", name, qtype) == Forward("asker is not a known pod"), name


def test_how_a_miss_is_decided_does_not_depend_on_other_networks():
    """The timing oracle: whether another network holds a name (or has a pod that will answer
    to it soon) changes nothing for an asker outside that network: the same decision, at once,
    as for a name nobody holds."""
    quiet = resolver_with(record("app", [NET_A], ip="10.0.1.2", namespace="ci"))
    busy = resolver_with(record("app", [NET_A], ip="10.0.1.2", namespace="ci"),
                         record("secret.db", [NET_B], aliases=["vault"], ip="10.0.2.1", namespace="ci"),
                         record("starting.db", [NET_B], aliases=["queue"], phase="Pending", namespace="ci"))
    for name in ("secret.db", "vault", "starting.db", "queue", "vault.ci.svc.cluster.local",
                 f"vault.{NET_B[:12]}", "nothing.db", "nothing"):
        for qtype in (TYPE_A, TYPE_AAAA):
            decided = busy.decide("10.0.1.2", name, qtype)
            assert decided == quiet.decide("10.0.1.2", name, qtype), name
            assert isinstance(decided, (NotFound, Forward)), (name, decided)
        assert busy.dependencies("10.0.1.2", name, TYPE_A) == [("address", "10.0.1.2"), ("network", NET_A)]


def test_held_only_while_a_pod_of_the_askers_networks_will_answer_soon():
    """A pod of the asker's networks that does not answer yet but will (Pending without or with
    an address, not Ready with require_ready) holds a question for any of its names, dotted
    aliases and ``name.<network>`` included; a pod being deleted never answers again, so it
    holds nothing."""
    for late, config in ((record("cache", [NET_A], aliases=["cache.internal"], phase="Pending", namespace="ci"), {}),
                         (record("cache", [NET_A], aliases=["cache.internal"], phase="Pending", ip="10.0.1.9",
                                 namespace="ci"), {}),
                         (record("cache", [NET_A], aliases=["cache.internal"], ip="10.0.1.9", ready=False,
                                 namespace="ci"), {"require_ready": True})):
        index = NetworkIndex(require_ready=config.get("require_ready", False))
        index.apply([Relisted((record("app", [NET_A], ip="10.0.1.2", namespace="ci"), late))])
        r = Resolver(index, ResolverConfig())
        for name in ("cache", "cache.ci.svc.cluster.local", "cache.internal", f"cache.{NET_A[:12]}"):
            assert isinstance(r.decide("10.0.1.2", name, TYPE_A), Hold), (name, late.phase)
        assert isinstance(r.decide("10.0.1.2", "other", TYPE_A), NotFound)
    r = resolver_with(record("app", [NET_A], ip="10.0.1.2", namespace="ci"),
                      record("cache", [NET_A], phase="Pending", deleting=True, namespace="ci"))
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A), NotFound)


def test_a_watch_that_lost_changes_holds_misses_until_the_next_list():
    """After the watch failed (changes may be missing), a miss of a container name is held (it
    may be about to appear), for a known asker and an unknown one alike; the next complete list
    ends that."""
    from kubedock_dns.contract import WatchInterrupted

    r = two_runs()
    pods = tuple(r.index.pods())
    r.index.apply([WatchInterrupted()])
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A), Hold)
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A, held=True), NotFound)
    assert isinstance(r.decide("10.9.9.9", "cache", TYPE_A), Hold)
    # Dotted names are outside names nearly always: forwarded at once, behind or not.
    assert isinstance(r.decide("10.0.1.2", "example.com", TYPE_A), Forward)
    r.index.apply([Relisted(pods)])
    assert isinstance(r.decide("10.0.1.2", "cache", TYPE_A), NotFound)
    assert isinstance(r.decide("10.9.9.9", "cache", TYPE_A), Forward)


def test_outside_names_are_forwarded_without_holding():
    """Multi-label names (example.com, Services) are not held: outside lookups stay fast."""
    r = two_runs()
    assert isinstance(r.decide("10.0.1.2", "example.com", TYPE_A), Forward)
    assert isinstance(r.decide("10.0.1.2", "kubernetes.default.svc.cluster.local", TYPE_A), Forward)
    assert isinstance(r.decide("10.0.1.2", "kubernetes.default", TYPE_A, held=True), Forward)


def test_conflicting_asker_gets_servfail():
    """Two live pods on the asker's address: nobody's networks are revealed."""
    r = resolver_with(record("a", [NET_A], ip="10.0.0.5"), record("b", [NET_B], ip="10.0.0.5"))
    assert isinstance(r.decide("10.0.0.5", "a", TYPE_A), ServFail)


def test_multiple_addresses_are_shuffled():
    """Several pods carrying one name come back in varying order (Docker shuffles)."""
    pods = [record(f"w{i}", [NET_A], aliases=["web"], ip=f"10.0.0.{i}") for i in range(1, 9)]
    r = resolver_with(record("client", [NET_A], ip="10.0.0.100"), *pods)
    orders = {r.decide("10.0.0.100", "web", TYPE_A).values for _ in range(20)}
    assert len(orders) > 1
    assert all(sorted(o) == sorted(p.ips[0] for p in pods) for o in orders)


names = st.sampled_from(["db", "service", "cache", "web", "api"])
nets = st.sampled_from([network_id(f"n{i}") for i in range(4)])


@st.composite
def topologies(draw):
    pods = []
    for i in range(draw(st.integers(1, 12))):
        pod_nets = draw(st.lists(nets, min_size=0, max_size=3, unique=True))
        pods.append(record(
            draw(names), pod_nets, aliases=draw(st.lists(names, max_size=2)),
            ip=f"10.0.0.{i + 1}", phase=draw(st.sampled_from(["Running", "Running", "Pending", "Succeeded"])),
            uid=f"p{i}",
        ))
    return pods


def expected_decision(pods, asker, qname, qtype):
    """The reference model of a decision after the hold, written from docs/design.md's Docker
    table and independent of the index: a name resolves in the first of the asker's networks
    (annotation order) where a Running pod carries it, to every such pod's address; a name no
    network of the asker holds is NXDOMAIN (single labels only here); a reverse name is answered
    with the name of the Running pod at that address in one of the asker's networks, else
    forwarded.  ``(kind, values)``: ("answer", values as a set), ("nxdomain", None) or
    ("forward", None)."""
    running = [p for p in pods if p.phase == "Running"]
    if qtype == TYPE_PTR:
        address = ".".join(reversed(qname.split(".")[:4]))
        owners = [p for p in running if address in p.ips and set(p.networks) & set(asker.networks)]
        return ("answer", {owners[0].reverse_name}) if owners else ("forward", None)
    for network in asker.networks:
        carriers = [p for p in running if network in p.networks and qname in p.names]
        if carriers:
            return "answer", {ip for p in carriers for ip in p.ips}
    return "nxdomain", None


@settings(max_examples=300, deadline=None)
@given(topologies(), st.sampled_from([TYPE_A, TYPE_PTR]), names)
def test_every_decision_matches_the_reference_model(pods, qtype, name):
    """For random pods, networks and aliases, every asker gets exactly what the reference model
    says: its own networks' addresses and names when some network of its holds them (a resolver
    that said "not found" to everything, or that answered across networks, fails here), NXDOMAIN
    or forwarding otherwise; never an address or a name of a pod that shares none of its
    networks."""
    r = resolver_with(*pods)
    askers = [p for p in pods if p.phase in ("Running", "Pending") and p.ips]
    answered = 0
    for asker in askers:
        for target in pods:
            qname = name if qtype == TYPE_A else ".".join(reversed(target.ips[0].split("."))) + ".in-addr.arpa"
            decision = r.decide(asker.ips[0], qname, qtype, held=True)
            kind, values = expected_decision(pods, asker, qname, qtype)
            if kind == "answer":
                assert isinstance(decision, Answer) and set(decision.values) == values, (asker, qname, decision)
                answered += 1
            elif kind == "nxdomain":
                assert isinstance(decision, NotFound), (asker, qname, decision)
            else:
                assert isinstance(decision, Forward), (asker, qname, decision)
    event(f"answered: {min(answered, 3)}+")


def test_the_reference_model_sees_answers_crossing_networks():
    """The model itself can tell right from wrong: the asker's own db is an answer, another
    network's db is not (so the property test above is not vacuous)."""
    pods = [record("db", [NET_A], ip="10.0.0.1", uid="a"), record("app", [NET_A], ip="10.0.0.2", uid="b"),
            record("db", [NET_B], ip="10.0.0.3", uid="c"), record("lone", [NET_B], ip="10.0.0.4", uid="d")]
    assert expected_decision(pods, pods[1], "db", TYPE_A) == ("answer", {"10.0.0.1"})
    assert expected_decision(pods, pods[3], "db", TYPE_A) == ("answer", {"10.0.0.3"})
    assert expected_decision(pods, pods[1], "lone", TYPE_A) == ("nxdomain", None)
    assert expected_decision(pods, pods[1], "3.0.0.10.in-addr.arpa", TYPE_PTR) == ("forward", None)


def test_the_memory_of_held_names_is_bounded_in_bytes():
    """An asker inventing long names cannot grow the memory of held names past its byte bound:
    the oldest pairs go first, the newest are still remembered."""
    from kubedock_dns.resolver import MissMemory

    memory = MissMemory(30, 65536, max_bytes=1 << 20)
    for i in range(20_000):
        memory.remember(("10.0.0.1", f"{i}-" + "x" * 240), now=0.0)
    assert memory.bytes <= 1 << 20
    assert len(memory._expiry) * 240 < 1 << 20
    assert memory.recently_missed(("10.0.0.1", "19999-" + "x" * 240), 1.0)
    assert not memory.recently_missed(("10.0.0.1", "0-" + "x" * 240), 1.0)
