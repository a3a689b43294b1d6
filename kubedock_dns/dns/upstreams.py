"""Where questions that are not ours go: upstream nameserver addresses, parsed strictly.

Contract: :func:`parse_upstream` turns ``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` (an IP address,
never a name) into a frozen :class:`Upstream`, or raises ``ValueError`` naming the text;
:func:`upstreams_from_resolv_conf` reads every ``nameserver`` of a resolv.conf's text, in order,
skipping (with a warning) values that are not addresses.  No sockets, no reactor: both the
option parser and the forwarder import this module, so the options never import the forwarder.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.logger import Logger

from kubedock_dns.contract import ascii_decimal

# These warnings were always logged under the forwarder's namespace; kept so log filters keep working.
log = Logger(namespace="kubedock_dns.dns.forwarder")


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """``host``, ``host:port`` or ``[v6]:port``; raises ValueError naming the text."""
    host, port = text.strip(), 53
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"upstream {text!r}: expected ':PORT' after ']'")
            port = ascii_decimal(rest[1:], 5)
    elif host.count(":") == 1:
        host, port_text = host.split(":")
        port = ascii_decimal(port_text, 5)
    ipaddress.ip_address(host)  # raises ValueError for names: upstreams must be addresses
    if not 0 < port < 65536:
        raise ValueError(f"upstream {text!r}: port out of range")
    return Upstream(host, port)


def upstreams_from_resolv_conf(text: str) -> list[Upstream]:
    """Every ``nameserver`` of a resolv.conf, in order."""
    found = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(Upstream(str(ipaddress.ip_address(parts[1].split("%")[0]))))
            except ValueError:
                log.warn("ignoring nameserver {value!r}: not an address", value=parts[1])
    return found
