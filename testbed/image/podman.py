"""Podman as the test bed's container engine, configured for this kind of machine.

Contract
--------
:class:`Podman` runs Debian's ``podman`` (and, through ``podman build``, buildah) as root with a
storage of its own, so the test bed never touches the machine's default image store and never
races another user of it:

- images and layers under ``~/.cache/kubedock-dns/podman/storage`` (kept between runs: the
  imported Debian base and the build cache survive), the engine's run state under
  ``/run/kubedock-dns-podman`` (a tmpfs: it must not outlive a reboot);
- storage driver ``overlay`` (native kernel overlayfs; the cache must be on a filesystem with
  d_type, such as ext4 or xfs), events to a file (there is no systemd journal);
- OCI runtime ``runc`` with the ``cgroupfs`` manager: cgroups are v1 here and there is no
  systemd to delegate them (crun was reported to refuse this machine; it is not installed, and
  naming the runtime keeps podman off crun should it ever be);
- default ulimits no higher than this process's own: podman gives root's containers
  ``nofile=1048576``, which runc cannot set without ``CAP_SYS_RESOURCE`` (absent in sandboxes), so
  every ``podman run`` failed with "error setting rlimit type 7: operation not permitted".
  (``--ulimit host`` does not help in podman 4.3: it still writes both limits into the spec.)

Every call raises :class:`PodmanError` carrying the command, its exit status and the tail of its
output, never a bare timeout.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

__all__ = ["CACHE", "Podman", "PodmanError", "PodmanUnavailable"]

CACHE = Path(os.environ.get("KUBEDOCK_DNS_CACHE", Path.home() / ".cache" / "kubedock-dns"))
# The engine's runtime directory: locks and mount state, which must vanish with a reboot.
RUN_ROOT = Path("/run/kubedock-dns-podman")
# podman itself lowers its hard RLIMIT_NPROC to the kernel's pid_max (32768 here); a container may
# not ask for more than the process starting it holds.
_PID_MAX = Path("/proc/sys/kernel/pid_max")


class PodmanError(RuntimeError):
    """A podman command failed; the message has the command, its status and its output's tail."""


class PodmanUnavailable(RuntimeError):
    """podman is not installed or cannot run here (not root); the message says which."""


def _tail(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _nproc_ceiling() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        pid_max = int(_PID_MAX.read_text())
    except (OSError, ValueError):
        pid_max = hard
    return min(hard if hard != resource.RLIM_INFINITY else pid_max, pid_max)


def _containers_conf() -> str:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    nproc = _nproc_ceiling()
    return (
        "# Written by testbed/image/podman.py; see its docstring for why each line is here.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )


class Podman:
    """The podman command line with the test bed's storage and settings (module docstring).

    ``root``/``run_root`` override the storage locations (a test that wants a store of its own).
    """

    def __init__(self, root: Path | None = None, run_root: Path | None = None) -> None:
        binary = shutil.which("podman")
        if binary is None:
            raise PodmanUnavailable("podman is not installed (Debian package podman; scripts/setup installs it)")
        if os.geteuid() != 0:
            raise PodmanUnavailable("the test bed runs podman as root (its storage and runc need it)")
        self.binary = binary
        self.root = root or CACHE / "podman" / "storage"
        self.run_root = run_root or RUN_ROOT
        self.conf = CACHE / "podman" / "containers.conf"
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_root.mkdir(parents=True, exist_ok=True)
        text = _containers_conf()
        if not self.conf.exists() or self.conf.read_text() != text:
            tmp = self.conf.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(self.conf)

    @property
    def global_args(self) -> list[str]:
        """The options every podman command of the test bed starts with."""
        return [
            "--root", str(self.root), "--runroot", str(self.run_root),
            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--runtime", "runc",
            "--events-backend", "file",
        ]

    @property
    def env(self) -> dict[str, str]:
        """The environment of every podman command: our containers.conf, loopback never proxied."""
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.conf)
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "localhost,127.0.0.1"]))
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def command(self, *args: str) -> list[str]:
        """The full argv of ``podman <args>`` with the test bed's global options."""
        return [self.binary, *self.global_args, *args]

    def __call__(self, *args: str, timeout: float = 600, input: str | None = None,
                 cwd: str | Path | None = None) -> str:
        """Run ``podman <args>``; return its stdout, or raise :class:`PodmanError`."""
        argv = self.command(*args)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                                    env=self.env, cwd=cwd)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise PodmanError(f"podman {' '.join(args)} did not finish in {timeout:.0f} s\n"
                              f"--- output\n{_tail(out + err)}") from None
        if result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} failed ({result.returncode})\n"
                              f"--- output\n{_tail(result.stdout + result.stderr)}")
        return result.stdout

    def image_exists(self, ref: str) -> bool:
        """Whether ``ref`` is in the test bed's store."""
        argv = self.command("image", "exists", ref)
        return subprocess.run(argv, capture_output=True, env=self.env, timeout=60).returncode == 0

    def image_size(self, ref: str) -> int:
        """The uncompressed size in bytes of ``ref`` (all its layers), as ``podman images`` shows."""
        return int(self("image", "inspect", "--format", "{{.Size}}", ref).strip())

    def layer_sizes(self, ref: str) -> list[tuple[str, int]]:
        """``(created by, bytes)`` of each layer of ``ref``, newest first (``podman history``)."""
        out = self("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", "--human=false", ref)
        rows = []
        for line in out.splitlines():
            size, _, created_by = line.partition("\t")
            rows.append((created_by, int(size) if size.isdigit() else 0))
        return rows

    def remove_containers(self, names: Sequence[str]) -> None:
        """Force-remove the named containers (missing ones are fine)."""
        if names:
            subprocess.run(self.command("rm", "--force", "--ignore", "--time", "0", *names),
                           capture_output=True, env=self.env, timeout=120)
