"""The network index: membership rules of DESIGN section 3, table by table."""

from __future__ import annotations

import dataclasses

import pytest

from kubedock_dns.contract import Deleted, Relisted, Upserted
from kubedock_dns.index import Conflict, NetworkIndex, reverse_name_to_ip
from tests.podfactory import network_id, record

NET_A, NET_B = network_id("a"), network_id("b")


def index_with(*records) -> NetworkIndex:
    index = NetworkIndex()
    index.apply([Relisted(tuple(records))])
    return index


@pytest.mark.parametrize(
    "phase, ip, host_network, asks, answers",
    [
        ("Running", "10.0.0.1", False, True, True),
        ("Pending", "10.0.0.1", False, True, False),
        ("Pending", None, False, False, False),
        ("Succeeded", "10.0.0.1", False, False, False),
        ("Failed", "10.0.0.1", False, False, False),
        ("Unknown", "10.0.0.1", False, False, False),
        ("Running", "10.0.0.1", True, False, False),
    ],
)
def test_membership_by_phase(phase, ip, host_network, asks, answers):
    """A pod asks from Pending-with-IP on and answers only once Running; finished and
    hostNetwork pods do neither."""
    index = index_with(record("db", [NET_A], ip=ip, phase=phase, host_network=host_network))
    assert (index.asker("10.0.0.1") is not None) == asks
    assert (index.lookup((NET_A,), "db") is not None) == answers


def test_pending_pod_without_ip_is_counted_as_awaiting():
    """An opted-in pod still waiting for its address is known to be coming."""
    index = index_with(record("db", [NET_A], phase="Pending"))
    assert index.pods_awaiting_ip == 1
    index.apply([Relisted(())])
    assert index.pods_awaiting_ip == 0


def test_terminating_pod_no_longer_answers_but_still_asks():
    """A pod with a deletion timestamp is no longer answered for (``docker rm`` removes the name
    at once; kubedock deletes with the default grace period), but it still asks from its address
    until it is gone."""
    index = index_with(record("db", [NET_A], ip="10.0.0.1", deleting=True),
                       record("app", [NET_A], ip="10.0.0.2"))
    assert index.lookup((NET_A,), "db") is None
    assert index.reverse((NET_A,), "10.0.0.1") is None
    assert index.answers_later((NET_A,), "db") is None  # and never will again
    assert index.asker("10.0.0.1").networks == (NET_A,)
    assert index.lookup(index.asker("10.0.0.1").networks, "app").addresses == ("10.0.0.2",)


def test_names_that_cannot_be_dns_names_are_skipped_and_listed():
    """A container name longer than 63 characters or an alias such as ``db:5432`` is not indexed
    (the pod's other names are) and the networks view lists it with the reason."""
    long_name = "c" * 70
    pod = record("db", [NET_A], aliases=["db:5432", "postgres"], ip="10.0.0.1",
                 container_name="/" + long_name, container_id="0123456789ab")
    index = index_with(pod)
    assert pod.names == ("db", "postgres", "0123456789ab")
    assert index.lookup((NET_A,), "postgres").addresses == ("10.0.0.1",)
    assert index.lookup((NET_A,), "db:5432") is None
    [member] = index.describe()["networks"][NET_A]
    refused = {r["name"]: r["reason"] for r in member["refused_names"]}
    assert set(refused) == {"db:5432", long_name}
    assert "kubedock.hostalias/1" in refused["db:5432"]
    assert "70 characters" in refused[long_name] and "kubedock.containername" in refused[long_name]


def test_reverse_name_is_the_container_name_when_it_is_a_dns_name():
    """PTR answers carry the container's name (Docker's answer) where it is a valid DNS name,
    else the hostname (``hostalias/0``)."""
    index = index_with(record("db", [NET_A], ip="10.0.0.1", container_name="/run-a-DB"),
                       record("web", [NET_A], ip="10.0.0.2", container_name="/run_a_web"),
                       record("api", [NET_A], ip="10.0.0.3"),
                       record("long", [NET_A], ip="10.0.0.4", container_name="/" + "l" * 64))
    assert index.reverse((NET_A,), "10.0.0.1") == "run-a-db"
    assert index.reverse((NET_A,), "10.0.0.2") == "run_a_web"
    assert index.reverse((NET_A,), "10.0.0.3") == "api"
    assert index.reverse((NET_A,), "10.0.0.4") == "long"


