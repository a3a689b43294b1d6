"""A real single-node Kubernetes cluster on this machine, for tests and the demo.

Contract
--------
``with Node() as node:`` (root only) brings up, printing progress to stderr, in this order:

1. etcd + kube-apiserver (:class:`testbed.controlplane.ControlPlane`), listening on all addresses
   and advertising this machine's address (:func:`testbed.node.host.node_ip`) as the endpoint of
   the ``kubernetes`` Service, with service accounts on, reaching the kubelet at the node's
   InternalIP (its name resolves nowhere): ``pods/exec``, ``pods/portforward`` and ``pods/log``
   work, so ``kubectl exec``/``port-forward``/``logs`` and kubedock's exec and port-forwards do;
2. the images no node here can pull (a pause image compiled here, CoreDNS, a toolbox with glibc's
   ``getent``; :mod:`testbed.node.images`), imported into
3. containerd (:mod:`testbed.node.containerd`) with runc and the bridge CNI: a bridge ``kdn<id>``,
   a pod subnet ``10.200.<n>.0/24`` that overlaps no route here, host-local IPAM state under the
   run directory, no masquerading (pods talk to this machine and to each other only);
4. kube-controller-manager and kube-scheduler, then the kubelet (cgroups v1 settings), then
   kube-proxy (``iptables`` mode by default, ``KUBEDOCK_DNS_PROXY_MODE=nftables`` for the other);
5. CoreDNS as a pod behind ``kube-system/kube-dns`` at ``cluster_dns_ip``
   (:mod:`testbed.node.clusterdns`), proven by resolving ``kubernetes.default.svc.cluster.local``
   through that Service IP from this machine.

``registry_hosts`` (``host:port``) are registries containerd pulls from over plain HTTP.
:meth:`Node.kubectl` runs the real ``kubectl`` (``build-tools.sh kubectl``) against the node.
Every file lives under one run directory ``/var/lib/kubedock-dns-testbed/node-<id>``; leaving the
``with`` block, also on an exception, deletes the pods (the kubelet stops them and tears down their
networks), stops every process, removes what containerd and the kubelet left (tasks, sandboxes'
network namespaces, mounts, ``/var/log/containers`` links), kube-proxy's rules (``kube-proxy
--cleanup``), the bridge and the run directory.  :meth:`Node.leftovers` lists whatever survived
(empty after a clean teardown); a run killed outright is swept by the next one
(:func:`testbed.node.host.stale_runs`).  One node runs per machine at a time
(:class:`testbed.node.host.MachineLock`).

A component that cannot start raises :class:`NodeComponentError` naming it, with its log tail;
:class:`NodeUnavailable` means this machine cannot run a node at all (tests skip on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from testbed.controlplane import BUILD_TOOLS, BinariesUnavailable, ControlPlane, ManagedProcess, find_binaries
from testbed.node import components, host, images
from testbed.node.clusterdns import cluster_dns_objects
from testbed.node.containerd import Containerd
from testbed.node.errors import NodeComponentError, NodeError, NodeUnavailable

__all__ = ["Node", "NodeBinaries", "find_kubectl", "find_node_binaries", "SERVICE_CIDR", "CLUSTER_DNS_IP"]

# Apart from the stand-in beds' 10.96.0.0/16, whose DNAT rules live on their own bridges: kube-proxy's
# rules are global, and must not capture those beds' Service IPs.
SERVICE_CIDR = "10.100.0.0/16"
CLUSTER_DNS_IP = "10.100.0.10"
NODE_COMPONENTS = ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler")


def _stderr(message: str) -> None:
    sys.stderr.write(f"node: {message}\n")
    sys.stderr.flush()


class NodeBinaries:
    """Paths of the node's Go-built executables (all from the cache of ``build-tools.sh``)."""

    def __init__(self, paths: dict[str, str]) -> None:
        for name, path in paths.items():
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise NodeUnavailable(f"{name} binary {path!r} does not exist or is not executable")
        self.paths = paths

    def __getitem__(self, name: str) -> str:
        return self.paths[name]


