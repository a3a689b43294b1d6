"""Bounded reading of DNS queries from the wire, and the fast path for the common question.

Every read is bounds-checked.  A query's question name must be uncompressed (nothing precedes it
that a pointer could refer to), each label at most 63 octets, the name at most 255.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Any, Callable

from kubedock_dns.contract import canonical_ip
from kubedock_dns.index import Touched
from kubedock_dns.resolver import Answer, Forward, Resolver

_HEADER = struct.Struct("!6H")
_TYPE_CLASS = struct.Struct("!HH")


class WireError(ValueError):
    """The message cannot be read as a query; answer FORMERR."""


def skip_name(data: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``; :class:`WireError` when it
    runs past the end.  A pointer ends the name; where it points is not followed (the records
    after the question are only counted and walked, never interpreted, except OPT)."""
    size = len(data)
    total = 0
    while True:
        if offset >= size:
            raise WireError("a record's name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > size:
                raise WireError("a compression pointer is cut off")
            return offset + 2
        if length & 0xC0:
            raise WireError("extended label type in a record's name")
        offset += 1 + length
        total += 1 + length
        if total > 255:
            raise WireError("a record's name is longer than 255 octets")
        if length == 0:
            return offset


def scan_records(data: bytes, offset: int, answers: int, authority: int, additional: int) -> list[int]:
    """Walk the records the header promises after the question (which ends at ``offset``).

    Returns the EDNS version of every OPT record in the additional section (normally none or
    one).  Raises :class:`WireError` when a record is cut off, or bytes are left over after the
    last one: a message that does not hold what its header says is malformed (FORMERR).
    """
    size = len(data)
    versions: list[int] = []
    for index in range(answers + authority + additional):
        offset = skip_name(data, offset)
        if offset + 10 > size:
            raise WireError("the message holds fewer records than its header counts")
        rtype, _cls, ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        offset += 10 + rdlength
        if offset > size:
            raise WireError("a record's data runs past the end of the message")
        if rtype == TYPE_OPT and index >= answers + authority:
            versions.append((ttl >> 16) & 0xFF)
    if offset != size:
        raise WireError(f"{size - offset} bytes after the last record the header counts")
    return versions


def parse_question(data: bytes) -> tuple[int, bytes, int, int]:
    """``(end offset, lower-cased name in presentation form, qtype, qclass)`` of the question
    that starts at offset 12.  Raises :class:`WireError` with the reason."""
    offset = 12
    length_total = 0
    labels = []
    size = len(data)
    while True:
        if offset >= size:
            raise WireError("question name runs past the end of the message")
        length = data[offset]
        if length & 0xC0:
            raise WireError("compressed or extended label in the question name")
        offset += 1
        if length == 0:
            break
        length_total += length + 1
        if length_total > 255:
            raise WireError("question name longer than 255 octets")
        if offset + length > size:
            raise WireError("question label runs past the end of the message")
        labels.append(data[offset : offset + length])
        offset += length
    if offset + 4 > size:
        raise WireError("question type and class missing")
    qtype, qclass = _TYPE_CLASS.unpack_from(data, offset)
    return offset + 4, b".".join(labels).lower(), qtype, qclass


TYPE_A, TYPE_PTR, TYPE_AAAA, TYPE_OPT = 1, 12, 28, 41
CLASS_IN = 1
UDP_PLAIN_LIMIT = 512
SERVER_UDP_PAYLOAD = 1232
TCP_LIMIT = 65535
# Our OPT record: root owner, type OPT, our UDP payload size, version 0, no flags, no options.
OPT_RECORD = b"\x00" + struct.pack("!HHIH", TYPE_OPT, SERVER_UDP_PAYLOAD, 0, 0)
FORWARD = object()
_RECORD_HEAD = struct.Struct("!HHHIH")


def read_opt(data: bytes, offset: int) -> int | None:
    """The client's UDP payload size from a version-0 OPT record that ends the message at
    ``offset``, or None when the additional record is anything else."""
    if offset + 11 > len(data) or data[offset] != 0:
        return None
    rtype, payload, ttl, rdlength = struct.unpack_from("!HHIH", data, offset + 1)
    if rtype != TYPE_OPT or offset + 11 + rdlength != len(data) or (ttl >> 16) & 0xFF:
        return None  # a version above 0 gets BADVERS from the full path
    return max(UDP_PLAIN_LIMIT, payload)


def encode_name(name: bytes, compression: dict[bytes, int], at: int) -> bytes:
    """``name`` in wire form, compressed against ``compression`` (suffix -> offset) the way
    twisted.names does it, registering its own suffixes from offset ``at``."""
    out = bytearray()
    while name:
        pointer = compression.get(name)
        if pointer is not None:
            out += struct.pack("!H", 0xC000 | pointer)
            return bytes(out)
        compression[name] = at + len(out)
        label, _, name = name.partition(b".")
        out += bytes([len(label)]) + label
    out += b"\x00"
    return bytes(out)


def question_compression(raw_name: bytes) -> dict[bytes, int]:
    """Suffix -> offset of the question name as the client wrote it (offset 12 on)."""
    table: dict[bytes, int] = {}
    offset = 12
    name = raw_name
    while name:
        table[name] = offset
        label, _, name = name.partition(b".")
        offset += 1 + len(label)
    return table


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
        self.index.subscribe(self._touched)

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
            return data[:2] + entry
        if entry.__class__ is _Shuffled:
            return data[:2] + entry.build(self._shuffle)
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
        _qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
            return None, []
        try:
            end, qname, qtype, qclass = parse_question(data)
            source_ip = canonical_ip(host)
        except ValueError:  # WireError included
            return None, []
        if qclass != CLASS_IN or qtype not in (TYPE_A, TYPE_AAAA, TYPE_PTR):
            return None, []
        edns = None
        if arcount:
            edns = read_opt(data, end)
            if edns is None:
                return None, []
        elif end != len(data):
            return None, []
        name = qname.decode("latin-1")
        facts = self.resolver.dependencies(source_ip, name, qtype)
        return self._decide(data, source_ip, name, qtype, flags, end, edns, tcp), facts

    def _decide(self, data: bytes, source_ip: str, name: str, qtype: int, flags: int, end: int,
                edns: int | None, tcp: bool) -> object:
        decision = self.resolver.decide(source_ip, name, qtype, now=self.clock())
        if isinstance(decision, Forward):
            return FORWARD if decision.cacheable else None
        if not isinstance(decision, Answer):
            return None
        records = self._records(decision, qtype, data[12 : end - 4])
        head = _HEADER.pack(0, 0x8480 | (flags & 0x0100), 1, len(records), 0, 1 if edns is not None else 0)
        prefix = head[2:] + data[12:end]
        suffix = OPT_RECORD if edns is not None else b""
        size = 12 + len(data[12:end]) + sum(map(len, records)) + len(suffix)
        if size > (TCP_LIMIT if tcp else (edns or UDP_PLAIN_LIMIT)):
            return None
        if len(records) > 1:
            return _Shuffled(prefix, records, suffix)
        return prefix + b"".join(records) + suffix

    def _records(self, decision: Answer, qtype: int, raw_name_wire: bytes) -> tuple[bytes, ...]:
        head = _RECORD_HEAD
        if qtype == TYPE_PTR:
            compression = question_compression(_presentation(raw_name_wire))
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



def _presentation(wire_name: bytes) -> bytes:
    """Dotted form of an uncompressed wire name, case kept (for compression offsets)."""
    labels, offset = [], 0
    while wire_name[offset]:
        length = wire_name[offset]
        labels.append(wire_name[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return b".".join(labels)
