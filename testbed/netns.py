"""Real pod network namespaces for the end-to-end test bed (the data plane).

Contract
--------
``PodNetwork`` (a context manager; needs root) builds, on this machine only:

- one Linux bridge ``kdb<id>`` holding the gateway address ``10.244.<n>.1/24`` of a private test
  subnet chosen so it overlaps no existing route (``10.244.0.0/16`` lives only inside the
  namespaces we create, nothing is routed off the machine);
- per pod (``add_pod``): a network namespace ``kd-<id>-<pod>``, a veth pair (``eth0`` inside with
  the pod IP/24 and a default route via the gateway, ``kv<id><n>`` on the bridge), loopback up,
  and ``/etc/netns/<netns>/resolv.conf`` + ``hosts``, which ``ip netns exec`` bind-mounts over
  ``/etc/resolv.conf`` and ``/etc/hosts``, so glibc inside the namespace resolves exactly as in
  a pod;
- the kube-proxy stand-in (``expose_service``): DNAT in PREROUTING on the bridge from
  ``service_ip:port`` (UDP and TCP) to where a server in the root namespace listens. Pods reach
  the service IP through their default route, so the packet enters the root namespace on the
  bridge; nothing is SNATed or masqueraded, the server sees the pod's own IP as the source, and
  conntrack un-DNATs the reply. The NAT backend is picked at run time: ``nft`` (one private
  table per instance) or, failing that, ``iptables`` / ``iptables-legacy`` (one private chain
  jumped to from PREROUTING).

``close()`` removes everything it made (processes it spawned in the namespaces, namespaces,
veths, bridge, ``/etc/netns`` entries, NAT rules), also when a test fails: use it as a context
manager; an ``atexit`` hook closes instances still open at interpreter exit, and a state file per
instance under ``/run/kubedock-dns-testbed/`` lets the next instance sweep what a killed process
left behind (``sweep_stale``).

``render_resolv_conf`` renders a pod's resolv.conf from ``dnsPolicy`` + ``dnsConfig`` the way the
kubelet (``pkg/kubelet/network/dns``) and the container runtime do.

Without root (or without ``ip netns``) there is no data plane: ``is_available()`` says why. The
fallback the demo uses then is to give each simulated pod a source address in ``127.0.0.0/8``
(Linux routes the whole /8 to ``lo``; a client binds e.g. ``127.10.0.5`` and queries the DNS
server on loopback), which exercises source-IP attribution but not glibc's resolv.conf logic.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

__all__ = [
    "NETNS_PREFIX",
    "BRIDGE_PREFIX",
    "VETH_PREFIX",
    "ExecResult",
    "Pod",
    "PodNetwork",
    "PodNetworkError",
    "is_available",
    "leftovers",
    "render_hosts_file",
    "render_resolv_conf",
    "resolv_conf_for_pod",
    "sweep_stale",
    "LOOPBACK_FALLBACK",
]

NETNS_PREFIX = "kd-"
BRIDGE_PREFIX = "kdb"
VETH_PREFIX = "kv"
STATE_DIR = Path("/run/kubedock-dns-testbed")
NETNS_ETC = Path("/etc/netns")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")

LOOPBACK_FALLBACK = (
    "without root (or network namespaces) each simulated pod is a source address in "
    "127.0.0.0/8: the client binds e.g. 127.10.0.5 and queries the DNS server on loopback; "
    "source-IP attribution is exercised, glibc's search/ndots handling is not"
)

# Kubelet limits (k8s.io/kubernetes/pkg/apis/core/validation: MaxDNSNameservers,
# MaxDNSSearchPathsExpanded, MaxDNSSearchListCharsExpanded; DNS1123SubdomainMaxLength).
MAX_NAMESERVERS = 3
MAX_SEARCH_PATHS = 32
MAX_SEARCH_CHARS = 2048
MAX_SEARCH_DOMAIN_LEN = 253
DEFAULT_DNS_OPTIONS = ("ndots:5",)


class PodNetworkError(RuntimeError):
    """A command building or tearing down the data plane failed; the message names it."""


class ExecResult(NamedTuple):
    """What a command run in a pod's namespace returned."""

    rc: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Pod:
    """One simulated pod: its namespace, address and the host side of its veth."""

    name: str
    ip: str
    netns: str
    host_veth: str
    hostname: str


