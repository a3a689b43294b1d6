"""Testcontainers' sshd container, made here from Debian's openssh-server.

Contract
--------
:func:`sshd_image` returns the name of a local image (``localhost/kubedock-dns-testbed/sshd:<key>``
in the test bed's podman store) built ``FROM`` :func:`testbed.image.base.debian_base` with
Debian's ``openssh-server`` installed from the Debian mirror; the key hashes the base and the
recipe, so it is built once (about half a minute) and found in the store afterwards.
:func:`docker_archive` writes an image of the store (this one, or the Debian base as a client
container image with glibc's ``getent`` and ``python3``) as a Docker archive that ``ctr images
import`` loads under its name: a node cannot pull Testcontainers' own ``testcontainers/sshd`` from
Docker Hub here, and needs no registry for images it already holds.

It behaves as Testcontainers' ``testcontainers/sshd`` does when Testcontainers runs it (its
``PortForwardingContainer`` sets only the environment variable ``PASSWORD`` and port 22): no
entrypoint, a command that sets root's password to ``$PASSWORD`` and runs sshd in the foreground
with root login by password, IPv4 only, ``GatewayPorts yes`` (the reverse tunnels listen on the
pod's address, where the session's containers connect) and TCP forwarding.  Its host keys are made
at build time: a throw-away test image.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from testbed.image.base import debian_base
from testbed.image.build import build_image
from testbed.image.podman import Podman

__all__ = ["SSHD_REPOSITORY", "docker_archive", "sshd_image"]

SSHD_REPOSITORY = "localhost/kubedock-dns-testbed/sshd"

START = """\
#!/bin/sh
# Testcontainers' sshd: root logs in with $PASSWORD; remote forwards listen on every address.
set -e
echo "root:${PASSWORD:?PASSWORD is not set}" | chpasswd
exec /usr/sbin/sshd -D -e -o PermitRootLogin=yes -o PasswordAuthentication=yes -o AddressFamily=inet \\
    -o GatewayPorts=yes -o AllowTcpForwarding=yes -o AllowAgentForwarding=yes \\
    -o KexAlgorithms=+diffie-hellman-group14-sha1 -o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedAlgorithms=+ssh-rsa
"""

CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        openssh-server >/dev/null && rm -rf /var/lib/apt/lists/* && mkdir -p /run/sshd && ssh-keygen -A
COPY start-sshd /usr/local/bin/start-sshd
RUN chmod 0755 /usr/local/bin/start-sshd
EXPOSE 22
CMD ["/usr/local/bin/start-sshd"]
"""


def sshd_image(podman: Podman) -> str:
    """The image's name in ``podman``'s store, built on first use (module docstring)."""
    base = debian_base(podman)
    key = hashlib.sha256((base + CONTAINERFILE + START).encode()).hexdigest()[:12]
    ref = f"{SSHD_REPOSITORY}:{key}"
    if not podman.image_exists(ref):
        with tempfile.TemporaryDirectory(prefix="sshd-image-") as context:
            (Path(context) / "start-sshd").write_text(START)
            (Path(context) / "Containerfile").write_text(CONTAINERFILE)
            build_image(podman, context, ref, build_args={"BASE": base})
    return ref


def docker_archive(podman: Podman, ref: str, out: Path) -> Path:
    """Image ``ref`` of the store written to ``out`` as a Docker archive, for ``ctr images import``."""
    podman("save", "--format", "docker-archive", "-o", str(out), ref, timeout=300)
    return out
