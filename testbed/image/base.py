"""A Debian base image made here, standing in for ``python:3.11-slim`` (which cannot be pulled).

Contract
--------
:func:`debian_base` returns the name of a local image (in the test bed's podman store) holding a
Debian minimal system of this machine's suite (bookworm) made by ``debootstrap --variant=minbase``
from Debian's mirror, plus :data:`PACKAGES`:

- ``python3``, ``python3-venv`` (``python -m venv`` and its ensurepip), ``python3-pip`` (the
  builder stage runs ``pip wheel``) and ``python-is-python3`` (the Dockerfile calls ``python``);
  Debian's python3 is 3.11, the version of ``python:3.11-slim``;
- ``ca-certificates`` (pip fetches from PyPI over TLS);
- what the Dockerfile and test pods need that minbase already has: ``groupadd``/``useradd``
  (passwd), ``getent`` (libc-bin, glibc's resolver as pods use it), ``sh``.

The image config repeats what the Dockerfile relies on from the stock image: ``PATH`` (an
imported tarball has none, and ``ENV PATH=$VENV/bin:$PATH`` would lose the system directories),
``LANG=C.UTF-8`` and ``CMD ["python3"]``.  Documentation, man pages, locales and apt's lists and
caches are removed (about half of the tree).

The machine's CA bundle (``/etc/ssl/certs/ca-certificates.crt``) replaces Debian's in the image:
where outbound TLS goes through an intercepting proxy (as in the sandboxes this is built in),
pip inside the build would otherwise refuse PyPI.  On an ordinary machine the two bundles hold
the same public CAs.

The root filesystem tarball is cached as ``~/.cache/kubedock-dns/debian-base-<suite>-<key>.tar``,
the key hashing the suite, the package list, the recipe version and the CA bundle, so it is made
once (about 1.5 minutes, mostly downloads) and imported into podman in seconds.  A file lock
makes concurrent callers (several tests, several engineers' test runs) wait for one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from testbed.image.podman import CACHE, Podman, PodmanError

__all__ = ["BaseImageError", "PACKAGES", "debian_base", "debian_suite", "rootfs_tarball"]

PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# Bump when the recipe below changes what ends up in the tarball.
RECIPE_VERSION = "1"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_REPOSITORY = "localhost/kubedock-dns-testbed/debian-python"
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# Trees a container never needs; removing them halves the base.
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
          "var/cache/apt", "var/lib/apt/lists", "var/log")


class BaseImageError(RuntimeError):
    """debootstrap (or the import) failed; the message carries its log's tail."""


def debian_suite() -> str:
    """This machine's Debian suite (``VERSION_CODENAME`` of /etc/os-release), e.g. bookworm."""
    text = Path("/etc/os-release").read_text()
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    if not found:
        raise BaseImageError("/etc/os-release names no VERSION_CODENAME: not a Debian machine?")
    return found.group(1)


def _mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            if re.search(r"^Suites:.*\b" + re.escape(debian_suite()) + r"\b", block, re.M):
                uri = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if uri and "security" not in uri.group(1):
                    return uri.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return DEFAULT_MIRROR


def _key(suite: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{suite}\n{RECIPE_VERSION}\n{' '.join(PACKAGES)}\n".encode())
    if HOST_CA_BUNDLE.exists():
        digest.update(HOST_CA_BUNDLE.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def rootfs_tarball(suite: str | None = None) -> Path:
    """The cached root filesystem tarball, made with debootstrap on first use (module docstring)."""
    suite = suite or debian_suite()
    tarball = CACHE / f"debian-base-{suite}-{_key(suite)}.tar"
    with _locked(CACHE / "debian-base.lock"):
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise BaseImageError("debootstrap is not installed (Debian package debootstrap; scripts/setup installs it)")
        with tempfile.TemporaryDirectory(prefix="debian-base-", dir=CACHE) as work:
            rootfs = Path(work) / "rootfs"
            argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    suite, str(rootfs), _mirror()]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                log = rootfs / "debootstrap" / "debootstrap.log"
                detail = log.read_text()[-3000:] if log.exists() else ""
                raise BaseImageError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                                     f"{(result.stdout + result.stderr)[-2000:]}\n--- debootstrap.log\n{detail}")
            for tree in _PRUNE:
                shutil.rmtree(rootfs / tree, ignore_errors=True)
                (rootfs / tree).mkdir(parents=True, exist_ok=True)
            if HOST_CA_BUNDLE.exists():
                shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
            partial = tarball.with_suffix(".partial")
            # Device nodes and mount points stay out: the engine provides /dev, /proc and /sys.
            subprocess.run(["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
                            "--exclude=./sys/*", "-C", str(rootfs), "-cf", str(partial), "."],
                           check=True, capture_output=True, timeout=600)
            os.replace(partial, tarball)
    return tarball


def debian_base(podman: Podman, suite: str | None = None) -> str:
    """The base image's name in ``podman``'s store, imported from :func:`rootfs_tarball` if new."""
    suite = suite or debian_suite()
    tarball = rootfs_tarball(suite)
    name = f"{IMAGE_REPOSITORY}:{suite}-{_key(suite)}"
    with _locked(CACHE / "debian-base-import.lock"):
        if not podman.image_exists(name):
            changes = [arg for change in IMAGE_CHANGES for arg in ("--change", change)]
            try:
                podman("import", *changes, str(tarball), name, timeout=600)
            except PodmanError as e:
                raise BaseImageError(f"importing {tarball} as {name} failed: {e}") from e
    return name
