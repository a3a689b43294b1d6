# syntax=docker/dockerfile:1
# kubedock-dns container image.
#
#   docker build -t "$REGISTRY/kubedock-dns:$TAG" . && docker push "$REGISTRY/kubedock-dns:$TAG"
#
# Two stages: the builder fetches the locked dependencies as wheels and builds the project's own
# wheel; the final stage installs only those wheels (no compiler, no pip, no sources) into a
# virtual environment and runs as an unprivileged user.  tests/test_image.py builds this file
# unchanged with podman (only PYTHON_IMAGE points at a Debian base made there), pushes it to a
# registry, pulls it back and runs it as uid 10001 with a read-only root filesystem.
#
# Reproducible inputs:
# - the base image is pinned by digest: python:3.11-slim-bookworm as published on 2026-08-25
#   (Python 3.11.16; the multi-platform index digest, as listed by docker-library/repo-info).
#   Override it with --build-arg PYTHON_IMAGE=<image>; refresh the pin with
#   `docker buildx imagetools inspect python:3.11-slim-bookworm` (its "Digest:" line).
# - the Python dependencies are exactly image-requirements.txt: every version pinned and every
#   file checked against its sha256 (pip --require-hashes), only wheels (nothing compiled here).
#   Regenerate it with the pip-compile command in its header after changing install_requires
#   in setup.cfg (tests/test_release.py checks that the two agree).
# The project's own wheel is built in an isolated build environment (pyproject.toml's
# setuptools); the build tools never reach the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b
# WHEEL_DIR must stay /wheels: the bind mount in the final stage names it literally.
ARG WHEEL_DIR=/wheels
ARG VENV=/opt/kubedock-dns

FROM ${PYTHON_IMAGE} AS builder
ARG WHEEL_DIR
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip download --require-hashes --only-binary=:all: --no-deps --dest "$WHEEL_DIR" -r image-requirements.txt \
 && pip wheel --no-deps --wheel-dir "$WHEEL_DIR" . \
 && cp image-requirements.txt "$WHEEL_DIR/"

FROM ${PYTHON_IMAGE}
ARG WHEEL_DIR
ARG VENV
ARG PYTHON_IMAGE
# The release (kubedock_dns.__version__; tests/test_release.py keeps them equal) and, when the
# builder passes it (--build-arg REVISION=$(git rev-parse HEAD)), the commit.
ARG VERSION=0.1.0
ARG REVISION=
LABEL org.opencontainers.image.title="kubedock-dns" \
      org.opencontainers.image.description="Docker-network name resolution for kubedock pods sharing one Kubernetes namespace" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.url="https://github.com/kubedock-dns/kubedock-dns" \
      org.opencontainers.image.source="https://github.com/kubedock-dns/kubedock-dns" \
      org.opencontainers.image.documentation="https://github.com/kubedock-dns/kubedock-dns/blob/main/docs/install.md" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=${VENV}/bin:$PATH
RUN groupadd --gid 10001 kubedock-dns \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin kubedock-dns
# Install the wheels only (never the index), bind-mounted from the builder so they never land in
# a layer: the locked dependencies with their hashes checked once more, then the project without
# dependencies, and `pip check` proves the lock covers everything it needs.  Then drop what never
# runs, measured (docs/install.md, "Image size"): pip and setuptools (nothing installs at run
# time) and the kubernetes client's asyncio twin, kubernetes/aio (68 MB with its bytecode; the
# watcher uses the synchronous client, and the import check below fails the build should that
# ever change).  The bytecode pip compiles stays: the root filesystem is read-only, so without it
# every start would compile the kubernetes client again.  Last, write Twisted's plugin cache now,
# which twistd would otherwise try to write on every start.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VENV" \
 && "$VENV/bin/pip" install --no-index --find-links "$WHEEL_DIR" --require-hashes -r "$WHEEL_DIR/image-requirements.txt" \
 && "$VENV/bin/pip" install --no-index --no-deps "$WHEEL_DIR"/kubedock_dns-*.whl \
 && "$VENV/bin/pip" check \
 && "$VENV/bin/pip" uninstall --yes pip setuptools \
 && rm -rf "$VENV"/lib/python*/site-packages/kubernetes/aio \
 && "$VENV/bin/python" -c "import kubedock_dns.tap, kubedock_dns.kube.watcher, kubedock_dns.kube.policy_writer, kubedock_dns.admission.service; \
from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
USER 10001:10001
# DNS (UDP+TCP), admission webhook (TLS), operations (/healthz, /readyz, /metrics, /debug/networks)
EXPOSE 5353/udp 5353/tcp 8443/tcp 8080/tcp
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "kubedock-dns"]
CMD ["--help"]
