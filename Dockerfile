# syntax=docker/dockerfile:1
# kubedock-dns container image.
#
#   docker build -t "$REGISTRY/kubedock-dns:0.1.0" . && docker push "$REGISTRY/kubedock-dns:0.1.0"
#
# Two stages: the builder turns the project and all its dependencies into wheels; the final stage
# installs only those wheels (no compiler, no pip, no sources) into a virtual environment and runs
# as an unprivileged user.  tests/test_image.py builds this file unchanged with podman (only
# PYTHON_IMAGE points at a Debian base made there), pushes it to a registry, pulls it back and runs
# it as uid 10001 with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim
# WHEEL_DIR must stay /wheels: the bind mount in the final stage names it literally.
ARG WHEEL_DIR=/wheels
ARG VENV=/opt/kubedock-dns

FROM ${PYTHON_IMAGE} AS builder
ARG WHEEL_DIR
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --wheel-dir "$WHEEL_DIR" .

FROM ${PYTHON_IMAGE}
ARG WHEEL_DIR
ARG VENV
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=${VENV}/bin:$PATH
RUN groupadd --gid 10001 kubedock-dns \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin kubedock-dns
# Install the wheels only (never the index), bind-mounted from the builder so they never land in
# a layer.  Then drop what never runs, measured (docs/install.md, "Image size"): pip and setuptools
# (nothing installs at run time) and the kubernetes client's asyncio twin, kubernetes/aio (68 MB
# with its bytecode; the watcher uses the synchronous client, and the import check below fails the
# build should that ever change).  The bytecode pip compiles stays: the root filesystem is
# read-only, so without it every start would compile the kubernetes client again.  Last, write
# Twisted's plugin cache now, which twistd would otherwise try to write on every start.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VENV" \
 && "$VENV/bin/pip" install --no-index --find-links "$WHEEL_DIR" kubedock-dns \
 && "$VENV/bin/pip" uninstall --yes pip setuptools \
 && rm -rf "$VENV"/lib/python*/site-packages/kubernetes/aio \
 && "$VENV/bin/python" -c "import kubedock_dns.tap, kubedock_dns.kube.watcher, kubedock_dns.kube.policy_writer, kubedock_dns.admission.service; \
from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
USER 10001:10001
# DNS (UDP+TCP), admission webhook (TLS), operations (/healthz, /readyz, /metrics, /debug/networks)
EXPOSE 5353/udp 5353/tcp 8443/tcp 8080/tcp
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "kubedock-dns"]
CMD ["--help"]
