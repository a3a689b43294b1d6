"""A kubedock-compatible Docker API stand-in, so that a real Docker client can drive the bed.

Contract
--------
``KubedockAPI(bed, bridge_id)`` (a context manager) serves, on a free loopback port, the subset of
the Docker Engine API (any ``/v1.xx`` prefix) that a client needs to create networks and run and
remove containers, and turns it into pods the way kubedock 0.22.0 does (read from its source,
none of it copied): a network gets a random 64-hex ID; ``bridge`` is predefined (``bridge_id``);
a container joins ``HostConfig.NetworkMode`` and every ``NetworkingConfig.EndpointsConfig`` network,
or ``bridge`` when none, with the endpoints' aliases; ``start`` creates the pod through
:meth:`testbed.bed.EndToEndBed.create_kubedock_pod` (``hostalias/0`` is the hostname, or the pod
name when none was given) and answers 500 with the API server's message when the pod is refused,
as kubedock does; ``DELETE /containers/<id>`` deletes the pod with the default grace period.

Routes: ``GET /_ping``, ``GET /version``, ``POST /networks/create``, ``GET /networks/<id or name>``,
``POST /containers/create?name=``, ``GET /containers/<id>/json``, ``POST /containers/<id>/start``,
``DELETE /containers/<id>``.  Anything else gets 404 with a message naming the route.  It is
test scaffolding, not kubedock: no images, logs, exec or ports.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testbed.bed import BedError, BedPod, EndToEndBed, kubedock_pod_name

__all__ = ["KubedockAPI"]

_VERSIONED = re.compile(r"^/v\d+\.\d+(/.*)$")


@dataclass
class _Container:
    id: str
    name: str
    hostname: str
    image: str
    networks: dict[str, list[str]]  # network ID -> aliases
    labels: dict[str, str] = field(default_factory=dict)
    pod: BedPod | None = None


class KubedockAPI:
    """See the module docstring."""

    def __init__(self, bed: EndToEndBed, bridge_id: str, *, linger: float = 0.0) -> None:
        self.bed = bed
        self.linger = linger  # seconds a removed container's pod stays Terminating
        self.networks: dict[str, str] = {bridge_id: "bridge"}  # ID -> name
        self.containers: dict[str, _Container] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the API first"
        return f"tcp://127.0.0.1:{self._server.server_address[1]}"

    def pod(self, container_id: str) -> BedPod:
        """The running pod of a started container (full or 12-hex ID)."""
        container = self._container(container_id)
        if container is None or container.pod is None:
            raise KeyError(f"container {container_id} is not running")
        return container.pod

    def __enter__(self) -> "KubedockAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._serve(self, "GET")

            def do_POST(self) -> None:
                api._serve(self, "POST")

            def do_DELETE(self) -> None:
                api._serve(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubedock-api",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- HTTP

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        path = _VERSIONED.sub(r"\1", url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}") if length else {}
        try:
            status, document = self._route(method, path, query, body)
        except BedError as e:  # kubedock: the pod could not be created
            status, document = 500, {"message": str(e)}
        except Exception as e:  # noqa: BLE001 - the client sees the reason
            status, document = 500, {"message": f"{type(e).__name__}: {e}"}
        payload = b"" if document is None else json.dumps(document).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json" if payload else "text/plain")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(self, method: str, path: str, query: dict[str, str],
               body: dict[str, Any]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["_ping"]:
            return 200, "OK"
        if method == "GET" and parts == ["version"]:
            return 200, {"ApiVersion": "1.41", "MinAPIVersion": "1.24", "Version": "kubedock-api-stand-in"}
        if parts[:1] == ["networks"]:
            if method == "POST" and parts[1:] == ["create"]:
                return self._create_network(body)
            if method == "GET" and len(parts) == 2:
                network_id = self._network_id(parts[1])
                if network_id is None:
                    return 404, {"message": f"network {parts[1]} not found"}
                return 200, {"Id": network_id, "Name": self.networks[network_id], "Driver": "bridge",
                             "Scope": "local", "Labels": {}, "Containers": {}}
        if parts[:1] == ["containers"]:
            if method == "POST" and parts[1:] == ["create"]:
                return self._create_container(query.get("name") or body.get("Name") or "", body)
            container = self._container(parts[1]) if len(parts) > 1 else None
            if container is None:
                return 404, {"message": f"No such container: {parts[1] if len(parts) > 1 else ''}"}
            if method == "GET" and parts[2:] == ["json"]:
                return 200, self._inspect(container)
            if method == "POST" and parts[2:] == ["start"]:
                return self._start(container)
            if method == "DELETE" and len(parts) == 2:
                return self._remove(container)
        return 404, {"message": f"{method} {path} is not served by the kubedock API stand-in"}

    # -- networks and containers

    def _network_id(self, id_or_name: str) -> str | None:
        with self._lock:
            for network_id, name in self.networks.items():
                if id_or_name in (network_id, name) or (len(id_or_name) >= 12 and network_id.startswith(id_or_name)):
                    return network_id
        return None

    def _create_network(self, body: dict[str, Any]) -> tuple[int, Any]:
        network_id = secrets.token_hex(32)
        with self._lock:
            self.networks[network_id] = body.get("Name") or network_id[:12]
        return 201, {"Id": network_id, "Warning": ""}

    def _container(self, id_or_name: str) -> _Container | None:
        with self._lock:
            for container in self.containers.values():
                if id_or_name in (container.id, container.name) or (
                        len(id_or_name) >= 12 and container.id.startswith(id_or_name)):
                    return container
        return None

    def _create_container(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        networks: dict[str, list[str]] = {}
        mode = (body.get("HostConfig") or {}).get("NetworkMode") or ""
        if mode and mode != "default":
            network_id = self._network_id(mode)
            if network_id is None:
                return 404, {"message": f"network {mode} not found"}
            networks[network_id] = []
        for key, endpoint in ((body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}).items():
            network_id = self._network_id((endpoint or {}).get("NetworkID") or key)
            if network_id is None:
                return 404, {"message": f"network {key} not found"}
            networks.setdefault(network_id, []).extend((endpoint or {}).get("Aliases") or [])
        if not networks:
            networks[self._network_id("bridge") or ""] = []
        container_id = secrets.token_hex(32)
        container = _Container(id=container_id, name=name.lstrip("/") or f"c{container_id[:8]}",
                               hostname=body.get("Hostname") or "", image=body.get("Image") or "",
                               networks=networks, labels=dict(body.get("Labels") or {}))
        with self._lock:
            self.containers[container_id] = container
        return 201, {"Id": container_id, "Warnings": []}

    def _inspect(self, container: _Container) -> dict[str, Any]:
        running = container.pod is not None
        return {
            "Id": container.id, "Name": "/" + container.name, "Image": container.image,
            "Config": {"Hostname": container.hostname, "Image": container.image, "Labels": container.labels},
            "State": {"Status": "running" if running else "created", "Running": running},
            "NetworkSettings": {"Networks": {
                self.networks.get(n, n): {"NetworkID": n, "Aliases": a,
                                          "IPAddress": container.pod.ip if container.pod else ""}
                for n, a in container.networks.items()}},
        }

    def _start(self, container: _Container) -> tuple[int, Any]:
        if container.pod is not None:
            return 304, None
        aliases = [a for aliases in container.networks.values() for a in aliases]
        hostname = container.hostname or kubedock_pod_name(container.name, container.id[:12])
        container.pod = self.bed.create_kubedock_pod(
            hostname, list(container.networks), aliases=list(dict.fromkeys(aliases)),
            container_name=container.name, container_id=container.id)
        return 204, None

    def _remove(self, container: _Container) -> tuple[int, Any]:
        if container.pod is not None:
            self.bed.delete_pod(container.pod, wait=False, linger=self.linger)
        with self._lock:
            self.containers.pop(container.id, None)
        return 204, None
