"""The end-to-end bed: every real part of kubedock-dns's world, composed, and torn down again.

Contract
--------
``with EndToEndBed() as bed:`` brings up, printing progress to stderr:

1. the control plane (:class:`testbed.controlplane.ControlPlane`: etcd + kube-apiserver; a
   running one may be passed in) and a fresh namespace in it;
2. the data plane: a :class:`testbed.netns.PodNetwork` (root: each pod a network namespace on a
   bridge) or, without root or with ``dataplane="loopback"``, a
   :class:`testbed.kubelet.LoopbackPlane` (each pod a source address in 127.0.0.0/8);
3. dnsmasq as the cluster DNS (:class:`testbed.upstream.Dnsmasq`): it holds
   ``kubernetes.default.svc.cluster.local`` and a decoy Service ``db.<namespace>.svc.cluster.local``
   with an IP no pod has (``DECOY_DB_IP``), so a lookup of ``db`` that fell through to the cluster
   DNS shows; reachable from pods at ``cluster_dns_ip`` (DNAT, the kube-proxy stand-in);
4. kubedock-dns itself, ``twistd -n kubedock-dns`` as a subprocess watching the namespace, its
   webhook serving TLS with a certificate from :func:`testbed.tls.generate_ca_and_cert`;
   reachable from pods at ``service_ip`` port 53 UDP+TCP (DNAT to the bridge gateway, no SNAT:
   it sees each pod's own address); the bed waits for its ``/readyz``;
5. a ``MutatingWebhookConfiguration`` pointing the API server at it (``url``
   ``https://127.0.0.1:<port>/mutate``, ``caBundle``, ``objectSelector`` ``kubedock=true``,
   ``namespaceSelector`` for the namespace, ``failurePolicy: Fail``, ``sideEffects: None``), and
   proof that it is in force (a dry-run pod comes back mutated);
6. the kubelet stand-in (:class:`testbed.kubelet.KubeletStandIn`).

:meth:`EndToEndBed.create_kubedock_pod` creates a pod through the API exactly as kubedock's
``internal/backend/deploy.go`` does (DESIGN section 2) and waits until the stand-in runs it;
:meth:`EndToEndBed.exec` runs a command inside it. Leaving the ``with`` block, also on an
exception or Ctrl-C, undoes everything in reverse order; :meth:`EndToEndBed.leftovers` lists
whatever survived (empty after a clean exit).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import secrets
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from testbed import netns
from testbed.controlplane import ManagedProcess
from testbed.kubelet import KubeletStandIn, LoopbackPlane
from testbed.netns import ExecResult, PodNetwork
from testbed.ports import wait_for_ports
from testbed.upstream import Dnsmasq

__all__ = ["BedError", "BedPod", "EndToEndBed", "DECOY_DB_IP", "READINESS_GATE", "network_id", "new_network_id",
           "kubedock_pod_manifest", "mutating_webhook_configuration", "wait_kubedock_dns_ready",
           "wait_webhook_in_force", "wait_pod_gone"]

DECOY_DB_IP = "10.96.7.7"
KUBERNETES_IP = "10.96.0.1"
SERVICE_IP = "10.96.0.53"
CLUSTER_DNS_IP = "10.96.0.10"
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")


class BedError(RuntimeError):
    """The bed could not be brought up or a pod could not be created; the message says why."""


def _stderr(message: str) -> None:
    sys.stderr.write(f"bed: {message}\n")  # one write: several threads report
    sys.stderr.flush()


def network_id(name: str) -> str:
    """A Docker-style 64-hex network ID derived from a readable name (same name, same ID)."""
    return hashlib.sha256(name.encode()).hexdigest()


def new_network_id() -> str:
    """A fresh random 64-hex Docker network ID."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class BedPod:
    """A pod created through the bed: its API name and the Docker identity kubedock gave it."""

    name: str                 # the pod's name in the API (kubedock's GetPodName)
    hostname: str             # kubedock.hostalias/0 and spec.hostname
    container_name: str       # kubedock.containername
    container_id: str         # 64 hex; the label kubedock.containerid holds the first 12
    networks: tuple[str, ...]  # kubedock.network/N, Docker network IDs
    aliases: tuple[str, ...]   # kubedock.hostalias/1..N
    opted_in: bool = True
    ip: str | None = None
    uid: str = ""
    warnings: tuple[str, ...] = ()  # the admission warnings the API server returned on create

    @property
    def short_id(self) -> str:
        return self.container_id[:12]

    @classmethod
    def new(cls, name: str, network_ids: Iterable[str], aliases: Iterable[str], container_name: str | None,
            container_id: str | None, hostname: str | None, opt_in: bool) -> "BedPod":
        """A pod as kubedock would make it for ``docker run --name <container_name>`` (default
        ``<name>_<4 hex>``) with container ID ``container_id`` (default random, 64 hex)."""
        container_id = container_id or secrets.token_hex(32)
        container_name = container_name or f"{name}_{secrets.token_hex(2)}"
        return cls(name=kubedock_pod_name(container_name, container_id[:12]), hostname=hostname or name,
                   container_name=container_name, container_id=container_id, networks=tuple(network_ids),
                   aliases=tuple(aliases), opted_in=opt_in)