def _build(tool: str, progress: Callable[[str], None], timeout: float) -> list[str]:
    progress(f"locating {tool} with {BUILD_TOOLS.name} (a cold build takes many minutes)")
    try:
        done = subprocess.run(["bash", str(BUILD_TOOLS), tool], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NodeError(f"building {tool} took longer than {timeout:.0f}s") from e
    if done.returncode != 0:
        if shutil.which("go") is None:
            raise NodeUnavailable(f"{tool} is not cached and Go is not installed to build it")
        raise NodeError(f"{BUILD_TOOLS} {tool} failed with exit status {done.returncode}")
    return done.stdout.split()


def find_node_binaries(progress: Callable[[str], None] = _stderr, timeout: float = 3600.0) -> NodeBinaries:
    """kubelet, kube-proxy, kube-controller-manager, kube-scheduler (``build-tools.sh kube-node``)
    and coredns (``build-tools.sh coredns``)."""
    paths = {Path(p).name: p for p in _build("kube-node", progress, timeout)}
    paths["coredns"] = _build("coredns", progress, timeout)[-1]
    missing = [c for c in NODE_COMPONENTS if c not in paths]
    if missing:
        raise NodeError(f"build-tools.sh kube-node did not print {', '.join(missing)}")
    return NodeBinaries(paths)


def find_kubectl(progress: Callable[[str], None] = _stderr, timeout: float = 3600.0) -> str:
    """kubectl of the node's Kubernetes version (``build-tools.sh kubectl``)."""
    return _build("kubectl", progress, timeout)[-1]


def sweep_stale_runs(self_binaries: NodeBinaries | None = None) -> list[str]:
    """Remove what node runs killed outright left behind (their owner process is gone): the
    containers' and daemons' processes, the pods' network namespaces, kube-proxy's rules, mounts,
    the bridge, the CRI's cgroups, the run directory.  The caller holds the machine lock (a run in
    progress is never touched: its owner is alive).  Returns the run directories swept."""
    swept = []
    for state in host.stale_runs():
        run = Path(state["run"])
        pids = {**host.processes_under(run), **host.cri_processes()}
        inodes = host.network_namespaces_of(pids) - host.network_namespaces_of([os.getpid()])
        host.kill_processes_under(run)
        host.remove_named_network_namespaces(inodes)
        # The path is in the state file; an older state file lacks it: use this run's binary.
        proxy = state.get("kube_proxy") or (self_binaries["kube-proxy"] if self_binaries else "")
        if proxy and os.access(proxy, os.X_OK):
            for mode in ("iptables", "nftables"):
                subprocess.run([proxy, "--cleanup", f"--proxy-mode={mode}"], capture_output=True,
                               timeout=60, check=False)
            _drop_kube_chains()
        host.unmount_all(run)
        subprocess.run(["ip", "link", "del", state.get("bridge", "")], capture_output=True, check=False)
        host.remove_log_links(run, bool(state.get("made_log_dir")))
        host.remove_cri_cgroups()
        for directory in host.control_plane_dirs(run):
            shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        Path(state["state_file"]).unlink(missing_ok=True)
        swept.append(str(run))
    return swept


def _drop_kube_chains() -> None:
    """Flush and delete the ``KUBE-*`` chains left after ``kube-proxy --cleanup`` (the kubelet's)."""
    for rule in host.kube_proxy_rules():
        parts = rule.split()
        if parts[0] in ("iptables", "ip6tables"):
            subprocess.run([parts[0], "-w", "5", "-t", parts[2], "-F", parts[4]], capture_output=True, check=False)
    for rule in host.kube_proxy_rules():
        parts = rule.split()
        if parts[0] in ("iptables", "ip6tables"):
            binary, table, chain = parts[0], parts[2], parts[4]
            out = subprocess.run([binary, "-w", "5", "-t", table, "-S"], capture_output=True, text=True,
                                 check=False).stdout
            for line in out.splitlines():
                tokens = shlex.split(line)
                if tokens[:1] == ["-A"] and "-j" in tokens and tokens[tokens.index("-j") + 1] == chain:
                    subprocess.run([binary, "-w", "5", "-t", table, "-D", *tokens[1:]],
                                   capture_output=True, check=False)
            subprocess.run([binary, "-w", "5", "-t", table, "-X", chain], capture_output=True, check=False)


def unavailable_reason() -> str | None:
    """Why this machine cannot run a node (None when it can)."""
    if os.geteuid() != 0:
        return "a node needs root (containerd, network namespaces, iptables)"
    lacking = Containerd.missing()
    if lacking:
        return f"missing {', '.join(lacking)} (Debian: apt-get install containerd runc containernetworking-plugins)"
    for tool in ("gcc", "busybox", "ip", "iptables", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs it)"
    return None


class Node:
    """See the module docstring.  After :meth:`start`: ``control_plane``, ``api_client``, ``core``
    (``CoreV1Api``), ``settings`` (:class:`testbed.node.components.NodeSettings`), ``containerd``,
    ``proxy_mode``, ``run``."""

    def __init__(self, *, registry_hosts: Sequence[str] = (), binaries: NodeBinaries | None = None,
                 proxy_mode: str | None = None,
                 progress: Callable[[str], None] | None = _stderr) -> None:
        self.registry_hosts = list(registry_hosts)
        self._binaries = binaries
        self.proxy_mode = proxy_mode or os.environ.get("KUBEDOCK_DNS_PROXY_MODE", "iptables")
        if self.proxy_mode not in ("iptables", "nftables"):
            raise ValueError(f"proxy_mode must be iptables or nftables (got {self.proxy_mode!r})")
        self._progress = progress or (lambda message: None)
        self.id = secrets.token_hex(4)
        self.bridge = f"kdn{self.id}"
        self.run = host.STATE_DIR / f"node-{self.id}"
        self.cluster_dns_ip = CLUSTER_DNS_IP
        self._stack = contextlib.ExitStack()
        self._lock = host.MachineLock(self._progress)
        self.control_plane: Any = None
        self.api_client: Any = None
        self.core: Any = None
        self.containerd: Containerd | None = None
        self.settings: components.NodeSettings | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self._netns_seen: set[str] = set()
        self._made_log_dir = False
        self._kubectl: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Node":
        reason = unavailable_reason()
        if reason:
            raise NodeUnavailable(reason)
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self._progress(f"node {self.settings.node_name if self.settings else ''} up in "
                       f"{time.monotonic() - began:.1f}s (run directory {self.run})")
        return self

    def _start(self) -> None:
        from kubernetes import client

        if self._binaries is None:
            try:
                self._binaries = find_node_binaries(self._progress)
            except BinariesUnavailable as e:
                raise NodeUnavailable(str(e)) from e
        plane_binaries = find_binaries(self._progress)
        self._lock.acquire()
        self._stack.callback(self._lock.release)
        self._sweep_stale()

        self.run.mkdir(parents=True)
        self._made_log_dir = not Path("/var/log/containers").exists()
        self._stack.callback(self._remove_run)
        state_file = host.write_state(self.run, self.bridge, self._binaries["kube-proxy"], self._made_log_dir)
        self._stack.callback(state_file.unlink, True)
        host.prepare_sysctls()
        subnet = host.choose_pod_subnet()
        self.settings = components.NodeSettings(
            run=self.run, node_name=f"kdn-{self.id}", node_ip=host.node_ip(),
            pod_subnet=str(subnet), cluster_dns_ip=self.cluster_dns_ip)
        s = self.settings
        self._progress(f"node {s.node_name}: address {s.node_ip}, pods {s.pod_subnet} on bridge "
                       f"{self.bridge}, Services {SERVICE_CIDR}")

        # 1. control plane
        self.control_plane = ControlPlane(plane_binaries, service_cidr=SERVICE_CIDR,
                                          advertise_address=s.node_ip, service_accounts=True,
                                          # The node's name resolves nowhere: reach the kubelet
                                          # (exec, port-forward, logs) at the address it reports.
                                          apiserver_args=["--kubelet-preferred-address-types=InternalIP,Hostname"],
                                          temp_tag=host.control_plane_tag(self.run),
                                          progress=lambda m: self._progress(f"controlplane: {m}"))
        self._stack.callback(self.control_plane.stop)
        self.control_plane.start()
        self.api_client = self.control_plane.api_client()
        self._stack.callback(self.api_client.close)
        self.core = client.CoreV1Api(self.api_client)

        # 2. images and 3. containerd with the CNI
        image_dir = self.run / "images"
        image_dir.mkdir()
        archives = [images.pause_image(image_dir),
                    images.coredns_image(Path(self._binaries["coredns"]), image_dir),
                    images.toolbox_image(image_dir)]
        self._write_cni_config(subnet)
        self.containerd = Containerd(self.run, images.PAUSE_IMAGE, registry_hosts=self.registry_hosts,
                                     progress=self._progress)
        self._stack.callback(self.containerd.stop)
        self.containerd.start()
        self.processes["containerd"] = self.containerd.process  # type: ignore[assignment]
        self._stack.callback(self._remove_containers)
        for archive in archives:
            self.containerd.import_image(archive.path)
        self._progress(f"images imported: {', '.join(a.name for a in archives)}")

        # 4. controllers, kubelet, kube-proxy
        plane = self.control_plane
        self._add("kube-controller-manager", components.start_controller_manager(
            self._binaries["kube-controller-manager"], plane, s))
        self._add("kube-scheduler", components.start_scheduler(self._binaries["kube-scheduler"], plane, s))
        self._add("kubelet", components.start_kubelet(self._binaries["kubelet"], plane, s,
                                                      self.containerd.socket))
        self._stack.callback(self._delete_all_pods)  # runs before the kubelet stops
        self._wait_node_ready()
        self._stack.callback(self._cleanup_kube_proxy)
        self._add("kube-proxy", components.start_kube_proxy(self._binaries["kube-proxy"], plane, s,
                                                            self.proxy_mode))
        self._progress(f"kube-proxy running ({self.proxy_mode} mode)")

        # 5. cluster DNS
        self.wait_service_account("kube-system")
        self.apply(cluster_dns_objects(images.COREDNS_IMAGE, self.cluster_dns_ip, s.cluster_domain))
        self.wait_deployment_ready("kube-system", "coredns", timeout=120)
        self._wait_cluster_dns()

    def _add(self, name: str, process: ManagedProcess) -> None:
        self.processes[name] = process
        self._stack.callback(process.stop, 10.0)
        self._progress(f"{name} healthy (log {process.log_path})")

    def close(self) -> None:
        """Tear everything down in reverse order (idempotent)."""
        stack, self._stack = self._stack, contextlib.ExitStack()
        self._progress("tearing down")
        stack.close()
        self._progress("torn down")

    def leftovers(self) -> list[str]:
        """Whatever of this node still exists on the machine (empty after :meth:`close`)."""
        found = host.leftovers(self.run, self.bridge)
        found += [f"network namespace {p}" for p in sorted(self._netns_seen) if os.path.exists(p)]
        if self._made_log_dir and Path("/var/log/containers").exists():
            found.append("directory /var/log/containers (made by the kubelet)")
        return found

    # -- teardown steps --------------------------------------------------------------------

    def _delete_all_pods(self) -> None:
        """Delete every pod and let the kubelet stop them (CNI DEL, sandbox netns removed)."""
        from kubernetes.client.exceptions import ApiException

        if self.core is None or not self.control_plane.apiserver_running:
            return
        self._remember_netns()
        try:
            for ns in self.core.list_namespace().items:
                with contextlib.suppress(ApiException):
                    self.core.delete_collection_namespaced_pod(ns.metadata.name, grace_period_seconds=1)
            deadline = time.monotonic() + 60
            while self.core.list_pod_for_all_namespaces().items and time.monotonic() < deadline:
                # Deployments' ReplicaSets would recreate them: stop those first.
                self._delete_controllers()
                time.sleep(0.5)
        except (ApiException, OSError) as e:
            self._progress(f"deleting pods: {e}")

    def _delete_controllers(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        apps = client.AppsV1Api(self.api_client)
        for ns in self.core.list_namespace().items:
            with contextlib.suppress(ApiException):
                apps.delete_collection_namespaced_deployment(ns.metadata.name)
                apps.delete_collection_namespaced_replica_set(ns.metadata.name)
                self.core.delete_collection_namespaced_pod(ns.metadata.name, grace_period_seconds=1)

    def _remember_netns(self) -> None:
        if self.containerd is not None:
            with contextlib.suppress(Exception):
                self._netns_seen.update(self.containerd._sandbox_netns_paths())

    def _remove_containers(self) -> None:
        if self.containerd is None:
            return
        self._remember_netns()
        left = self.containerd.remove_all()
        if left:
            self._progress(f"removed network namespaces the kubelet left: {', '.join(left)}")

    def _cleanup_kube_proxy(self) -> None:
        if self._binaries is None or self.settings is None:
            return
        proc = self.processes.pop("kube-proxy", None)
        if proc is not None:
            proc.stop(10.0)
        for mode in ("iptables", "nftables"):
            components.kube_proxy_cleanup(self._binaries["kube-proxy"], self.settings, mode)
        # The kubelet's canary chains (KUBE-KUBELET-CANARY, KUBE-FIREWALL...) remain: drop them.
        _drop_kube_chains()

    def _remove_run(self) -> None:
        for name in list(self.processes):
            with contextlib.suppress(Exception):
                self.processes.pop(name).stop(5.0)
        host.kill_processes_under(self.run)
        # Again, now that the kubelet is gone: it re-creates its canary chains (KUBE-KUBELET-CANARY,
        # KUBE-FIREWALL...) when it finds them missing, and it may have done so after kube-proxy's
        # cleanup dropped them.
        _drop_kube_chains()
        host.unmount_all(self.run)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        host.remove_log_links(self.run, self._made_log_dir)
        host.remove_cri_cgroups()
        shutil.rmtree(self.run, ignore_errors=True)

    def _sweep_stale(self) -> None:
        for run in sweep_stale_runs(self._binaries):
            self._progress(f"swept what a killed node run left: {run}")

    # -- set-up steps ----------------------------------------------------------------------

    def _write_cni_config(self, subnet: Any) -> None:
        gateway = str(next(subnet.hosts()))
        conflist = {
            "cniVersion": "1.0.0",
            "name": f"kdn-{self.id}",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 # A pod reaching itself through a Service IP comes back over its own port.
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": str(subnet), "gateway": gateway}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.run / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        conf_dir = self.run / "cni" / "net.d"
        conf_dir.mkdir(parents=True)
        (conf_dir / "10-kdn.conflist").write_text(json.dumps(conflist, indent=1))

    def _wait_node_ready(self, timeout: float = 120.0) -> None:
        assert self.settings is not None
        deadline = time.monotonic() + timeout
        last = "not registered yet"
        while time.monotonic() < deadline:
            kubelet = self.processes["kubelet"]
            if not kubelet.alive():
                raise NodeComponentError("kubelet", "exited while registering the node", kubelet)
            try:
                node = self.core.read_node(self.settings.node_name)
                for condition in node.status.conditions or []:
                    if condition.type == "Ready":
                        if condition.status == "True":
                            self._progress(f"node {self.settings.node_name} Ready")
                            return
                        last = f"Ready={condition.status}: {condition.reason}: {condition.message}"
            except Exception as e:  # noqa: BLE001 - 404 until registered; reported below
                last = str(e).splitlines()[0]
            time.sleep(0.5)
        raise NodeComponentError("kubelet", f"node not Ready after {timeout:.0f}s ({last})",
                                 self.processes["kubelet"])

    def _wait_cluster_dns(self, timeout: float = 60.0) -> None:
        """CoreDNS answers for the cluster through the kube-dns Service IP (kube-proxy's DNAT)."""
        import dns.message
        import dns.query

        name = "kubernetes.default.svc.cluster.local."
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = dns.query.udp(dns.message.make_query(name, "A"), self.cluster_dns_ip, timeout=2)
                addresses = [r.to_text() for rrset in reply.answer for r in rrset]
                if self.control_plane.service_ip in addresses:
                    self._progress(f"CoreDNS answers at {self.cluster_dns_ip}: {name} -> {addresses}")
                    return
                last = f"{dns.rcode.to_text(reply.rcode())} {addresses}"
            except Exception as e:  # noqa: BLE001 - timeouts until kube-proxy and CoreDNS are there
                last = repr(e)
            time.sleep(0.5)
        raise NodeComponentError("coredns", f"{name} not answered through {self.cluster_dns_ip} "
                                 f"after {timeout:.0f}s (last: {last}); {self.pod_logs('kube-system', 'k8s-app=kube-dns')}",
                                 self.processes.get("kube-proxy"))

    # -- operations ------------------------------------------------------------------------

    def apply(self, objects: Iterable[dict[str, Any]]) -> None:
        """Create each object (kubectl create semantics)."""
        from kubernetes import utils

        for obj in objects:
            try:
                utils.create_from_dict(self.api_client, obj)
            except utils.FailToCreateError as e:
                raise NodeError(f"creating {obj['kind']} {obj['metadata']['name']}: "
                                f"{'; '.join(str(x.body) for x in e.api_exceptions)}") from None

    def create_namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        """A new namespace ``<prefix>-<random>``, once its ``default`` service account exists."""
        created = self.core.create_namespace(body={"metadata": {"generateName": f"{prefix}-",
                                                                "labels": labels or {}}})
        name = created.metadata.name
        self.wait_service_account(name)
        return str(name)

    def delete_namespace(self, name: str, timeout: float = 90.0) -> None:
        """Delete a namespace and wait until the namespace controller has emptied and removed it."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespace(name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(name)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(0.5)
        raise NodeError(f"namespace {name} still exists {timeout:.0f}s after its deletion")

    def wait_service_account(self, namespace: str, timeout: float = 60.0) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.core.read_namespaced_service_account("default", namespace)
                self.core.read_namespaced_config_map("kube-root-ca.crt", namespace)
                return
            except ApiException as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise NodeComponentError("kube-controller-manager", f"no default service account and "
                                             f"kube-root-ca.crt in {namespace} after {timeout:.0f}s",
                                             self.processes.get("kube-controller-manager")) from None
            time.sleep(0.2)

    def wait_deployment_ready(self, namespace: str, name: str, timeout: float = 120.0) -> dict[str, Any]:
        """Until the Deployment's rollout is complete and all its replicas are ready."""
        from kubernetes import client

        apps: Any = client.AppsV1Api(self.api_client)
        deadline = time.monotonic() + timeout
        while True:
            d = json.loads(apps.read_namespaced_deployment(name, namespace, _preload_content=False).data)
            spec, status = d["spec"], d.get("status", {})
            want = spec.get("replicas", 1)
            if (status.get("observedGeneration", 0) >= d["metadata"]["generation"]
                    and status.get("updatedReplicas", 0) == want and status.get("readyReplicas", 0) == want
                    and status.get("replicas", 0) == want and status.get("availableReplicas", 0) == want):
                return dict(d)
            if time.monotonic() > deadline:
                selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
                raise NodeError(f"deployment {namespace}/{name} not ready after {timeout:.0f}s "
                                f"(status {status}); {self.pod_logs(namespace, selector)}")
            time.sleep(0.5)

    def wait_pod_running(self, namespace: str, name: str, timeout: float = 90.0,
                         condition: str = "Ready") -> dict[str, Any]:
        """The pod's JSON once it is Running with every container started (and ready, if probed);
        ``condition="ContainersReady"`` for a pod whose readiness gate keeps it not Ready."""
        deadline = time.monotonic() + timeout
        while True:
            pod = json.loads(self.core.read_namespaced_pod(name, namespace, _preload_content=False).data)
            status = pod.get("status", {})
            if status.get("phase") in ("Failed", "Succeeded"):
                raise NodeError(f"pod {namespace}/{name} ended ({status.get('phase')}); "
                                f"{self.describe_pod(namespace, name)}")
            ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get(condition)
            if status.get("phase") == "Running" and ready == "True":
                return dict(pod)
            if time.monotonic() > deadline:
                raise NodeError(f"pod {namespace}/{name} not running and ready after {timeout:.0f}s; "
                                f"{self.describe_pod(namespace, name)}")
            time.sleep(0.2)

    def describe_pod(self, namespace: str, name: str) -> str:
        """The pod's status and events, and the kubelet's last lines (for failure messages)."""
        try:
            pod = json.loads(self.core.read_namespaced_pod(name, namespace, _preload_content=False).data)
            events = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
            lines = [f"{e.type} {e.reason}: {e.message}" for e in events.items]
            status = json.dumps(pod.get("status", {}).get("containerStatuses", pod.get("status")))[:1500]
        except Exception as e:  # noqa: BLE001 - a diagnosis must never hide the original failure
            return f"(could not describe pod: {e})"
        kubelet = self.processes.get("kubelet")
        return (f"status: {status}\nevents:\n" + "\n".join(lines[-15:]) +
                (f"\nkubelet log tail:\n{kubelet.tail(15)}" if kubelet else ""))

    def pod_logs(self, namespace: str, selector: str, lines: int = 20) -> str:
        """The last log lines of the pods matching ``selector`` (for failure messages)."""
        out = []
        try:
            for pod in self.core.list_namespaced_pod(namespace, label_selector=selector).items:
                out.append(f"pod {pod.metadata.name} ({pod.status.phase}):")
                try:
                    out.append(self.core.read_namespaced_pod_log(pod.metadata.name, namespace,
                                                                 tail_lines=lines, _request_timeout=10))
                except Exception as e:  # noqa: BLE001
                    out.append(f"(no log: {str(e).splitlines()[0]})")
                out.append(self.describe_pod(namespace, pod.metadata.name))
        except Exception as e:  # noqa: BLE001
            out.append(f"(could not list pods: {e})")
        return "\n".join(out)

    def container_id(self, namespace: str, pod: str, container: str | None = None) -> str:
        data = json.loads(self.core.read_namespaced_pod(pod, namespace, _preload_content=False).data)
        for status in data.get("status", {}).get("containerStatuses", []):
            if container is None or status["name"] == container:
                cid = status.get("containerID", "")
                if cid.startswith("containerd://"):
                    return str(cid[len("containerd://"):])
        raise NodeError(f"pod {namespace}/{pod} has no running container {container or ''}")

    IDLE = ("/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done")

    def create_kubedock_pod(self, namespace: str, name: str, networks: Sequence[str] = (),
                            aliases: Sequence[str] = (), *, opt_in: bool = True,
                            image: str = images.TOOLBOX_IMAGE, command: Sequence[str] | None = IDLE,
                            pod_security_context: dict[str, Any] | None = None,
                            container_security_context: dict[str, Any] | None = None,
                            wait: bool = True) -> dict[str, Any]:
        """Create a pod as kubedock does for a Docker container named ``name`` on ``networks``
        (Docker network IDs) with ``aliases``, running ``image`` (``command``, or the image's own
        when None; the default idles and ends at once on SIGTERM, so deletion takes no grace
        period).  With ``wait``, return its JSON once the kubelet runs it (else as stored, after
        the webhook's mutation)."""
        from testbed.bed import BedPod, kubedock_pod_manifest, kubedock_pod_name

        container_id = secrets.token_hex(32)
        container_name = f"{name}_{secrets.token_hex(2)}"
        pod = BedPod(name=kubedock_pod_name(container_name, container_id[:12]), hostname=name,
                     container_name=container_name, container_id=container_id,
                     networks=tuple(networks), aliases=tuple(aliases), opted_in=opt_in)
        body = kubedock_pod_manifest(pod, namespace, "node-tests", init_container=False, image=image,
                                     command=command)
        if pod_security_context:
            body["spec"]["securityContext"] = pod_security_context
        if container_security_context:
            body["spec"]["containers"][0]["securityContext"] = container_security_context
        try:
            response = self.core.create_namespaced_pod(namespace, body=body, _preload_content=False)
        except Exception as e:  # noqa: BLE001 - the API's reason is the message
            raise NodeError(f"creating pod {pod.name} in {namespace} failed: {getattr(e, 'body', e)}") from None
        created = json.loads(response.data)
        if not wait:
            return dict(created)
        return self.wait_pod_running(namespace, pod.name)

    def kubectl_command(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of ``kubectl <args>`` against this node (its kubeconfig), for
        a command that keeps running (``port-forward``)."""
        if self._kubectl is None:
            self._kubectl = find_kubectl(self._progress)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["KUBECONFIG"] = str(self.control_plane.kubeconfig_path)
        return [self._kubectl, *args], env

    def kubectl(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``kubectl <args>`` against this node, as a user runs it; never raises for a non-zero
        exit (the caller asserts on it)."""
        argv, env = self.kubectl_command(*args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=env,
                              check=False)

    def exec(self, namespace: str, pod: str, argv: Sequence[str], container: str | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the pod's container through containerd (like ``kubectl exec``)."""
        assert self.containerd is not None
        return self.containerd.exec(self.container_id(namespace, pod, container), argv, timeout=timeout)
