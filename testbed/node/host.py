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

import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

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
    """An exclusive flock on ``STATE_DIR/node.lock``, waited for with progress messages."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self._progress = progress
        self._fd: int | None = None

    def acquire(self, timeout: float = 1800.0) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(STATE_DIR / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        noted = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"another node held {STATE_DIR / 'node.lock'} for {timeout:.0f}s")
                if time.monotonic() - noted > 30:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    self._progress(f"another node runs on this machine ({holder or 'unknown'}); waiting")
                    noted = time.monotonic()
                time.sleep(1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def write_state(run: Path, bridge: str) -> Path:
    path = STATE_DIR / f"{run.name}.json"
    path.write_text(json.dumps({"run": str(run), "bridge": bridge, "pid": os.getpid()}))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_runs() -> list[dict[str, Any]]:
    """State of runs whose owner process is gone (each with its state file as ``state_file``)."""
    found = []
    for path in sorted(STATE_DIR.glob("node-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not _pid_alive(int(state.get("pid", 0))):
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
    """Processes whose command line or working directory mentions ``root`` (pid -> command)."""
    needle = str(root)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found[int(entry)] = cmdline.strip()[:200]
    return found


def kill_processes_under(root: Path) -> None:
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


def leftovers(run: Path, bridge: str) -> list[str]:
    """Everything of the run ``run`` that still exists; empty after a clean teardown."""
    found = [f"process {pid}: {cmd}" for pid, cmd in processes_under(run).items()]
    found += [f"mount {point}" for point in mounts_under(run)]
    if run.exists():
        found.append(f"directory {run}")
    if Path(f"/sys/class/net/{bridge}").exists():
        found.append(f"bridge {bridge}")
    found += kube_proxy_rules()
    found += [f"cgroup {d}" for d in cri_cgroups()]
    for link in Path("/var/log/containers").glob("*.log") if Path("/var/log/containers").is_dir() else []:
        if str(run) in os.readlink(link) if link.is_symlink() else False:
            found.append(f"log link {link}")
    return found
