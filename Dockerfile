# syntax=docker/dockerfile:1
# kubedock-dns container image.
#
#   docker build -t "$REGISTRY/kubedock-dns:0.1.0" . && docker push "$REGISTRY/kubedock-dns:0.1.0"
#
# Two stages: the builder turns the project and all its dependencies into wheels; the final stage
# installs only those wheels (no compiler, no pip cache, no sources) into a virtual environment and
# runs as an unprivileged user.  The RUN instructions marked "# image-test: run" are executed, in
# order and with the same ARG values redirected to temporary directories, by tests/test_image.py:
# keep every install step in such a marked RUN so the test keeps proving what the image does.

ARG PYTHON_IMAGE=python:3.11-slim
# WHEEL_DIR must stay /wheels: the bind mount in the final stage names it literally.
ARG WHEEL_DIR=/wheels
ARG VENV=/opt/kubedock-dns

FROM ${PYTHON_IMAGE} AS builder
ARG WHEEL_DIR
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
# image-test: run
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
# a layer; then write Twisted's plugin cache now: at run time the root filesystem is read-only and
# twistd would otherwise try to write it on every start.
# image-test: run
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VENV" \
 && "$VENV/bin/pip" install --no-index --find-links "$WHEEL_DIR" kubedock-dns \
 && "$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
USER 10001:10001
# DNS (UDP+TCP), admission webhook (TLS), operations (/healthz, /readyz, /metrics, /debug/networks)
EXPOSE 5353/udp 5353/tcp 8443/tcp 8080/tcp
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "kubedock-dns"]
CMD ["--help"]
