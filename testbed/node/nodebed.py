"""The end-to-end bed's interface on the real node: the same scenarios, real kubelet and kube-proxy.

Contract: ``with NodeBed(node) as bed:`` gives the subset of :class:`testbed.bed.EndToEndBed` that
the end-to-end tests and the demo use (``namespace``, ``service_ip``, ``cluster_dns_ip``,
``kubernetes_ip``, ``decoy_db_ip``, ``create_kubedock_pod``, ``exec``, ``stored_pod``,
``delete_pod``, ``open_readiness_gate``, ``debug_networks``, ``metrics``, ``server_log``, ``cluster_dns_askers``,
``leftovers``), on a
:class:`testbed.node.Node`:

- a fresh namespace, with a decoy Service ``db`` (the cluster DNS, CoreDNS, answers
  ``db.<namespace>.svc.cluster.local`` with its ClusterIP, ``decoy_db_ip``; a wrong fall-through
  would show it);
- kubedock-dns serving it (:class:`testbed.node.hostserver.HostKubedockDns`: this checkout's code,
  reached by pods through a Service via kube-proxy);
- pods created exactly as kubedock creates them (:func:`testbed.bed.kubedock_pod_manifest`), with
  the toolbox image (glibc ``getent``, ``dig``), run by the real kubelet; kubedock's ``setup`` init
  container is released the way kubedock releases it (``touch /tmp/done`` in it by exec).

What the real node cannot do, it refuses with :class:`testbed.bed.BedError`, saying why: choosing
a pod's IP (``ip=``; host-local IPAM hands out addresses itself) and ending a pod while keeping its
record (``finish``).  Leaving the block removes the webhook registration, the server and the
namespace (the namespace controller and the kubelet remove the pods).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import urllib.request
from dataclasses import replace
from typing import Any, Iterable

from testbed.bed import READINESS_GATE, BedError, BedPod, kubedock_pod_manifest, metric_values, wait_pod_gone
from testbed.netns import ExecResult
from testbed.node import images
from testbed.node.hostserver import HostKubedockDns

__all__ = ["NodeBed"]

# Ends at once on SIGTERM, unless /tmp/linger holds a number of seconds to keep running first
# (``delete_pod(linger=...)``: a container that takes its time to stop, so that its pod stays
# Terminating with its IP under the default grace period, as kubedock's deletions leave it).
IDLE = ("/bin/sh", "-c", "trap 'if [ -f /tmp/linger ]; then sleep \"$(cat /tmp/linger)\"; fi; exit 0' TERM; "
        "while :; do sleep 1; done")
# kubedock's own init container command: wait until kubedock has copied files in and says so.
INIT_DONE = "/tmp/done"


class NodeBed:
    """See the module docstring."""

    loopback = False
    loopback_reason = ""
    upstream = None  # the cluster DNS is CoreDNS on the node: see cluster_dns_askers

    def __init__(self, node: Any, *, namespace_prefix: str = "e2e", progress: Any = None,
                 server_args: Iterable[str] = ()) -> None:
        self.node = node
        self._server_args = tuple(server_args)
        self._prefix = namespace_prefix
        self._progress = progress or node._progress
        self.instance_id = secrets.token_hex(6)
        self.namespace = ""
        self.service_ip = ""
        self.cluster_dns_ip = node.cluster_dns_ip
        self.kubernetes_ip = node.control_plane.service_ip
        self.decoy_db_ip = ""
        self.server: HostKubedockDns | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "NodeBed":
        try:
            self.namespace = self.node.create_namespace(self._prefix)
            self._stack.callback(self.node.delete_namespace, self.namespace)
            decoy = self.node.core.create_namespaced_service(self.namespace, body={
                "metadata": {"name": "db"}, "spec": {"ports": [{"port": 5432}]}})
            self.decoy_db_ip = decoy.spec.cluster_ip
            self.server = self._stack.enter_context(HostKubedockDns(self.node, self.namespace, self._server_args))
            self.service_ip = self.server.service_ip
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    close = __exit__

    def leftovers(self) -> list[str]:
        """What of this bed remains: its namespace (the node's own leftovers are the node's)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.node.core.read_namespace(self.namespace)
        except ApiException as e:
            if e.status == 404:
                return []
            raise
        return [f"namespace {self.namespace}"]

    # -- pods

    def create_kubedock_pod(self, name: str, network_ids: Iterable[str] = (),
                            aliases: Iterable[str] = (), container_name: str | None = None,
                            container_id: str | None = None, *, hostname: str | None = None,
                            opt_in: bool = True, init_container: bool = True,
                            ip: str | None = None, wait: bool = True, readiness_gate: bool = False,
                            timeout: float = 90.0) -> BedPod:
        """As :meth:`testbed.bed.EndToEndBed.create_kubedock_pod`, run by the real kubelet."""
        if ip is not None:
            raise BedError("the real node cannot give a pod a chosen IP (host-local IPAM allocates)")
        pod = BedPod.new(name, network_ids, aliases, container_name, container_id, hostname, opt_in)
        body = kubedock_pod_manifest(pod, self.namespace, self.instance_id, init_container=init_container,
                                     image=images.TOOLBOX_IMAGE, command=IDLE,
                                     init_image=images.TOOLBOX_IMAGE, readiness_gate=readiness_gate)
        try:
            response = self.node.core.create_namespaced_pod(self.namespace, body=body, _preload_content=False)
        except Exception as e:  # noqa: BLE001 - the API's reason is the message
            raise BedError(f"creating pod {pod.name} failed: {getattr(e, 'body', e)}") from None
        stored = json.loads(response.data)
        pod = replace(pod, uid=stored["metadata"]["uid"],
                      warnings=tuple(response.headers.getlist("Warning")))
        if opt_in and stored["spec"].get("dnsPolicy") != "None":
            raise BedError(f"pod {pod.name} was not mutated by the webhook: {stored['spec']}")
        if not wait:
            return pod
        if init_container:
            self._release_init_container(pod.name, timeout)
        running = self.node.wait_pod_running(self.namespace, pod.name, timeout,
                                             condition="ContainersReady" if readiness_gate else "Ready")
        return replace(pod, ip=running["status"]["podIP"])

    def wait_running(self, pod: BedPod, timeout: float = 90.0) -> BedPod:
        """Start a pod created with ``wait=False`` as kubedock would (its ``setup`` init container
        released) and wait until the kubelet runs it; returns it with its IP."""
        self._release_init_container(pod.name, timeout)
        running = self.node.wait_pod_running(self.namespace, pod.name, timeout)
        return replace(pod, ip=running["status"]["podIP"])

    def _release_init_container(self, name: str, timeout: float) -> None:
        """Do what kubedock does once it has copied files into the pod: ``touch /tmp/done`` in
        the running ``setup`` init container."""
        deadline = time.monotonic() + timeout
        while True:
            pod = self.stored_pod(name)
            statuses = pod.get("status", {}).get("initContainerStatuses") or []
            setup = next((s for s in statuses if s["name"] == "setup"), None)
            if setup and "terminated" in (setup.get("state") or {}):
                return
            if setup and "running" in (setup.get("state") or {}) and setup.get("containerID"):
                cid = setup["containerID"].split("://", 1)[1]
                assert self.node.containerd is not None
                done = self.node.containerd.exec(cid, ["touch", INIT_DONE])
                if done.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise BedError(f"init container of {name} never ran; "
                               f"{self.node.describe_pod(self.namespace, name)}")
            time.sleep(0.2)

    def open_readiness_gate(self, pod: BedPod | str) -> None:
        """Set the pod's readiness gate condition True; the real kubelet then makes it Ready."""
        name = pod if isinstance(pod, str) else pod.name
        self.node.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": {"conditions": [{"type": READINESS_GATE, "status": "True"}]}},
            _content_type="application/strategic-merge-patch+json", _preload_content=False)

    def stored_pod(self, pod: BedPod | str) -> dict[str, Any]:
        name = pod if isinstance(pod, str) else pod.name
        return dict(json.loads(self.node.core.read_namespaced_pod(name, self.namespace,
                                                                  _preload_content=False).data))

    def delete_pod(self, pod: BedPod | str, *, wait: bool = True, timeout: float = 60.0,
                   linger: float = 0.0) -> None:
        """Delete the pod as kubedock does (the default grace period; the kubelet confirms).  Its
        container ends at once on SIGTERM, or with ``linger`` keeps running that many seconds
        first, so the pod stays Terminating with its IP (the kubelet kills it when the grace
        period ends)."""
        name = pod if isinstance(pod, str) else pod.name
        if linger:
            done = self.exec(name, ["sh", "-c", f"echo {int(linger)} > /tmp/linger"])
            if done.rc != 0:
                raise BedError(f"could not make {name} linger: {done.stdout}{done.stderr}")
        self.node.core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
        if wait:
            wait_pod_gone(self.node.core, self.namespace, name, timeout, poll=0.1)

    def finish(self, pod: BedPod | str) -> str:
        raise BedError("the real node cannot end a pod on request while pinning its IP for the next one")

    def exec(self, pod: BedPod | str, argv: list[str] | tuple[str, ...], timeout: float = 30) -> ExecResult:
        """Run ``argv`` in the pod's main container (its namespaces, resolv.conf and hosts)."""
        name = pod if isinstance(pod, str) else pod.name
        done = self.node.exec(self.namespace, name, list(argv), container="main", timeout=timeout)
        return ExecResult(done.returncode, done.stdout, done.stderr)

    # -- observations

    def _ops(self, path: str) -> bytes:
        assert self.server is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.server.ops_port}{path}", timeout=5) as r:
            return bytes(r.read())

    def debug_networks(self) -> dict[str, Any]:
        return dict(json.loads(self._ops("/debug/networks")))

    def metrics(self) -> dict[str, float]:
        return metric_values(self._ops("/metrics").decode())

    def server_log(self, lines: int = 80) -> str:
        return self.server.log(lines) if self.server else ""

    def cluster_dns_askers(self) -> set[str]:
        """The client addresses CoreDNS has had queries from, by its log plugin's lines in the
        container logs the kubelet writes (its ``podLogsDir``; reading them through the API
        server would need it to reach the kubelet by the node's name, which this machine's
        resolver does not know)."""
        from pathlib import Path

        from testbed.node.clusterdns import askers_in_log

        askers: set[str] = set()
        for log in (Path(self.node.run) / "pod-logs").glob("kube-system_coredns-*/coredns/*.log"):
            askers |= askers_in_log(log.read_text(errors="replace"))
        return askers
