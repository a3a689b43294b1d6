"""A kubelet stand-in for the end-to-end bed: pods created through the API get a network
namespace, an IP and a kubelet-style status.

Contract
--------
``KubeletStandIn(api_client, namespace, plane, cluster_dns_ip)`` (a context manager) watches the
pods of one namespace through the API server (list, then watch from the list's resourceVersion,
raw JSON; a ``410 Gone`` relists) and reconciles each pod, level-triggered, on a small thread
pool (one pod is never handled by two threads at once):

- a new pod (not finished, not being deleted) is bound to the stand-in's node (the ``binding``
  subresource, as the scheduler would), given an IP by the plane's IPAM (or the IP pinned for its
  name with :meth:`pin_ip`, or, with ``reuse_ips``, the most recently released IP), and gets its
  sandbox: ``plane.add_pod`` with ``/etc/resolv.conf`` rendered from the pod's **stored** spec
  (``dnsPolicy`` + ``dnsConfig`` after every admission webhook ran) by
  :func:`testbed.netns.resolv_conf_for_pod`, exactly as a kubelet renders it. Then its status is
  patched through the ``status`` subresource like a kubelet does: first ``Pending`` with
  ``podIP``/``podIPs`` and its init containers running (pods with init containers), then
  ``Running`` with ``startTime``, conditions (``Ready`` True) and minimal ``containerStatuses``;
- a pod being deleted (``deletionTimestamp``) loses its sandbox and is then deleted with grace
  period 0 (the kubelet's final delete); a pod that disappears loses its sandbox; a pod named in
  :meth:`linger` first keeps running (sandbox, IP, status) for that many seconds, as a container
  that ignores SIGTERM does for its grace period: the pod stays Terminating in the API meanwhile;
- a pod named in :meth:`hold_init` (created later) stays ``Pending`` with its IP and its init
  containers running, as kubedock's pods do until kubedock has copied their files into the
  ``setup`` container, until :meth:`release_init` lets the init containers finish;
- :meth:`finish` ends a pod the way a container that exits 0 under ``restartPolicy: Never``
  does: sandbox removed, status ``Succeeded`` (``podIP`` stays set, as a real kubelet leaves it)
  and its IP released, so the IPAM may hand it to another pod.

The plane is a :class:`testbed.netns.PodNetwork` (real namespaces; needs root) or a
:class:`LoopbackPlane` (no namespaces: each pod is a source address in 127.0.0.0/8).
:meth:`stop` stops the watch and the workers and removes every sandbox the stand-in made;
failures handling a pod are kept in :attr:`errors` (and reported by :meth:`wait_running`).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from testbed.netns import ExecResult, render_hosts_file, resolv_conf_for_pod

__all__ = ["KubeletStandIn", "KubeletError", "LoopbackPlane", "NODE_NAME", "Plane", "StartedPod"]

NODE_NAME = "kubedock-dns-testbed"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


class KubeletError(RuntimeError):
    """A pod could not be started or did not reach the wanted state; the message says which."""


class Plane(Protocol):
    """What the stand-in needs from a data plane (``PodNetwork`` and ``LoopbackPlane`` fit)."""

    gateway: str

    def allocate_ip(self) -> str: ...

    def add_pod(self, name: str, ip: str | None = None, resolv_conf_text: str | None = None,
                *, hostname: str | None = None, hosts_text: str | None = None) -> Any: ...

    def remove_pod(self, name: str) -> None: ...

    def exec(self, name: str, argv: Sequence[str], timeout: float = 30,
             input: str | None = None) -> ExecResult: ...


@dataclass(frozen=True)
class _LoopbackPod:
    name: str
    ip: str
    hostname: str
    resolv_conf: str


class LoopbackPlane:
    """The fallback data plane without root: pods are addresses in ``127.10.0.0/16``.

    Nothing is created on the machine (Linux routes all of 127.0.0.0/8 to ``lo``); a client
    binds the pod's address as its source. ``exec`` runs the command on the host as it is, so
    only commands that take a source address (``dig -b IP``) act as the pod.
    """

    def __init__(self, subnet: str = "127.10.0.0/16") -> None:
        self.subnet = ipaddress.IPv4Network(subnet)
        self.gateway = str(self.subnet.network_address + 1)
        self._pods: dict[str, _LoopbackPod] = {}
        self._next = 2
        self._lock = threading.Lock()

    @property
    def pods(self) -> Mapping[str, _LoopbackPod]:
        return dict(self._pods)

    def allocate_ip(self) -> str:
        with self._lock:
            used = {p.ip for p in self._pods.values()}
            while True:
                candidate = str(self.subnet.network_address + self._next)
                self._next += 1
                if self._next >= self.subnet.num_addresses - 1:
                    self._next = 2
                if candidate not in used:
                    return candidate

    def add_pod(self, name: str, ip: str | None = None, resolv_conf_text: str | None = None,
                *, hostname: str | None = None, hosts_text: str | None = None) -> _LoopbackPod:
        with self._lock:
            if name in self._pods:
                raise ValueError(f"pod {name!r} already exists")
        pod = _LoopbackPod(name, ip or self.allocate_ip(), hostname or name, resolv_conf_text or "")
        with self._lock:
            self._pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        with self._lock:
            self._pods.pop(name, None)

    def exec(self, name: str, argv: Sequence[str], timeout: float = 30,
             input: str | None = None) -> ExecResult:
        import subprocess

        if name not in self._pods:
            raise KeyError(f"no pod {name!r}; pods: {sorted(self._pods)}")
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input)
        return ExecResult(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        with self._lock:
            self._pods.clear()

    def leftovers(self) -> list[str]:
        return []

    def __enter__(self) -> "LoopbackPlane":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class StartedPod:
    """A pod the stand-in runs: API name and uid, its IP and when it became Running."""

    name: str
    uid: str
    ip: str
    phase: str


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Expired(Exception):
    """The watch's resourceVersion is too old: relist."""