# --------------------------------------------------------------------------------------------
# resolv.conf / hosts rendering (pure)


def _omit_duplicates(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _merge_options(existing: Sequence[str], extra: Sequence[Mapping[str, Any]]) -> list[str]:
    # kubelet mergeDNSOptions: later names override earlier ones; Go map order is random,
    # we sort, which is one of the orders a kubelet may produce.
    merged: dict[str, str] = {}
    for op in existing:
        name, _, value = op.partition(":")
        merged[name] = value
    for option in extra:
        raw = option.get("value")
        merged[str(option["name"])] = "" if raw is None else str(raw)
    return [name + (":" + value if value else "") for name, value in sorted(merged.items())]


def _fit_search(search: list[str]) -> list[str]:
    # kubelet formDNSSearchFitsLimits
    search = search[:MAX_SEARCH_PATHS]
    search = [s for s in search if len(s) <= MAX_SEARCH_DOMAIN_LEN]
    line_len = len(" ".join(search))
    while search and line_len > MAX_SEARCH_CHARS:
        line_len -= len(search.pop()) + 1
    return search


def render_resolv_conf(
    dns_config: Mapping[str, Any] | None,
    cluster_dns_ip: str | Sequence[str] | None,
    *,
    dns_policy: str | None = "None",
    namespace: str = "default",
    cluster_domain: str = "cluster.local",
    host_network: bool = False,
    host_nameservers: Sequence[str] = ("127.0.0.1",),
    host_search: Sequence[str] = (),
    host_options: Sequence[str] = (),
) -> str:
    """Render resolv.conf for a pod as kubelet + containerd would.

    ``dns_config`` is the pod's ``spec.dnsConfig`` as stored by the API server (camelCase JSON:
    ``nameservers``, ``searches``, ``options: [{name, value}]``) or None; ``dns_policy`` its
    ``spec.dnsPolicy`` (None/empty means the API default, ClusterFirst). ``cluster_dns_ip`` is
    the kubelet's ``--cluster-dns`` (one IP or several); ``host_*`` stand for the kubelet's
    ``--resolv-conf`` file (used by ``Default`` and appended to ClusterFirst's search list).
    """
    policy = dns_policy or "ClusterFirst"
    if isinstance(cluster_dns_ip, str):
        cluster_dns = [cluster_dns_ip]
    else:
        cluster_dns = list(cluster_dns_ip or ())
    if policy == "ClusterFirstWithHostNet":
        policy = "ClusterFirst"
    elif policy == "ClusterFirst" and host_network:
        policy = "Default"
    if policy not in ("None", "ClusterFirst", "Default"):
        raise ValueError(f"unknown dnsPolicy {dns_policy!r}: expected None, ClusterFirst, "
                         "ClusterFirstWithHostNet or Default")
    nameservers: list[str]
    search: list[str]
    options: list[str]
    host_search_clean = [s.rstrip(".") for s in host_search if s != "."]
    if policy == "None":
        nameservers, search, options = [], [], []
    elif policy == "ClusterFirst" and cluster_dns:
        nameservers = list(cluster_dns)
        cluster_search = ([f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}",
                           cluster_domain] if cluster_domain else [])
        search = _omit_duplicates(cluster_search + host_search_clean)
        options = list(DEFAULT_DNS_OPTIONS)
    else:  # Default, or ClusterFirst without a cluster DNS (kubelet falls through to host)
        nameservers = list(host_nameservers)
        search = host_search_clean
        options = list(host_options)
    if dns_config:
        nameservers = _omit_duplicates(nameservers + list(dns_config.get("nameservers") or ()))
        search = _omit_duplicates(search + list(dns_config.get("searches") or ()))
        options = _merge_options(options, dns_config.get("options") or ())
    nameservers = nameservers[:MAX_NAMESERVERS]
    search = _fit_search(search)
    # containerd (internal/cri/server/sandbox_run / parseDNSOptions): search, nameserver, options
    lines = []
    if search:
        lines.append("search " + " ".join(search))
    lines.extend("nameserver " + ns for ns in nameservers)
    if options:
        lines.append("options " + " ".join(options))
    return "".join(line + "\n" for line in lines)