def test_unresolved_networks_are_left_out_of_every_pod():
    """A network named as never resolved (kubedock's default ``bridge``, by full ID or 12-hex
    prefix) holds no names, and its members ask as if they were not in it."""
    bridge = NET_B
    for spelling in (bridge, bridge[:12].upper()):
        index = NetworkIndex(unresolved_networks=[spelling])
        index.apply([Relisted((record("a", [bridge], ip="10.0.0.1"),
                               record("b", [bridge, NET_A], ip="10.0.0.2"),
                               record("c", [NET_A], ip="10.0.0.3")))])
        assert index.asker("10.0.0.1").networks == ()
        assert index.asker("10.0.0.2").networks == (NET_A,)
        assert index.lookup((bridge,), "a") is None
        assert index.lookup((NET_A,), "b").addresses == ("10.0.0.2",)
        assert bridge not in index.describe()["networks"]


def test_finished_pod_ip_reused_in_other_network_never_leaks_old_name():
    """The IP of a Succeeded pod handed to a new pod in another network resolves only the new
    pod's names, and the new pod asks from its own networks."""
    old = record("db", [NET_A], ip="10.0.0.7")
    asker_a = record("client", [NET_A], ip="10.0.0.8")
    index = index_with(old, asker_a)
    index.apply([Upserted(dataclasses.replace(old, phase="Succeeded"))])
    new = record("cache", [NET_B], ip="10.0.0.7")
    index.apply([Upserted(new)])
    assert index.lookup((NET_A,), "db") is None
    assert index.reverse((NET_A,), "10.0.0.7") is None
    assert index.asker("10.0.0.7").networks == (NET_B,)
    assert index.reverse((NET_B,), "10.0.0.7") == "cache"


def test_two_live_pods_claiming_one_ip_conflict():
    """Two live pods on one address: neither is answered nor served, until one goes."""
    first = record("db", [NET_A], ip="10.0.0.9")
    second = record("db", [NET_B], ip="10.0.0.9", phase="Pending")
    index = index_with(first, second)
    with pytest.raises(Conflict):
        index.asker("10.0.0.9")
    with pytest.raises(Conflict):
        index.lookup((NET_A,), "db")
    with pytest.raises(Conflict):
        index.reverse((NET_A,), "10.0.0.9")
    assert index.conflicted_addresses() == ["10.0.0.9"]
    index.apply([Deleted(second.uid)])
    assert index.asker("10.0.0.9").networks == (NET_A,)
    assert index.lookup((NET_A,), "db").addresses == ("10.0.0.9",)


def test_dual_stack_pod_asks_and_answers_on_both_families():
    """Every address in status.podIPs counts, IPv4-mapped IPv6 included as IPv4."""
    pod = record("db", [NET_A], ips=["10.0.0.1", "fd00::1"])
    index = index_with(pod)
    assert index.asker("fd00::1").uid == pod.uid
    assert index.asker("10.0.0.1").uid == pod.uid
    assert sorted(index.lookup((NET_A,), "db").addresses) == ["10.0.0.1", "fd00::1"]
    mapped = record("cache", [NET_B], ip="::ffff:10.0.0.2")
    assert mapped.ips == ("10.0.0.2",)


def test_pod_in_two_networks_is_found_from_both():
    """A pod in two networks answers askers of either network."""
    index = index_with(record("db", [NET_A, NET_B], ip="10.0.0.1"))
    assert index.lookup((NET_A,), "db").addresses == ("10.0.0.1",)
    assert index.lookup((NET_B,), "db").addresses == ("10.0.0.1",)


def test_first_network_of_asker_wins_without_merging():
    """An asker in several networks gets the name from the first network (annotation order)
    that has it, not a merge."""
    index = index_with(record("db", [NET_A], ip="10.0.0.1"), record("db", [NET_B], ip="10.0.0.2"))
    assert index.lookup((NET_B, NET_A), "db").addresses == ("10.0.0.2",)
    assert index.lookup((NET_A, NET_B), "db").addresses == ("10.0.0.1",)


def test_two_pods_sharing_an_alias_both_answer():
    """Docker returns every container carrying an alias."""
    index = index_with(
        record("web1", [NET_A], aliases=["web"], ip="10.0.0.1"),
        record("web2", [NET_A], aliases=["web"], ip="10.0.0.2"),
    )
    assert sorted(index.lookup((NET_A,), "web").addresses) == ["10.0.0.1", "10.0.0.2"]


def test_container_name_and_short_id_resolve_like_aliases():
    """The container name (leading '/' dropped) and the short ID are names too; names are
    case-insensitive."""
    index = index_with(record("pod-x", [NET_A], hostname="Db", container_name="/My_DB",
                              container_id="0123456789ab", ip="10.0.0.1"))
    for name in ("db", "my_db", "0123456789ab"):
        assert index.lookup((NET_A,), name).addresses == ("10.0.0.1",)
    assert index.reverse((NET_A,), "10.0.0.1") == "my_db"  # the container name, as Docker answers


