"""The data-plane half of the end-to-end test bed works on this machine.

Pods are real network namespaces on a bridge; a pod's glibc resolves through the resolv.conf a
kubelet would render, via a service IP DNATed (kube-proxy stand-in) to a server in the root
namespace that sees the pod's own IP as the source; dnsmasq plays the cluster DNS; and nothing
the bed creates survives it, even when a test fails or the process is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from testbed import netns
from testbed.netns import PodNetwork, render_resolv_conf, resolv_conf_for_pod
from testbed.ports import bind_udp_and_tcp
from testbed.upstream import Dnsmasq

SERVICE_IP = "10.96.0.10"


def _require_netns() -> None:
    ok, reason = netns.is_available()
    if not ok:
        pytest.skip(reason)


@pytest.fixture
def net() -> Iterator[PodNetwork]:
    _require_netns()
    with PodNetwork() as network:
        yield network
    assert network.leftovers() == []


class SourceEcho:
    """UDP and TCP servers in the root namespace answering each datagram/connection with the
    source address they saw."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.udp, self.tcp, self.port = bind_udp_and_tcp(host)
        self.tcp.listen(8)
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _serve_udp(self) -> None:
        while not self.stop.is_set():
            try:
                _, addr = self.udp.recvfrom(512)
            except (TimeoutError, OSError):
                continue
            self.udp.sendto(f"udp {addr[0]}".encode(), addr)

    def _serve_tcp(self) -> None:
        while not self.stop.is_set():
            try:
                conn, addr = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(f"tcp {addr[0]}".encode())

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=2)
        self.udp.close()
        self.tcp.close()


ASK_SOURCE = textwrap.dedent("""
    import socket, sys
    ip, port = sys.argv[1], int(sys.argv[2])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    u.sendto(b"who am i", (ip, port)); print(u.recvfrom(512)[0].decode())
    t = socket.create_connection((ip, port), timeout=3); print(t.recv(512).decode())
""")


@pytest.mark.netns
def test_two_pods_ping_and_exchange_udp(net: PodNetwork) -> None:
    """Two pods on the bridge reach each other by IP: ICMP echo, and a UDP datagram whose
    reply reports the sender's pod IP."""
    a = net.add_pod("pod-a")
    b = net.add_pod("pod-b")
    if shutil.which("ping") is None:
        pytest.skip("ping (iputils-ping) is not installed")
    rc, out, err = net.exec("pod-a", ["ping", "-c", "1", "-W", "3", b.ip], timeout=10)
    assert rc == 0, out + err
    server = net.spawn("pod-b", [sys.executable, "-c", textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999))
        print("ready", flush=True)
        data, addr = s.recvfrom(512); s.sendto(data + b" from " + addr[0].encode(), addr)
    """)], text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    rc, out, err = net.exec("pod-a", [sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        s.sendto(b"hello", ("{b.ip}", 9999)); print(s.recvfrom(512)[0].decode())
    """)], timeout=10)
    assert rc == 0, err
    assert out.strip() == f"hello from {a.ip}"


@pytest.mark.netns
@pytest.mark.parametrize("where", ["gateway", "loopback"])
def test_pod_glibc_resolves_via_service_dnat_to_dnsmasq(net: PodNetwork, where: str) -> None:
    """A pod with a kubelet-rendered ClusterFirst resolv.conf naming the service IP resolves
    ``kubernetes.default`` through glibc's search list; the DNAT delivers to dnsmasq in the
    root namespace (bound to the bridge gateway, or to loopback), which sees the pod's IP."""
    listen = net.gateway if where == "gateway" else None
    with Dnsmasq(listen_ip=listen, port=5353 if listen else None) as upstream:
        net.expose_service(SERVICE_IP, 53, upstream.listen_ip, upstream.port)
        pod = net.add_pod("asker", resolv_conf_text=render_resolv_conf(
            None, SERVICE_IP, dns_policy="ClusterFirst", namespace="default"))
        rc, out, err = net.exec("asker", ["getent", "hosts", "kubernetes.default"], timeout=15)
        assert rc == 0, err
        assert out.split() == ["10.96.0.1", "kubernetes.default.svc.cluster.local"]
        rc, out, err = net.exec("asker", ["getent", "hosts", "nothing-here.example"], timeout=15)
        assert rc == 2, out + err
        rc, out, _ = net.exec("asker", ["dig", "+tcp", "+short", "db.default.svc.cluster.local"],
                              timeout=15)
        assert out.split() == ["10.96.7.7"]
        pod_queries = [q for q in upstream.queries() if q.client == pod.ip]
        assert {q.name for q in pod_queries} >= {"kubernetes.default.svc.cluster.local",
                                                 "db.default.svc.cluster.local"}
        # everything the pod sent arrived with its own address, nothing masqueraded
        assert not [q for q in upstream.queries()
                    if q.client.startswith("10.244.") and q.client != pod.ip
                    and q.client != net.gateway]


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["auto", "nft", "iptables", "iptables-legacy"])
def test_service_dnat_preserves_pod_source_address(backend: str) -> None:
    """Through the kube-proxy stand-in (every NAT backend), a server behind the service IP sees
    each pod's own IP as the source over UDP and TCP, and its replies reach the pod as coming
    from the service IP (conntrack un-DNATs them)."""
    _require_netns()
    if backend != "auto" and shutil.which(backend) is None:
        pytest.skip(f"{backend} is not installed")
    with PodNetwork(nat_backend=backend) as network:
        echo = SourceEcho(network.gateway)
        try:
            network.expose_service(SERVICE_IP, 53, echo.host, echo.port)
            pods = [network.add_pod(f"p{i}") for i in range(2)]
            for pod in pods:
                rc, out, err = network.exec(pod.name, [sys.executable, "-c", ASK_SOURCE,
                                                       SERVICE_IP, "53"], timeout=15)
                assert rc == 0, err
                assert out.split("\n")[:2] == [f"udp {pod.ip}", f"tcp {pod.ip}"]
        finally:
            echo.close()
    assert network.leftovers() == []