def resolv_conf_for_pod(pod: Mapping[str, Any], cluster_dns_ip: str | Sequence[str] | None,
                        *, cluster_domain: str = "cluster.local", **host: Any) -> str:
    """``render_resolv_conf`` for a raw pod object (JSON dict as the API server returns it)."""
    spec = pod.get("spec") or {}
    return render_resolv_conf(
        spec.get("dnsConfig"), cluster_dns_ip,
        dns_policy=spec.get("dnsPolicy"),
        namespace=(pod.get("metadata") or {}).get("namespace") or "default",
        cluster_domain=cluster_domain,
        host_network=bool(spec.get("hostNetwork")),
        **host,
    )


def render_hosts_file(ip: str, hostname: str) -> str:
    """The kubelet-managed /etc/hosts of a pod (pkg/kubelet/kubelet_pods.go managedHostsFileContent)."""
    return ("# Kubernetes-managed hosts file.\n"
            "127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "fe00::0\tip6-localnet\n"
            "fe00::0\tip6-mcastprefix\n"
            "fe00::1\tip6-allnodes\n"
            "fe00::2\tip6-allrouters\n"
            f"{ip}\t{hostname}\n")


# --------------------------------------------------------------------------------------------
# command helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input)
    except FileNotFoundError as exc:
        raise PodNetworkError(f"{argv[0]} is not installed: {exc}") from exc
    if check and proc.returncode != 0:
        raise PodNetworkError(f"`{' '.join(argv)}` failed with exit code {proc.returncode}: "
                              f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _sysctl_write(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def is_available() -> tuple[bool, str]:
    """Whether this machine can host a ``PodNetwork``; the reason names what is missing."""
    if os.geteuid() != 0:
        return False, f"not root (euid {os.geteuid()}); fallback: {LOOPBACK_FALLBACK}"
    if shutil.which("ip") is None:
        return False, f"`ip` (iproute2) is not installed; fallback: {LOOPBACK_FALLBACK}"
    probe = f"{NETNS_PREFIX}probe-{secrets.token_hex(3)}"
    try:
        added = _run(["ip", "netns", "add", probe], check=False)
        if added.returncode != 0:
            return False, (f"`ip netns add` fails here ({added.stderr.strip()}); "
                           f"fallback: {LOOPBACK_FALLBACK}")
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    backend = _pick_nat_backend("auto", probe_only=True)
    if backend is None:
        return False, "no working NAT backend (tried nft, iptables, iptables-legacy)"
    return True, f"root, ip netns works, NAT backend {backend}"


# --------------------------------------------------------------------------------------------
# NAT backends: kube-proxy stand-in


def _probe_nft() -> bool:
    if shutil.which("nft") is None:
        return False
    table = f"kdprobe{secrets.token_hex(3)}"
    ok = _run(["nft", "add", "table", "ip", table], check=False).returncode == 0
    _run(["nft", "delete", "table", "ip", table], check=False)
    return ok


def _probe_iptables(binary: str) -> bool:
    if shutil.which(binary) is None:
        return False
    return _run([binary, "-w", "5", "-t", "nat", "-S", "PREROUTING"], check=False).returncode == 0


def _pick_nat_backend(wanted: str, probe_only: bool = False) -> str | None:
    order = ["nft", "iptables", "iptables-legacy"] if wanted == "auto" else [wanted]
    for backend in order:
        works = _probe_nft() if backend == "nft" else _probe_iptables(backend)
        if works:
            return backend
    if probe_only:
        return None
    raise PodNetworkError(f"no working NAT backend among {order}")


class _NftNat:
    """One private ``ip`` table with a dstnat prerouting chain; dropping the table undoes all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.table = name
        self.created = False

    def _ensure(self) -> None:
        if not self.created:
            _run(["nft", "-f", "-"], input=(
                f"table ip {self.table} {{\n"
                f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
                f"}}\n"))
            self.created = True

    def add_dnat(self, iif: str, service_ip: str, port: int, target_ip: str,
                 target_port: int) -> None:
        self._ensure()
        rules = "".join(
            f"add rule ip {self.table} prerouting iifname \"{iif}\" ip daddr {service_ip} "
            f"{proto} dport {port} dnat to {target_ip}:{target_port}\n"
            for proto in ("udp", "tcp"))
        _run(["nft", "-f", "-"], input=rules)

    def state(self) -> dict[str, str]:
        return {"backend": "nft", "table": self.table}

    def close(self) -> None:
        if self.created:
            _run(["nft", "delete", "table", "ip", self.table], check=False)
            self.created = False


class _IptablesNat:
    """A private nat chain ``KDB-<id>`` jumped to from PREROUTING for our bridge only."""

    def __init__(self, binary: str, name: str, bridge: str) -> None:
        self.binary = binary
        self.chain = name.upper().replace("KDB", "KDB-", 1)
        self.bridge = bridge
        self.created = False

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([self.binary, "-w", "5", "-t", "nat", *args], check=check)

    def _ensure(self) -> None:
        if not self.created:
            self._ipt("-N", self.chain)
            self.created = True
            self._ipt("-I", "PREROUTING", "-i", self.bridge, "-j", self.chain)

    def add_dnat(self, iif: str, service_ip: str, port: int, target_ip: str,
                 target_port: int) -> None:
        self._ensure()
        for proto in ("udp", "tcp"):
            self._ipt("-A", self.chain, "-i", iif, "-d", service_ip, "-p", proto,
                      "--dport", str(port), "-j", "DNAT",
                      "--to-destination", f"{target_ip}:{target_port}")

    def state(self) -> dict[str, str]:
        return {"backend": self.binary, "chain": self.chain, "bridge": self.bridge}

    def close(self) -> None:
        if self.created:
            _iptables_cleanup(self.binary, self.chain, self.bridge)
            self.created = False


def _iptables_cleanup(binary: str, chain: str, bridge: str) -> None:
    base = [binary, "-w", "5", "-t", "nat"]
    while _run(base + ["-D", "PREROUTING", "-i", bridge, "-j", chain],
               check=False).returncode == 0:
        pass
    _run(base + ["-F", chain], check=False)
    _run(base + ["-X", chain], check=False)


# --------------------------------------------------------------------------------------------
# state files, stale sweeping, leftovers


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_resources(state: Mapping[str, Any]) -> None:
    for ns in state.get("netns", ()):
        _kill_netns_processes(ns)
        _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    for link in state.get("links", ()):
        _run(["ip", "link", "del", link], check=False)
    nat = state.get("nat") or {}
    if nat.get("backend") == "nft":
        _run(["nft", "delete", "table", "ip", nat["table"]], check=False)
    elif nat.get("backend"):
        _iptables_cleanup(nat["backend"], nat["chain"], nat["bridge"])


def _kill_netns_processes(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep_stale() -> list[str]:
    """Remove what instances whose process died left behind; returns their bridge names."""
    swept: list[str] = []
    if not STATE_DIR.is_dir():
        return swept
    for path in STATE_DIR.glob(f"{BRIDGE_PREFIX}*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(state.get("pid", 0))):
            continue
        _remove_resources(state)
        path.unlink(missing_ok=True)
        swept.append(path.stem)
    return swept


def leftovers(name: str | None = None) -> list[str]:
    """Namespaces, links, /etc/netns dirs and nft tables with our prefixes (of one instance if
    ``name``, the bridge name, is given). Empty when everything was cleaned up."""
    found = []
    ns_prefix = f"{NETNS_PREFIX}{name[len(BRIDGE_PREFIX):]}-" if name else NETNS_PREFIX
    link_prefixes = ((name, VETH_PREFIX + name[len(BRIDGE_PREFIX):]) if name
                     else (BRIDGE_PREFIX, VETH_PREFIX))
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(ns_prefix) and not ns.startswith(f"{NETNS_PREFIX}probe-"):
            found.append(f"netns {ns}")
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if link.startswith(link_prefixes):
                found.append(f"link {link}")
    if NETNS_ETC.is_dir():
        found.extend(f"dir {p}" for p in NETNS_ETC.iterdir() if p.name.startswith(ns_prefix))
    if shutil.which("nft"):
        for line in _run(["nft", "list", "tables"], check=False).stdout.splitlines():
            table = line.split()[-1] if line.split() else ""
            if table.startswith(name or BRIDGE_PREFIX):
                found.append(f"nft table {table}")
    return found


# --------------------------------------------------------------------------------------------
# the pod network


_open_instances: set["PodNetwork"] = set()
_open_lock = threading.Lock()


def _close_all_at_exit() -> None:
    with _open_lock:
        instances = list(_open_instances)
    for instance in instances:
        try:
            instance.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_close_all_at_exit)

_NAME_CLEAN = re.compile(r"[^a-z0-9.-]+")


class PodNetwork:
    """A bridge, a test subnet and pods as network namespaces on it (see the module docstring).

    ``subnet`` (default: a free ``10.244.<n>.0/24``) must lie in ``10.244.0.0/16``; the bridge
    takes its first host address. ``nat_backend`` is ``"auto"`` (nft, then iptables, then
    iptables-legacy) or one of those names.
    """

    def __init__(self, subnet: str | None = None, nat_backend: str = "auto") -> None:
        ok, reason = is_available()
        if not ok:
            raise PodNetworkError(f"cannot build pod network namespaces: {reason}")
        sweep_stale()
        self.short = secrets.token_hex(3)
        self.bridge = BRIDGE_PREFIX + self.short
        self.nat_backend = _pick_nat_backend(nat_backend)
        assert self.nat_backend is not None
        self._nat: _NftNat | _IptablesNat = (
            _NftNat(self.bridge) if self.nat_backend == "nft"
            else _IptablesNat(self.nat_backend, self.bridge, self.bridge))
        self._pods: dict[str, Pod] = {}
        self._procs: dict[str, list[subprocess.Popen[Any]]] = {}
        self._next_index = 0
        self._next_host = 2
        self._closed = False
        self._lock = threading.RLock()
        self._state_path = STATE_DIR / f"{self.bridge}.json"
        with _open_lock:
            _open_instances.add(self)
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            with open(STATE_DIR / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = self._choose_subnet(subnet)
                self.gateway = str(next(self.subnet.hosts()))
                self._save_state()
                _run(["ip", "link", "add", self.bridge, "type", "bridge"])
                _run(["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}",
                      "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            # Strict reverse-path filtering is fine (pod sources are routed back via the
            # bridge), but we set loose mode on our own bridge so a host with rp_filter=1 and
            # asymmetric test routes does not drop pod packets silently. route_localnet lets
            # expose_service DNAT to a server bound to 127.0.0.0/8.
            _sysctl_write(f"net/ipv4/conf/{self.bridge}/rp_filter", "2")
        except BaseException:
            self.close()
            raise

    # -- setup helpers

    def _choose_subnet(self, wanted: str | None) -> ipaddress.IPv4Network:
        used = []
        for line in _run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines():
            dest = line.split()[0] if line.split() else ""
            if dest == "default" or dest in ("local", "broadcast", "unreachable"):
                continue
            try:
                used.append(ipaddress.IPv4Network(dest, strict=False))
            except ValueError:
                continue
        for line in _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
            fields = line.split()
            if "inet" in fields:
                used.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
        if wanted is not None:
            net = ipaddress.IPv4Network(wanted)
            if not net.subnet_of(POD_SUPERNET):
                raise ValueError(f"subnet {wanted} must lie in {POD_SUPERNET} (a test-only range)")
            if any(net.overlaps(u) and u.prefixlen > 0 for u in used):
                raise PodNetworkError(f"subnet {wanted} overlaps an existing route or address")
            return net
        candidates = [n for n in POD_SUPERNET.subnets(new_prefix=24)
                      if not any(n.overlaps(u) and u.prefixlen > 0 for u in used)
                      and n.network_address.packed[2] != 0]
        if not candidates:
            raise PodNetworkError(f"no free /24 left in {POD_SUPERNET}")
        return candidates[secrets.randbelow(len(candidates))]

    def _save_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "bridge": self.bridge,
            "subnet": str(getattr(self, "subnet", "")),
            "netns": [p.netns for p in self._pods.values()],
            "links": [p.host_veth for p in self._pods.values()] + [self.bridge],
            "nat": self._nat.state() if self._nat.created else {},
        }
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_path)

    # -- public API

    @property
    def pods(self) -> Mapping[str, Pod]:
        """The pods added and not removed, by name."""
        return dict(self._pods)

    def allocate_ip(self) -> str:
        """The next unused pod address of the subnet (the kubelet stand-in's IPAM)."""
        with self._lock:
            used = {p.ip for p in self._pods.values()}
            hosts = list(self.subnet.hosts())
            for _ in range(len(hosts)):
                candidate = str(self.subnet.network_address + self._next_host)
                self._next_host = self._next_host + 1 if self._next_host < len(hosts) else 2
                if candidate not in used and candidate != self.gateway:
                    return candidate
        raise PodNetworkError(f"subnet {self.subnet} is full")

    def add_pod(self, name: str, ip: str | None = None, resolv_conf_text: str | None = None,
                *, hostname: str | None = None, hosts_text: str | None = None) -> Pod:
        """Create the pod's namespace on the bridge with ``ip`` (default: ``allocate_ip()``).

        ``resolv_conf_text`` (default: ``nameserver <gateway>``) becomes the namespace's
        /etc/resolv.conf; its /etc/hosts is the kubelet's (``render_hosts_file``) for
        ``hostname`` (default: ``name``) unless ``hosts_text`` is given.
        """
        with self._lock:
            if self._closed:
                raise PodNetworkError(f"{self.bridge} is closed")
            if name in self._pods:
                raise ValueError(f"pod {name!r} already exists on {self.bridge}")
            ip = ip or self.allocate_ip()
            addr = ipaddress.IPv4Address(ip)
            if addr not in self.subnet or str(addr) == self.gateway or addr in (
                    self.subnet.network_address, self.subnet.broadcast_address):
                raise ValueError(f"pod IP {ip} is not a host address of {self.subnet} "
                                 f"other than the gateway {self.gateway}")
            if any(p.ip == ip for p in self._pods.values()):
                raise ValueError(f"pod IP {ip} is already used on {self.bridge}")
            index = self._next_index
            self._next_index += 1
            clean = _NAME_CLEAN.sub("-", name.lower()).strip("-.")[:40] or "pod"
            pod = Pod(name=name, ip=ip, netns=f"{NETNS_PREFIX}{self.short}-{clean}-{index:x}",
                      host_veth=f"{VETH_PREFIX}{self.short}{index:x}",
                      hostname=hostname or name)
            self._pods[name] = pod
            self._procs[name] = []
            self._save_state()
        peer = f"{VETH_PREFIX}{self.short}{index:x}p"
        try:
            etc = NETNS_ETC / pod.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                resolv_conf_text if resolv_conf_text is not None
                else f"nameserver {self.gateway}\n")
            (etc / "hosts").write_text(hosts_text if hosts_text is not None
                                       else render_hosts_file(ip, pod.hostname))
            _run(["ip", "netns", "add", pod.netns])
            _run(["ip", "link", "add", pod.host_veth, "type", "veth", "peer", "name", peer])
            _run(["ip", "link", "set", peer, "netns", pod.netns])
            _run(["ip", "link", "set", pod.host_veth, "master", self.bridge])
            _run(["ip", "link", "set", pod.host_veth, "up"])
            inside = ["ip", "-n", pod.netns]
            _run(inside + ["link", "set", peer, "name", "eth0"])
            _run(inside + ["addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0"])
            _run(inside + ["link", "set", "lo", "up"])
            _run(inside + ["link", "set", "eth0", "up"])
            _run(inside + ["route", "add", "default", "via", self.gateway, "dev", "eth0"])
        except BaseException:
            self.remove_pod(name)
            raise
        return pod

    def set_resolv_conf(self, name: str, resolv_conf_text: str) -> None:
        """Replace a pod's resolv.conf (seen by the next ``exec``)."""
        (NETNS_ETC / self._pods[name].netns / "resolv.conf").write_text(resolv_conf_text)

    def _exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        try:
            pod = self._pods[name]
        except KeyError:
            raise KeyError(f"no pod {name!r} on {self.bridge}; pods: {sorted(self._pods)}")
        return ["ip", "netns", "exec", pod.netns, *argv]

    def exec(self, name: str, argv: Sequence[str], timeout: float = 30,
             input: str | None = None) -> ExecResult:
        """Run ``argv`` inside the pod's namespace (with its resolv.conf and hosts) and wait.

        Raises ``subprocess.TimeoutExpired`` (after killing it) when it outlives ``timeout``.
        """
        proc = subprocess.run(self._exec_argv(name, argv), capture_output=True, text=True,
                              timeout=timeout, input=input)
        return ExecResult(proc.returncode, proc.stdout, proc.stderr)

    def spawn(self, name: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the pod's namespace in the background; it is killed when the pod is
        removed or the network closed."""
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self._exec_argv(name, argv), **popen_kwargs)
        self._procs[name].append(proc)
        return proc

    def expose_service(self, service_ip: str, port: int, target_ip: str,
                       target_port: int) -> None:
        """DNAT ``service_ip:port`` (UDP and TCP) from pods to ``target_ip:target_port``, a
        server in the root namespace (bound to the gateway, 0.0.0.0, or 127.0.0.0/8). No SNAT:
        the server sees the pod's IP. Pods reach the service IP through their default route."""
        ipaddress.IPv4Address(service_ip)
        if ipaddress.IPv4Address(target_ip).is_loopback:
            # a packet arriving on the bridge may be DNATed to 127/8 and answered from it only
            # with route_localnet on that interface
            _sysctl_write(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")
        with self._lock:
            self._nat.add_dnat(self.bridge, service_ip, port, target_ip, target_port)
            self._save_state()

    def remove_pod(self, name: str) -> None:
        """Kill what was spawned in the pod, delete its namespace, veth and /etc/netns entry."""
        with self._lock:
            pod = self._pods.pop(name, None)
            procs = self._procs.pop(name, [])
        if pod is None:
            return
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _kill_netns_processes(pod.netns)
        _run(["ip", "netns", "del", pod.netns], check=False)
        _run(["ip", "link", "del", pod.host_veth], check=False)
        shutil.rmtree(NETNS_ETC / pod.netns, ignore_errors=True)
        with self._lock:
            if not self._closed:
                self._save_state()

    def close(self) -> None:
        """Remove everything this instance created. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for name in list(self._pods):
            self.remove_pod(name)
        self._nat.close()
        _run(["ip", "link", "del", self.bridge], check=False)
        self._state_path.unlink(missing_ok=True)
        with _open_lock:
            _open_instances.discard(self)

    def leftovers(self) -> list[str]:
        """What of this instance still exists (empty after ``close``)."""
        return leftovers(self.bridge)

    def __enter__(self) -> "PodNetwork":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<PodNetwork {self.bridge} {getattr(self, 'subnet', '?')} "
                f"nat={self.nat_backend} pods={sorted(self._pods)}>")
