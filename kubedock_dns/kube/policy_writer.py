"""``--network-policies``: keeps the namespace's managed NetworkPolicies equal to the networks in use.

Contract
--------
What the policies say is decided by the pure :mod:`kubedock_dns.kube.policies`; this module only makes
the API server match it, from its own daemon thread (see :class:`NetworkPolicyWriter`), and runs
that thread as a Twisted service while the server runs.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import kubernetes.client
from twisted.application.service import Service
from twisted.logger import Logger

from kubedock_dns.kube.client import ApiError, api_client_from, describe_failure, status_of
from kubedock_dns.kube.policies import MANAGED_SELECTOR, Plan, PolicyConfig, base_policy, network_policy, plan

# The kube side has always logged under this namespace; kept so log filters keep working.
log = Logger(namespace="kubedock_dns.watcher")


class NetworkPolicyWriter:
    """Keeps the namespace's managed NetworkPolicies equal to the wanted networks.

    :meth:`want` (any thread, cheap: the reactor thread calls it after every index change) records
    the latest set of networks with pods; a daemon thread makes the API match it: at its first pass
    it makes sure the isolation policy exists (created from
    :func:`kubedock_dns.kube.policies.base_policy` if missing, never changed: the chart owns it; deleted
    later, it stops all writing, see :meth:`isolation_policy`), then creates, replaces and deletes per-network policies as
    :func:`kubedock_dns.kube.policies.plan` says.  Nothing per network is written before the first
    :meth:`want` (the index must be synced first, or every policy would look unwanted).  It
    reconciles again every ``resync`` seconds (a policy deleted by hand comes back), and after a
    failure with a capped backoff.  Another replica doing the same is harmless: 409 on create and
    404 on delete count as done.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, config: PolicyConfig,
                 resync: float = 60.0, request_timeout: float = 10.0) -> None:
        self._api = kubernetes.client.NetworkingV1Api(api_client)
        self.namespace = namespace
        self.config = config
        self.resync = resync
        self._timeout = request_timeout
        self._condition = threading.Condition()
        self._wanted: frozenset[str] | None = None
        self._dirty = True
        self._stopping = False
        self._base_missing = False
        self._thread: threading.Thread | None = None
        # Written by the writer thread alone; read anywhere (plain ints).
        self.reconciles = self.errors = self.created = self.replaced = self.deleted = 0

    def want(self, networks: frozenset[str]) -> None:
        with self._condition:
            if networks != self._wanted:
                self._wanted = networks
                self._dirty = True
                self._condition.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kubedock-dns-policies", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        failures = 0
        while True:
            with self._condition:
                if failures:
                    # Backoff: new wishes wait too (an API server in trouble gets no burst).
                    deadline = time.monotonic() + min(30.0, 0.5 * 2 ** failures)
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._condition.wait(left)
                elif not self._dirty and not self._stopping:
                    self._condition.wait(self.resync)
                if self._stopping:
                    return
                self._dirty = False
                wanted = self._wanted
            try:
                self.reconcile(wanted)
                failures = 0
            except Exception as error:
                failures += 1
                self.errors += 1
                log.warn("network policies not reconciled ({error}); retrying in {delay:.1f}s",
                         error=describe_failure(error), delay=min(30.0, 0.5 * 2 ** failures))

    def _request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._api, method)(*args, _request_timeout=self._timeout, **kwargs)
        except kubernetes.client.ApiException as e:
            reason, message = status_of(e.body)
            raise ApiError(int(e.status or 0), reason or str(e.reason or ""), message) from None

    def isolation_policy(self) -> dict[str, Any] | None:
        """The isolation policy as stored; created if it is missing at the first pass only.

        Later it is missing because somebody deleted it: ``helm upgrade`` turning the mode off
        while this replica still runs, or an admin by hand.  Re-creating it would undo that, so
        nothing is written until it is back (the garbage collector removes the rest meanwhile).
        """
        name = self.config.base_name
        try:
            response = self._request("read_namespaced_network_policy", name, self.namespace, _preload_content=False)
        except ApiError as e:
            if e.status != 404:
                raise
            if self.reconciles:
                if not self._base_missing:
                    log.warn("the isolation NetworkPolicy {name} was deleted (network policies turned "
                             "off?): writing no network policies until it is back", name=name)
                self._base_missing = True
                return None
            try:
                response = self._request("create_namespaced_network_policy", self.namespace,
                                         base_policy(self.config), _preload_content=False)
                log.info("created the isolation NetworkPolicy {name}", name=name)
            except ApiError as created:
                if created.status != 409:
                    raise
                response = self._request("read_namespaced_network_policy", name, self.namespace,
                                         _preload_content=False)
        self._base_missing = False
        return json.loads(response.data)

    def reconcile(self, networks: frozenset[str] | None) -> Plan:
        """One pass (blocking): the isolation policy, then, once networks are known, one policy
        per network and none for any other."""
        base = self.isolation_policy()
        if base is None:
            return Plan()
        if networks is None:
            self.reconciles += 1
            return Plan()
        owner = {"name": base["metadata"]["name"], "uid": base["metadata"]["uid"]}
        listed = json.loads(self._request("list_namespaced_network_policy", self.namespace,
                                          label_selector=MANAGED_SELECTOR, _preload_content=False).data)
        existing = {p["metadata"]["name"]: p for p in listed.get("items") or ()}
        todo = plan((network_policy(n, owner) for n in networks), existing.values(), keep=(self.config.base_name,))
        for body in todo.create:
            try:
                self._request("create_namespaced_network_policy", self.namespace, body, _preload_content=False)
                self.created += 1
            except ApiError as e:
                if e.status != 409:
                    raise
        for body in todo.replace:
            name = body["metadata"]["name"]
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": existing[name]["metadata"]["resourceVersion"]}}
            self._request("replace_namespaced_network_policy", name, self.namespace, body, _preload_content=False)
            self.replaced += 1
        for name in todo.delete:
            try:
                self._request("delete_namespaced_network_policy", name, self.namespace, _preload_content=False)
                self.deleted += 1
            except ApiError as e:
                if e.status != 404:
                    raise
        self.reconciles += 1
        if todo:
            log.info("network policies: {created} created, {replaced} replaced, {deleted} deleted",
                     created=len(todo.create), replaced=len(todo.replace), deleted=len(todo.delete))
        return todo


class NetworkPolicyService(Service):
    """Runs a :class:`NetworkPolicyWriter` while the server runs (``--network-policies``)."""

    def __init__(self, writer: NetworkPolicyWriter) -> None:
        self.setName("network-policies")
        self.writer = writer

    @classmethod
    def for_cluster(cls, kubeconfig: str | None, namespace: str, config: PolicyConfig) -> NetworkPolicyService:
        return cls(NetworkPolicyWriter(api_client_from(kubeconfig), namespace, config))

    def startService(self) -> None:
        Service.startService(self)
        self.writer.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.writer.stop()
