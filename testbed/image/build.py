"""Building and pushing images with podman: kubedock-dns' own Dockerfile, and a small test pod.

Contract
--------
- :func:`build_image` runs ``podman build --isolation chroot --layers=false`` on a context
  directory and returns the tag.  ``--isolation chroot``: the RUN steps use the host's network
  (pip reaches PyPI) with no OCI runtime, cgroup or network set up, so podman's network stack
  (netavark) never adds firewall rules or a bridge on a machine shared with a Kubernetes node.
  (The default OCI isolation also builds here, given the ulimits of :mod:`testbed.image.podman`,
  but it does create those rules.)  ``--layers=false`` because podman 4.3's layer cache is wrong for
  ``RUN --mount=type=bind,from=<stage>``, which the Dockerfile uses: a cached builder stage is
  not mounted at all (podman#16281: "couldn't find .../merged/wheels ... to bind mount", pip then
  finds no wheels), and a cached mounting step is reused even when the stage it mounts changed
  (podman#17119, still open), which would ship stale code.  BuildKit (``docker build``) has
  neither problem.  The image replaced under the same tag is removed, so rebuilds do not pile
  up in the store.
- :func:`push` runs ``podman push --tls-verify=false`` (the loopback registry speaks plain HTTP).
- :func:`kubedock_dns_image` builds the repository's ``Dockerfile`` unchanged, with only its
  ``PYTHON_IMAGE`` argument pointing at :func:`testbed.image.base.debian_base`, tags it
  ``<registry>/kubedock-dns:<tag>`` and pushes it: the commands of docs/install.md.
- :func:`test_pod_image` builds and pushes ``<registry>/kubedock-testpod:<key>``: the same
  Debian base (glibc's ``getent``, ``python3``) whose command, ``/usr/local/bin/idle``, waits for
  SIGTERM and exits 0 at once (a plain ``sleep`` as PID 1 ignores SIGTERM, so every pod deletion
  would wait out its grace period).  Usable as a kubedock container and as a pause image.
- :func:`podman_shim` writes a ``podman`` executable that adds the test bed's settings, so a
  test can run a documented shell command word for word.
"""

from __future__ import annotations

import hashlib
import shlex
import tempfile
from pathlib import Path

from testbed.image.base import debian_base
from testbed.image.podman import Podman, PodmanError

__all__ = ["REPO", "build_image", "kubedock_dns_image", "podman_shim", "push", "test_pod_image"]

REPO = Path(__file__).resolve().parents[2]

IDLE = """\
#!/usr/bin/python3
# Wait until told to stop; exit 0 on SIGTERM or SIGINT (PID 1 gets no default handlers).
import signal, sys
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""

TEST_POD_CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
COPY idle /usr/local/bin/idle
RUN chmod 0755 /usr/local/bin/idle
CMD ["/usr/local/bin/idle"]
"""


def build_image(podman: Podman, context: str | Path, ref: str, *, build_args: dict[str, str] | None = None,
                containerfile: str | Path | None = None, timeout: float = 1200) -> str:
    """``podman build --isolation chroot --layers=false -t ref [--build-arg K=V ...] [-f file]
    context``; returns ``ref``."""
    previous = podman("image", "inspect", "--format", "{{.Id}}", ref).strip() if podman.image_exists(ref) else ""
    args = ["build", "--isolation", "chroot", "--layers=false", "-t", ref]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    if containerfile is not None:
        args += ["-f", str(containerfile)]
    podman(*args, str(context), timeout=timeout)
    if previous and podman("image", "inspect", "--format", "{{.Id}}", ref).strip() != previous:
        try:
            podman("rmi", previous, timeout=120)
        except PodmanError:
            pass  # still used by a container or another tag: keep it
    return ref


def push(podman: Podman, ref: str, timeout: float = 600) -> str:
    """``podman push --tls-verify=false ref`` (plain HTTP to the loopback registry); returns ``ref``."""
    podman("push", "--tls-verify=false", ref, timeout=timeout)
    return ref


def kubedock_dns_image(podman: Podman, registry: str, tag: str | None = None, context: str | Path = REPO) -> str:
    """Build the Dockerfile of ``context`` as ``<registry>/kubedock-dns:<tag>`` (default: the
    release, ``kubedock_dns.__version__``, the chart's appVersion), push it, return the ref."""
    if tag is None:
        from kubedock_dns import __version__ as tag
    ref = f"{registry}/kubedock-dns:{tag}"
    build_image(podman, context, ref, build_args={"PYTHON_IMAGE": debian_base(podman)})
    return push(podman, ref)


def test_pod_image(podman: Podman, registry: str) -> str:
    """Build and push the small test pod image (module docstring); return its ref."""
    base = debian_base(podman)
    key = hashlib.sha256((base + TEST_POD_CONTAINERFILE + IDLE).encode()).hexdigest()[:12]
    ref = f"{registry}/kubedock-testpod:{key}"
    with tempfile.TemporaryDirectory(prefix="testpod-") as context:
        (Path(context) / "idle").write_text(IDLE)
        (Path(context) / "Containerfile").write_text(TEST_POD_CONTAINERFILE)
        build_image(podman, context, ref, build_args={"BASE": base})
    return push(podman, ref)


test_pod_image.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def podman_shim(podman: Podman, directory: str | Path, build_args: dict[str, str] | None = None) -> Path:
    """Write ``<directory>/podman``: the real podman with the test bed's global options, and for
    ``podman build`` also ``--isolation chroot`` and ``build_args``.  Put ``directory`` first on
    ``PATH`` to run a documented command as written.  Returns the shim's path."""
    real = shlex.join([podman.binary, *podman.global_args])
    extra = " ".join(shlex.quote(f"--build-arg={k}={v}") for k, v in (build_args or {}).items())
    shim = Path(directory) / "podman"
    shim.write_text(
        "#!/bin/sh\n"
        "# The test bed's podman (testbed/image/build.py): its storage, runtime and limits.\n"
        f"export CONTAINERS_CONF={shlex.quote(str(podman.conf))}\n"
        f'if [ "$1" = build ]; then shift; exec {real} build --isolation chroot {extra} "$@"; fi\n'
        f'exec {real} "$@"\n'
    )
    shim.chmod(0o755)
    return shim
