"""NetworkPolicy engines for the real node: what enforces the policies ``--network-policies`` writes.

Contract: each engine class has a ``name``, a static ``unavailable_reason()`` (why this machine
cannot run it, or None) and is used as ``with Engine(node) as engine:``.  Entering builds the engine
from the Go module proxy (``scripts/build-tools.sh <name>``, cached by version), starts it on the
node and returns once it has programmed the kernel at least once; leaving stops it and removes
every rule and set it made, raising :class:`testbed.node.errors.NodeError` if any remain.
``engine.describe(ip)`` is what a failed expectation about traffic to ``ip`` needs: the engine's
log tail and its rules.

- :class:`KubeRouterFirewall`: kube-router's network-policy controller alone (``--run-firewall``,
  no routing, no service proxy), iptables + ipset, as a process on the node's host with the
  node's kubeconfig, as the node's kubelet and kube-proxy run.  v2.1.0 is the only v2 release
  the module proxy serves here and security flaws are reported against it: a TEST-BED engine on a
  throw-away loopback node only, never shipped or recommended.  Its health and metrics servers are
  off (``--health-port=0``; metrics and pprof are off by default), so it listens on nothing.
- :class:`KubeNetworkPolicies`: sigs.k8s.io/kube-network-policies as a host-network pod, as its
  install manifest deploys it.  It hands every new connection to user space with nftables'
  ``queue`` statement, which needs nft_queue in the kernel.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from testbed.controlplane import BUILD_TOOLS, ManagedProcess
from testbed.node.errors import NodeError, NodeUnavailable

__all__ = ["KubeRouterFirewall", "KubeNetworkPolicies", "ENGINES"]


def _built(tool: str, timeout: float = 3600.0) -> Path:
    """The engine's binary, built (or found in the cache) by ``scripts/build-tools.sh``."""
    done = subprocess.run(["bash", str(BUILD_TOOLS), tool], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        if shutil.which("go") is None:
            raise NodeUnavailable(f"{tool} is not cached and Go is not installed to build it")
        raise NodeError(f"{BUILD_TOOLS} {tool} failed ({done.returncode}): {done.stderr[-1500:]}")
    return Path(done.stdout.split()[-1])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


class KubeRouterFirewall:
    """kube-router's network-policy controller on the node (see the module docstring)."""

    name = "kube-router"
    # Everything it makes in the filter table and in ipset: its top-level chains, one chain per
    # policy and per local pod, and the policies' address sets.
    CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
    SET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-")

    def __init__(self, node: Any) -> None:
        self.node = node
        self.process: ManagedProcess | None = None

    @staticmethod
    def unavailable_reason() -> str | None:
        for tool in ("ipset", "iptables", "iptables-save", "iptables-restore"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (scripts/setup installs it)"
        # A scratch set proves the kernel's ipset; `-m set` then needs xt_set (built in here).
        probe = f"kdn-probe-{os.getpid()}"
        made = _run(["ipset", "create", probe, "hash:ip"])
        _run(["ipset", "destroy", probe])
        if made.returncode != 0:
            return f"the kernel has no usable ipset: {made.stderr.strip()}"
        return None

    def __enter__(self) -> "KubeRouterFirewall":
        from testbed.node.cluster import SERVICE_CIDR

        binary = _built(self.name)
        settings = self.node.settings
        argv = [str(binary), "--kubeconfig", str(self.node.control_plane.kubeconfig_path),
                "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
                f"--hostname-override={settings.node_name}", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--health-port=0", "--v=1"]
        self.process = ManagedProcess(self.name, argv, Path(self.node.run) / f"{self.name}.log")
        try:
            self.process.start()
            self._wait_first_sync()
        except BaseException:
            self.__exit__()
            raise
        self.node._progress(f"{self.name} enforces NetworkPolicies (log {self.process.log_path})")
        return self

    def _wait_first_sync(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while "sync iptables took" not in self.process.log_path.read_text(errors="replace"):
            if not self.process.alive():
                raise NodeError(f"{self.name} exited before its first sync:\n{self.process.tail(30)}")
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} did not sync within {timeout:.0f}s:\n{self.process.tail(30)}")
            time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop(10.0)
        # It leaves its rules when it stops (its --cleanup-config would also reset the router's and
        # service proxy's state, which this node never had): remove exactly what it made.
        self._remove_rules()
        left = self.leftovers()
        if left:
            raise NodeError(f"{self.name} left {', '.join(left)}")

    def _chains(self) -> list[str]:
        out = _run(["iptables", "-w", "5", "-t", "filter", "-S"]).stdout
        return sorted({c for c in re.findall(r"^-N (\S+)", out, re.M) if c.startswith(self.CHAIN_PREFIXES)})

    def _sets(self) -> list[str]:
        out = _run(["ipset", "list", "-n"]).stdout
        return [s for s in out.split() if s.startswith(self.SET_PREFIXES)]

    def _remove_rules(self) -> None:
        for builtin in ("INPUT", "FORWARD", "OUTPUT"):
            for line in _run(["iptables", "-w", "5", "-t", "filter", "-S", builtin]).stdout.splitlines():
                tokens = shlex.split(line)
                if tokens[:1] == ["-A"] and "-j" in tokens and tokens[tokens.index("-j") + 1].startswith(self.CHAIN_PREFIXES):
                    _run(["iptables", "-w", "5", "-t", "filter", "-D", *tokens[1:]])
        chains = self._chains()
        for chain in chains:
            _run(["iptables", "-w", "5", "-t", "filter", "-F", chain])
        for chain in chains:
            _run(["iptables", "-w", "5", "-t", "filter", "-X", chain])
        for name in self._sets():
            _run(["ipset", "destroy", name])

    def leftovers(self) -> list[str]:
        return ([f"iptables chain {c}" for c in self._chains()] + [f"ipset {s}" for s in self._sets()])

    def describe(self, ip: str) -> str:
        forward = _run(["iptables", "-w", "5", "-t", "filter", "-S", "KUBE-ROUTER-FORWARD"]).stdout
        chains = set(re.findall(rf"-d {re.escape(ip)}/32 .*-j (KUBE-POD-FW-\S+)", forward))
        rules = "".join(_run(["iptables", "-w", "5", "-t", "filter", "-S", c]).stdout for c in sorted(chains))
        log = self.process.tail(25) if self.process else ""
        return (f"{self.name} log:\n{log}\nKUBE-ROUTER-FORWARD:\n{forward[-2000:]}\n"
                f"chains for {ip}:\n{rules[-3000:]}")


class KubeNetworkPolicies:
    """sigs.k8s.io/kube-network-policies as a host-network pod (see the module docstring)."""

    name = "kube-network-policies"
    IMAGE = "localhost/kubedock-dns-testbed/kube-network-policies:v0.8.0"
    NAMESPACE = "kube-system"

    def __init__(self, node: Any) -> None:
        self.node = node

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why the kernel cannot queue new connections to user space with an nftables ``queue``
        statement (nft_queue + nfnetlink_queue), probed in a scratch table; None if it can."""
        if shutil.which("nft") is None:
            return "nft is not installed"
        table = f"kdn_probe_{os.getpid()}"
        # A counter rule first: so a refused queue rule is the kernel lacking the statement (nft then
        # says "No such file or directory" and guesses at a chain name), not a broken table.
        steps = [["add", "table", "inet", table],
                 ["add", "chain", "inet", table, "c", "{ type filter hook forward priority 0; }"],
                 ["add", "rule", "inet", table, "c", "counter"],
                 ["add", "rule", "inet", table, "c", "queue", "num", "98", "bypass"]]
        try:
            for step in steps:
                done = _run(["nft", *step])
                if done.returncode != 0:
                    first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else done.returncode
                    if step[-1] == "bypass":
                        return ("it needs nftables' queue statement, which this kernel refuses while it "
                                f"accepts a counter rule in the same chain (nft: {first})")
                    return f"nftables is unusable here (nft {' '.join(step[:3])}: {first})"
        finally:
            _run(["nft", "delete", "table", "inet", table])
        return None

    def _objects(self) -> list[dict[str, Any]]:
        """Its RBAC and pod, as its install.yaml has them (NRI off: containerd 1.6 has none)."""
        name, node_name = self.name, self.node.settings.node_name
        return [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": self.NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
                       {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": self.NAMESPACE}]},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": self.NAMESPACE, "labels": {"app": name}},
             "spec": {"hostNetwork": True, "serviceAccountName": name, "nodeName": node_name,
                      "tolerations": [{"operator": "Exists"}],
                      "containers": [{"name": name, "image": self.IMAGE, "imagePullPolicy": "Never",
                                      "args": [f"--hostname-override={node_name}", "--disable-nri", "--v=2",
                                               "--nfqueue-id=98", "--metrics-bind-address=127.0.0.1:0"],
                                      "securityContext": {"privileged": True}}]}},
        ]

    def __enter__(self) -> "KubeNetworkPolicies":
        from testbed.node import images

        binary = _built(self.name)
        archive = images.oci_archive(self.IMAGE, {"/bin/netpol": binary},
                                     images.ImageConfig(entrypoint=["/bin/netpol"]),
                                     Path(self.node.run) / "images" / "kube-network-policies.oci.tar")
        self.node.containerd.import_image(archive.path)
        self.node.apply(self._objects())
        try:
            self.node.wait_pod_running(self.NAMESPACE, self.name, timeout=90)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from kubernetes import client

        core, rbac = client.CoreV1Api(self.node.api_client), client.RbacAuthorizationV1Api(self.node.api_client)
        for delete in (lambda: core.delete_namespaced_pod(self.name, self.NAMESPACE, grace_period_seconds=5),
                       lambda: core.delete_namespaced_service_account(self.name, self.NAMESPACE),
                       lambda: rbac.delete_cluster_role_binding(self.name),
                       lambda: rbac.delete_cluster_role(self.name)):
            try:
                delete()
            except client.ApiException as e:
                if e.status != 404:
                    raise
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                core.read_namespaced_pod(self.name, self.NAMESPACE)
            except client.ApiException:
                break
            time.sleep(0.5)
        # The engine removes its table when it stops; make sure of it.
        _run(["nft", "delete", "table", "inet", self.name])

    def describe(self, ip: str) -> str:
        rules = _run(["nft", "list", "table", "inet", self.name])
        logs = "".join(path.read_text()[-3000:]
                       for path in Path("/var/log/pods").glob(f"{self.NAMESPACE}_{self.name}_*/*/*.log"))
        return f"{self.name} log:\n{logs}\nnft:\n{rules.stdout[-3000:]}{rules.stderr}"


ENGINES = {engine.name: engine for engine in (KubeRouterFirewall, KubeNetworkPolicies)}
