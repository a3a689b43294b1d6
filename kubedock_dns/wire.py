"""Bounded reading of DNS queries from the wire, and the fast path for the common question.

Every read is bounds-checked.  A query's question name must be uncompressed (nothing precedes it
that a pointer could refer to), each label at most 63 octets, the name at most 255.
"""

from __future__ import annotations

import struct

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
