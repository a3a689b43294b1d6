"""Questions held until the index can answer them, or until their bound passes.

A question the resolver answers with :class:`~kubedock_dns.resolver.Hold` waits here.  It is
decided again when the index touches one of the facts its decision read
(:meth:`Resolver.dependencies <kubedock_dns.resolver.Resolver.dependencies>`, the same facts
that keep the fast path's cached answers, in the vocabulary of
:class:`~kubedock_dns.index.Touched`), not on every change: with many questions held, a change
in one network re-decides only the questions that could read it.  After ``hold_seconds`` the
question is decided as if it had been held to the end (``held=True``) and its (asker, name) is
remembered, so the next form of the name glibc tries is not held again.

At most ``max_held`` questions wait at once, and at most ``max_held_per_asker`` of one asker
address; past either, a question is decided at once as if its hold had already expired (a flood
of questions that would be held must not pile up, nor one asker's take every pod's holds).
Everything runs in the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable

from kubedock_dns.dns.query import Query
from kubedock_dns.index import Touched
from kubedock_dns.resolver import Decision, Hold, Resolver

Fact = tuple[str, str]


class _Held:
    __slots__ = ("query", "first", "facts", "timer")

    def __init__(self, query: Query, first: Hold) -> None:
        self.query = query
        self.first = first
        self.facts: list[Fact] = []
        self.timer: Any = None


class Holds:
    """The questions waiting for the index (see the module).

    :param decided: called with ``(query, decision)`` once a held question is decided.
    :param expired: called once per question whose bound passed (for the counters).
    """

    def __init__(self, reactor: Any, resolver: Resolver, decided: Callable[[Query, Decision], None],
                 expired: Callable[[], None] = lambda: None, max_held: int = 4096,
                 max_held_per_asker: int = 64) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.decided = decided
        self.expired = expired
        self.max_held = max_held
        self.max_held_per_asker = max_held_per_asker
        self._per_asker: dict[str, int] = {}  # asker address -> its questions held
        self._waiting: dict[Fact, dict[_Held, None]] = {}  # fact -> held questions reading it
        self._held: dict[_Held, None] = {}
        resolver.index.subscribe(self._touched)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return len(self._held) >= self.max_held

    def full_for(self, source_ip: str) -> bool:
        """Whether ``source_ip`` holds its share of questions already."""
        return self._per_asker.get(source_ip, 0) >= self.max_held_per_asker

    def hold(self, query: Query, first: Hold) -> None:
        """Wait for the index on ``query``'s behalf; ``first`` is the decision that held it."""
        held = _Held(query, first)
        self._held[held] = None
        self._per_asker[query.source_ip] = self._per_asker.get(query.source_ip, 0) + 1
        self._watch(held)
        held.timer = self.reactor.callLater(self.resolver.config.hold_seconds, self._expire, held)

    def _watch(self, held: _Held) -> None:
        query = held.query
        held.facts = self.resolver.dependencies(query.source_ip, query.name, query.qtype)
        for fact in held.facts:
            self._waiting.setdefault(fact, {})[held] = None

    def _unwatch(self, held: _Held) -> None:
        for fact in held.facts:
            waiting = self._waiting.get(fact)
            if waiting is not None:
                waiting.pop(held, None)
                if not waiting:
                    del self._waiting[fact]
        held.facts = []

    def _touched(self, touched: Touched) -> None:
        if not self._held:
            return
        if touched.everything:
            affected = list(self._held)
        else:
            facts = [("address", a) for a in touched.addresses]
            facts += [("network", n) for n in touched.networks]
            facts += [("session", n) for n in touched.sessions]
            if touched.awaiting:
                facts.append(("awaiting", ""))
            found: dict[_Held, None] = {}
            for fact in facts:
                found.update(self._waiting.get(fact, ()))
            affected = list(found)
        now = self.reactor.seconds()
        for held in affected:
            if held not in self._held:
                continue
            query = held.query
            decision = self.resolver.decide(query.source_ip, query.name, query.qtype, now=now)
            self._unwatch(held)
            if isinstance(decision, Hold):
                self._watch(held)  # what it reads may have changed (the asker became known)
                continue
            held.timer.cancel()
            self._release(held)
            self.decided(query, decision)

    def _release(self, held: _Held) -> None:
        del self._held[held]
        source = held.query.source_ip
        left = self._per_asker[source] - 1
        if left:
            self._per_asker[source] = left
        else:
            del self._per_asker[source]

    def _expire(self, held: _Held) -> None:
        self._release(held)
        self._unwatch(held)
        now = self.reactor.seconds()
        if held.first.miss_key is not None:
            self.resolver.misses.remember(held.first.miss_key, now)
        self.expired()
        query = held.query
        self.decided(query, self.resolver.decide(query.source_ip, query.name, query.qtype, held=True, now=now))
