"""The wire form of our own replies on the full path: answers, failures and BADVERS.

Answers are built with twisted.names' public ``Message``; the OPT record we add is written by
:func:`kubedock_dns.dns.wire.opt_record` and appended last (twisted.names has no public OPT
type, and an OPT record is always the message's last one here), so the bytes equal the fast
path's (:mod:`kubedock_dns.dns.fastpath`), which a differential test holds.
"""

from __future__ import annotations

from twisted.names import dns

from kubedock_dns.dns.wire import (
    CLASS_IN,
    FLAG_QR,
    HEADER,
    EDNS_FLAG_DO,
    OPT_RECORD,
    OPT_RECORD_DO,
    RCODE_BADVERS,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_OPT,
    UDP_PLAIN_LIMIT,
    opt_record,
    with_additional,
)
from kubedock_dns.resolver import Answer


def error_reply(data: bytes, rcode: int) -> bytes:
    """A header-only reply to a query we cannot or will not read: same ID, opcode and RD."""
    qid, flags = HEADER.unpack_from(data)[:2]
    return HEADER.pack(qid, FLAG_QR | (flags & 0x7900) | rcode, 0, 0, 0, 0)


def edns_payload_size(message: dns.Message) -> int | None:
    """The client's advertised UDP payload size, or None when the query has no OPT record."""
    for record in message.additional:
        if record.type == TYPE_OPT:
            return max(UDP_PLAIN_LIMIT, record.cls)
    return None


def dnssec_ok(message: dns.Message) -> bool:
    """Whether the query's OPT record sets the DO bit, which a reply copies (RFC 3225 3)."""
    return any(record.type == TYPE_OPT and record.ttl & EDNS_FLAG_DO for record in message.additional)


def encode_answer(query: dns.Message, edns_payload: int | None, rcode: int, decision: Answer | None,
                  ttl: int, limit: int) -> tuple[bytes, bool]:
    """The wire form of our own answer to ``query``, truncated (TC, no answers) past ``limit``.

    Returns the bytes and whether they were truncated.
    """
    question = query.queries[0]
    # Our own answers and our NXDOMAIN (a container name no network of the asker holds) are
    # authoritative; failures are not.
    response = dns.Message(
        id=query.id, answer=True, opCode=dns.OP_QUERY, auth=decision is not None or rcode == RCODE_NXDOMAIN,
        recDes=query.recDes, recAv=1, rCode=rcode, maxSize=0,
    )
    response.queries = [question]
    if decision is not None:
        owner = question.name.name
        for value in decision.values:
            payload: dns.IEncodableRecord
            if decision.qtype == TYPE_A:
                payload = dns.Record_A(value, ttl)
            elif decision.qtype == TYPE_AAAA:
                payload = dns.Record_AAAA(value, ttl)
            else:
                payload = dns.Record_PTR(value.encode("ascii"), ttl)
            response.answers.append(dns.RRHeader(owner, decision.qtype, CLASS_IN, ttl, payload, auth=True))
    opt = b"" if edns_payload is None else OPT_RECORD_DO if dnssec_ok(query) else OPT_RECORD
    wire = response.toStr()
    if len(wire) + len(opt) > limit:
        response.answers = []
        response.trunc = 1
        wire = response.toStr()
        truncated = True
    else:
        truncated = False
    return (with_additional(wire, opt) if opt else wire), truncated


def badvers_reply(query: dns.Message) -> bytes:
    """RFC 6891 6.1.3: the question echoed, extended rcode BADVERS (16), and our OPT record
    saying which version we do speak (0)."""
    response = dns.Message(id=query.id, answer=True, opCode=dns.OP_QUERY, recDes=query.recDes,
                           recAv=1, rCode=RCODE_BADVERS & 0xF, maxSize=0)
    response.queries = list(query.queries)
    return with_additional(response.toStr(), opt_record(extended_rcode=RCODE_BADVERS >> 4,
                                                        dnssec_ok=dnssec_ok(query)))
