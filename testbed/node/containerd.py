"""containerd (Debian's 1.6) with its CRI plugin, private to one node run.

Contract:

- :class:`Containerd` writes a config whose every path (root, state, sockets, CNI config and
  state, registry hosts) lies under the run directory it is given, starts ``containerd`` with it,
  and returns once the CRI socket answers ``ctr version``.  A start failure raises
  :class:`NodeComponentError` with the log tail.
- The CRI plugin uses runc with cgroupfs (cgroups v1 here), the pause image built locally
  (``sandbox_image``), ``restrict_oom_score_adj = true`` (the sandbox lacks CAP_SYS_RESOURCE; without
  it every pod sandbox fails with "can't get final child's PID from pipe"), and the CNI plugins of
  Debian's ``containernetworking-plugins`` from ``CNI_BIN_DIR``.
- ``registry_hosts`` maps a registry host:port to plain-HTTP access (a ``hosts.toml`` each, the way a
  node is told to pull from an insecure registry).
- :meth:`Containerd.exec` runs a command in a running container as ``kubectl exec`` would, but as
  a plain child of the caller (``nsenter`` into the task's namespaces, root, user, environment),
  so its output is captured from a pipe, not copied through containerd's FIFOs.
- :meth:`Containerd.import_image` loads an OCI archive into the ``k8s.io`` namespace (the CRI's).
- :meth:`Containerd.remove_all` kills and deletes every task and container left in ``k8s.io``
  (after the kubelet has had its chance to stop pods), and removes the network namespaces of
  their sandboxes; :meth:`Containerd.stop` then stops the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from testbed.controlplane import ManagedProcess
from testbed.node.errors import NodeComponentError

__all__ = ["CNI_BIN_DIR", "Containerd"]

_NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"

CNI_BIN_DIR = "/usr/lib/cni"
CRI_NAMESPACE = "k8s.io"
REQUIRED_CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


def _config(run: Path, sandbox_image: str) -> str:
    d = run / "containerd"
    runc = shutil.which("runc") or "/usr/sbin/runc"
    return f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{d / 'containerd.sock'}"
[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{run / 'cni' / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d / 'certs.d'}"
"""


