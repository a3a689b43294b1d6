"""The real kubedock, serving the Docker API for one namespace of the real node.

Contract
--------
:func:`find_kubedock` returns the path of the kubedock binary the suite runs (``../shared/kubedock/
kubedock`` relative to the project root, or ``$KUBEDOCK``), or raises :class:`KubedockUnavailable`
saying where it looked: kubedock is not served by the Go module proxy, so a machine without it
skips the tests that need it.

``with Kubedock(node, namespace) as kubedock:`` starts ``kubedock server`` the way the README tells
users to (``--disable-services`` beside kubedock-dns, ``--port-forward`` so that published ports
reach this machine), on a loopback port the kernel chose, with the node's kubeconfig, and returns
once its Docker API answers ``/_ping``.  ``docker_host`` is the value for ``DOCKER_HOST``;
``bridge_network`` the ID of kubedock's default ``bridge`` network (random per start), as its
network list reports it.  Leaving the block stops the process (its pods stay: the namespace's
owner removes them).

What kubedock needs here and cannot find by itself: ``--initimage`` (its default image lives on a
registry this machine cannot reach; the ``setup`` init container needs only ``sh``, so the node's
toolbox image serves) and ``--disable-dind`` (the docker-in-docker sidecar's default image is
unreachable too; nothing here mounts a Docker socket).  See ``../shared/kubedock/README.md`` for
what kubedock does that surprises (inspect reports 127.0.0.1, network inspect answers ``ID``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from testbed.controlplane import ManagedProcess

__all__ = ["Kubedock", "KubedockUnavailable", "find_kubedock", "KUBEDOCK_RELATIVE"]

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBEDOCK_RELATIVE = Path("..") / "shared" / "kubedock" / "kubedock"


class KubedockUnavailable(RuntimeError):
    """The kubedock binary is not on this machine; the message says where it was looked for."""


def find_kubedock() -> str:
    """The kubedock binary: ``$KUBEDOCK``, else ``../shared/kubedock/kubedock`` beside the project."""
    candidate = Path(os.environ.get("KUBEDOCK") or (REPO_ROOT / KUBEDOCK_RELATIVE)).resolve()
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise KubedockUnavailable(
            f"no kubedock binary at {candidate} ({KUBEDOCK_RELATIVE} relative to the project root, or "
            "$KUBEDOCK): kubedock is not on the Go module proxy, so it cannot be built here")
    return str(candidate)


def _loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Kubedock:
    """See the module docstring.  After entering: ``docker_host``, ``port``, ``process``,
    ``bridge_network``."""

    def __init__(self, node: Any, namespace: str, *, init_image: str, extra_args: Sequence[str] = (),
                 name: str = "kubedock", binary: str | None = None) -> None:
        self.node = node
        self.namespace = namespace
        self.init_image = init_image
        self.extra_args = tuple(extra_args)
        self.name = name
        self.binary = binary or find_kubedock()
        self.port = 0
        self.docker_host = ""
        self.bridge_network = ""
        self.process: ManagedProcess | None = None

    def __enter__(self) -> "Kubedock":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        log = Path(self.node.run) / f"{self.name}-{self.namespace}.log"
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            self.port = _loopback_port()
            self.process = ManagedProcess(self.name, [
                self.binary, "server",
                "--namespace", self.namespace,
                "--kubeconfig", str(self.node.control_plane.kubeconfig_path),
                "--listen-addr", f"127.0.0.1:{self.port}",
                "--disable-services", "--port-forward",
                "--initimage", self.init_image, "--disable-dind",
                "--verbosity", "2",
                *self.extra_args,
            ], log, cwd=Path(self.node.run))
            self.process.start()
            if self._wait_ping(timeout):
                break
            if "address already in use" not in self.process.tail(20):
                raise RuntimeError(f"{self.name} did not answer /_ping within {timeout:.0f}s:\n{self.process.tail(30)}")
            self.process.stop()
        else:
            raise RuntimeError(f"{self.name} could not bind a loopback port:\n{self.process.tail(30)}")
        self.docker_host = f"tcp://127.0.0.1:{self.port}"
        self.bridge_network = next((n.get("Id") or n.get("ID") or "" for n in self.get("/networks")
                                    if n.get("Name") == "bridge"), "")

    def _wait_ping(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                return False
            try:
                if self._request("/_ping") == b"OK":
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def _request(self, path: str) -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        """A GET on kubedock's Docker API, decoded from JSON."""
        return json.loads(self._request(path))

    def log(self, lines: int = 40) -> str:
        return self.process.tail(lines) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10.0)
