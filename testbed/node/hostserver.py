"""kubedock-dns from this checkout, as a process on the node's host, serving one namespace's pods.

Contract: ``with HostKubedockDns(node, namespace) as server:`` creates a Service ``kubedock-dns``
in ``namespace`` without a selector and an EndpointSlice pointing it at this machine's address
(``node.settings.node_ip``) on the port ``twistd kubedock-dns`` listens on (UDP and TCP), starts
that process (``--dns-service-ip`` the Service's ClusterIP, upstream the cluster DNS Service),
waits for its ``/readyz``, registers its webhook (``https://127.0.0.1:<port>/mutate``, the
chart's selectors and failure policy) and proves it in force.  Pods then reach it exactly as they
reach an in-cluster replica: their queries to the ClusterIP are DNATed by the real kube-proxy, not
masqueraded (they come from the cluster CIDR), so kubedock-dns sees each pod's own address.
``server.restart(server_args)`` stops the process and starts it again with other extra arguments
on the same ports (an operator changing the server's settings).  Leaving the block removes the
webhook registration first (so no later pod creation is blocked), then stops the process and
deletes the Service.

This is the tier that needs no container image of kubedock-dns; the chart tier runs the image.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any

from testbed.bed import (TWISTD, BedPod, kubedock_pod_manifest, mutating_webhook_configuration,
                         new_network_id, wait_kubedock_dns_ready, wait_webhook_in_force)
from testbed.controlplane import ManagedProcess
from testbed.upstream import free_port

__all__ = ["HostKubedockDns"]


class HostKubedockDns:
    """See the module docstring.  After entering: ``service_ip``, ``server`` (the process),
    ``ops_port`` (``/debug/networks``, ``/metrics`` on 127.0.0.1)."""

    def __init__(self, node: Any, namespace: str, server_args: tuple[str, ...] = ()) -> None:
        self.node = node
        self.namespace = namespace
        self.server_args = tuple(server_args)
        self.service_ip = ""
        self.server: ManagedProcess | None = None
        self.ops_port = 0
        self.webhook_name = f"kubedock-dns-host-{namespace}"
        self._argv: list[str] = []
        self._workdir = Path()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "HostKubedockDns":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        from kubernetes import client

        from testbed.tls import generate_ca_and_cert

        node, ns = self.node, self.namespace
        workdir = Path(node.run) / f"host-kubedock-dns-{ns}"
        workdir.mkdir()
        node_ip = node.settings.node_ip
        dns_port = free_port(node_ip)
        self.ops_port = free_port("127.0.0.1")
        webhook_port = free_port("127.0.0.1")
        ports = [{"name": "dns", "port": 53, "targetPort": dns_port, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "targetPort": dns_port, "protocol": "TCP"}]
        service = node.core.create_namespaced_service(ns, body={
            "metadata": {"name": "kubedock-dns"}, "spec": {"ports": ports}})
        self._stack.callback(self._delete_service)
        self.service_ip = service.spec.cluster_ip
        discovery: Any = client.DiscoveryV1Api(node.api_client)
        discovery.create_namespaced_endpoint_slice(ns, body={
            "metadata": {"name": "kubedock-dns-host",
                         "labels": {"kubernetes.io/service-name": "kubedock-dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node.settings.node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "dns", "port": dns_port, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"}],
        })
        tls = generate_ca_and_cert(["127.0.0.1", "localhost"], workdir / "tls")
        argv = [*TWISTD, "-n", "--pidfile=", "kubedock-dns",
                "--kubeconfig", str(node.control_plane.kubeconfig_path), "--namespace", ns,
                # Bound to the node's address, not 0.0.0.0: a UDP socket on the wildcard address
                # answers a pod from the bridge's address (the route's source), which matches no
                # conntrack entry of the DNAT, so the pod would drop every answer.
                "--dns-port", str(dns_port), "--dns-interface", node_ip,
                "--upstream", f"{node.cluster_dns_ip}:53",
                "--ops-port", str(self.ops_port), "--ops-interface", "127.0.0.1",
                "--webhook-port", str(webhook_port), "--webhook-interface", "127.0.0.1",
                "--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path),
                "--dns-service-ip", self.service_ip,
                "--drain-seconds", "0"]  # nothing routes here once the bed stops
        self._argv, self._workdir = argv, workdir
        self._stack.callback(self._stop_server)
        self._start_server()
        progress = node._progress
        admission: Any = client.AdmissionregistrationV1Api(node.api_client)
        admission.create_mutating_webhook_configuration(body=mutating_webhook_configuration(
            self.webhook_name, ns, f"https://127.0.0.1:{webhook_port}/mutate", tls.ca_pem))
        self._stack.callback(self._delete_webhook, admission)
        probe = kubedock_pod_manifest(
            BedPod(name="webhook-probe", hostname="webhook-probe", container_name="webhook-probe",
                   container_id=secrets.token_hex(32), networks=(new_network_id(),), aliases=()),
            ns, "probe", init_container=False)
        wait_webhook_in_force(node.core, ns, probe, self.server, progress)
        progress(f"kubedock-dns (host process) serves {ns} at Service {self.service_ip}:53 -> "
                 f"{node.settings.node_ip}:{dns_port}")

    def _start_server(self) -> None:
        self.server = ManagedProcess("kubedock-dns", [*self._argv, *self.server_args],
                                     self._workdir / "kubedock-dns.log", cwd=self._workdir)
        self.server.start()
        wait_kubedock_dns_ready(self.server, self.ops_port, self.node._progress)

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def restart(self, server_args: tuple[str, ...]) -> None:
        """Stop the server and start it again with ``server_args`` instead (same ports)."""
        self._stop_server()
        self.server_args = tuple(server_args)
        self._start_server()

    def _delete_webhook(self, admission: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            admission.delete_mutating_webhook_configuration(self.webhook_name)

    def _delete_service(self) -> None:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            self.node.core.delete_namespaced_service("kubedock-dns", self.namespace)

    def log(self, lines: int = 40) -> str:
        return self.server.tail(lines) if self.server else ""
