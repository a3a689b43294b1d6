"""Generated benchmark topologies: pods, the records every server gets, and the queries sent.

A topology is ``networks`` Docker networks of two pods each, ``db`` (alias ``postgres``) and
``service`` (alias ``api``), as kubedock would create them: label ``kubedock: "true"``, label
``kubedock.containerid`` (12 hex), annotations ``kubedock.hostalias/0..1``,
``kubedock.network/0`` (a 64-hex network ID) and ``kubedock.containername``.  Pod IPs lie in
127.10.0.0/16 so that, on Linux, every pod address is local and ``dnsperf -a`` can send from it.

The same pods are served in two forms:

* the **view** form, for kubedock-dns: the pods file (a JSON list of pod objects).  Every network
  uses the same names; the asker's source address selects the network, so the query for ``db``
  is the same text from every pod and the answer differs.
  aardvark-dns (podman's per-network DNS) answers the same view-form queries by source address
  too, from one config file per network (:meth:`Topology.aardvark_configs`), on that network's
  gateway address (:meth:`Topology.gateway`), as netavark sets it up.
* the **peer** form, for CoreDNS, dnsmasq and the naive baseline, which have no per-source views:
  the union of all networks in one hosts file, every name made unique by its network's label
  (``db.n0001``, ``db.n0001.bench.svc.cluster.local``).  A peer does strictly less work per query
  than kubedock-dns (one table lookup, no asker lookup, no network selection).

:meth:`Topology.queries_for` gives, for one source pod, the query mix glibc and typical clients
send, each query in both forms with the answer every server must give.  Everything here is pure
and deterministic (no I/O, no randomness): the same sizes give byte-identical files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

NAMESPACE = "bench"
CLUSTER_DOMAIN = "cluster.local"
SEARCH_SUFFIX = f"{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
FORWARDED_ZONE = "example.test"
FORWARDED_ANSWER = "192.0.2.10"
POD_NET = ipaddress.IPv4Network("127.10.0.0/16")
# One gateway address per network, for servers that listen on each network's gateway (aardvark-dns).
GATEWAY_NET = ipaddress.IPv4Network("127.11.0.0/16")
TTL = 5

# (role, hostalias/0, further aliases): two pods per network, as a typical testcontainers setup.
ROLES = (("db", ("postgres",)), ("service", ("api",)))


def _hex(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Network:
    """One Docker network: its 64-hex ID and the short label peers use to make names unique."""

    index: int
    id: str
    label: str


@dataclass(frozen=True)
class Pod:
    """One benchmark pod: address, network, and the names Docker resolves for it (primary first)."""

    index: int
    ip: str
    network: Network
    role: str
    hostname: str
    aliases: tuple[str, ...]
    container_name: str
    container_id: str
    uid: str

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the pod in a Docker network, ``hostalias/0`` first (lower case)."""
        return (self.hostname, *self.aliases, self.container_name, self.container_id)

    def peer_name(self, name: str) -> str:
        """The name made unique across networks, as peers serve it (``db.n0001``)."""
        return f"{name}.{self.network.label}"

    def as_api_object(self) -> dict:
        """The pod as the API server's JSON shows it once it runs."""
        annotations = {f"kubedock.hostalias/{i}": n for i, n in enumerate((self.hostname, *self.aliases))}
        annotations["kubedock.network/0"] = self.network.id
        annotations["kubedock.containername"] = self.container_name
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "uid": self.uid,
                "name": f"kubedock-{self.container_id}",
                "namespace": NAMESPACE,
                "labels": {"kubedock": "true", "kubedock.containerid": self.container_id},
                "annotations": annotations,
            },
            "spec": {
                "restartPolicy": "Never",
                "hostname": self.hostname,
                "containers": [{"name": "main", "image": f"bench/{self.role}:latest"}],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }


@dataclass(frozen=True)
class Query:
    """One query of the mix, in both forms, with the answer every server must give.

    ``expect`` is a tuple of addresses for A, the empty tuple for NODATA, and for PTR the pod's
    container name (Docker's answer), which must be the first label of the answer's target (peers
    answer ``n0001-db-1.n0001.``; kubedock-dns answers ``n0001-db-1.``).  ``kind`` is ``local`` or ``forwarded``.
    """

    kind: str
    qtype: str
    view_name: str
    peer_name: str
    expect: tuple[str, ...]
    label: str

    def line(self, form: str) -> str:
        """The dnsperf input line (``NAME TYPE``) for ``form`` ``view`` or ``peer``."""
        return f"{self.view_name if form == 'view' else self.peer_name} {self.qtype}"


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


