"""Strict reading and writing of DNS wire format, with no knowledge of what is answered.

Contract (pure: no Twisted, no index): every read is bounds-checked.  A query's question name must
be uncompressed (nothing precedes it that a pointer could refer to), each label at most 63 octets,
the name at most 255; anything else raises :class:`WireError` (a ``ValueError``) with the reason,
which the server answers with FORMERR.  The records after the question are walked and counted,
never interpreted, except OPT.  Names are written compressed the way twisted.names writes them, so
the fast path (:mod:`kubedock_dns.dns.fastpath`) and the full path produce the same bytes.
"""

from __future__ import annotations

import struct

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


def presentation(wire_name: bytes) -> bytes:
    """Dotted form of an uncompressed wire name, case kept (for compression offsets)."""
    labels, offset = [], 0
    while wire_name[offset]:
        length = wire_name[offset]
        labels.append(wire_name[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return b".".join(labels)
