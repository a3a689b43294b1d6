"""The Kubernetes node and controller processes: their configuration, start-up and health checks.

Contract: each ``start_*`` function writes the component's configuration under the run directory,
starts it as a :class:`testbed.controlplane.ManagedProcess` (own process group, log file
``<run>/<component>.log``, killed with its group) and returns it once its health endpoint answers
200, or raises :class:`NodeComponentError` naming the component with its log tail (it exited, or
it did not become healthy in time).  Every port is chosen by the kernel (port 0, then used), every
path lies under the run directory, and nothing is written to the usual system locations
(``/var/lib/kubelet``, ``/etc/kubernetes``, ``/var/log/pods``).

The kubelet runs with the settings this machine needs (cgroups v1: ``failCgroupV1: false``,
``cgroupDriver: cgroupfs``, ``cgroupsPerQOS: false``, ``enforceNodeAllocatable: []``,
``failSwapOn: false``, ``localStorageCapacityIsolation: false``) and serves its API to anyone on
its port (anonymous, AlwaysAllow): a throw-away node on a private machine.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from testbed.controlplane import ControlPlane, ManagedProcess
from testbed.node.errors import NodeComponentError
from testbed.upstream import free_port

__all__ = ["NodeSettings", "start_controller_manager", "start_scheduler", "start_kubelet",
           "start_kube_proxy", "wait_healthy"]


@dataclass(frozen=True)
class NodeSettings:
    """What every component agrees on."""

    run: Path
    node_name: str
    node_ip: str
    pod_subnet: str
    cluster_dns_ip: str
    cluster_domain: str = "cluster.local"


def wait_healthy(process: ManagedProcess, url: str, timeout: float,
                 progress: Callable[[str], None] = lambda message: None) -> None:
    """Poll ``url`` (http or https, certificate not checked: components serve self-signed ones)
    until it answers 200; raise with the log tail if the process dies or the time runs out."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if not process.alive():
            raise NodeComponentError(process.name, "exited during start-up", process)
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise NodeComponentError(process.name, f"not healthy after {timeout:.0f}s (last answer "
                                     f"from {url}: {last})", process)
        time.sleep(0.2)


def _started(name: str, argv: list[str], settings: NodeSettings) -> ManagedProcess:
    process = ManagedProcess(name, argv, settings.run / f"{name}.log", cwd=settings.run)
    process.start()
    return process


def _control_loop_args(name: str, plane: ControlPlane, settings: NodeSettings, port: int) -> list[str]:
    """What the controller manager and the scheduler both need: the API server through the
    control plane's kubeconfig (also for authenticating and authorising their own health
    endpoint), no leader election (one of each), that endpoint on loopback ``port``."""
    return [
        f"--kubeconfig={plane.kubeconfig_path}",
        f"--authentication-kubeconfig={plane.kubeconfig_path}",
        f"--authorization-kubeconfig={plane.kubeconfig_path}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={settings.run / (name + '-pki')}",
    ]


def start_controller_manager(binary: str, plane: ControlPlane, settings: NodeSettings,
                             timeout: float = 120.0) -> ManagedProcess:
    """Service accounts and their tokens' CA, namespaces, deployments/replica sets, garbage
    collection, endpoint slices: every default controller, no leader election."""
    port = free_port("127.0.0.1")
    process = _started("kube-controller-manager", [
        binary, *_control_loop_args("kube-controller-manager", plane, settings, port),
        f"--service-account-private-key-file={plane.service_account_key_path}",
        f"--root-ca-file={plane.ca_path}",
        "--use-service-account-credentials=false",
        "--allocate-node-cidrs=false",
        "--controllers=*",
        "--concurrent-deployment-syncs=5", "--concurrent-replicaset-syncs=5",
        "--v=1",
    ], settings)
    wait_healthy(process, f"https://127.0.0.1:{port}/healthz", timeout)
    return process


def start_scheduler(binary: str, plane: ControlPlane, settings: NodeSettings,
                    timeout: float = 120.0) -> ManagedProcess:
    port = free_port("127.0.0.1")
    process = _started("kube-scheduler", [
        binary, *_control_loop_args("kube-scheduler", plane, settings, port),
        "--v=1",
    ], settings)
    wait_healthy(process, f"https://127.0.0.1:{port}/healthz", timeout)
    return process


def start_kubelet(binary: str, plane: ControlPlane, settings: NodeSettings, runtime_socket: Path,
                  timeout: float = 120.0) -> ManagedProcess:
    run = settings.run
    healthz = free_port("127.0.0.1")
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroups v1 on this machine, and no CAP_SYS_RESOURCE (see the module docstring).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "localStorageCapacityIsolation": False,
        "containerRuntimeEndpoint": f"unix://{runtime_socket}",
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "address": settings.node_ip,
        "port": free_port("0.0.0.0"),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
        "clusterDNS": [settings.cluster_dns_ip],
        "clusterDomain": settings.cluster_domain,
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(run / "pod-logs"),
        "volumePluginDir": str(run / "volume-plugins"),
        "serializeImagePulls": False,
        "registerNode": True,
        # A pod's status reaches the API at once, not on the next sync.
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "5s",
        # Nothing on this disk is the node's to evict for.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 110,
    }
    (run / "kubelet").mkdir(exist_ok=True)
    config_path = run / "kubelet" / "config.json"
    config_path.write_text(json.dumps(config, indent=1))
    process = _started("kubelet", [
        binary,
        f"--config={config_path}",
        f"--kubeconfig={plane.kubeconfig_path}",
        f"--root-dir={run / 'kubelet' / 'root'}",
        f"--cert-dir={run / 'kubelet' / 'pki'}",
        f"--hostname-override={settings.node_name}",
        f"--node-ip={settings.node_ip}",
        "--v=1",
    ], settings)
    wait_healthy(process, f"http://127.0.0.1:{healthz}/healthz", timeout)
    return process


def kube_proxy_config(plane: ControlPlane, settings: NodeSettings, mode: str) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(plane.kubeconfig_path)},
        "mode": mode,
        "hostnameOverride": settings.node_name,
        "bindAddress": "0.0.0.0",
        # Traffic from pods is local: never masqueraded, so servers see each pod's own address.
        "clusterCIDR": settings.pod_subnet,
        "detectLocalMode": "ClusterCIDR",
        "healthzBindAddress": f"127.0.0.1:{free_port('127.0.0.1')}",
        "metricsBindAddress": f"127.0.0.1:{free_port('127.0.0.1')}",
        # Leave the host's conntrack sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "nodePortAddresses": ["primary"],
        "syncPeriod": "30s",
        "iptables": {"minSyncPeriod": "0s"},
        "nftables": {"minSyncPeriod": "0s"},
    }


def start_kube_proxy(binary: str, plane: ControlPlane, settings: NodeSettings, mode: str,
                     timeout: float = 60.0) -> ManagedProcess:
    config = kube_proxy_config(plane, settings, mode)
    config_path = settings.run / "kube-proxy.json"
    config_path.write_text(json.dumps(config, indent=1))
    process = _started("kube-proxy", [binary, f"--config={config_path}", "--v=1"], settings)
    wait_healthy(process, f"http://{config['healthzBindAddress']}/livez", timeout)
    return process


def kube_proxy_cleanup(binary: str, settings: NodeSettings, mode: str) -> str:
    """``kube-proxy --cleanup``: remove the rules of ``mode``; returns its output for the log."""
    import subprocess

    done = subprocess.run([binary, "--cleanup", f"--proxy-mode={mode}"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=settings.run)
    return done.stdout + done.stderr
