"""Container images the node needs and cannot pull, built here as OCI archives from local files.

Contract:

- :func:`oci_archive` packs files (host path -> path in the image) and a config (entrypoint, user,
  env) into an OCI image layout tarball with one uncompressed layer, named by the annotation
  ``io.containerd.image.name``, which ``ctr images import`` turns into an image of that name.
  The same input gives the same bytes (fixed mtimes, sorted entries), so the digest is stable.
- :func:`pause_image` compiles ``PAUSE_C`` (the sandbox's init: sleeps until SIGTERM/SIGINT,
  reaps orphans) with ``gcc -static`` and packs it alone.
- :func:`coredns_image` packs the cached static CoreDNS binary (CGO off) with nothing else: CoreDNS
  runs as an ordinary pod of the cluster, as on a real one.
- :func:`toolbox_image` packs busybox (static: ``sh``, ``sleep``, ``touch``), glibc's ``getent``
  and ``dig`` with the shared libraries they load, and a world-writable ``/tmp``, so a test pod
  resolves names with the real glibc resolver reading the kubelet-written ``/etc/resolv.conf``
  (and asks its nameserver directly with dig), as any user.

Every function writes into a directory the caller owns and returns the archive path and the image
name; nothing is kept elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["ImageArchive", "ImageBuildError", "oci_archive", "pause_image", "coredns_image",
           "toolbox_image", "PAUSE_IMAGE", "COREDNS_IMAGE", "TOOLBOX_IMAGE"]

PAUSE_IMAGE = "localhost/kubedock-dns-testbed/pause:1"
COREDNS_IMAGE = "localhost/kubedock-dns-testbed/coredns:1"
TOOLBOX_IMAGE = "localhost/kubedock-dns-testbed/toolbox:1"

# The pod sandbox's init process: PID 1 of the pod, holding its namespaces.  It must exit on the
# signals the runtime sends and reap zombies (it is the subreaper of the pod's processes).
PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


class ImageBuildError(RuntimeError):
    """An image could not be built: the message names the image and the failing step."""


@dataclass(frozen=True)
class ImageArchive:
    """An OCI archive on disk and the name ``ctr images import`` gives it."""

    name: str
    path: Path


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: Sequence[str]
    user: str = "0:0"
    env: Sequence[str] = ("PATH=/bin:/usr/bin",)
    labels: Mapping[str, str] = field(default_factory=dict)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _layer(files: Mapping[str, Path | bytes], symlinks: Mapping[str, str],
           directories: Mapping[str, int] | None = None) -> bytes:
    """An uncompressed layer tar: directories (parents 0755, ``directories`` with their mode),
    then files, then symlinks, sorted."""
    buffer = io.BytesIO()
    modes = {d.strip("/"): mode for d, mode in (directories or {}).items()}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = [p.lstrip("/") for p in (*files, *symlinks)]
        parents = {str(Path(p).parents[i]) for p in paths for i in range(len(Path(p).parents) - 1)}
        for directory in sorted(parents | set(modes)):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, modes.get(directory, 0o755), 0
            tar.addfile(info)
        for target in sorted(files):
            source = files[target]
            if isinstance(source, bytes):
                _add_bytes(tar, target.lstrip("/"), source)
            else:
                data = source.read_bytes()
                _add_bytes(tar, target.lstrip("/"), data, 0o755 if os.access(source, os.X_OK) else 0o644)
        for link in sorted(symlinks):
            info = tarfile.TarInfo(link.lstrip("/"))
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, symlinks[link], 0o777, 0
            tar.addfile(info)
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _add_bytes(tar, f"blobs/sha256/{digest[7:]}", data)
    return digest


def oci_archive(name: str, files: Mapping[str, Path | bytes], config: ImageConfig, out: Path,
                symlinks: Mapping[str, str] | None = None,
                directories: Mapping[str, int] | None = None) -> ImageArchive:
    """Write an OCI image layout tarball holding ``files`` as one layer; see the module docstring."""
    layer = _layer(files, symlinks or {}, directories)
    image_config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": list(config.entrypoint), "User": config.user,
                   "Env": list(config.env), "Labels": dict(config.labels)},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        layer_digest = _blob(tar, layer)
        config_digest = _blob(tar, config_bytes)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": len(layer)}],
        }, sort_keys=True).encode()
        manifest_digest = _blob(tar, manifest)
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rpartition(":")[2]}}]}
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    return ImageArchive(name=name, path=out)


def pause_image(workdir: Path) -> ImageArchive:
    """The pod sandbox image: ``PAUSE_C`` compiled statically, nothing else."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageBuildError("pause image: gcc is not installed (Debian: apt-get install gcc libc6-dev)")
    source, binary = workdir / "pause.c", workdir / "pause"
    source.write_text(PAUSE_C)
    done = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(binary), str(source)],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise ImageBuildError(f"pause image: gcc -static failed (is libc6-dev installed?):\n{done.stderr}")
    return oci_archive(PAUSE_IMAGE, {"/pause": binary}, ImageConfig(entrypoint=["/pause"], user="65535:65535"),
                       workdir / "pause.oci.tar")


def coredns_image(coredns: Path, workdir: Path) -> ImageArchive:
    """The cluster DNS image: the static CoreDNS binary alone, run as an unprivileged user."""
    if _needs_loader(coredns):
        raise ImageBuildError(f"coredns image: {coredns} is dynamically linked; build it with CGO_ENABLED=0")
    return oci_archive(COREDNS_IMAGE, {"/coredns": coredns},
                       ImageConfig(entrypoint=["/coredns"], user="65532:65532"), workdir / "coredns.oci.tar")


def _needs_loader(binary: Path) -> bool:
    """Whether ``binary`` is dynamically linked (has an ELF interpreter), i.e. cannot run alone."""
    return b"/lib64/ld-linux" in binary.read_bytes()[:4096]


def _shared_libraries(binary: Path) -> list[Path]:
    """The files the dynamic loader maps for ``binary`` (from ldd), the loader included."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=False)
    found = re.findall(r"(/\S+)\s+\(0x", done.stdout)
    return [Path(p) for p in found]


def toolbox_image(workdir: Path) -> ImageArchive:
    """A small pod image: static busybox for sh/sleep and glibc's getent for lookups."""
    busybox = shutil.which("busybox")
    getent, dig = shutil.which("getent"), shutil.which("dig")
    if busybox is None or _needs_loader(Path(busybox)):
        raise ImageBuildError("toolbox image: static busybox is missing (Debian: apt-get install busybox-static)")
    if getent is None or dig is None:
        raise ImageBuildError("toolbox image: getent or dig is missing (Debian: libc-bin, dnsutils)")
    files: dict[str, Path | bytes] = {"/bin/busybox": Path(busybox), "/usr/bin/getent": Path(getent),
                                      "/usr/bin/dig": Path(dig)}
    for binary in (getent, dig):
        for library in _shared_libraries(Path(binary)):
            files[str(library)] = library.resolve()
    # glibc without nsswitch.conf would still try dns then files; say it explicitly, like Debian.
    files["/etc/nsswitch.conf"] = b"hosts: files dns\n"
    files["/etc/passwd"] = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
    links = {f"/bin/{tool}": "busybox"
             for tool in ("sh", "sleep", "cat", "echo", "true", "touch", "ls", "nslookup")}
    return oci_archive(TOOLBOX_IMAGE, files, ImageConfig(entrypoint=["/bin/sh"]),
                       workdir / "toolbox.oci.tar", symlinks=links, directories={"/tmp": 0o1777})