@pytest.mark.netns
def test_everything_removed_when_the_test_body_fails() -> None:
    """An exception inside the ``with`` block still removes namespaces, veths, bridge,
    /etc/netns entries and NAT rules."""
    _require_netns()
    with pytest.raises(RuntimeError, match="boom"):
        with PodNetwork() as network:
            network.add_pod("doomed")
            network.expose_service(SERVICE_IP, 53, network.gateway, 5353)
            assert network.leftovers() != []
            raise RuntimeError("boom")
    assert network.leftovers() == []


CHILD = textwrap.dedent("""
    import os, sys, signal
    from testbed.netns import PodNetwork
    net = PodNetwork()
    net.add_pod("orphan")
    net.expose_service("10.96.0.10", 53, net.gateway, 5353)
    print(net.bridge, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # else: exit without close(); the atexit hook must clean up
""")


@pytest.mark.netns
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_nothing_survives_the_owning_process(how: str) -> None:
    """A process that exits without closing its PodNetwork leaves nothing (atexit); one that
    is SIGKILLed leaves state that the next ``sweep_stale`` (run by every new PodNetwork)
    removes."""
    _require_netns()
    child = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True,
                           timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    bridge = child.stdout.strip()
    assert bridge.startswith(netns.BRIDGE_PREFIX), child.stderr
    if how == "kill":
        assert child.returncode == -signal.SIGKILL
        # a PodNetwork created meanwhile (a concurrent run) may have swept it already
        netns.sweep_stale()
    else:
        assert child.returncode == 0, child.stderr
    assert netns.leftovers(bridge) == []


@pytest.mark.netns
def test_no_leftovers_with_our_prefixes() -> None:
    """After the bed's tests, no namespace, link, /etc/netns directory or nft table with the
    bed's prefixes remains on the machine (other than those of a live concurrent run)."""
    _require_netns()
    netns.sweep_stale()
    live = set()
    if netns.STATE_DIR.is_dir():
        live = {p.stem for p in netns.STATE_DIR.glob(f"{netns.BRIDGE_PREFIX}*.json")}
    remaining = [item for item in netns.leftovers()
                 if not any(name[len(netns.BRIDGE_PREFIX):] in item for name in live)]
    assert remaining == []


# ---------------------------------------------------------------------------------------------
# resolv.conf rendering (pure: no root needed)


def test_mutated_pod_gets_only_its_dns_config() -> None:
    """dnsPolicy None (what the webhook sets): resolv.conf holds exactly the stored dnsConfig,
    nameservers, search list and options, in containerd's layout."""
    pod = {"metadata": {"namespace": "ci"},
           "spec": {"dnsPolicy": "None",
                    "dnsConfig": {"nameservers": ["10.96.0.10"],
                                  "searches": ["ci.svc.cluster.local", "svc.cluster.local",
                                               "cluster.local"],
                                  "options": [{"name": "ndots", "value": "5"},
                                              {"name": "edns0"}]}}}
    assert resolv_conf_for_pod(pod, "10.96.0.99") == (
        "search ci.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options edns0 ndots:5\n")


def test_cluster_first_pod_gets_cluster_dns_and_namespace_search_list() -> None:
    """dnsPolicy ClusterFirst (also the default when unset): the cluster DNS IP, the
    namespace's search list followed by the host's, ndots:5; a dnsConfig is appended and its
    options override by name."""
    assert render_resolv_conf(None, "10.96.0.10", dns_policy=None, namespace="team",
                              host_search=["corp.example."]) == (
        "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n")
    assert render_resolv_conf(
        {"nameservers": ["10.0.0.2", "10.96.0.10"], "searches": ["extra.example"],
         "options": [{"name": "ndots", "value": "2"}, {"name": "timeout", "value": "1"}]},
        "10.96.0.10", dns_policy="ClusterFirst") == (
        "search default.svc.cluster.local svc.cluster.local cluster.local extra.example\n"
        "nameserver 10.96.0.10\nnameserver 10.0.0.2\n"
        "options ndots:2 timeout:1\n")


def test_kubelet_limits_apply() -> None:
    """At most three nameservers and 32 search domains survive, as the kubelet truncates; a
    hostNetwork pod with ClusterFirst gets the host's resolv.conf."""
    text = render_resolv_conf({"nameservers": [f"10.0.0.{i}" for i in range(1, 6)],
                               "searches": [f"s{i}.example" for i in range(40)]}, None)
    assert text.count("nameserver") == 3
    assert len(text.splitlines()[0].split()) == 1 + 32
    assert render_resolv_conf(None, "10.96.0.10", dns_policy="ClusterFirst", host_network=True,
                              host_nameservers=["192.0.2.53"]) == "nameserver 192.0.2.53\n"
    with pytest.raises(ValueError, match="dnsPolicy"):
        render_resolv_conf(None, "10.96.0.10", dns_policy="Bogus")
