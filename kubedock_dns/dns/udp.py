"""The DNS server's UDP port: a twisted UDP port whose read loop sends prepared replies itself.

Most datagrams a test suite sends are questions the fast path has answered before: their reply
is a dictionary look-up away (:attr:`FastPath.replies <kubedock_dns.dns.fastpath.FastPath.replies>`).
Twisted's port hands every datagram through three Python calls (protocol, server, fast path)
and the server counts it in three attributes; here the read loop looks the reply up and sends
it in line, and adds its counts once per batch.  Everything else (a miss, a reply with several
addresses to shuffle, a question to relay or to read strictly) goes to the server's
:meth:`~kubedock_dns.dns.server.KubedockDNSServerFactory.counted_query` exactly as before, so the bytes
on the wire are the fast path's, which the differential test holds equal to the full path's.
Measured with ``python -m bench.cost`` (instructions per local answer) and ``python -m bench.run``.
"""

from __future__ import annotations

import socket

from twisted.internet import udp
from twisted.python import log

# What twisted's own UDP read loop treats as "nothing more to read now" (EAGAIN, EINTR) and as a
# refused earlier send (ECONNREFUSED: reported only on connected ports, which this never is).
_READ_DONE = frozenset(udp._sockErrReadIgnore) | frozenset(udp._sockErrReadRefuse)


class AnsweringPort(udp.Port):
    """A listening UDP port for ``protocol`` (a :class:`~kubedock_dns.dns.server.QueryDatagramProtocol`)
    that answers fast-path hits from ``server.fast_path.replies`` in its read loop."""

    def __init__(self, port: int, protocol, interface: str, reactor, server) -> None:
        super().__init__(port, protocol, interface, reactor=reactor)
        self.server = server

    def doRead(self) -> None:
        server = self.server
        if server.fast_path is None:
            return super().doRead()
        replies = server.fast_path.replies
        counters = server.counters
        mask, clock, observe = server.sample_mask, server.clock, server.answer_latency.observe
        query = server.counted_query
        protocol = self.protocol
        recvfrom, sendto = self.socket.recvfrom, self.socket.sendto
        size, budget = self.maxPacketSize, self.maxThroughput
        ipv6 = self.addressFamily == socket.AF_INET6
        number = counters.queries_udp
        hits = read = 0
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
                # One query in N is timed (server.sample_mask); the others pay one AND.
                started = 0.0 if number & mask else clock()
                reply = replies.get((address[0], False, data[2:]))
                if reply.__class__ is bytes:
                    hits += 1
                    try:
                        sendto(data[:2] + reply, address)
                    except OSError:
                        pass  # a full buffer or vanished peer: dropped, as UDP may; the client retries
                    if started:
                        observe(clock() - started)
                    continue
                if ipv6:
                    address = address[:2]  # (host, port), as twisted's port hands it on
                try:
                    query(data, protocol, address, address[0], started)
                except BaseException:
                    log.err()
        finally:
            counters.queries_udp = number
            counters.fast_path += hits
            counters.answered_local += hits


def listen_answering_udp(reactor, port: int, protocol, interface: str, server) -> AnsweringPort:
    """``reactor.listenUDP`` with an :class:`AnsweringPort`: bound and reading when it returns."""
    listening = AnsweringPort(port, protocol, interface, reactor, server)
    listening.startListening()
    return listening
