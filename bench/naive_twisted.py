"""The naive Python baseline: a plain twisted.names server with a simple in-memory resolver.

It serves the peer form of a topology (a hosts file, as CoreDNS and dnsmasq get it) the way a
first Python attempt would: stock ``DNSServerFactory``, every datagram parsed into ``dns.Message``
objects, answers built record by record, a dict from lower-cased name to addresses, PTR from the
first name of each hosts line, NODATA for a known name of another type, and every other name
forwarded by the stock ``client.Resolver`` to one upstream.  No cache, no per-source views.

    python -m bench.naive_twisted --hosts FILE --port PORT [--interface 127.0.0.1]
                                  --upstream HOST:PORT [--ttl 5]

Prints ``ready`` on stdout once both UDP and TCP listen.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from twisted.internet import defer
from twisted.names import client, common, dns, server


class HostsResolver(common.ResolverBase):
    """A, AAAA and PTR from an in-memory hosts table; other names are "not mine" (DomainError)."""

    def __init__(self, lines: list[str], ttl: int) -> None:
        common.ResolverBase.__init__(self)
        self.ttl = ttl
        self.addresses: dict[bytes, list[str]] = {}
        self.pointers: dict[bytes, bytes] = {}
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            ip, names = fields[0], [n.lower().encode() for n in fields[1:]]
            for name in names:
                self.addresses.setdefault(name, []).append(ip)
            reverse = ipaddress.ip_address(ip).reverse_pointer.encode()
            self.pointers.setdefault(reverse, names[0])

    def _lookup(self, name, cls, type, timeout=None):
        key = name.lower().rstrip(b".")
        if type == dns.PTR and key in self.pointers:
            record = dns.Record_PTR(self.pointers[key], ttl=self.ttl)
            return defer.succeed(([dns.RRHeader(name, dns.PTR, dns.IN, self.ttl, record, auth=True)], [], []))
        ips = self.addresses.get(key)
        if ips is None:
            return defer.fail(dns.DomainError(name))
        answers = []
        for ip in ips:
            if type in (dns.A, dns.ALL_RECORDS) and ":" not in ip:
                answers.append(dns.RRHeader(name, dns.A, dns.IN, self.ttl, dns.Record_A(ip, self.ttl), auth=True))
            elif type in (dns.AAAA, dns.ALL_RECORDS) and ":" in ip:
                answers.append(dns.RRHeader(name, dns.AAAA, dns.IN, self.ttl, dns.Record_AAAA(ip, self.ttl), auth=True))
        return defer.succeed((answers, [], []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--ttl", type=int, default=5)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    with open(args.hosts) as f:
        hosts = HostsResolver(f.readlines(), args.ttl)
    host, _, port = args.upstream.rpartition(":")
    upstream = client.Resolver(servers=[(host, int(port))], reactor=reactor)
    factory = server.DNSServerFactory(authorities=[hosts], clients=[upstream], verbose=0)
    reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface=args.interface)
    reactor.listenTCP(args.port, factory, interface=args.interface)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