class Containerd:
    """See the module docstring.  ``socket`` is valid after construction."""

    def __init__(self, run: Path, sandbox_image: str, *,
                 registry_hosts: Sequence[str] = (),
                 progress: Callable[[str], None] = lambda message: None) -> None:
        self.run = run
        self.dir = run / "containerd"
        self.socket = self.dir / "containerd.sock"
        self.sandbox_image = sandbox_image
        self.registry_hosts = list(registry_hosts)
        self._progress = progress
        self.process: ManagedProcess | None = None

    @staticmethod
    def missing() -> list[str]:
        """What this machine lacks to run containerd with CNI (empty when all is there)."""
        lacking = [tool for tool in ("containerd", "ctr", "runc") if shutil.which(tool) is None]
        lacking += [f"{CNI_BIN_DIR}/{p}" for p in REQUIRED_CNI_PLUGINS
                    if not os.access(f"{CNI_BIN_DIR}/{p}", os.X_OK)]
        return lacking

    def start(self, timeout: float = 60.0) -> None:
        lacking = self.missing()
        if lacking:
            raise NodeComponentError(
                "containerd", f"missing {', '.join(lacking)} (Debian: apt-get install containerd runc "
                "containernetworking-plugins)")
        self.dir.mkdir(parents=True)
        (self.run / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        for host in self.registry_hosts:
            self.add_registry(host)
        config = self.dir / "config.toml"
        config.write_text(_config(self.run, self.sandbox_image))
        self.process = ManagedProcess("containerd", [shutil.which("containerd") or "containerd",
                                                     "--config", str(config)], self.run / "containerd.log")
        self.process.start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.alive():
                raise NodeComponentError("containerd", "exited during start-up", self.process)
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise NodeComponentError("containerd", f"socket {self.socket} not answering after "
                                         f"{timeout:.0f}s", self.process)
            time.sleep(0.1)
        self._progress(f"containerd ready at {self.socket}")

    def add_registry(self, host: str) -> None:
        """Pull from ``host`` (host:port) over plain HTTP; containerd reads this at every pull."""
        hosts_dir = self.dir / "certs.d" / host
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts.toml").write_text(
            f'server = "http://{host}"\n\n[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n')
        if host not in self.registry_hosts:
            self.registry_hosts.append(host)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", CRI_NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise NodeComponentError("containerd", f"ctr {' '.join(args)} failed: {done.stderr.strip()}",
                                     self.process)
        return done

    def import_image(self, archive: Path) -> None:
        # --no-unpack would leave the CRI without a snapshot; unpack into the CRI's snapshotter.
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def task_pid(self, container_id: str) -> int:
        """The host PID of a running container's process (``ctr tasks ls``)."""
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == container_id:
                if fields[2] != "RUNNING":
                    break
                return int(fields[1])
        raise NodeComponentError("containerd", f"container {container_id} has no running task", self.process)

    def exec(self, container_id: str, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a running container, as ``kubectl exec`` would: in its namespaces
        (mount: the pod's resolv.conf and hosts; network, PID, UTS, IPC), its root and working
        directory, as its user, with its environment.

        It runs as a plain child of this process (``nsenter`` into the container's task), so
        its stdout and exit status are read straight from a pipe and from ``wait``.  ``ctr tasks
        exec`` copies output through FIFOs and, under load, was seen to report exit 0 with the
        output of ``getent`` lost; a resolver test cannot tell that from a wrong answer.  A
        command still running after ``timeout`` is killed with everything it started
        (``subprocess.TimeoutExpired``, as ``subprocess.run``)."""
        pid = self.task_pid(container_id)
        try:
            uid, gid, environ = _process_identity(pid)
        except OSError as e:  # the task ended in between
            raise NodeComponentError("containerd", f"container {container_id} (pid {pid}): {e}",
                                     self.process) from e
        command = [_NSENTER, f"--target={pid}", "--mount", "--net", "--pid", "--uts", "--ipc",
                   "--root", "--wd", f"--setgid={gid}", f"--setuid={uid}", "--", *argv]
        # Its own session, so a timeout kills the forked child inside the PID namespace too.
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=environ,
                              start_new_session=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise
        return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)

    def _sandbox_netns_paths(self) -> list[str]:
        paths = []
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            info = self.ctr("containers", "info", container, check=False)
            try:
                spec = json.loads(info.stdout).get("Spec") or {}
            except json.JSONDecodeError:
                continue
            for ns in (spec.get("linux") or {}).get("namespaces") or []:
                if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                    paths.append(ns["path"])
        return sorted(set(paths))

    def remove_all(self) -> list[str]:
        """Kill and delete every task and container, remove their sandboxes' network namespaces;
        return the namespace paths that were still there (what the kubelet did not clean)."""
        if self.process is None or not self.process.alive():
            return []
        netns_paths = self._sandbox_netns_paths()
        for container in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
        deadline = time.monotonic() + 20
        while self.ctr("tasks", "ls", "-q", check=False).stdout.split() and time.monotonic() < deadline:
            for container in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", container, check=False)
            time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)
        remaining = [p for p in netns_paths if os.path.exists(p)]
        for path in remaining:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
            try:
                os.unlink(path)
            except OSError:
                pass
        return remaining

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10.0)
            self.process = None

    def tail(self) -> str:
        return self.process.tail() if self.process else ""


def _process_identity(pid: int) -> tuple[int, int, dict[str, str]]:
    """The real user and group IDs and the environment of a host process."""
    ids: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = int(value.split()[0])
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [entry.decode(errors="replace").partition("=") for entry in f.read().split(b"\0") if entry]
    return ids["Uid"], ids["Gid"], {key: value for key, _, value in pairs}