def test_network_reachable_by_full_and_short_id():
    """``name.<network>`` works with the 12-character short ID of a 64-hex network ID."""
    index = index_with(record("db", [NET_A], ip="10.0.0.1"))
    assert index.lookup_in_network((NET_A,), NET_A[:12], "db").addresses == ("10.0.0.1",)
    assert index.lookup_in_network((NET_B,), NET_A[:12], "db") is None


def test_relist_removes_pods_missing_from_the_list_and_marks_synced():
    """A relist after an outage replaces the whole state."""
    gone = record("db", [NET_A], ip="10.0.0.1")
    kept = record("svc", [NET_A], ip="10.0.0.2")
    index = NetworkIndex()
    assert not index.synced
    index.apply([Relisted((gone, kept))])
    index.apply([Relisted((kept,))])
    assert index.synced
    assert index.lookup((NET_A,), "db") is None
    assert index.asker("10.0.0.1") is None
    assert index.lookup((NET_A,), "svc").addresses == ("10.0.0.2",)


def test_update_moving_a_pod_between_networks_leaves_nothing_behind():
    """A changed record replaces the old one entirely."""
    pod = record("db", [NET_A], ip="10.0.0.1")
    index = index_with(pod)
    index.apply([Upserted(dataclasses.replace(pod, networks=(NET_B,)))])
    assert index.lookup((NET_A,), "db") is None
    assert index.lookup((NET_B,), "db").addresses == ("10.0.0.1",)
    assert index.describe()["networks"].keys() == {NET_B}


def test_require_ready_option_waits_for_readiness():
    """With --require-ready a Running but unready pod does not answer yet."""
    index = NetworkIndex(require_ready=True)
    index.apply([Relisted((record("db", [NET_A], ip="10.0.0.1", ready=False),))])
    assert index.lookup((NET_A,), "db") is None


def test_subscribers_hear_of_every_apply_after_it_is_done():
    """Subscribers are told once per apply, after every change of the batch is in the index:
    the first sync touches everything, a later pod its own address and networks."""
    index = NetworkIndex()
    heard = []
    index.subscribe(lambda touched: heard.append((touched, index.lookup((NET_A,), "db"))))
    index.apply([Relisted(())])
    index.apply([Upserted(record("db", [NET_A], ip="10.0.0.1", uid="db"))])
    [(first, _), (second, found)] = heard
    assert first.everything
    assert not second.everything and second.addresses == {"10.0.0.1"} and second.networks == {NET_A}
    assert found is not None  # the pod is indexed when the subscriber runs


def test_ten_thousand_pods_in_five_thousand_networks():
    """At scale, every asker sees exactly its own network's db, and one update touches only
    its own entries."""
    records = []
    for n in range(5000):
        net = network_id(f"net{n}")
        records.append(record("db", [net], ip=f"10.{n // 250}.{n % 250}.1", uid=f"db{n}"))
        records.append(record("svc", [net], ip=f"10.{n // 250}.{n % 250}.2", uid=f"svc{n}"))
    index = index_with(*records)
    assert len(index) == 10000
    for n in (0, 1234, 4999):
        asker = index.asker(f"10.{n // 250}.{n % 250}.2")
        assert index.lookup(asker.networks, "db").addresses == (f"10.{n // 250}.{n % 250}.1",)
    def entries() -> dict:
        return {(network, name): uids for network, names in index._names.items() for name, uids in names.items()}

    before = entries()
    index.apply([Deleted("db7")])
    after = entries()
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {(network_id("net7"), "db")}


@pytest.mark.parametrize(
    "name, ip",
    [
        ("1.0.0.10.in-addr.arpa", "10.0.0.1"),
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", "fd00::1"),
        ("0.10.in-addr.arpa", None),
        ("01.0.0.10.in-addr.arpa", None),
        ("256.0.0.10.in-addr.arpa", None),
        ("x.0.0.10.in-addr.arpa", None),
    ],
)
def test_reverse_names(name, ip):
    """PTR names map to the address they stand for; anything else is not a reverse name."""
    assert reverse_name_to_ip(name.split(".")) == ip


def test_subscribers_learn_what_an_apply_touched():
    """A pod's change names its addresses and networks, and nothing of the networks it is not
    in."""
    db = record("db", [NET_A], ip="10.0.0.1", uid="db")
    other = record("svc", [NET_B], ip="10.0.0.9", uid="svc")
    index = index_with(db, other)
    seen: list = []
    index.subscribe(seen.append)
    index.apply([Upserted(dataclasses.replace(db, names=("db", "cache.local")))])
    (touched,) = seen
    assert touched.addresses == {"10.0.0.1"}
    assert touched.networks == {NET_A}
    assert not touched.awaiting and not touched.everything


