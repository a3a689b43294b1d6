"""What a node run touches on this machine outside its run directory, and how it is found again.

Contract:

- :func:`node_ip` is the address of the interface holding the default route (pods reach the API
  server and host processes there); :func:`choose_pod_subnet` a ``/24`` in ``POD_SUPERNET`` that
  overlaps no route of this machine.
- :func:`prepare_sysctls` turns on what kube-proxy and the bridge CNI need (``ip_forward``,
  ``bridge-nf-call-iptables``), as kubeadm's preflight demands; they are host settings that other
  beds on this machine may rely on too, so they are left on.
- :class:`MachineLock`: one node per machine at a time, since kube-proxy's iptables chains and
  nftables table have fixed names (``KUBE-*``, ``kube-proxy``): a second run waits, saying for whom.
- :func:`mounts_under`, :func:`processes_under` find what still lives under a run directory;
  :func:`kube_proxy_rules` what kube-proxy left in iptables and nftables;
  :func:`leftovers` puts them together with the bridge and the run directory itself.
- A state file per run in ``STATE_DIR`` names the run directory, bridge and owner pid, so
  :func:`stale_runs` finds what a killed run left behind (its owner is gone) for the next one to
  sweep.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from testbed.netns import pid_alive

__all__ = ["STATE_DIR", "POD_SUPERNET", "MachineLock", "node_ip", "choose_pod_subnet",
           "prepare_sysctls", "mounts_under", "processes_under", "kube_proxy_rules", "leftovers",
           "stale_runs", "write_state", "unmount_all", "kill_processes_under"]

STATE_DIR = Path("/var/lib/kubedock-dns-testbed")
POD_SUPERNET = ipaddress.IPv4Network("10.200.0.0/16")


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def node_ip() -> str:
    """The source address of this machine's default route."""
    routes = json.loads(_run(["ip", "-j", "-4", "route", "get", "192.0.2.255"]).stdout or "[]")
    for route in routes:
        if route.get("prefsrc"):
            return str(route["prefsrc"])
    for line in _run(["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout.splitlines():
        match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", line)
        if match:
            return match.group(1)
    raise RuntimeError("this machine has no global IPv4 address for the node (ip -4 addr shows none)")


def _routed_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                networks.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                continue
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


def choose_pod_subnet() -> ipaddress.IPv4Network:
    taken = _routed_networks()
    candidates: list[ipaddress.IPv4Network] = list(POD_SUPERNET.subnets(new_prefix=24))
    for _ in range(len(candidates)):
        subnet = candidates[secrets.randbelow(len(candidates))]
        if not any(subnet.overlaps(n) for n in taken):
            return subnet
    raise RuntimeError(f"no free /24 in {POD_SUPERNET}: every one overlaps a route")


def prepare_sysctls() -> None:
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/bridge/bridge-nf-call-iptables"):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} does not exist (the br_netfilter module is not loaded: "
                               "modprobe br_netfilter)")
        with open(path) as f:
            if f.read().strip() == "1":
                continue
        with open(path, "w") as f:
            f.write("1")


class MachineLock:
    """The machine's one node, held as a bound abstract Unix socket (``LOCK_ADDRESS``) and waited
    for with progress messages.

    Not a flock on a file: deleting the state directory (a clean-up by hand) let a second node
    start beside a running one.  An abstract socket has no file to delete, and the kernel frees it
    when its holder exits, however it exits.  The holder's pid goes to ``STATE_DIR/node.holder``
    for the waiting message only."""

    LOCK_ADDRESS = "\0kubedock-dns-testbed-node"

    def __init__(self, progress: Callable[[str], None]) -> None:
        self._progress = progress
        self._socket: socket.socket | None = None

    # A second node in a process that already runs one would wait for itself: count the locks
    # held here and refuse at once.
    held_here = 0

    def acquire(self, timeout: float = 1800.0) -> None:
        if MachineLock.held_here:
            raise RuntimeError("this process already runs a node (one node per machine: kube-proxy's "
                               "rules have fixed names); stop it first")
        holder_file = STATE_DIR / "node.holder"
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited by the node's processes
        deadline = time.monotonic() + timeout
        noted = 0.0
        while True:
            try:
                lock.bind(self.LOCK_ADDRESS)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    lock.close()
                    raise
                if time.monotonic() > deadline:
                    lock.close()
                    raise RuntimeError(f"another node held the machine's node lock for {timeout:.0f}s")
                if time.monotonic() - noted > 30:
                    try:
                        holder = holder_file.read_text().strip()
                    except OSError:
                        holder = ""
                    self._progress(f"another node runs on this machine ({holder or 'unknown'}); waiting")
                    noted = time.monotonic()
                time.sleep(1)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        holder_file.write_text(f"pid {os.getpid()}")
        self._socket = lock
        MachineLock.held_here += 1

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()  # unbinds the abstract address
            self._socket = None
            MachineLock.held_here -= 1


def write_state(run: Path, bridge: str, kube_proxy: str, made_log_dir: bool) -> Path:
    path = STATE_DIR / f"{run.name}.json"
    path.write_text(json.dumps({"run": str(run), "bridge": bridge, "pid": os.getpid(),
                                "kube_proxy": kube_proxy, "made_log_dir": made_log_dir}))
    return path


CONTAINER_LOGS = Path("/var/log/containers")  # the kubelet's fixed place for its log links


def remove_log_links(run: Path, made_log_dir: bool) -> None:
    """Remove the kubelet's links to the run's container logs (and their directory if the run made
    it and it is empty)."""
    if not CONTAINER_LOGS.is_dir():
        return
    for link in CONTAINER_LOGS.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and str(run) in os.readlink(link):
                link.unlink()
    if made_log_dir:
        with contextlib.suppress(OSError):
            CONTAINER_LOGS.rmdir()



def stale_runs() -> list[dict[str, Any]]:
    """State of runs whose owner process is gone (each with its state file as ``state_file``)."""
    found = []
    for path in sorted(STATE_DIR.glob("node-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not pid_alive(int(state.get("pid", 0))):
            found.append({**state, "state_file": str(path)})
    return found


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == str(root):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_all(root: Path) -> None:
    for _ in range(3):  # stacked mounts need several rounds
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            _run(["umount", "-l", point])


def processes_under(root: Path) -> dict[int, str]:
    """Processes whose command line mentions ``root`` (the node's daemons, containerd's shims) or
    whose root directory lies below it (the containers' processes) (pid -> command)."""
    needle = str(root)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fs_root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if needle in cmdline or fs_root.startswith(needle + "/"):
            found[int(entry)] = cmdline.strip()[:200]
    return found


def cri_processes() -> dict[int, str]:
    """Processes in the CRI's cgroups (``/k8s.io/<container>``): the pods' containers.  A container
    that pivoted into its own root shows ``/`` as its root, and its command names nothing of the run
    directory; its cgroup is what says whose it is (one node per machine: every such process is the
    node's)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cgroups = Path(f"/proc/{entry}/cgroup").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f":/{CRI_CGROUP}/" in cgroups:
            found[int(entry)] = cmdline.strip()[:200]
    return found


def network_namespaces_of(pids: Iterable[int]) -> set[int]:
    """The inode numbers of the network namespaces of ``pids`` (those still readable)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
    return inodes


def remove_named_network_namespaces(inodes: set[int]) -> list[str]:
    """Unmount and remove the ``/run/netns`` entries (as the CRI names pod namespaces) bound to
    one of ``inodes``; returns their paths."""
    removed: list[str] = []
    netns_dir = Path("/run/netns")
    if not inodes or not netns_dir.is_dir():
        return removed
    for entry in netns_dir.iterdir():
        with contextlib.suppress(OSError):
            if entry.stat().st_ino in inodes:
                _run(["umount", "-l", str(entry)])
                entry.unlink()
                removed.append(str(entry))
    return removed


def kill_processes_under(root: Path, wait: float = 10.0) -> None:
    """SIGKILL the run's processes and every container process (see :func:`cri_processes`), and
    wait until they are gone (reaped)."""
    for pid in {**processes_under(root), **cri_processes()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while (processes_under(root) or cri_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)


CGROUP_ROOT = Path("/sys/fs/cgroup")
CRI_CGROUP = "k8s.io"  # where runc puts containers the kubelet (cgroupsPerQOS off) starts


def cri_cgroups() -> list[Path]:
    """The CRI's cgroup directories (``/sys/fs/cgroup/<controller>/k8s.io`` and below), deepest first."""
    found: list[Path] = []
    if CGROUP_ROOT.is_dir():
        for top in CGROUP_ROOT.glob(f"*/{CRI_CGROUP}"):
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: -len(p.parts))


def remove_cri_cgroups() -> None:
    """rmdir every empty CRI cgroup (a cgroup with processes refuses, and is reported as left)."""
    for directory in cri_cgroups():
        try:
            directory.rmdir()
        except OSError:
            pass


def control_plane_tag(run: Path) -> str:
    """The tag the node's control plane puts in its temporary directories' names."""
    return run.name


def control_plane_dirs(run: Path) -> list[Path]:
    """The node's control plane directories (PKI, kubeconfig, logs; etcd's data on /dev/shm)."""
    tag = control_plane_tag(run)
    found = []
    for parent in {Path(tempfile.gettempdir()), Path("/dev/shm")}:
        found += sorted(parent.glob(f"kubedock-dns-*-{tag}-*"))
    return found


def kube_proxy_rules() -> list[str]:
    """kube-proxy's (and the kubelet's) chains in iptables, and its nftables tables."""
    found = []
    for binary in ("iptables", "ip6tables"):
        for table in ("nat", "filter", "mangle"):
            out = _run([binary, "-w", "5", "-t", table, "-S"]).stdout
            chains = sorted({m for m in re.findall(r"^-N (KUBE-\S+)", out, re.M)})
            found += [f"{binary} -t {table} chain {c}" for c in chains]
    tables = _run(["nft", "list", "tables"]).stdout
    found += [f"nftables {line.strip()}" for line in tables.splitlines() if "kube-proxy" in line]
    return found


def other_live_runs(run: Path) -> list[str]:
    """Run directories of other node runs whose owner is alive (another session's node)."""
    live = []
    for path in sorted(STATE_DIR.glob("node-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("run") != str(run) and pid_alive(int(state.get("pid", 0))):
            live.append(str(state.get("run")))
    return live


def leftovers(run: Path, bridge: str) -> list[str]:
    """Everything of the run ``run`` that still exists; empty after a clean teardown.  While
    another session's node runs (it took the machine lock after us), the machine-wide traces
    (container processes, CRI cgroups, kube-proxy's rules) are its own and are not counted."""
    found = [f"process {pid}: {cmd}" for pid, cmd in processes_under(run).items()]
    machine_wide = not other_live_runs(run)
    if machine_wide:
        found += [f"container process {pid}: {cmd}" for pid, cmd in cri_processes().items()]
    found += [f"mount {point}" for point in mounts_under(run)]
    if run.exists():
        found.append(f"directory {run}")
    if Path(f"/sys/class/net/{bridge}").exists():
        found.append(f"bridge {bridge}")
    if machine_wide:
        found += kube_proxy_rules()
        found += [f"cgroup {d}" for d in cri_cgroups()]
    found += [f"control plane directory {d}" for d in control_plane_dirs(run)]
    for link in CONTAINER_LOGS.glob("*.log") if CONTAINER_LOGS.is_dir() else []:
        if str(run) in os.readlink(link) if link.is_symlink() else False:
            found.append(f"log link {link}")
    return found
