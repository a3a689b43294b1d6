"""Container images for real: a Debian base made here, podman builds, a loopback registry.

Usage (every step is real: debootstrap, buildah via ``podman build``, Debian's docker-registry)::

    from testbed.image import Podman, Registry, kubedock_dns_image, test_pod_image

    podman = Podman()                          # root; storage in ~/.cache/kubedock-dns/podman
    with Registry(tmp_path) as registry:       # docker-registry on 127.0.0.1:<free port>
        ref = kubedock_dns_image(podman, registry.address)   # "localhost:<port>/kubedock-dns:0.1.0"
        pod = test_pod_image(podman, registry.address)       # "localhost:<port>/kubedock-testpod:<key>"
        # a node pulls both over plain HTTP from registry.address (containerd: an http:// endpoint)

- :mod:`testbed.image.podman`: :class:`Podman`, the engine with the settings this machine needs
  (runc, cgroupfs, ulimits, a private store) and errors that carry podman's output.
- :mod:`testbed.image.base`: :func:`debian_base`, the stand-in for ``python:3.11-slim`` (debootstrap
  of this machine's suite + Debian's python3), cached as a tarball keyed by suite and packages.
- :mod:`testbed.image.build`: :func:`build_image`, :func:`push`, :func:`kubedock_dns_image` (the
  repository's Dockerfile, unchanged, through its ``PYTHON_IMAGE`` argument), :func:`test_pod_image`,
  :func:`podman_shim` (run a documented ``podman`` command word for word).
- :mod:`testbed.image.registry`: :class:`Registry`, a context manager with ``.address``.

A first run makes the base (about 1.5 minutes) and builds the image (about 1.5 minutes: pip
fetches the dependencies from PyPI); later runs reuse the base and podman's layer cache.
"""

from testbed.image.base import BaseImageError, debian_base
from testbed.image.build import build_image, kubedock_dns_image, podman_shim, push, test_pod_image
from testbed.image.podman import Podman, PodmanError, PodmanUnavailable
from testbed.image.registry import Registry, RegistryError

__all__ = [
    "BaseImageError", "Podman", "PodmanError", "PodmanUnavailable", "Registry", "RegistryError",
    "build_image", "debian_base", "kubedock_dns_image", "podman_shim", "push", "test_pod_image",
]