def kubedock_pod_name(container_name: str, short_id: str) -> str:
    """kubedock's ``Container.GetPodName``: ``kubedock-<name, cleaned, 32 chars>-<short id>``."""
    name = "kubedock-" + container_name
    name = re.sub(r"[^A-Za-z0-9-]", "", name.replace("_", "-"))[:32]
    name = (name + "-" + short_id).replace("--", "-")
    return name.lower().strip("-")


def _no_proxy_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


# The condition a test pod's readiness gate waits for (``readiness_gate=True``): the pod runs but
# stays not Ready until the test opens the gate (``open_readiness_gate``).
READINESS_GATE = "kubedock-dns.test/ready"


def kubedock_pod_manifest(pod: BedPod, namespace: str, instance_id: str, *, init_container: bool = True,
                          image: str = "busybox:1.36", command: Sequence[str] | None = None,
                          init_image: str = "alpine:3", readiness_gate: bool = False) -> dict[str, Any]:
    """The pod as kubedock's ``internal/backend/deploy.go`` writes it (DESIGN section 2): the
    annotations ``kubedock.containername``, ``kubedock.hostalias/N``, ``kubedock.network/N``, the
    labels ``kubedock.id``, ``kubedock.containerid`` and (opted in) ``kubedock=true``, and, with
    ``init_container``, kubedock's ``setup`` init container that waits for ``/tmp/done``.  The
    container's Docker labels (Testcontainers' and an arbitrary one) are copied into annotations,
    and into labels where they are valid label values; annotations come in random order, as Go's
    map iteration writes them.  ``readiness_gate``: the pod stays not Ready, although Running,
    until the condition :data:`READINESS_GATE` is True (kubedock never sets one; a test uses it
    for a container that runs but is not ready yet)."""
    docker_labels = {"org.testcontainers": "true", "org.testcontainers.lang": "python",
                     "org.testcontainers.version": "4.8.2",
                     "org.testcontainers.sessionId": secrets.token_hex(16),
                     "com.example.description": "the db: for tests, not a valid label value"}
    annotations = dict(docker_labels)
    annotations.update({"kubedock.containername": pod.container_name,
                        "kubedock.hostalias/0": pod.hostname})
    for i, alias in enumerate(pod.aliases, start=1):
        annotations[f"kubedock.hostalias/{i}"] = alias
    for i, network in enumerate(pod.networks):
        annotations[f"kubedock.network/{i}"] = network
    shuffled = list(annotations.items())
    random.shuffle(shuffled)  # Go's map iteration order: random from pod to pod
    annotations = dict(shuffled)
    labels = {k: v for k, v in docker_labels.items() if re.fullmatch(r"[A-Za-z0-9._-]{0,63}", v)}
    labels.update({"kubedock.id": instance_id, "kubedock.containerid": pod.short_id})
    if pod.opted_in:
        labels["kubedock"] = "true"
    main: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                            "resources": {}}
    if command:
        main["command"] = list(command)
    spec: dict[str, Any] = {"containers": [main], "restartPolicy": "Never",
                            "serviceAccountName": "default"}
    if re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", pod.hostname):
        spec["hostname"] = pod.hostname
    if readiness_gate:
        spec["readinessGates"] = [{"conditionType": READINESS_GATE}]
    if init_container:
        spec["initContainers"] = [{
            "name": "setup", "image": init_image, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", "while [ ! -f /tmp/done ]; do sleep 0.1 ; done"],
            "resources": {}}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": namespace, "labels": labels,
                         "annotations": annotations},
            "spec": spec}


