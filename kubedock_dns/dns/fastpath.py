"""The fast path: the common question answered from prepared wire bytes, with its answer cache.

Contract: :meth:`FastPath.answer` returns the reply's bytes, :data:`FORWARD` (relay the query
unparsed: the index plainly does not answer it), or None (the full path in
:mod:`kubedock_dns.dns.server` decides).  It counts what it answered (with records, or NODATA)
and relayed itself, by transport and question type (``counts``, see :data:`ANSWERED`): each
entry carries its counter's index, so a count is one list index, also in the UDP read loop.  Its
replies are byte-identical to the full path's
(``tests/test_fast_path.py`` holds them so on random topologies), and a cached reply never outlives
a change to any index fact its decision read.  The query is read with the strict readers of
:mod:`kubedock_dns.dns.wire`.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Any, Callable

from kubedock_dns.contract import canonical_ip
from kubedock_dns.index import Touched
from kubedock_dns.resolver import Answer, Forward, Resolver
from kubedock_dns.dns.wire import (
    CLASS_IN,
    FLAG_AA,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    HEADER,
    MAX_QUERY_BYTES,
    OPT_RECORD,
    OPT_RECORD_DO,
    TCP_LIMIT,
    TYPE_A,
    TYPE_AAAA,
    TYPE_PTR,
    TYPE_SLOT_NAMES,
    TYPE_SLOTS,
    UDP_PLAIN_LIMIT,
    encode_name,
    parse_question,
    presentation,
    question_compression,
    read_opt,
)

_RECORD_HEAD = struct.Struct("!HHHIH")
FORWARD = object()

# The fast path's counters are one list: at ANSWERED + slot the questions answered with records,
# at NODATA + slot those answered NOERROR without one, at RELAYED + slot those relayed unparsed,
# where slot is the question type's (dns.wire.TYPE_SLOTS); UDP first, then TCP from OVER_TCP on.
# An entry is prepared per transport, so its counter's index says the transport too.
TYPES = len(TYPE_SLOT_NAMES)
ANSWERED, NODATA, RELAYED, OVER_TCP = 0, TYPES, 2 * TYPES, 3 * TYPES


Key = tuple[str, bool, bytes]  # (asker address as received, over TCP, query after its ID)
Fact = tuple[str, str]

# Bounds of the prepared replies (docs/design.md, "Bounds"), in bytes: a query, its reply and
# what keeps them (key tuple, dictionary slots, the fact lists and sets; ENTRY_OVERHEAD, measured
# with tracemalloc in tests/test_fast_path.py) count against one budget for the whole server and
# a share per asker, so that one asker's questions never push out another's.
MAX_CACHE_BYTES = 32 * 1024 * 1024
MAX_ASKER_BYTES = 256 * 1024
ENTRY_OVERHEAD = 850
# A common query is a question and at most an OPT record: a few dozen bytes.  Longer ones (EDNS
# padding, options) are answered all the same, from a fresh decision each time, never kept.
MAX_KEPT_QUERY = 512


class FastPath:
    """Answers the common query from prepared wire bytes, without twisted.names' objects.

    Common: one question, class IN, type A, AAAA or PTR, no answer or authority records, at most
    an OPT record, from a known asker, with a name the index answers.  The reply is prepared once
    per (asker address, transport, query bytes after the ID) and kept until the index touches one
    of the facts the decision read (:meth:`Resolver.dependencies`: the asker's address, its
    networks, the name), so a hit is a dictionary look-up and a concatenation with the client's
    ID, and a change in one network leaves the answers of every other network's askers warm;
    multi-address answers are shuffled per reply.  Questions the index plainly does not answer are reported as
    :data:`FORWARD` (relayed without a parse); anything else returns None and the full path
    decides (holds, NXDOMAIN, SERVFAIL, truncation, malformed or unusual queries).  A differential test
    holds its bytes equal to the full path's.

    Only what a later query can be answered (or relayed) from is kept: never a None, never a query
    longer than :data:`MAX_KEPT_QUERY`.  What is kept is bounded in bytes: ``max_bytes`` in all and
    ``max_asker_bytes`` per asker address; an asker past its share loses its own entries (oldest
    first), and past the whole budget the askers that stored first lose theirs, a whole share at a
    time.
    """

    def __init__(self, resolver: Resolver, clock: Callable[[], float],
                 shuffle: Callable[[list], Any] = random.shuffle, max_bytes: int = MAX_CACHE_BYTES,
                 max_asker_bytes: int = MAX_ASKER_BYTES) -> None:
        self.resolver = resolver
        self.index = resolver.index
        self.ttl = resolver.config.ttl
        self.clock = clock
        self.max_bytes = max_bytes
        self.max_asker_bytes = min(max_asker_bytes, max_bytes)
        self._shuffle = shuffle
        # key -> the reply after its ID (bytes), a _Shuffled reply, or FORWARD.
        self._cache: dict[Key, object] = {}
        # key -> the index facts its decision read; (kind, key) of a fact -> the keys that read it.
        self._facts: dict[Key, tuple[Fact, ...]] = {}
        self._dependents: dict[Fact, set[Key]] = {}
        # asker address -> its keys (oldest first) and what each costs; the bytes of all of them.
        self._shares: dict[str, dict[Key, int]] = {}
        self._share_bytes: dict[str, int] = {}
        self.bytes = 0  # what every kept entry costs, by the count above
        self.invalidated = 0  # entries dropped because a fact they read was touched
        self.evicted = 0  # entries dropped to stay within the byte bounds
        # Questions answered from prepared bytes (the UDP read loop adds its hits here too) and
        # relayed unparsed, by transport, outcome and type (see ANSWERED): its own counters.
        self.counts = [0] * (2 * OVER_TCP)
        self.index.subscribe(self._touched)

    @property
    def answered(self) -> int:
        """Questions answered from prepared bytes (with records or NODATA), both transports."""
        counts = self.counts
        return sum(counts[:RELAYED]) + sum(counts[OVER_TCP : OVER_TCP + RELAYED])

    @property
    def relayed(self) -> int:
        """Questions relayed unparsed, both transports."""
        counts = self.counts
        return sum(counts[RELAYED:OVER_TCP]) + sum(counts[OVER_TCP + RELAYED :])

    @property
    def replies(self) -> dict[tuple[str, bool, bytes], object]:
        """The prepared entries, keyed (asker address, over TCP, query after its ID): a ``tuple``
        value is (the whole reply after the ID, the index of its counter in ``counts``).
        Read-only for others (the UDP port's read loop looks hits up here without a call); the
        same dictionary for the fast path's lifetime."""
        return self._cache

    def answer(self, data: bytes, host: str, tcp: bool) -> bytes | object | None:
        """The reply's bytes, :data:`FORWARD`, or None (let the full path decide)."""
        key = (host, tcp, data[2:])
        entry = self._cache.get(key, _MISSING)
        if entry is _MISSING:
            entry, facts = self._prepare(data, host, tcp)
            if entry is None:
                return None
            if len(data) <= MAX_KEPT_QUERY:
                self._keep(key, entry, facts)
        kind = entry.__class__
        if kind is tuple:
            wire: bytes
            counter: int
            wire, counter = entry  # type: ignore[misc]
            self.counts[counter] += 1
            return data[:2] + wire
        if kind is _Shuffled:
            self.counts[entry.counter] += 1  # type: ignore[attr-defined]
            return data[:2] + entry.build(self._shuffle)  # type: ignore[attr-defined]
        self.counts[entry.counter] += 1  # type: ignore[attr-defined]  # a _Relay
        return FORWARD

    def _keep(self, key: Key, entry: object, facts: list[Fact]) -> None:
        cost = ENTRY_OVERHEAD + len(key[2]) + _size(entry)
        host = key[0]
        if self._share_bytes.get(host, 0) + cost > self.max_asker_bytes:
            self._shrink_share(host, self.max_asker_bytes - cost)
        while self.bytes + cost > self.max_bytes and self._shares:
            self._drop_share(next(iter(self._shares)))
        self._cache[key] = entry
        self._facts[key] = tuple(facts)
        for fact in facts:
            self._dependents.setdefault(fact, set()).add(key)
        self._shares.setdefault(host, {})[key] = cost
        self._share_bytes[host] = self._share_bytes.get(host, 0) + cost
        self.bytes += cost

    def _shrink_share(self, host: str, target: int) -> None:
        """Drop ``host``'s oldest entries until its share is at most ``target`` bytes."""
        share = self._shares.get(host)
        while share and self._share_bytes[host] > target:
            self._forget(next(iter(share)))
            self.evicted += 1
            share = self._shares.get(host)

    def _drop_share(self, host: str) -> None:
        for key in list(self._shares.get(host, ())):
            self._forget(key)
            self.evicted += 1

    def _forget(self, key: Key) -> None:
        """Drop one entry and everything that refers to it."""
        del self._cache[key]
        for fact in self._facts.pop(key):
            keys = self._dependents.get(fact)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._dependents[fact]
        host = key[0]
        share = self._shares[host]
        cost = share.pop(key)
        self.bytes -= cost
        if share:
            self._share_bytes[host] -= cost
        else:
            del self._shares[host], self._share_bytes[host]

    def _touched(self, touched: Touched) -> None:
        """Drop the entries whose decision read a fact the index just touched."""
        if touched.everything:
            self.invalidated += len(self._cache)
            self._cache.clear()
            self._facts.clear()
            self._dependents.clear()
            self._shares.clear()
            self._share_bytes.clear()
            self.bytes = 0
            return
        facts = [("address", a) for a in touched.addresses]
        facts += [("network", n) for n in touched.networks]
        facts += [("session", s) for s in touched.sessions]
        if touched.awaiting:
            facts.append(("awaiting", ""))
        dependents = self._dependents
        for fact in facts:
            keys = dependents.pop(fact, None)
            if keys:
                for key in keys:
                    if key in self._facts:
                        self._forget(key)
                        self.invalidated += 1

    def _prepare(self, data: bytes, host: str, tcp: bool) -> tuple[object, list[tuple[str, str]]]:
        """Read the query strictly and decide: what to cache for it (see ``_cache``) and the
        index facts that decision read (none when the query alone decided)."""
        if not 12 <= len(data) <= MAX_QUERY_BYTES:
            return None, []
        _qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
        if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
            return None, []
        try:
            end, qname, qtype, qclass = parse_question(data)
            source_ip = canonical_ip(host)
        except ValueError:  # WireError included
            return None, []
        if qclass != CLASS_IN or qtype not in (TYPE_A, TYPE_AAAA, TYPE_PTR):
            return None, []
        edns = dnssec_ok = None
        if arcount:
            opt = read_opt(data, end)
            if opt is None:
                return None, []
            edns, dnssec_ok = opt
        elif end != len(data):
            return None, []
        name = qname.decode("latin-1")
        facts = self.resolver.dependencies(source_ip, name, qtype)
        return self._decide(data, source_ip, name, qtype, flags, end, edns, bool(dnssec_ok), tcp), facts

    def _decide(self, data: bytes, source_ip: str, name: str, qtype: int, flags: int, end: int,
                edns: int | None, dnssec_ok: bool, tcp: bool) -> object:
        decision = self.resolver.decide(source_ip, name, qtype, now=self.clock())
        slot = TYPE_SLOTS[qtype] + (OVER_TCP if tcp else 0)  # A, AAAA or PTR: all counted by name
        if isinstance(decision, Forward):
            return _RELAYS[slot] if decision.cacheable else None
        if not isinstance(decision, Answer):
            return None
        records = self._records(decision, qtype, data[12 : end - 4])
        head = HEADER.pack(0, FLAG_QR | FLAG_AA | FLAG_RA | (flags & FLAG_RD), 1, len(records), 0,
                           1 if edns is not None else 0)
        prefix = head[2:] + data[12:end]
        suffix = b"" if edns is None else OPT_RECORD_DO if dnssec_ok else OPT_RECORD
        size = 12 + len(data[12:end]) + sum(map(len, records)) + len(suffix)
        if size > (TCP_LIMIT if tcp else (edns or UDP_PLAIN_LIMIT)):
            return None
        counter = (ANSWERED if records else NODATA) + slot
        if len(records) > 1:
            return _Shuffled(prefix, records, suffix, counter)
        return (prefix + b"".join(records) + suffix, counter)

    def _records(self, decision: Answer, qtype: int, raw_name_wire: bytes) -> tuple[bytes, ...]:
        head = _RECORD_HEAD
        if qtype == TYPE_PTR:
            compression = question_compression(presentation(raw_name_wire))
            offset = 12 + len(raw_name_wire) + 4 + 12
            target = encode_name(decision.values[0].encode("ascii"), compression, offset)
            return (head.pack(0xC00C, qtype, CLASS_IN, self.ttl, len(target)) + target,)
        return tuple(
            head.pack(0xC00C, qtype, CLASS_IN, self.ttl, 4 if qtype == TYPE_A else 16)
            + ipaddress.ip_address(value).packed
            for value in decision.values
        )


class _Shuffled:
    """A reply with several address records, put together in a fresh order each time."""

    __slots__ = ("prefix", "records", "suffix", "counter")

    def __init__(self, prefix: bytes, records: tuple[bytes, ...], suffix: bytes, counter: int) -> None:
        self.prefix, self.records, self.suffix, self.counter = prefix, records, suffix, counter

    def size(self) -> int:
        return len(self.prefix) + sum(map(len, self.records)) + len(self.suffix) + 40 * len(self.records)

    def build(self, shuffle: Callable[[list], Any]) -> bytes:
        records = list(self.records)
        shuffle(records)
        return self.prefix + b"".join(records) + self.suffix


class _Relay:
    """A question to relay unparsed (answered :data:`FORWARD`), counted at ``counter``."""

    __slots__ = ("counter",)

    def __init__(self, counter: int) -> None:
        self.counter = counter


# By type slot, OVER_TCP added for TCP.
_RELAYS = {offset + slot: _Relay(offset + RELAYED + slot) for offset in (0, OVER_TCP) for slot in range(TYPES)}


def _size(entry: object) -> int:
    """The bytes of a kept reply beyond :data:`ENTRY_OVERHEAD` (a _Relay keeps none)."""
    if entry.__class__ is tuple:
        return len(entry[0])
    if entry.__class__ is _Shuffled:
        return entry.size()
    return 0


_MISSING = object()
