"""Held questions wait on the facts their decision read (dns/holds.py), on a memory clock.

A held question is decided again when the index touches one of its facts (its asker's address,
networks, the name), exactly the facts that keep the fast path's cache; a change anywhere else
leaves it waiting, and the hold bound ends it either way.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from kubedock_dns.contract import Relisted, Upserted
from kubedock_dns.dns.holds import Holds
from kubedock_dns.dns.query import Query
from kubedock_dns.index import NetworkIndex
from kubedock_dns.resolver import Answer, Hold, NotFound, Resolver, ResolverConfig
from tests.podfactory import network_id, record

NET_A, NET_B = network_id("holds-a"), network_id("holds-b")


class Setting:
    def __init__(self, max_held: int = 4096) -> None:
        self.clock = Clock()
        self.index = NetworkIndex()
        # db and cache are being started in network A (Pending, no address yet): app's questions
        # for them are held until they run.
        self.index.apply([Relisted((record("app", [NET_A], ip="10.0.0.2", uid="app", namespace="ns"),
                                    record("other", [NET_B], ip="10.0.1.2", uid="other", namespace="ns"),
                                    record("db", [NET_A], phase="Pending", uid="db-a", namespace="ns"),
                                    record("cache", [NET_A], phase="Pending", uid="cache-a", namespace="ns")))])
        self.resolver = Resolver(self.index, ResolverConfig(hold_seconds=1.5))
        self.decided: list[tuple[str, object]] = []
        self.decisions = 0
        real_decide = self.resolver.decide

        def counting_decide(*args, **kwargs):
            self.decisions += 1
            return real_decide(*args, **kwargs)

        self.resolver.decide = counting_decide  # type: ignore[method-assign]
        self.expired = 0
        self.holds = Holds(self.clock, self.resolver, lambda q, d: self.decided.append((q.name, d)),
                           self._expired, max_held)

    def _expired(self) -> None:
        self.expired += 1

    def ask(self, source: str, name: str) -> None:
        query = Query(b"", None, (source, 5353), source)
        query.source_ip, query.name, query.qtype = source, name, 1
        first = self.resolver.decide(source, name, 1, now=self.clock.seconds())
        assert isinstance(first, Hold), first
        self.holds.hold(query, first)


def test_a_held_name_is_answered_when_its_pod_appears_in_the_askers_network():
    """app (network A) asks for db while db is being started in A: held; db running answers it
    at once."""
    s = Setting()
    s.ask("10.0.0.2", "db")
    assert len(s.holds) == 1 and s.decided == []
    s.index.apply([Upserted(record("db", [NET_A], ip="10.0.0.1", uid="db-a", namespace="ns"))])
    [(name, decision)] = s.decided
    assert name == "db" and isinstance(decision, Answer) and decision.values == ("10.0.0.1",)
    assert len(s.holds) == 0 and s.expired == 0
    s.clock.advance(5)
    assert len(s.decided) == 1  # the bound's timer was cancelled: no second decision


def test_changes_elsewhere_do_not_decide_a_held_question_again():
    """Pods starting in another network, db among them, re-decide nothing: the question reads
    network A only."""
    s = Setting()
    s.ask("10.0.0.2", "db")
    before = s.decisions
    for i in range(5):
        s.index.apply([Upserted(record(f"web{i}", [NET_B], ip=f"10.0.1.{10 + i}", uid=f"web{i}", namespace="ns"))])
    s.index.apply([Upserted(record("db", [NET_B], ip="10.0.1.1", uid="db-b", namespace="ns"))])
    assert s.decisions == before and s.decided == [] and len(s.holds) == 1
    # Positive control: a pod starting in A touches network A, so the question is decided again;
    # A's db is still starting, so it stays held.
    s.index.apply([Upserted(record("web", [NET_A], ip="10.0.0.5", uid="web-a", namespace="ns"))])
    assert s.decisions == before + 1 and s.decided == [] and len(s.holds) == 1


def test_the_bound_ends_a_hold_with_the_decision_after_the_hold():
    """db does not start in time: after hold_seconds the single-label name is NXDOMAIN, the
    expiry is counted, and (asker, name) is remembered so the next search form is not held again."""
    s = Setting()
    s.ask("10.0.0.2", "db")
    s.clock.advance(1.4)
    assert s.decided == []
    s.clock.advance(0.2)
    [(name, decision)] = s.decided
    assert isinstance(decision, NotFound) and s.expired == 1 and len(s.holds) == 0
    assert s.resolver.misses.recently_missed(("10.0.0.2", "db"), s.clock.seconds())
    # A later change touching db reaches no leftover entry.
    s.index.apply([Upserted(record("db", [NET_A], ip="10.0.0.1", uid="db-a", namespace="ns"))])
    assert len(s.decided) == 1


def test_an_unknown_asker_is_decided_when_its_own_address_is_indexed():
    """A pod asks before the watcher delivered its address: held while an opted-in pod waits for
    its IP; once the index gives that pod this address, the question is decided from its
    networks (it asked for db, which is in A)."""
    s = Setting()
    s.index.apply([Upserted(record("db", [NET_A], ip="10.0.0.1", uid="db-a", namespace="ns")),
                   Upserted(record("late", [NET_A], ip=None, uid="late", namespace="ns", phase="Pending"))])
    s.ask("10.0.0.7", "db")
    assert s.decided == []
    s.index.apply([Upserted(record("late", [NET_A], ip="10.0.0.7", uid="late", namespace="ns"))])
    [(name, decision)] = s.decided
    assert isinstance(decision, Answer) and decision.values == ("10.0.0.1",)


def test_full_is_reported_at_the_bound():
    """``full`` says when the bound on held questions is reached (the server then decides at once)."""
    s = Setting(max_held=2)
    s.ask("10.0.0.2", "db")
    assert not s.holds.full
    s.ask("10.0.0.2", "cache")
    assert s.holds.full


def test_one_asker_cannot_take_every_hold():
    """An address asking many questions that would be held (here an unknown one while a pod
    awaits its address) holds at most max_held_per_asker of them: past that its own questions
    are decided at once, while another asker's question is still held."""
    s = Setting(max_held=100)
    s.index.apply([Upserted(record("late", [NET_B], ip=None, uid="late", namespace="ns", phase="Pending"))])
    for i in range(s.holds.max_held_per_asker):
        s.ask("10.9.9.9", f"name{i}")
    assert s.holds.full_for("10.9.9.9") and not s.holds.full
    assert not s.holds.full_for("10.0.0.2")
    s.ask("10.0.0.2", "db")
    assert len(s.holds) == s.holds.max_held_per_asker + 1
    s.clock.advance(2)
    assert len(s.holds) == 0 and not s.holds.full_for("10.9.9.9")
