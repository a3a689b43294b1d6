"""The fast path: the common question answered from prepared wire bytes, with its answer cache.

Contract: :meth:`FastPath.answer` returns the reply's bytes, :data:`FORWARD` (relay the query
unparsed: the index plainly does not answer it), or None (the full path in
:mod:`kubedock_dns.dns.server` decides).  It counts what it answered and relayed itself.  Its replies are byte-identical to the full path's
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
    OPT_RECORD,
    OPT_RECORD_DO,
    TCP_LIMIT,
    TYPE_A,
    TYPE_AAAA,
    TYPE_PTR,
    UDP_PLAIN_LIMIT,
    encode_name,
    parse_question,
    presentation,
    question_compression,
    read_opt,
)

_RECORD_HEAD = struct.Struct("!HHHIH")
FORWARD = object()


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
    """

    def __init__(self, resolver: Resolver, clock: Callable[[], float],
                 shuffle: Callable[[list], Any] = random.shuffle, max_entries: int = 100_000) -> None:
        self.resolver = resolver
        self.index = resolver.index
        self.ttl = resolver.config.ttl
        self.clock = clock
        self.max_entries = max_entries
        self._shuffle = shuffle
        # (asker, tcp, query after its ID) -> the reply after its ID (bytes), a _Shuffled reply,
        # FORWARD, or None (the full path answers).
        self._cache: dict[tuple[str, bool, bytes], object] = {}
        # (kind, key) of an index fact -> the cache keys whose decision read it.
        self._dependents: dict[tuple[str, str], set[tuple[str, bool, bytes]]] = {}
        self._links = 0  # members of all _dependents sets, stale ones included
        self.invalidated = 0  # entries dropped because a fact they read was touched
        # Questions answered from prepared bytes (the UDP read loop adds its hits here too) and
        # relayed unparsed: the fast path's own counters.
        self.answered = 0
        self.relayed = 0
        self.index.subscribe(self._touched)

    @property
    def replies(self) -> dict[tuple[str, bool, bytes], object]:
        """The prepared entries, keyed (asker address, over TCP, query after its ID): a ``bytes``
        value is the whole reply after the ID.  Read-only for others (the UDP port's read loop
        looks hits up here without a call); the same dictionary for the fast path's lifetime."""
        return self._cache

    def answer(self, data: bytes, host: str, tcp: bool) -> bytes | object | None:
        """The reply's bytes, :data:`FORWARD`, or None (let the full path decide)."""
        key = (host, tcp, data[2:])
        entry = self._cache.get(key, _MISSING)
        if entry is _MISSING:
            entry, facts = self._prepare(data, host, tcp)
            # Entries dropped by one fact stay listed under the others until those fire: bound
            # the lists as well as the entries.
            if len(self._cache) >= self.max_entries or self._links >= 8 * self.max_entries:
                self._forget_all()
            self._cache[key] = entry
            for fact in facts:
                self._dependents.setdefault(fact, set()).add(key)
            self._links += len(facts)
        if entry.__class__ is bytes:
            self.answered += 1
            return data[:2] + entry
        if entry.__class__ is _Shuffled:
            self.answered += 1
            return data[:2] + entry.build(self._shuffle)
        if entry is FORWARD:
            self.relayed += 1
        return entry

    def _touched(self, touched: Touched) -> None:
        """Drop the entries whose decision read a fact the index just touched."""
        if touched.everything:
            self.invalidated += len(self._cache)
            self._forget_all()
            return
        facts = [("address", a) for a in touched.addresses]
        facts += [("network", n) for n in touched.networks]
        facts += [("name", n) for n in touched.names]
        if touched.awaiting:
            facts.append(("awaiting", ""))
        cache, dependents = self._cache, self._dependents
        for fact in facts:
            keys = dependents.pop(fact, None)
            if keys:
                self._links -= len(keys)
                for key in keys:
                    if cache.pop(key, _MISSING) is not _MISSING:
                        self.invalidated += 1

    def _forget_all(self) -> None:
        self._cache.clear()
        self._dependents.clear()
        self._links = 0

    def _prepare(self, data: bytes, host: str, tcp: bool) -> tuple[object, list[tuple[str, str]]]:
        """Read the query strictly and decide: what to cache for it (see ``_cache``) and the
        index facts that decision read (none when the query alone decided)."""
        if len(data) < 12:
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
        if isinstance(decision, Forward):
            return FORWARD if decision.cacheable else None
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
        if len(records) > 1:
            return _Shuffled(prefix, records, suffix)
        return prefix + b"".join(records) + suffix

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

    __slots__ = ("prefix", "records", "suffix")

    def __init__(self, prefix: bytes, records: tuple[bytes, ...], suffix: bytes) -> None:
        self.prefix, self.records, self.suffix = prefix, records, suffix

    def build(self, shuffle: Callable[[list], Any]) -> bytes:
        records = list(self.records)
        shuffle(records)
        return self.prefix + b"".join(records) + self.suffix


_MISSING = object()
