"""The DNS server's UDP port: a twisted UDP port whose read loop sends prepared replies itself.

Most datagrams a test suite sends are questions the fast path has answered before: their reply
is a dictionary look-up away (:attr:`FastPath.replies <kubedock_dns.dns.fastpath.FastPath.replies>`).
Twisted's port hands every datagram through a protocol to the server; here the read loop looks
the reply up and sends it in line, counts the hit (one list index: the prepared reply carries its
counter's), and reports how many datagrams it read once per batch.  Everything else (a
miss, a reply with several addresses to shuffle, a question to relay or to read strictly) is
handed to the server through :attr:`ReadLoopHook.missed`, as a :class:`~kubedock_dns.dns.query.Query`
made here, so the bytes on the wire are the fast path's, which the differential test holds equal
to the full path's.
Measured with ``python -m bench.cost`` (instructions per local answer) and ``python -m bench.run``.

The port sees the server through one narrow :class:`ReadLoopHook` and nothing else.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import udp
from twisted.python import log

from kubedock_dns.dns.query import Query
from kubedock_dns.ops.latency import Sampler

# "Nothing more to read now" (EAGAIN/EWOULDBLOCK, EINTR), and a refused earlier send
# (ECONNREFUSED: reported only on connected ports, which this never is).  twisted's own read
# loop keeps the same list in private names, so it is stated here.
_READ_DONE = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED))


@dataclass(frozen=True, slots=True)
class ReadLoopHook:
    """All the UDP port knows of the server.

    - ``replies``: prepared replies keyed (asker address, False, query after its ID); a ``tuple``
      value is (the whole reply after the ID, the index of its counter in ``counts``) (the fast
      path's, read-only here);
    - ``sampler``: which datagrams are timed, and where local answers' times go;
    - ``missed(query)``: a datagram the loop did not answer, counted already, as a
      :class:`~kubedock_dns.dns.query.Query` (``started`` as the sampler decided);
    - ``read(datagrams)``: after each batch, how many datagrams it read;
    - ``counts``: the fast path's counters, to which the loop adds each hit in place.
    """

    replies: dict
    sampler: Sampler
    missed: Callable[[Query], None]
    read: Callable[[int], None]
    counts: list


class AnsweringPort(udp.Port):
    """A listening UDP port whose read loop answers prepared replies (see the module)."""

    def __init__(self, port: int, protocol: Any, interface: str, reactor: Any, hook: ReadLoopHook) -> None:
        super().__init__(port, protocol, interface, reactor=reactor)
        self.hook = hook
        self.datagrams = 0  # numbers the datagrams, to time one in N

    def doRead(self) -> None:
        hook = self.hook
        replies, missed, counts = hook.replies, hook.missed, hook.counts
        sampler = hook.sampler
        mask, clock, observe = sampler.mask, sampler.clock, sampler.answers.observe
        protocol = self.protocol
        recvfrom, sendto = self.socket.recvfrom, self.socket.sendto
        size, budget = self.maxPacketSize, self.maxThroughput
        ipv6 = self.addressFamily == socket.AF_INET6
        number = first = self.datagrams
        read = 0
        try:
            while read < budget:
                try:
                    data, address = recvfrom(size)
                except OSError as e:
                    if e.args[0] in _READ_DONE:
                        return
                    raise
                read += len(data)
                number += 1
                # One query in N is timed (sampler.mask); the others pay one AND.
                started = 0.0 if number & mask else clock()
                reply = replies.get((address[0], False, data[2:]))
                if reply.__class__ is tuple:  # (reply after the ID, counter index)
                    wire, counter = reply
                    counts[counter] += 1
                    try:
                        sendto(data[:2] + wire, address)
                    except OSError:
                        pass  # a full buffer or vanished peer: dropped, as UDP may; the client retries
                    if started:
                        observe(clock() - started)
                    continue
                if ipv6:
                    address = address[:2]  # (host, port), as twisted's port hands it on
                try:
                    missed(Query(data, protocol, address, address[0], started))
                except BaseException:
                    log.err()
        finally:
            self.datagrams = number
            hook.read(number - first)


def listen_answering_udp(reactor: Any, port: int, protocol: Any, interface: str, hook: ReadLoopHook) -> AnsweringPort:
    """``reactor.listenUDP`` with an :class:`AnsweringPort`: bound and reading when it returns."""
    listening = AnsweringPort(port, protocol, interface, reactor, hook)
    listening.startListening()
    return listening