def test_a_shared_address_touches_the_networks_of_every_claimant():
    """When a second pod claims an address, the first pod's answers turn into a conflict: its
    networks are touched too, although the first pod did not change."""
    db = record("db", [NET_A], ip="10.0.0.1", uid="db")
    index = index_with(db)
    seen: list = []
    index.subscribe(seen.append)
    index.apply([Upserted(record("intruder", [NET_B], ip="10.0.0.1", uid="intruder"))])
    assert seen[-1].networks == {NET_A, NET_B}
    index.apply([Deleted("intruder")])
    assert seen[-1].networks == {NET_A, NET_B}


def test_awaiting_and_sync_are_touched_when_they_change():
    """The first pod of a namespace awaiting its address, and the first full list, are named."""
    index = NetworkIndex()
    seen: list = []
    index.subscribe(seen.append)
    index.apply([Relisted(())])
    assert seen[-1].everything
    index.apply([Upserted(record("new", [NET_A], phase="Pending", uid="new"))])
    assert seen[-1].awaiting and not seen[-1].everything
    index.apply([Upserted(record("new2", [NET_A], phase="Pending", uid="new2"))])
    assert not seen[-1].awaiting  # same namespace: nothing an unknown asker sees changed
    index.apply([Relisted(())])
    assert seen[-1].awaiting and not seen[-1].everything


def test_a_change_no_answer_reads_touches_nothing():
    """Readiness flips (without require_ready) keep every answer: nothing is touched, but the
    networks view shows the new record."""
    db = record("db", [NET_A], ip="10.0.0.1", uid="db")
    index = index_with(db)
    seen: list = []
    index.subscribe(seen.append)
    index.apply([Upserted(dataclasses.replace(db, ready=not db.ready))])
    assert not (seen[-1].addresses or seen[-1].networks)
    assert next(index.pods()).ready is not db.ready
    strict = NetworkIndex(require_ready=True)
    strict.apply([Relisted((db,))])
    strict.subscribe(seen.append)
    strict.apply([Upserted(dataclasses.replace(db, ready=not db.ready))])
    assert seen[-1].networks == {NET_A}


def test_pods_that_will_answer_soon_are_known_per_network_and_name():
    """A pod that does not answer yet but will (Pending, with or without an address) is found
    under each of its names in each of its networks, and leaves that map (touching its networks)
    when it starts answering, finishes or is deleted."""
    index = index_with(record("app", [NET_B], ip="10.0.1.2", uid="app"))
    seen: list = []
    index.subscribe(seen.append)
    late = record("db", [NET_A, NET_B], aliases=["db.internal"], phase="Pending", uid="late")
    index.apply([Upserted(late)])
    assert seen[-1].networks == {NET_A, NET_B}
    assert index.answers_later((NET_B,), "db.internal") == NET_B
    assert index.answers_later((NET_A, NET_B), "db") == NET_A
    assert index.answers_later_in_network((NET_B,), NET_B[:12], "db") == NET_B
    assert index.answers_later((NET_B,), "app") is None
    index.apply([Upserted(dataclasses.replace(late, ips=("10.0.1.9",)))])  # an address, still Pending
    assert index.answers_later((NET_B,), "db") == NET_B
    index.apply([Upserted(dataclasses.replace(late, ips=("10.0.1.9",), phase="Running"))])
    assert seen[-1].networks == {NET_A, NET_B}
    assert index.answers_later((NET_B,), "db") is None and index.lookup((NET_B,), "db").addresses == ("10.0.1.9",)
    index.apply([Upserted(dataclasses.replace(late, phase="Pending", uid="late2")), Deleted("late2")])
    assert index.answers_later((NET_A, NET_B), "db") is None


def test_a_lost_watch_puts_the_index_behind_until_the_next_list():
    """WatchInterrupted marks the index behind (every decision may change: everything touched
    once), more of them change nothing, and the next Relisted catches it up (everything again)."""
    from kubedock_dns.contract import WatchInterrupted

    index = index_with(record("app", [NET_A], ip="10.0.1.2", uid="app"))
    seen: list = []
    index.subscribe(seen.append)
    index.apply([WatchInterrupted()])
    assert index.behind and seen[-1].everything
    index.apply([WatchInterrupted()])
    assert index.behind and not seen[-1].everything
    index.apply([Relisted(tuple(index.pods()))])
    assert not index.behind and seen[-1].everything
