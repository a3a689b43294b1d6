"""DNS on the wire: the one home of its constants, and strict reading and writing of messages.

Every type, class and rcode number the package uses, the 12-byte header, and the names of query
types are defined here and nowhere else.  Contract (pure: no Twisted, no index): every read is
bounds-checked.  A query's question name must
be uncompressed (nothing precedes it that a pointer could refer to), each label at most 63 octets,
the name at most 255; anything else raises :class:`WireError` (a ``ValueError``) with the reason,
which the server answers with FORMERR.  The records after the question are walked and counted,
never interpreted, except OPT.  Names are written compressed the way twisted.names writes them, so
the fast path (:mod:`kubedock_dns.dns.fastpath`) and the full path produce the same bytes.
"""

from __future__ import annotations

import struct

TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_PTR, TYPE_MX, TYPE_TXT, TYPE_AAAA = 1, 2, 5, 6, 12, 15, 16, 28
TYPE_SRV, TYPE_OPT, TYPE_HTTPS, TYPE_ANY = 33, 41, 65, 255
CLASS_IN = 1
OPCODE_QUERY = 0
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 2, 3, 4, 5
RCODE_BADVERS = 16  # an extended rcode (RFC 6891): its upper 8 bits travel in the OPT record
RCODE_NAMES = {RCODE_OK: "NOERROR", RCODE_FORMERR: "FORMERR", RCODE_SERVFAIL: "SERVFAIL",
               RCODE_NXDOMAIN: "NXDOMAIN", RCODE_NOTIMP: "NOTIMP", RCODE_REFUSED: "REFUSED",
               6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
               RCODE_BADVERS: "BADVERS"}
QTYPE_NAMES = {TYPE_A: "A", TYPE_NS: "NS", TYPE_CNAME: "CNAME", TYPE_SOA: "SOA", TYPE_PTR: "PTR", TYPE_MX: "MX",
               TYPE_TXT: "TXT", TYPE_AAAA: "AAAA", TYPE_SRV: "SRV", TYPE_HTTPS: "HTTPS", TYPE_ANY: "ANY"}

# Query types counted under their own name (kubedock_dns_requests_total{type}): every named type
# above, in a fixed order, so that a count is one list index (TYPE_SLOTS[qtype]) on the hot path.
# Any other type, and a query whose question could not be read, is counted as "other".
COUNTED_TYPES = (TYPE_A, TYPE_AAAA, TYPE_PTR, TYPE_SRV, TYPE_TXT, TYPE_MX, TYPE_CNAME, TYPE_NS, TYPE_SOA,
                 TYPE_HTTPS, TYPE_ANY)
TYPE_SLOTS = {qtype: slot for slot, qtype in enumerate(COUNTED_TYPES)}
OTHER_TYPE_SLOT = len(COUNTED_TYPES)
TYPE_SLOT_NAMES = tuple(QTYPE_NAMES[qtype] for qtype in COUNTED_TYPES) + ("other",)

UDP_PLAIN_LIMIT = 512
# The longest query answered at all (longer ones get REFUSED): a question and an OPT record with
# cookies, client subnet or padding fit many times over.  A held or relayed query keeps its
# bytes, so this bounds what held and forwarded questions can hold (4096 held, --max-forwards).
MAX_QUERY_BYTES = 4096
# The DNS flag day 2020 size: no IP fragmentation on common paths.
SERVER_UDP_PAYLOAD = 1232
TCP_LIMIT = 65535

# ID, flags, QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT.
HEADER = struct.Struct("!6H")
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
_TYPE_CLASS = struct.Struct("!HH")
_RECORD_HEAD = struct.Struct("!HHIH")


def qtype_name(qtype: int) -> str:
    """``A``, ``AAAA``, ... or ``TYPE<n>`` (RFC 3597) for a type without a name here."""
    return QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    """``NOERROR``, ``NXDOMAIN``, ... or ``RCODE<n>`` for an rcode without a name here."""
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


# The DNSSEC OK bit of an OPT record's TTL field (RFC 3225): a reply copies the query's.
EDNS_FLAG_DO = 0x8000


def opt_record(payload: int = SERVER_UDP_PAYLOAD, extended_rcode: int = 0, version: int = 0,
               dnssec_ok: bool = False) -> bytes:
    """An OPT pseudo-record (RFC 6891 6.1.2): root owner, our UDP payload size, the upper 8 bits
    of an extended rcode, the EDNS version and the DO bit (RFC 3225 3: copied from the query) in
    the TTL field, no options."""
    flags = EDNS_FLAG_DO if dnssec_ok else 0
    return b"\x00" + _RECORD_HEAD.pack(TYPE_OPT, payload, (extended_rcode << 24) | (version << 16) | flags, 0)


def with_additional(message: bytes, record: bytes) -> bytes:
    """``message`` with ``record`` appended to its additional section (ARCOUNT counted up); the
    record must be the last one, as an OPT record is."""
    arcount = struct.unpack_from("!H", message, 10)[0]
    return message[:10] + struct.pack("!H", arcount + 1) + message[12:] + record


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


# Our OPT record: root owner, type OPT, our UDP payload size, version 0, no options; without and
# with the DO bit, as the query had it.
OPT_RECORD = opt_record()
OPT_RECORD_DO = opt_record(dnssec_ok=True)


def question_section(message: bytes) -> bytes:
    """The raw bytes of the question (name, type, class) of a query already read strictly,
    lower-cased for comparing it with the question an answer echoes.  Only walks the label
    lengths (the forwarder calls it for every relayed query); :class:`WireError` when the name
    runs past the end."""
    return message[12 : skip_name(message, 12) + 4].lower()


def read_opt(data: bytes, offset: int) -> tuple[int, bool] | None:
    """The client's UDP payload size and DO bit from a version-0 OPT record that ends the message
    at ``offset``, or None when the additional record is anything else."""
    if offset + 11 > len(data) or data[offset] != 0:
        return None
    rtype, payload, ttl, rdlength = struct.unpack_from("!HHIH", data, offset + 1)
    if rtype != TYPE_OPT or offset + 11 + rdlength != len(data) or (ttl >> 16) & 0xFF:
        return None  # a version above 0 gets BADVERS from the full path
    return max(UDP_PLAIN_LIMIT, payload), bool(ttl & EDNS_FLAG_DO)


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
