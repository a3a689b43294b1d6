"""Ports in tests and tools never race: servers in this process bind port 0 and use the port the
kernel gave (the DNS server puts UDP and TCP on one number, choosing again when TCP's is taken);
servers in other processes report the port they bound, or are restarted on another port when
theirs was taken meanwhile."""

from __future__ import annotations

import socket

import dns.message
import dns.query
from twisted.application import service
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

import testbed.upstream
from kubedock_dns.dns.upstreams import parse_upstream
from kubedock_dns.options import Config
from kubedock_dns.tap import build_server
from testbed.upstream import Dnsmasq


class _TCPTakenOnce:
    """The real reactor, except that the first TCP port asked for is in use (another process
    took it between our UDP bind and our TCP bind)."""

    def __init__(self) -> None:
        self.refused: list[int] = []

    def __getattr__(self, name):
        return getattr(reactor, name)

    def listenTCP(self, port, factory, **kwargs):
        if not self.refused:
            self.refused.append(port)
            raise CannotListenError(kwargs.get("interface"), port, OSError("Address already in use"))
        return reactor.listenTCP(port, factory, **kwargs)


class _KernelPicksTheDNSPort:
    """The real reactor, except that an ephemeral UDP bind (port 0, the forwarder's upstream
    socket) is handed ``port`` while it is free, as the kernel may do when a restart asks again
    for a number from the ephemeral range."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handed: list[int] = []

    def __getattr__(self, name):
        return getattr(reactor, name)

    def listenUDP(self, port, protocol, **kwargs):
        if port == 0:
            try:
                listening = reactor.listenUDP(self.port, protocol, **kwargs)
            except CannotListenError:
                return reactor.listenUDP(0, protocol, **kwargs)
            self.handed.append(self.port)
            return listening
        return reactor.listenUDP(port, protocol, **kwargs)


def _serve(case: TestCase, clock, port: int) -> int:
    """The server on ``port`` of 127.0.0.1 (0: the kernel's choice) with ``clock`` as its reactor,
    stopped when ``case`` ends; the DNS port it listens on."""
    config = Config(dns_port=port, dns_interface="127.0.0.1", upstreams=(parse_upstream("127.0.0.1:9"),),
                    namespace="ns", ops_port=0, ops_interface="127.0.0.1", drain_seconds=0)
    server = build_server(config, clock, pod_source=lambda index: service.Service())
    top = server.service
    top.startService()
    case.addCleanup(top.stopService)
    return server.listeners.port


def _free_for_udp_and_tcp() -> int:
    """A port number free for UDP and for TCP on 127.0.0.1 right now.  A port the kernel gives
    for UDP may be taken for TCP by another process on this shared machine (seen: the server
    then fails to listen on TCP, which this test is not about)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no port free for both UDP and TCP in 100 tries")


class DNSPortOrderTests(TestCase):
    timeout = 30

    async def test_the_dns_port_is_bound_before_the_forwarders_ephemeral_socket(self) -> None:
        """A fixed --dns-port in the ephemeral range cannot be taken by the server's own upstream
        socket: the DNS listeners bind first, so the kernel hands the forwarder another port and
        the server answers on the port asked for (seen on the real node: a restart on the same
        port failed with 'Address already in use' against itself)."""
        port = _free_for_udp_and_tcp()
        clock = _KernelPicksTheDNSPort(port)
        assert _serve(self, clock, port) == port and clock.handed == []
        query = dns.message.make_query("x.example", "A")
        udp = await deferToThread(dns.query.udp, query, "127.0.0.1", port=port, timeout=5)
        assert udp.id == query.id


class DNSPortZeroTests(TestCase):
    timeout = 30

    def start(self, clock) -> int:
        return _serve(self, clock, 0)

    async def test_port_zero_serves_udp_and_tcp_on_one_port(self) -> None:
        """--dns-port 0: the kernel picks the UDP port and TCP listens on the same number, so a
        client (and a TC retry over TCP) reaches both on the one port reported."""
        port = self.start(reactor)
        assert port != 0
        query = dns.message.make_query("x.example", "A")
        # Both get an answer (SERVFAIL: the upstream is down); a missing listener would time out.
        udp = await deferToThread(dns.query.udp, query, "127.0.0.1", port=port, timeout=5)
        tcp = await deferToThread(dns.query.tcp, query, "127.0.0.1", port=port, timeout=5)
        assert udp.id == query.id and tcp.id == query.id

    async def test_taken_tcp_port_makes_it_choose_again(self) -> None:
        """When the TCP port matching the kernel's UDP choice is taken, both are given up and the
        next choice is used; the server still answers on one port for both."""
        clock = _TCPTakenOnce()
        port = self.start(clock)
        assert clock.refused and port != 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.connect(("127.0.0.1", port))
        query = dns.message.make_query("x.example", "A")
        udp = await deferToThread(dns.query.udp, query, "127.0.0.1", port=port, timeout=5)
        assert udp.id == query.id


def test_dnsmasq_starts_again_on_another_port_when_its_port_was_taken(monkeypatch) -> None:
    """A port chosen for dnsmasq and taken by another process before dnsmasq binds it: dnsmasq
    reports the address in use, and the bed chooses another port and starts it again."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        udp.bind(("127.0.0.1", 0))
        taken = udp.getsockname()[1]
        tcp.bind(("127.0.0.1", taken))
        tcp.listen(1)
        real = testbed.upstream.free_port
        choices = iter([taken])
        monkeypatch.setattr(testbed.upstream, "free_port", lambda host="127.0.0.1": next(choices, None) or real(host))
        with Dnsmasq("127.0.0.1") as upstream:
            assert upstream.port != taken
            answer = dns.query.udp(dns.message.make_query(upstream.kubernetes_name, "A"),
                                   "127.0.0.1", port=upstream.port, timeout=5)
            assert answer.answer
