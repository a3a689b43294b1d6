"""Pods as kubedock creates them (DESIGN section 2), as raw API JSON and as records."""

from __future__ import annotations

import hashlib
import itertools

from kubedock_dns.contract import PodRecord, pod_record_from_dict

_serial = itertools.count(1)


def network_id(name: str) -> str:
    """A Docker-style 64-hex network ID derived from a readable name."""
    return hashlib.sha256(name.encode()).hexdigest()


def kubedock_pod(name: str, networks=(), aliases=(), hostname=None, ip=None, ips=None,
                 phase="Running", namespace="tests", uid=None, labels=None, container_name=None,
                 container_id=None, host_network=False, deleting=False, ready=True, session=None,
                 image="busybox") -> dict:
    """The JSON of a pod the way kubedock's deploy.go writes it, with a kubelet-style status;
    ``session``: the Testcontainers session label kubedock copies into the annotations."""
    serial = next(_serial)
    annotations = {"kubedock.hostalias/0": hostname or name}
    for i, alias in enumerate(aliases, start=1):
        annotations[f"kubedock.hostalias/{i}"] = alias
    for i, net in enumerate(networks):
        annotations[f"kubedock.network/{i}"] = net
    if container_name:
        annotations["kubedock.containername"] = container_name
    if session:
        annotations["org.testcontainers.sessionId"] = session
    pod_labels = {"kubedock": "true"}
    if container_id:
        pod_labels["kubedock.containerid"] = container_id
    pod_labels.update(labels or {})
    status: dict = {"phase": phase}
    addresses = list(ips or ([ip] if ip else []))
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": a} for a in addresses]
    status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    metadata = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}-{serial}",
        "labels": pod_labels,
        "annotations": annotations,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": metadata,
        "spec": {"hostNetwork": host_network, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": image}]},
        "status": status,
    }


def record(*args, **kwargs) -> PodRecord:
    return pod_record_from_dict(kubedock_pod(*args, **kwargs))


def creatable_pod(name: str, *, opted_in: bool = True, networks=("net-a",)) -> dict:
    """A kubedock-shaped pod body to POST to the API server: no uid, no status."""
    pod = kubedock_pod(name, list(networks), aliases=[f"{name}-alias"], container_name=f"/{name}",
                       container_id="0123456789ab")
    del pod["metadata"]["uid"], pod["metadata"]["namespace"], pod["status"]
    if not opted_in:
        del pod["metadata"]["labels"]["kubedock"]
    return {"apiVersion": "v1", "kind": "Pod", **pod}
