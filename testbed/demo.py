"""The demo: one command that shows kubedock-dns resolving Docker network names per test run.

``python -m testbed.demo`` (what ``scripts/demo`` runs) builds or reuses the cached Kubernetes
binaries (``scripts/build-tools.sh`` under ``~/.cache/kubedock-dns/``), brings up a real single
node (:mod:`testbed.node`: kube-apiserver, controller manager, scheduler, kubelet, kube-proxy,
containerd, CoreDNS) with kubedock-dns serving one namespace behind a Service
(:mod:`testbed.node.nodebed`), and plays two test runs side by side in that namespace,
as two testcontainers suites sharing one kubedock would: each run is a Docker network with a
``db`` and a ``service`` container, created as kubedock creates pods. Then each run's
``service`` resolves names from inside its pod (glibc ``getent``, through the resolv.conf the
webhook's mutation produced) and a table shows who asked what, the answer, whether it is right
and why. Everything is torn down at the end, also on failure or Ctrl-C.

Exit status: 0 when every answer is right, 1 when any is wrong, 2 when the demo cannot run
(the message says what is missing). ``--stand-in`` (or a machine that cannot run a node, which
the output says) uses the quick end-to-end bed instead (:mod:`testbed.bed`: the same API server
and webhook, a kubelet stand-in with network namespaces, dnsmasq as the cluster DNS).  Without
root (or with ``--loopback``) there are no network namespaces: pods are source addresses in
127.0.0.0/8 and the lookups are made with dnspython bound to them (glibc's search-list handling is
emulated), which the output says.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from typing import Sequence

__all__ = ["main"]

_T0 = time.monotonic()


def say(message: str) -> None:
    # one write per line: the kubelet stand-in's threads report too
    sys.stderr.write(f"[{time.monotonic() - _T0:6.1f}s] {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Row:
    asker: str
    network: str
    query: str
    answer: str
    expected: str
    why: str

    @property
    def ok(self) -> bool:
        return self.answer == self.expected


NOT_FOUND = "(not found)"


class Resolver:
    """Lookups as a pod makes them: glibc inside its namespace, or dnspython from its address."""

    def __init__(self, bed) -> None:
        self.bed = bed

    def forward(self, pod, name: str) -> str:
        if not self.bed.loopback:
            rc, out, _ = self.bed.exec(pod, ["getent", "ahosts", name], timeout=30)
            ips = sorted({line.split()[0] for line in out.splitlines() if line.strip()})
            return ", ".join(ips) if rc == 0 and ips else NOT_FOUND
        import dns.message
        import dns.query
        import dns.rcode

        # glibc with ndots:5 tries the search list first; the webhook's search list is the
        # namespace's cluster search list
        candidates = [name] if name.endswith(".") else [
            f"{name}.{suffix}." for suffix in (f"{self.bed.namespace}.svc.cluster.local",
                                               "svc.cluster.local", "cluster.local")] + [f"{name}."]
        for candidate in candidates:
            answer = dns.query.udp(dns.message.make_query(candidate, "A"), "127.0.0.1",
                                   port=self.bed.dns_port, source=pod.ip, timeout=5)
            ips = sorted(rr.address for rrset in answer.answer for rr in rrset if rr.rdtype == 1)
            if answer.rcode() == dns.rcode.NOERROR and ips:
                return ", ".join(ips)
        return NOT_FOUND

    def reverse(self, pod, ip: str) -> str:
        if not self.bed.loopback:
            rc, out, _ = self.bed.exec(pod, ["getent", "hosts", ip], timeout=30)
            fields = out.split()
            return fields[1] if rc == 0 and len(fields) > 1 else NOT_FOUND
        import dns.message
        import dns.query
        import dns.reversename

        answer = dns.query.udp(dns.message.make_query(dns.reversename.from_address(ip), "PTR"),
                               "127.0.0.1", port=self.bed.dns_port, source=pod.ip, timeout=5)
        names = [rr.target.to_text().rstrip(".") for rrset in answer.answer for rr in rrset]
        return names[0] if names else NOT_FOUND


def run_scenario(bed) -> list[Row]:
    """Two test runs, each a network with ``db`` and ``service``; their lookups as rows."""
    from testbed.bed import new_network_id

    runs = {}
    for run in ("run-a", "run-b"):
        network = new_network_id()
        say(f"{run}: Docker network {network[:12]}... (ID of 64 hex, as kubedock annotates it)")
        db = bed.create_kubedock_pod("db", [network], aliases=["database"],
                                     container_name=f"{run}-db")
        say(f"{run}: container {db.container_name} -> pod {db.name}, IP {db.ip}")
        service = bed.create_kubedock_pod("service", [network], aliases=["api"],
                                          container_name=f"{run}-service")
        say(f"{run}: container {service.container_name} -> pod {service.name}, IP {service.ip}")
        runs[run] = (network, db, service)

    resolver = Resolver(bed)
    rows = []
    for run, other in (("run-a", "run-b"), ("run-b", "run-a")):
        network, db, service = runs[run]
        asker, net = f"{run}/service", f"{run} ({network[:8]})"
        say(f"{asker} is looking names up")
        rows.append(Row(asker, net, "db", resolver.forward(service, "db"), db.ip,
                        f"{run}'s db: the asker's own network ({other}'s db is another network)"))
        rows.append(Row(asker, net, "database", resolver.forward(service, "database"), db.ip,
                        "a network alias of the same container"))
        rows.append(Row(asker, net, f"{run}-db", resolver.forward(service, f"{run}-db"), db.ip,
                        "the Docker container name resolves too"))
        rows.append(Row(asker, net, db.ip, resolver.reverse(service, db.ip), f"{run}-db",
                        "reverse lookup: the container's name, as Docker answers"))
        rows.append(Row(asker, net, f"{other}-db", resolver.forward(service, f"{other}-db"),
                        NOT_FOUND, f"{other}'s containers are invisible from {run}"))
    network, db, service = runs["run-a"]
    fqdn = f"db.{bed.namespace}.svc.cluster.local"
    rows.append(Row("run-a/service", f"run-a ({network[:8]})", fqdn,
                    resolver.forward(service, fqdn + "."), db.ip,
                    f"search suffix stripped: the cluster's Service db ({bed.decoy_db_ip}) never answers"))
    rows.append(Row("run-a/service", f"run-a ({network[:8]})", "cache", resolver.forward(service, "cache"),
                    NOT_FOUND, "no container called cache in run-a: not found, as in Docker "
                    "(never a namespace Service)"))
    rows.append(Row("run-a/service", f"run-a ({network[:8]})", "kubernetes.default",
                    resolver.forward(service, "kubernetes.default"), bed.kubernetes_ip,
                    "not a container name: forwarded to the cluster DNS"))
    return rows


def print_table(rows: Sequence[Row]) -> None:
    headers = ("pod", "network", "query", "answer", "check", "why")
    cells = [(r.asker, r.network, r.query, r.answer, "ok" if r.ok else f"WRONG, expected {r.expected}",
              r.why) for r in rows]
    widths = [max(len(headers[i]), *(len(c[i]) for c in cells)) for i in range(len(headers) - 1)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)) + "  " + values[-1]

    print(line(headers))
    print(line(["-" * w for w in widths] + ["-" * 3]))
    for c in cells:
        print(line(c))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Bring up a real control plane, kubedock-dns and simulated pods; show two "
                    "test runs resolving their own Docker networks; tear everything down.")
    parser.add_argument("--loopback", action="store_true",
                        help="no network namespaces even as root: pods are 127.0.0.0/8 addresses")
    parser.add_argument("--stand-in", action="store_true",
                        help="the quick bed (kubelet stand-in, network namespaces) instead of a real node")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)

    from testbed import netns
    from testbed.bed import BedError, EndToEndBed
    from testbed.controlplane import BinariesUnavailable, ControlPlane, ControlPlaneError, find_binaries
    from testbed.node.cluster import unavailable_reason

    if not (args.loopback or args.stand_in):
        reason = unavailable_reason()
        if reason is None:
            return _on_a_real_node()
        say(f"NOTE: no real node here ({reason}); using the stand-in bed")
    if args.loopback:
        say(f"--loopback: {netns.LOOPBACK_FALLBACK}")
    else:
        ok, reason = netns.is_available()
        if ok:
            say(f"data plane: real network namespaces ({reason})")
        else:
            say(f"NOTE: {reason}")
            say("run as root (e.g. sudo scripts/demo) to see glibc inside real pod namespaces")
    say("locating kube-apiserver and etcd (built once into ~/.cache/kubedock-dns by "
        "scripts/build-tools.sh; a first build takes 10-20 minutes on 2 cores)")
    try:
        binaries = find_binaries(progress=lambda m: say(f"build: {m}"))
    except BinariesUnavailable as e:
        say(f"cannot run the demo: {e}")
        return 2
    except ControlPlaneError as e:
        say(f"cannot run the demo: building the control plane failed: {e}")
        return 2
    try:
        with ControlPlane(binaries, progress=lambda m: say(f"control plane: {m}")) as plane:
            with EndToEndBed(control_plane=plane, dataplane="loopback" if args.loopback else "auto",
                             namespace_prefix="demo", progress=say) as bed:
                rows = run_scenario(bed)
                if any(not r.ok for r in rows):
                    say("some answers are wrong; kubedock-dns's log ends with:\n" + bed.server_log(40))
            leftover = bed.leftovers()
    except KeyboardInterrupt:
        say("interrupted; everything was torn down")
        return 130
    except (BedError, ControlPlaneError) as e:
        say(f"the demo could not run: {e}")
        return 2
    where = ("from inside each pod's network namespace with glibc (getent), kubelet stand-in"
             if not bed.loopback else "with dnspython from each pod's 127.0.0.0/8 address (no "
             f"namespaces: {bed.loopback_reason})")
    return _report(rows, bed.namespace, where, leftover)


def _on_a_real_node() -> int:
    """The demo on a real single node: real pods, kubelet, kube-proxy, CoreDNS."""
    from testbed.bed import BedError
    from testbed.controlplane import ControlPlaneError
    from testbed.node.cluster import Node
    from testbed.node.errors import NodeError
    from testbed.node.nodebed import NodeBed

    say("data plane: a real single node (kubelet, kube-proxy, containerd + runc + bridge CNI, "
        "CoreDNS); binaries built once into ~/.cache/kubedock-dns by scripts/build-tools.sh "
        "(a first build takes 20-30 minutes on 2 cores)")
    try:
        with Node(progress=lambda m: say(f"node: {m}")) as node:
            with NodeBed(node, namespace_prefix="demo", progress=say) as bed:
                say(f"kubedock-dns serves namespace {bed.namespace} behind Service {bed.service_ip} "
                    f"(kube-proxy, {node.proxy_mode} mode); CoreDNS behind {node.cluster_dns_ip}")
                rows = run_scenario(bed)
                if any(not r.ok for r in rows):
                    say("some answers are wrong; kubedock-dns's log ends with:\n" + bed.server_log(40))
            leftover = bed.leftovers()
        leftover += node.leftovers()
    except KeyboardInterrupt:
        say("interrupted; everything was torn down")
        return 130
    except (NodeError, BedError, ControlPlaneError) as e:
        say(f"the demo could not run: {e}")
        return 2
    where = ("inside real pods started by the kubelet (glibc getent), through the kubedock-dns "
             "Service IP programmed by kube-proxy")
    return _report(rows, bed.namespace, where, leftover)


def _report(rows: Sequence[Row], namespace: str, where: str, leftover: Sequence[str]) -> int:
    print()
    print(f"Two test runs in namespace {namespace}, one Docker network each; lookups made {where}:")
    print()
    print_table(rows)
    print()
    wrong = [r for r in rows if not r.ok]
    if leftover:
        print(f"WARNING: left behind: {leftover}")
    if wrong:
        print(f"{len(wrong)} of {len(rows)} lookups were WRONG (kubedock-dns's log is above); "
              "the end-to-end tests give details: python -m pytest -q tests/test_e2e.py")
        return 1
    print(f"All {len(rows)} lookups answered as Docker would, in {time.monotonic() - _T0:.0f}s. "
          "On a real cluster the same happens with kubedock started as "
          "`kubedock server --disable-services` and kubedock-dns installed by its Helm chart.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
