"""A real image registry on loopback: Debian's ``docker-registry`` (the CNCF distribution registry).

Contract
--------
``with Registry(tmp_dir) as registry:`` starts ``docker-registry serve`` on ``127.0.0.1`` with its
storage in a fresh directory under ``tmp_dir``, and returns once ``GET /v2/`` answers 200.  Then:

- ``registry.address`` is ``localhost:<port>``, the form users give as ``$REGISTRY``
  (docs/install.md); plain HTTP, as Docker allows for ``localhost`` without configuration
  (podman needs ``--tls-verify=false``, containerd an ``http://`` endpoint);
- ``registry.url`` is ``http://127.0.0.1:<port>``;
- ``registry.manifest(repository, tag)`` is the stored manifest (the proof a push arrived),
  ``registry.tags(repository)`` the stored tags.

The registry cannot be told to bind port 0 and report the port, so a port free right now is
picked and the start is retried on another one when it loses the race (its log says "address
already in use").  Any other failure to start raises :class:`RegistryError` with its log's tail.
Leaving the block stops the process and removes the storage.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["DOCKER_REGISTRY", "Registry", "RegistryError"]

DOCKER_REGISTRY = "/usr/bin/docker-registry"
# Loopback only: never through a proxy the environment may name.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open
_MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


class RegistryError(RuntimeError):
    """The registry is missing or did not start; the message carries its log's tail."""


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """The distribution registry on loopback; see the module docstring."""

    def __init__(self, parent_dir: str | Path | None = None, *, binary: str = DOCKER_REGISTRY,
                 start_timeout: float = 30.0, attempts: int = 5) -> None:
        self.binary = binary
        self.parent_dir = Path(parent_dir) if parent_dir else None
        self.start_timeout = start_timeout
        self.attempts = attempts
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``localhost:<port>``: what users export as ``REGISTRY``."""
        return f"localhost:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None, "the registry is not started"
        return self._dir / "registry.log"

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        if not Path(self.binary).exists():
            raise RegistryError(f"{self.binary} is missing (Debian package docker-registry; scripts/setup installs it)")
        self._dir = Path(tempfile.mkdtemp(prefix="registry-", dir=self.parent_dir))
        try:
            for _ in range(self.attempts):
                self.port = _free_tcp_port()
                if self._start_once():
                    return
            raise RegistryError(f"the registry lost the race for a free port {self.attempts} times:\n{self.log_tail()}")
        except BaseException:
            self.close()
            raise

    def _start_once(self) -> bool:
        """Start on ``self.port``: True once it answers, False if the port was taken meanwhile."""
        assert self._dir is not None
        storage = self._dir / "storage"
        storage.mkdir(exist_ok=True)
        config = self._dir / "config.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}, "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }))
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([self.binary, "serve", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "address already in use" in self.log_tail():
                    self._proc = None
                    return False
                raise RegistryError(f"docker-registry exited ({self._proc.returncode}) on start:\n{self.log_tail()}")
            try:
                with _urlopen(f"{self.url}/v2/", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RegistryError(f"docker-registry did not answer GET /v2/ within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _get_json(self, path: str, accept: str | None = None) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Accept": accept} if accept else {})
        with _urlopen(request, timeout=10) as response:
            return json.load(response)

    def manifest(self, repository: str, tag: str) -> dict[str, Any]:
        """The manifest stored for ``repository:tag`` (HTTPError 404 when none was pushed)."""
        result: dict[str, Any] = self._get_json(f"/v2/{repository}/manifests/{tag}", _MANIFEST_TYPES)
        return result

    def tags(self, repository: str) -> list[str]:
        """The tags stored for ``repository``."""
        return list(self._get_json(f"/v2/{repository}/tags/list").get("tags") or [])
