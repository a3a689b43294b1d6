"""Bounded reading of DNS queries from the wire, and the fast path for the common question.

Every read is bounds-checked.  A query's question name must be uncompressed (nothing precedes it
that a pointer could refer to), each label at most 63 octets, the name at most 255.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Any, Callable

from kubedock_dns.resolver import Answer, Forward, Resolver

_HEADER = struct.Struct("!6H")
_TYPE_CLASS = struct.Struct("!HH")


class WireError(ValueError):
    """The message cannot be read as a query; answer FORMERR."""


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
    """The client's UDP payload size from an OPT record that ends the message at ``offset``,
    or None when the additional record is anything else."""
    if offset + 11 > len(data) or data[offset] != 0:
        return None
    rtype, payload, _ttl, rdlength = struct.unpack_from("!HHIH", data, offset + 1)
    if rtype != TYPE_OPT or offset + 11 + rdlength != len(data):
        return None
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
    an OPT record, from a known asker, with a name the index answers.  The records are cached per
    (asker address, question, type) until the index changes; each hit only patches the ID,
    echoes the question byte for byte and shuffles multi-address answers.  Questions the index
    does not answer are reported as :data:`FORWARD` when they are plainly not ours, else None:
    the full path decides (holds, SERVFAIL, truncation, anything unusual).  A differential test
    holds its bytes equal to the full path's.
    """

    def __init__(self, resolver: Resolver, ttl: int, shuffle: Callable[[list], Any] = random.shuffle,
                 max_entries: int = 200_000) -> None:
        self.resolver = resolver
        self.index = resolver.index
        self.ttl = ttl
        self.max_entries = max_entries
        self._shuffle = shuffle
        self._generation = -1
        # (asker, question, type) -> answer records, or FORWARD, or _UNCACHEABLE (full path).
        self._cache: dict[tuple[str, bytes, int], object] = {}

    def answer(self, data: bytes, source_ip: str, tcp: bool) -> bytes | object | None:
        """The reply's bytes, :data:`FORWARD`, or None (let the full path decide)."""
        qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
            return None
        try:
            end, qname, qtype, qclass = parse_question(data)
        except WireError:
            return None
        if qclass != CLASS_IN or qtype not in (TYPE_A, TYPE_AAAA, TYPE_PTR):
            return None
        edns = None
        if arcount:
            edns = read_opt(data, end)
            if edns is None:
                return None
        elif end != len(data):
            return None
        index = self.index
        if index.generation != self._generation:
            self._cache.clear()
            self._generation = index.generation
        key = (source_ip, data[12:end].lower(), qtype)
        records = self._cache.get(key)
        if records is None:
            records = self._prepare(source_ip, qname, qtype, data[12:end - 4])
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[key] = records
        if not isinstance(records, tuple):
            return records if records is FORWARD else None
        if len(records) > 1:
            records = list(records)
            self._shuffle(records)
        reply = b"".join((
            _HEADER.pack(qid, 0x8480 | (flags & 0x0100), 1, len(records), 0, 1 if edns is not None else 0),
            data[12:end],
            *records,
            OPT_RECORD if edns is not None else b"",
        ))
        limit = TCP_LIMIT if tcp else (edns or UDP_PLAIN_LIMIT)
        if len(reply) > limit:
            return None
        return reply

    def _prepare(self, source_ip: str, qname: bytes, qtype: int, raw_name_wire: bytes) -> object:
        decision = self.resolver.decide(source_ip, qname.decode("latin-1"), qtype, now=0.0)
        if isinstance(decision, Forward) and decision.cacheable:
            return FORWARD
        if not isinstance(decision, Answer):
            return _UNCACHEABLE
        head = _RECORD_HEAD
        if qtype == TYPE_PTR:
            raw_name = _presentation(raw_name_wire)
            compression = question_compression(raw_name)
            offset = 12 + len(raw_name_wire) + 4 + 12
            target = encode_name(decision.values[0].encode("ascii"), compression, offset)
            return (head.pack(0xC00C, qtype, CLASS_IN, self.ttl, len(target)) + target,)
        return tuple(
            head.pack(0xC00C, qtype, CLASS_IN, self.ttl, 4 if qtype == TYPE_A else 16)
            + ipaddress.ip_address(value).packed
            for value in decision.values
        )


_UNCACHEABLE = object()


def _presentation(wire_name: bytes) -> bytes:
    """Dotted form of an uncompressed wire name, case kept (for compression offsets)."""
    labels, offset = [], 0
    while wire_name[offset]:
        length = wire_name[offset]
        labels.append(wire_name[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return b".".join(labels)