@dataclass(frozen=True)
class Topology:
    """``networks`` networks of two pods each (see the module docstring)."""

    networks: int

    def __post_init__(self) -> None:
        if not 1 <= self.networks <= (POD_NET.num_addresses - 2) // (2 * len(ROLES)):
            raise ValueError(f"networks must be between 1 and 16000 (got {self.networks!r})")

    @property
    def size(self) -> int:
        return self.networks * len(ROLES)

    @property
    def name(self) -> str:
        return f"{self.size} pods / {self.networks} networks"

    def network(self, index: int) -> Network:
        width = max(4, len(str(self.networks - 1)))
        return Network(index, _hex(f"bench-network-{index}", 64), f"n{index:0{width}d}")

    def pod_ip(self, index: int) -> str:
        # 200 pods per /24, host part .10 to .209: no .0/.255 look-alikes, easy to read.
        return str(POD_NET.network_address + (index // 200) * 256 + index % 200 + 10)

    def gateway(self, network: Network) -> str:
        """The network's gateway address (its bridge address in podman), where aardvark-dns
        listens for that network; 250 networks per /24, host part .1 to .250."""
        return str(GATEWAY_NET.network_address + (network.index // 250) * 256 + network.index % 250 + 1)

    def pods(self) -> list[Pod]:
        return list(self._pods)

    @cached_property
    def _pods(self) -> tuple[Pod, ...]:
        pods = []
        for n in range(self.networks):
            network = self.network(n)
            for r, (role, aliases) in enumerate(ROLES):
                index = n * len(ROLES) + r
                cid = _hex(f"bench-container-{index}", 12)
                pods.append(
                    Pod(
                        index=index,
                        ip=self.pod_ip(index),
                        network=network,
                        role=role,
                        hostname=role,
                        aliases=aliases,
                        container_name=f"{network.label}-{role}-1",
                        container_id=cid,
                        uid=f"{_hex(f'bench-uid-{index}', 8)}-0000-4000-8000-{_hex(f'uid-{index}', 12)}",
                    )
                )
        return tuple(pods)

    def sources(self, count: int) -> list[Pod]:
        """``count`` asking pods spread evenly over the networks (one per network at most)."""
        pods = self.pods()
        count = max(1, min(count, self.networks))
        step = self.networks / count
        return [pods[int(i * step) * len(ROLES)] for i in range(count)]

    # -- the view form (kubedock-dns) ----------------------------------------------------------

    def pods_json(self) -> str:
        return json.dumps([p.as_api_object() for p in self.pods()], indent=None, separators=(",", ":"))

    def aardvark_configs(self, upstream: str) -> dict[str, str]:
        """aardvark-dns's config directory as netavark writes it: one file per network (named
        after it), first line the gateway address and the network's DNS servers (``upstream``,
        where names it does not own go), then one line per container: ID, IPv4, IPv6 (none),
        names (the container name first, as Docker answers PTR, then hostname, aliases, short ID)."""
        files: dict[str, list[str]] = {}
        for pod in self.pods():
            lines = files.setdefault(pod.network.label, [f"{self.gateway(pod.network)} {upstream}"])
            names = (pod.container_name, *(n for n in pod.names if n != pod.container_name))
            lines.append(f"{_hex(f'bench-container-{pod.index}', 64)} {pod.ip}  {','.join(names)}")
        return {label: "\n".join(lines) + "\n" for label, lines in files.items()}

    # -- the peer form (CoreDNS, dnsmasq, naive baseline) ---------------------------------------

    def peer_records(self) -> Iterable[tuple[str, tuple[str, ...]]]:
        """``(ip, names)`` for the hosts file; the first name (the container name, as Docker
        answers PTR) is the PTR target."""
        for pod in self.pods():
            names = []
            for name in (pod.container_name, *(n for n in pod.names if n != pod.container_name)):
                names.append(pod.peer_name(name))
                names.append(f"{pod.peer_name(name)}.{SEARCH_SUFFIX}")
            yield pod.ip, tuple(names)

    def peer_name_count(self) -> int:
        return sum(len(names) for _, names in self.peer_records())

    def hosts_file(self) -> str:
        return "".join(f"{ip} {' '.join(names)}\n" for ip, names in self.peer_records())

    def dnsmasq_local_conf(self) -> str:
        """dnsmasq ``local=`` lines: answer these zones from the hosts file only, NODATA for a
        known name of another type, NXDOMAIN otherwise (never forward them)."""
        zones = [SEARCH_SUFFIX] + [self.network(n).label for n in range(self.networks)]
        return "".join(f"local=/{zone}/\n" for zone in zones)

    # -- queries ------------------------------------------------------------------------------

    def queries_for(self, source: Pod) -> list[Query]:
        """The mix one pod sends, 20 queries: 8 A and 4 AAAA (NODATA) in the search-suffixed form
        glibc sends first, 3 short names (as sent with a trailing dot), 2 PTR for network members,
        3 forwarded names answered by the upstream."""
        first = source.network.index * len(ROLES)
        db, service = self._pods[first], self._pods[first + 1]
        out: list[Query] = []

        def local(pod: Pod, name: str, qtype: str, label: str, suffixed: bool) -> None:
            expect = (pod.ip,) if qtype == "A" else ()
            peer = pod.peer_name(name)
            if suffixed:
                out.append(Query("local", qtype, f"{name}.{SEARCH_SUFFIX}.", f"{peer}.{SEARCH_SUFFIX}.", expect, label))
            else:
                out.append(Query("local", qtype, f"{name}.", f"{peer}.", expect, label))

        for pod, name in ((db, "db"), (service, "service"), (db, "postgres"), (service, "api"),
                          (db, db.container_id), (service, service.container_id),
                          (db, db.container_name), (db, "db")):
            local(pod, name, "A", "A search-suffixed", True)
        for pod, name in ((db, "db"), (service, "service"), (db, "postgres"), (service, "api")):
            local(pod, name, "AAAA", "AAAA NODATA", True)
        for pod, name in ((db, "db"), (service, "service"), (service, "api")):
            local(pod, name, "A", "A short", False)
        for pod in (db, service):
            out.append(Query("local", "PTR", reverse_name(pod.ip) + ".", reverse_name(pod.ip) + ".",
                             (pod.container_name,), "PTR"))
        for k in range(3):
            name = f"fw{k}.{FORWARDED_ZONE}."
            out.append(Query("forwarded", "A", name, name, (FORWARDED_ANSWER,), "A forwarded"))
        return out

    def forwarded_queries(self) -> list[Query]:
        """Forwarded names only, to compare a server with asking the upstream directly."""
        return [Query("forwarded", "A", n, n, (FORWARDED_ANSWER,), "A forwarded")
                for n in (f"fw{k}.{FORWARDED_ZONE}." for k in range(20))]