class KubeletStandIn:
    """See the module docstring. ``progress`` gets one line per pod event (None: silent)."""

    def __init__(self, api_client: Any, namespace: str, plane: Plane,
                 cluster_dns_ip: str | Sequence[str] | None, *,
                 cluster_domain: str = "cluster.local", node_name: str = NODE_NAME,
                 reuse_ips: bool = False, workers: int = 4, watch_timeout: int = 30,
                 progress: Callable[[str], None] | None = None) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(api_client)  # raw JSON calls: untyped
        self.namespace = namespace
        self.plane = plane
        self.cluster_dns_ip = cluster_dns_ip
        self.cluster_domain = cluster_domain
        self.node_name = node_name
        self.reuse_ips = reuse_ips
        self.watch_timeout = watch_timeout
        self._progress = progress or (lambda message: None)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubelet-pod")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None
        self._lock = threading.Condition()
        self._latest: dict[str, dict[str, Any] | None] = {}  # uid -> newest object (None: gone)
        self._scheduled: set[str] = set()
        self._pod_locks: dict[str, threading.Lock] = {}
        self._sandboxes: dict[str, StartedPod] = {}  # uid -> pod with a sandbox
        self._phases: dict[str, tuple[str, str]] = {}  # pod name -> (uid, phase we reported)
        self._pinned: dict[str, str] = {}  # pod name -> IP to use
        self._linger: dict[str, float] = {}  # pod name -> seconds it runs on once deleted
        self._deleted_at: dict[str, float] = {}  # uid -> when its deletion was first seen
        self._released: list[str] = []
        self._finished: set[str] = set()  # uids finished by finish(): never restarted
        self._held_init: set[str] = set()  # pod names whose init containers wait for release_init
        self._init_waiting: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {}  # name -> (pod, ip, base)
        self.errors: list[str] = []

    # -- life cycle

    def start(self) -> "KubeletStandIn":
        """Start watching; returns once the first list has been handled (handed to workers)."""
        listed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(listed,), daemon=True,
                                        name=f"kubelet-{self.namespace}")
        self._thread.start()
        if not listed.wait(timeout=60):
            self.stop()
            raise KubeletError(f"could not list the pods of namespace {self.namespace}: "
                               f"{self.errors[-1] if self.errors else 'no answer in 60 s'}")
        return self

    def stop(self) -> None:
        """Stop the watch and the workers; remove every sandbox this stand-in made. Idempotent."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # noqa: BLE001 - already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            sandboxes = list(self._sandboxes.values())
            self._sandboxes.clear()
            self._lock.notify_all()
        for pod in sandboxes:
            self.plane.remove_pod(pod.name)

    def __enter__(self) -> "KubeletStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use

    def pin_ip(self, pod_name: str, ip: str) -> None:
        """The pod called ``pod_name`` (created later) gets ``ip``, even one just released."""
        with self._lock:
            self._pinned[pod_name] = ip

    def linger(self, pod_name: str, seconds: float) -> None:
        """Once deleted, the pod called ``pod_name`` keeps running for ``seconds`` (its grace
        period, spent by a container that ignores SIGTERM) before its sandbox goes."""
        with self._lock:
            self._linger[pod_name] = seconds

    def hold_init(self, pod_name: str) -> None:
        """The pod called ``pod_name`` (created later) stays Pending, its init containers running,
        until :meth:`release_init` (what kubedock's ``setup`` container does until kubedock has
        copied files into it)."""
        with self._lock:
            self._held_init.add(pod_name)

    def release_init(self, pod_name: str) -> None:
        """Let the init containers of ``pod_name`` finish: it goes on to Running (now, or as soon
        as its sandbox exists)."""
        with self._lock:
            self._held_init.discard(pod_name)
            waiting = self._init_waiting.pop(pod_name, None)
        if waiting is not None:
            pod, ip, base = waiting
            uid = pod["metadata"]["uid"]

            def run() -> None:
                with self._pod_lock(uid):
                    with self._lock:
                        if uid not in self._sandboxes:
                            return  # deleted meanwhile
                    try:
                        self._run_containers(pod, ip, base)
                    except Exception as e:  # noqa: BLE001 - recorded, the test sees it
                        self._record_error(f"pod {pod_name}: {e}")

            self._pool.submit(run)

    def wait_running(self, pod_name: str, timeout: float = 30.0) -> StartedPod:
        """Block until the stand-in reported ``pod_name`` Running; raise KubeletError on timeout
        (with any error handling it)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for pod in self._sandboxes.values():
                    if pod.name == pod_name and pod.phase == "Running":
                        return pod
                errors = [e for e in self.errors if f" {pod_name}:" in e]
                if errors:
                    raise KubeletError(errors[-1])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KubeletError(f"pod {self.namespace}/{pod_name} was not Running after "
                                       f"{timeout:.0f}s (the stand-in runs: "
                                       f"{sorted(p.name for p in self._sandboxes.values())})")
                self._lock.wait(timeout=min(left, 0.5))

    def running(self) -> dict[str, StartedPod]:
        """Pods with a sandbox, by name."""
        with self._lock:
            return {p.name: p for p in self._sandboxes.values()}

    def finish(self, pod_name: str, exit_code: int = 0) -> str:
        """End the pod as its container exiting would (``Succeeded``, or ``Failed`` for a
        non-zero ``exit_code``): the sandbox goes, ``podIP`` stays in the status, the IP is
        released for reuse. Returns that IP."""
        with self._lock:
            started = next((p for p in self._sandboxes.values() if p.name == pod_name), None)
        if started is None:
            raise KubeletError(f"pod {pod_name} has no sandbox (running: {sorted(self.running())})")
        with self._pod_lock(started.uid):
            with self._lock:
                self._finished.add(started.uid)
            pod = self._get(pod_name)
            self._teardown(started.uid)
            phase = "Succeeded" if exit_code == 0 else "Failed"
            now = _now()
            terminated = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0
                                         else "Error", "startedAt": now, "finishedAt": now}}
            self._patch_status(pod_name, {
                "phase": phase,
                "conditions": self._conditions(ready=False, initialized=True),
                "containerStatuses": [self._container_status(c, terminated, ready=False)
                                      for c in pod["spec"].get("containers", [])],
            })
            with self._lock:
                self._phases[pod_name] = (started.uid, phase)
                self._release(started.ip)
                self._lock.notify_all()
        self._progress(f"{pod_name} finished ({phase}); IP {started.ip} released")
        return started.ip

    # -- watching

    def _run(self, listed: threading.Event) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                version = self._relist()
                listed.set()
                backoff = 0.2
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Expired:
                continue
            except Exception as e:  # noqa: BLE001 - keep watching, report
                if self._stop.is_set():
                    return
                self._record_error(f"watch of namespace {self.namespace}: {e!r}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _relist(self) -> str:
        response = self.core.list_namespaced_pod(self.namespace, _preload_content=False,
                                                 _request_timeout=(5, 30))
        data = json.loads(response.data)
        seen = set()
        for pod in data.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self._observe(pod["metadata"]["uid"], pod)
        with self._lock:
            gone = [uid for uid in self._latest if uid not in seen]
        for uid in gone:
            self._observe(uid, None)
        return str(data["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        response = self.core.list_namespaced_pod(
            self.namespace, watch=True, resource_version=version, allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout, _preload_content=False,
            _request_timeout=(5, self.watch_timeout + 10))
        self._response = response
        try:
            for line in _lines(response.stream(amt=None, decode_content=True)):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise KubeletError(f"watch error: {obj.get('message')}")
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                uid = obj["metadata"]["uid"]
                self._observe(uid, None if kind == "DELETED" else obj)
                if self._stop.is_set():
                    break
        finally:
            self._response = None
            response.release_conn()
        return version

    def _observe(self, uid: str, pod: dict[str, Any] | None) -> None:
        with self._lock:
            if pod is None and uid not in self._latest:
                return
            self._latest[uid] = pod
            if uid in self._scheduled or self._stop.is_set():
                return
            self._scheduled.add(uid)
        try:
            self._pool.submit(self._reconcile, uid)
        except RuntimeError:  # pool shut down: stopping
            pass

    # -- reconciling one pod

    def _pod_lock(self, uid: str) -> threading.Lock:
        with self._lock:
            return self._pod_locks.setdefault(uid, threading.Lock())

    def _reconcile(self, uid: str) -> None:
        with self._pod_lock(uid):
            with self._lock:
                self._scheduled.discard(uid)
                pod = self._latest.get(uid)
                started = self._sandboxes.get(uid)
            name = pod["metadata"]["name"] if pod else (started.name if started else uid)
            try:
                self._reconcile_locked(uid, pod)
            except Exception as e:  # noqa: BLE001 - recorded, the test sees it
                if not self._stop.is_set():
                    self._record_error(f"pod {name}: {e}")

    def _reconcile_locked(self, uid: str, pod: dict[str, Any] | None) -> None:
        if pod is None:  # deleted from the API
            self._teardown(uid)
            with self._lock:
                self._latest.pop(uid, None)
                self._pod_locks.pop(uid, None)
            return
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            with self._lock:
                seconds = self._linger.get(name, 0.0)
                since = self._deleted_at.setdefault(uid, time.monotonic())
            remaining = since + seconds - time.monotonic()
            if remaining > 0:
                timer = threading.Timer(remaining, lambda: self._observe(uid, self._latest.get(uid)))
                timer.daemon = True
                timer.start()
                return
            with self._lock:
                self._deleted_at.pop(uid, None)
            self._teardown(uid)
            self._progress(f"{name} deleted: sandbox removed")
            from kubernetes.client.exceptions import ApiException
            try:
                self.core.delete_namespaced_pod(
                    name, self.namespace, grace_period_seconds=0,
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                    _preload_content=False)
            except ApiException as e:
                if e.status not in (404, 409):
                    raise
            return
        if status.get("phase") in FINISHED_PHASES or uid in self._finished:
            self._teardown(uid)
            return
        if spec.get("nodeName") not in (None, "", self.node_name):
            return  # someone else's pod
        with self._lock:
            if uid in self._sandboxes:
                return
        self._start(pod)

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        name, uid = meta["name"], meta["uid"]
        if not spec.get("nodeName"):
            self.core.create_namespaced_pod_binding(
                name, self.namespace, body={
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "uid": uid},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}},
                _preload_content=False)
        ip = self._allocate(name)
        resolv = resolv_conf_for_pod(pod, self.cluster_dns_ip, cluster_domain=self.cluster_domain)
        hostname = spec.get("hostname") or name
        with self._lock:
            self._sandboxes[uid] = StartedPod(name, uid, ip, "Pending")
        try:
            self.plane.add_pod(name, ip, resolv, hostname=hostname,
                               hosts_text=render_hosts_file(ip, hostname))
        except BaseException:
            with self._lock:
                self._sandboxes.pop(uid, None)
                self._release(ip)
            raise
        now = _now()
        base = {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": self.plane.gateway,
                "hostIPs": [{"ip": self.plane.gateway}], "startTime": now, "qosClass": "BestEffort"}
        init = spec.get("initContainers") or []
        if init:
            # as a kubelet: the sandbox has its IP while the init containers (kubedock's
            # "setup") run; the pod is an asker already, not yet an answer
            self._patch_status(name, dict(base, phase="Pending",
                                          conditions=self._conditions(ready=False, initialized=False),
                                          initContainerStatuses=[
                                              self._container_status(c, {"running": {"startedAt": now}},
                                                                     ready=False) for c in init],
                                          containerStatuses=[
                                              self._container_status(c, {"waiting": {"reason": "PodInitializing"}},
                                                                     ready=False)
                                              for c in spec.get("containers", [])]))
            with self._lock:
                if name in self._held_init:
                    self._init_waiting[name] = (pod, ip, base)
                    self._progress(f"{name} Pending with IP {ip}: its init containers wait")
                    return
        self._run_containers(pod, ip, base)

    def _run_containers(self, pod: dict[str, Any], ip: str, base: dict[str, Any]) -> None:
        """The init containers done, the containers running: phase Running."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        name, uid = meta["name"], meta["uid"]
        init = spec.get("initContainers") or []
        now = _now()
        done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
        # A readiness gate keeps the pod not Ready until its condition is True, as a kubelet
        # does; the stand-in does not watch for it: the bed sets Ready with the gate's condition.
        gated = bool(spec.get("readinessGates"))
        self._patch_status(name, dict(base, phase="Running",
                                      conditions=self._conditions(ready=not gated, initialized=True,
                                                                  containers_ready=True),
                                      initContainerStatuses=[self._container_status(c, done, ready=True)
                                                             for c in init],
                                      containerStatuses=[
                                          self._container_status(c, {"running": {"startedAt": now}}, ready=True)
                                          for c in spec.get("containers", [])]))
        with self._lock:
            self._sandboxes[uid] = StartedPod(name, uid, ip, "Running")
            self._phases[name] = (uid, "Running")
            self._lock.notify_all()
        self._progress(f"{name} Running with IP {ip}")

    def _teardown(self, uid: str) -> None:
        with self._lock:
            started = self._sandboxes.pop(uid, None)
            self._lock.notify_all()
        if started is not None:
            self.plane.remove_pod(started.name)
            with self._lock:
                if uid not in self._finished:
                    self._release(started.ip)

    # -- IPAM

    def _allocate(self, name: str) -> str:
        with self._lock:
            ip = self._pinned.pop(name, None)
            if ip is None and self.reuse_ips and self._released:
                ip = self._released.pop()
            if ip is not None:
                if ip in self._released:
                    self._released.remove(ip)
                in_use = [p.name for p in self._sandboxes.values() if p.ip == ip]
                if in_use:
                    raise KubeletError(f"IP {ip} for {name} is still used by {in_use[0]}")
                return ip
        return self.plane.allocate_ip()

    def _release(self, ip: str) -> None:
        # caller holds self._lock
        if ip not in self._released:
            self._released.append(ip)

    # -- status writing

    @staticmethod
    def _conditions(*, ready: bool, initialized: bool, containers_ready: bool | None = None) -> list[dict[str, Any]]:
        now = _now()
        flag = {True: "True", False: "False"}
        return [{"type": t, "status": s, "lastTransitionTime": now} for t, s in (
            ("PodReadyToStartContainers", "True"),
            ("Initialized", flag[initialized]),
            ("Ready", flag[ready]),
            ("ContainersReady", flag[ready if containers_ready is None else containers_ready]),
            ("PodScheduled", "True"),
        )]

    @staticmethod
    def _container_status(container: Mapping[str, Any], state: dict[str, Any],
                          ready: bool) -> dict[str, Any]:
        return {"name": container["name"], "image": container.get("image") or "unknown",
                "imageID": "", "ready": ready, "restartCount": 0,
                "started": "running" in state, "state": state,
                **({"containerID": f"testbed://{container['name']}"} if "waiting" not in state else {})}

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": status},
            _content_type="application/merge-patch+json", _preload_content=False)

    def _get(self, name: str) -> dict[str, Any]:
        return json.loads(self.core.read_namespaced_pod(name, self.namespace,
                                                        _preload_content=False).data)

    def _record_error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
            self._lock.notify_all()
        self._progress(f"error: {message}")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a streamed watch body into its JSON lines."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer
