"""CoreDNS as the cluster DNS: a Deployment in kube-system behind the ``kube-dns`` Service.

Contract: :func:`cluster_dns_objects` returns the objects a cluster installer (kubeadm's CoreDNS
addon) creates, adapted to this bed: the image is the static CoreDNS binary packed here
(:func:`testbed.node.images.coredns_image`), it runs as an unprivileged user and so listens on
port 1053 (the Service maps 53 to it: no capability needed), with the ``kubernetes`` plugin for
``cluster.local`` and reverse zones, ``ready`` on 8181 as the readiness probe, and every other
name answered NXDOMAIN at once (``template``): the bed is an island, so names outside the cluster
get the answer a healthy cluster DNS gives for a name that does not exist, and no query leaves
this machine (forwarding to the host's resolvers would send test traffic to them, and their
timeouts would look like a broken upstream to kubedock-dns' forward-failure alert).  The ``log`` plugin writes one line per
query with the client's address, so a test can tell who asked the cluster DNS
(:func:`askers_in_log`).  The Service has the fixed ClusterIP
the kubelet's ``clusterDNS`` names.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["COREFILE", "askers_in_log", "cluster_dns_objects"]

# The log plugin's line: "[INFO] 10.200.0.5:53412 - 4660 \"A IN name. udp 54 false 512\" NOERROR ..."
_LOG_LINE = re.compile(r"\[INFO\] \[?(?P<client>[0-9a-fA-F.:]+?)\]?:\d+ - \d+ \"")


def askers_in_log(log: str) -> set[str]:
    """The client addresses of the queries in a CoreDNS log (the ``log`` plugin's lines)."""
    return {m["client"] for m in _LOG_LINE.finditer(log)}


# Two server blocks: CoreDNS runs its plugins in a fixed order (template before kubernetes), so
# the catch-all NXDOMAIN lives in a block of its own for every zone that is not the cluster's; the
# kubernetes plugin answers its reverse zones itself (no fallthrough: nothing after it).
COREFILE = """%(domain)s:1053 in-addr.arpa:1053 ip6.arpa:1053 {
    errors
    log
    health :8080
    ready :8181
    kubernetes %(domain)s in-addr.arpa ip6.arpa {
        pods insecure
        ttl 30
    }
    cache 30
}
.:1053 {
    errors
    log
    template ANY ANY {
        rcode NXDOMAIN
    }
}
"""

_LABELS = {"k8s-app": "kube-dns"}


def cluster_dns_objects(image: str, cluster_ip: str, domain: str = "cluster.local") -> list[dict[str, Any]]:
    ns = "kube-system"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": ns},
         "data": {"Corefile": COREFILE % {"domain": domain}}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": ns, "labels": _LABELS},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": _LABELS},
             "template": {
                 "metadata": {"labels": _LABELS},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "dnsPolicy": "Default",
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "IfNotPresent",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                            "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "periodSeconds": 10, "failureThreshold": 5},
                         "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": ns, "labels": _LABELS},
         "spec": {"clusterIP": cluster_ip, "selector": _LABELS,
                  "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]