def mutating_webhook_configuration(name: str, namespace: str, url: str, ca_pem: bytes) -> dict[str, Any]:
    """The registration the chart makes, pointed at ``url``: opted-in pods of ``namespace`` only,
    ``failurePolicy: Fail``, ``sideEffects: None``."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": f"pods.kubedock-dns.{namespace}.testbed",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "objectSelector": {"matchLabels": {"kubedock": "true"}},
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""],
                       "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_pem).decode()},
        }],
    }


def metric_values(exposition: str) -> dict[str, float]:
    """Prometheus text exposition as sample (name with its labels) -> value; comments skipped."""
    values = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return values


def wait_pod_gone(core: Any, namespace: str, name: str, timeout: float, poll: float) -> None:
    """Until the API server no longer has the pod (the kubelet confirmed its deletion)."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        if time.monotonic() > deadline:
            raise BedError(f"pod {name} still exists {timeout:.0f}s after its deletion")
        time.sleep(poll)


def wait_kubedock_dns_ready(server: ManagedProcess, ops_port: int, progress: Callable[[str], None],
                            timeout: float = 60.0) -> None:
    """Until kubedock-dns's ``/readyz`` (on 127.0.0.1) says 200; its log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    opener = _no_proxy_opener()
    last = "no answer yet"
    next_note = time.monotonic() + 5
    while True:
        if not server.alive():
            raise BedError(f"kubedock-dns exited during start-up; its log:\n{server.tail()}")
        try:
            with opener.open(f"http://127.0.0.1:{ops_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise BedError(f"kubedock-dns not ready after {timeout:.0f} s (last /readyz: {last}); its "
                           f"log:\n{server.tail()}")
        if time.monotonic() > next_note:
            progress(f"waiting for kubedock-dns /readyz ({last})")
            next_note = time.monotonic() + 5
        time.sleep(0.1)


def wait_webhook_in_force(core: Any, namespace: str, probe: dict[str, Any], server: ManagedProcess | None,
                          progress: Callable[[str], None], timeout: float = 30.0) -> None:
    """The API server loads webhook configurations through an informer: prove the webhook is in
    force with a dry-run pod (not stored, so nothing else sees it)."""
    from kubernetes import client

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            response = core.create_namespaced_pod(namespace, body=probe, dry_run="All",
                                                  _preload_content=False)
            spec = json.loads(response.data)["spec"]
            if spec.get("dnsPolicy") == "None":
                ns = (spec.get("dnsConfig") or {}).get("nameservers")
                progress(f"webhook in force: opted-in pods get dnsPolicy None, nameservers {ns}")
                return
            last = f"dnsPolicy {spec.get('dnsPolicy')}"
        except client.ApiException as e:
            last = f"HTTP {e.status}: {str(e.body)[:300]}"
        if time.monotonic() > deadline:
            raise BedError(f"the webhook is not in force after {timeout:.0f} s (last dry-run: {last}); "
                           f"kubedock-dns log:\n{server.tail() if server else ''}")
        time.sleep(0.2)


class EndToEndBed:
    """See the module docstring.

    ``control_plane``: a started ControlPlane to use (not stopped on exit); default: a new one.
    ``dataplane``: ``"auto"`` (namespaces when possible, else loopback), ``"netns"``, or
    ``"loopback"``. ``server_args``: extra ``twistd kubedock-dns`` options (e.g.
    ``["--hold-timeout", "1.0"]``). ``reuse_ips``: the kubelet stand-in hands the most recently
    released IP to the next pod. ``server_command``: what runs twistd (default ``TWISTD``, this
    interpreter); the bed appends ``-n --pidfile= kubedock-dns`` and the options.
    """

    def __init__(self, *, control_plane: Any = None, dataplane: str = "auto",
                 namespace_prefix: str = "e2e", service_ip: str = SERVICE_IP,
                 cluster_dns_ip: str = CLUSTER_DNS_IP, server_args: Sequence[str] = (),
                 reuse_ips: bool = False, server_command: Sequence[str] | None = None,
                 progress: Callable[[str], None] | None = _stderr) -> None:
        if dataplane not in ("auto", "netns", "loopback"):
            raise ValueError(f"dataplane must be auto, netns or loopback (got {dataplane!r})")
        self._given_plane = control_plane
        self._dataplane = dataplane
        self._prefix = namespace_prefix
        self.service_ip = service_ip
        self.cluster_dns_ip = cluster_dns_ip
        self.kubernetes_ip = KUBERNETES_IP  # the kubernetes Service, as the cluster DNS answers it
        self.decoy_db_ip = DECOY_DB_IP      # the cluster's Service db.<namespace>
        self._server_args = list(server_args)
        self._reuse_ips = reuse_ips
        self._server_command = list(server_command or TWISTD)
        self._progress = progress or (lambda message: None)
        self._stack = contextlib.ExitStack()
        self.instance_id = secrets.token_hex(6)  # kubedock's label kubedock.id
        self.control_plane: Any = None
        self.namespace = ""
        self.plane: PodNetwork | LoopbackPlane | None = None
        self.loopback = False
        self.loopback_reason = ""
        self.upstream: Dnsmasq | None = None
        self.kubelet: KubeletStandIn | None = None
        self.server: ManagedProcess | None = None
        self.dns_port = 0
        self.ops_port = 0
        self.webhook_port = 0
        self.webhook_name = ""
        self.workdir: Path | None = None
        self._api_client: Any = None
        self.core: Any = None
        self._started = False

    # -- bring up / tear down

    def __enter__(self) -> "EndToEndBed":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "EndToEndBed":
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self._started = True
        self._progress(f"up in {time.monotonic() - began:.1f}s: namespace {self.namespace}, "
                       f"kubedock-dns at {self.service_ip}:53 "
                       f"({'loopback fallback' if self.loopback else 'pod network namespaces'})")
        return self

    def _start(self) -> None:
        from kubernetes import client

        from testbed.controlplane import ControlPlane

        self.workdir = Path(tempfile.mkdtemp(prefix="kubedock-dns-bed-"))
        self._stack.callback(shutil.rmtree, self.workdir, True)

        # 1. control plane and namespace
        if self._given_plane is not None:
            self.control_plane = self._given_plane
        else:
            self._progress("starting the control plane (etcd + kube-apiserver)")
            self.control_plane = ControlPlane(progress=self._progress_prefix("controlplane"))
            self._stack.callback(self.control_plane.stop)
            self.control_plane.start()
        self._api_client = self.control_plane.api_client()
        self._stack.callback(self._api_client.close)
        self.core = client.CoreV1Api(self._api_client)
        created = self.core.create_namespace(body={"metadata": {
            "generateName": f"{self._prefix}-", "labels": {"kubedock-dns.test/scratch": "true"}}})
        self.namespace = created.metadata.name
        self._stack.callback(self._delete_namespace)
        self._progress(f"namespace {self.namespace} created")

        # 2. data plane
        if self._dataplane == "loopback":
            use_netns, reason = False, "loopback data plane requested"
        else:
            use_netns, reason = netns.is_available()
            if self._dataplane == "netns" and not use_netns:
                raise BedError(f"network namespaces are not available: {reason}")
        if use_netns:
            self.plane = PodNetwork()
            self._stack.callback(self.plane.close)
            self._progress(f"pod network {self.plane.bridge} on {self.plane.subnet} "
                           f"(NAT: {self.plane.nat_backend})")
        else:
            self.loopback = True
            self.loopback_reason = reason
            self.plane = LoopbackPlane()
            self._progress(f"no network namespaces ({reason}); {netns.LOOPBACK_FALLBACK}")

        # 3. the cluster DNS
        self.upstream = Dnsmasq(namespace=self.namespace, service_ip=DECOY_DB_IP,
                                kubernetes_ip=KUBERNETES_IP)
        self._stack.callback(self.upstream.close)
        self.upstream.start()
        self._progress(f"dnsmasq (cluster DNS) at {self.upstream.upstream_arg}; decoy Service "
                       f"{self.upstream.service_name} -> {DECOY_DB_IP}")
        if isinstance(self.plane, PodNetwork):
            self.plane.expose_service(self.cluster_dns_ip, 53, self.upstream.listen_ip,
                                      self.upstream.port)

        # 4. kubedock-dns
        self._start_server()
        if isinstance(self.plane, PodNetwork):
            self.plane.expose_service(self.service_ip, 53, self.plane.gateway, self.dns_port)

        # 5. webhook registration
        self._register_webhook()

        # 6. kubelet stand-in
        self.kubelet = KubeletStandIn(
            self._api_client, self.namespace, self.plane,
            self.cluster_dns_ip if isinstance(self.plane, PodNetwork) else self.upstream.listen_ip,
            reuse_ips=self._reuse_ips, progress=self._progress_prefix("kubelet"))
        self._stack.callback(self.kubelet.stop)
        self.kubelet.start()

    def _progress_prefix(self, who: str) -> Callable[[str], None]:
        return lambda message: self._progress(f"{who}: {message}")

    def _start_server(self) -> None:
        from testbed.tls import generate_ca_and_cert

        assert self.workdir is not None and self.upstream is not None
        self.tls = generate_ca_and_cert(["127.0.0.1", "localhost"], self.workdir / "tls")
        # Port 0 everywhere: the server binds what the kernel gives and logs it (testbed.ports).
        argv = [
            *self._server_command, "-n", "--pidfile=", "kubedock-dns",
            "--kubeconfig", str(self.control_plane.kubeconfig_path),
            "--namespace", self.namespace,
            "--dns-port", "0", "--dns-interface", "0.0.0.0",
            "--upstream", self.upstream.upstream_arg,
            "--ops-port", "0", "--ops-interface", "127.0.0.1",
            "--webhook-port", "0", "--webhook-interface", "127.0.0.1",
            "--tls-cert", str(self.tls.cert_path), "--tls-key", str(self.tls.key_path),
            "--dns-service-ip", self.service_ip,
            # Nothing routes here once the bed stops: no drain, teardown stays fast.
            "--drain-seconds", "0",
            *self._server_args,
        ]
        self.server = ManagedProcess("kubedock-dns", argv, self.workdir / "kubedock-dns.log", cwd=self.workdir)
        self._stack.callback(self.server.stop)
        self._progress(f"starting kubedock-dns; log {self.server.log_path}")
        self.server.start()
        try:
            ports = wait_for_ports(self.server.log_path, ("dns", "webhook", "ops"), self.server.alive)
        except RuntimeError as e:
            raise BedError(f"kubedock-dns: {e}; its log:\n{self.server.tail()}") from None
        self.dns_port, self.webhook_port, self.ops_port = ports["dns"], ports["webhook"], ports["ops"]
        self._progress(f"kubedock-dns listening (DNS :{self.dns_port}, webhook :{self.webhook_port}, "
                       f"ops :{self.ops_port})")
        wait_kubedock_dns_ready(self.server, self.ops_port, self._progress)
        self._progress("kubedock-dns ready (pod index synced)")

    def _register_webhook(self) -> None:
        from kubernetes import client

        admission: Any = client.AdmissionregistrationV1Api(self._api_client)
        self.webhook_name = f"kubedock-dns-{self.namespace}"
        body = mutating_webhook_configuration(self.webhook_name, self.namespace,
                                              f"https://127.0.0.1:{self.webhook_port}/mutate",
                                              self.tls.ca_pem)
        admission.create_mutating_webhook_configuration(body=body, _preload_content=False)
        self._stack.callback(self._delete_webhook, admission)
        probe = kubedock_pod_manifest(
            BedPod(name="webhook-probe", hostname="webhook-probe", container_name="webhook-probe",
                   container_id=secrets.token_hex(32), networks=(new_network_id(),), aliases=()),
            self.namespace, self.instance_id, init_container=False)
        wait_webhook_in_force(self.core, self.namespace, probe, self.server, self._progress)

    def _delete_webhook(self, admission: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            admission.delete_mutating_webhook_configuration(self.webhook_name,
                                                            _preload_content=False)

    def _delete_namespace(self) -> None:
        from kubernetes.client.exceptions import ApiException

        if not self.namespace or not self.control_plane.apiserver_running:
            return
        try:
            self.core.delete_collection_namespaced_pod(self.namespace, grace_period_seconds=0,
                                                       _request_timeout=30)
            self.core.delete_namespace(self.namespace, _request_timeout=30)
            self.core.replace_namespace_finalize(
                self.namespace, body={"metadata": {"name": self.namespace},
                                      "spec": {"finalizers": []}}, _request_timeout=30)
        except ApiException as e:
            if e.status != 404:
                raise

    def close(self) -> None:
        """Tear everything down in reverse order (idempotent)."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None  # type: ignore[assignment]
        self._progress("tearing down")
        stack.close()
        self._progress("torn down")

    def leftovers(self) -> list[str]:
        """Network namespaces, links, NAT tables of this bed that still exist (empty after close)."""
        if isinstance(self.plane, PodNetwork):
            return self.plane.leftovers()
        return []

    # -- pods

    def _pod_body(self, pod: BedPod, *, init_container: bool = True, readiness_gate: bool = False) -> dict[str, Any]:
        return kubedock_pod_manifest(pod, self.namespace, self.instance_id, init_container=init_container,
                                     readiness_gate=readiness_gate)

    def create_kubedock_pod(self, name: str, network_ids: Iterable[str] = (),
                            aliases: Iterable[str] = (), container_name: str | None = None,
                            container_id: str | None = None, *, hostname: str | None = None,
                            opt_in: bool = True, init_container: bool = True,
                            ip: str | None = None, wait: bool = True, readiness_gate: bool = False,
                            timeout: float = 30.0) -> BedPod:
        """Create a pod through the API as kubedock does for a Docker container.

        ``name`` is the Docker hostname (``kubedock.hostalias/0``, ``spec.hostname``);
        ``network_ids`` the Docker network IDs (64 hex); ``aliases`` the network aliases;
        ``container_name`` (default ``<name>_<4 hex>``) and ``container_id`` (default random,
        64 hex) the Docker container's. ``opt_in=False`` leaves out the label ``kubedock=true``
        (an ordinary workload). ``ip`` pins the pod IP (e.g. one just released). With ``wait``,
        returns once the kubelet stand-in reports it Running, with ``ip`` filled in.  With
        ``readiness_gate`` it runs but is not Ready until :meth:`open_readiness_gate`.  Without
        ``wait``, a pod with its init container stays Pending (init container running, with its
        IP) until :meth:`wait_running`, as kubedock's pods do until their files are copied in.
        """
        assert self.kubelet is not None
        pod = BedPod.new(name, network_ids, aliases, container_name, container_id, hostname, opt_in)
        if ip is not None:
            self.kubelet.pin_ip(pod.name, ip)
        if not wait and init_container:
            # As kubedock's pods and the real node's: Pending, its ``setup`` init container
            # waiting, until wait_running lets it finish (kubedock: once files are copied in).
            self.kubelet.hold_init(pod.name)
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.core.create_namespaced_pod(
                self.namespace, body=self._pod_body(pod, init_container=init_container,
                                                    readiness_gate=readiness_gate),
                _preload_content=False)
        except ApiException as e:
            raise BedError(f"creating pod {pod.name} failed: HTTP {e.status}: {e.body}") from None
        stored = json.loads(response.data)
        pod = replace(pod, uid=stored["metadata"]["uid"],
                      warnings=tuple(response.headers.getlist("Warning")))
        if opt_in and stored["spec"].get("dnsPolicy") != "None":
            raise BedError(f"pod {pod.name} was not mutated by the webhook: {stored['spec']}")
        if wait:
            return self.wait_running(pod, timeout)
        return pod

    def wait_running(self, pod: BedPod, timeout: float = 30.0) -> BedPod:
        """Start a pod created with ``wait=False`` as kubedock would (its ``setup`` init
        container released) and wait until the kubelet stand-in runs it; returns it with its IP."""
        assert self.kubelet is not None
        self.kubelet.release_init(pod.name)
        started = self.kubelet.wait_running(pod.name, timeout)
        return replace(pod, ip=started.ip)

    def open_readiness_gate(self, pod: BedPod | str) -> None:
        """Set the pod's readiness gate condition True; the stand-in's part of a kubelet, Ready
        following the gates, is set with it."""
        name = pod if isinstance(pod, str) else pod.name
        self.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": {"conditions": [{"type": READINESS_GATE, "status": "True"},
                                                             {"type": "Ready", "status": "True"}]}},
            _content_type="application/strategic-merge-patch+json", _preload_content=False)

    def stored_pod(self, pod: BedPod | str) -> dict[str, Any]:
        """The pod's JSON as the API server stores it (after the webhook's mutation)."""
        name = pod if isinstance(pod, str) else pod.name
        return json.loads(self.core.read_namespaced_pod(name, self.namespace,
                                                        _preload_content=False).data)

    def delete_pod(self, pod: BedPod | str, *, wait: bool = True, timeout: float = 30.0,
                   linger: float = 0.0) -> None:
        """Delete the pod as kubedock does (default grace period: the stand-in removes its
        sandbox, then deletes it for good, as a kubelet would); with ``linger`` its container
        keeps running that many seconds first (it ignores SIGTERM), so the pod stays Terminating
        with its IP; with ``wait``, until it is gone from the API."""
        name = pod if isinstance(pod, str) else pod.name
        if linger:
            assert self.kubelet is not None
            self.kubelet.linger(name, linger)
        self.core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
        if wait:
            wait_pod_gone(self.core, self.namespace, name, timeout, poll=0.05)

    def finish(self, pod: BedPod | str) -> str:
        """The pod's container exits 0: phase Succeeded, sandbox gone, IP released; returns it."""
        assert self.kubelet is not None
        return self.kubelet.finish(pod if isinstance(pod, str) else pod.name)

    def exec(self, pod: BedPod | str, argv: Sequence[str], timeout: float = 30) -> ExecResult:
        """Run ``argv`` inside the pod (its network namespace, resolv.conf and hosts)."""
        assert self.plane is not None
        return self.plane.exec(pod if isinstance(pod, str) else pod.name, argv, timeout=timeout)

    # -- observations

    def debug_networks(self) -> dict[str, Any]:
        """What kubedock-dns believes (its ``/debug/networks``)."""
        with _no_proxy_opener().open(f"http://127.0.0.1:{self.ops_port}/debug/networks",
                                     timeout=5) as r:
            return json.loads(r.read())

    def ready(self) -> bool:
        """Whether kubedock-dns's ``/readyz`` says ready."""
        try:
            with _no_proxy_opener().open(f"http://127.0.0.1:{self.ops_port}/readyz", timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """kubedock-dns's ``/metrics`` as name -> value."""
        with _no_proxy_opener().open(f"http://127.0.0.1:{self.ops_port}/metrics", timeout=5) as r:
            return metric_values(r.read().decode())

    def server_log(self, lines: int = 80) -> str:
        """The last lines kubedock-dns logged."""
        return self.server.tail(lines) if self.server else ""

    def cluster_dns_askers(self) -> set[str]:
        """The client addresses the cluster DNS (dnsmasq) has had queries from, by its query log."""
        assert self.upstream is not None
        return {q.client for q in self.upstream.queries()}
