"""The NetworkPolicies of ``--network-policies``: their shape, and what to change to reach it.

Contract (pure: no Twisted, no kubernetes client; :class:`kubedock_dns.kube.policy_writer.NetworkPolicyWriter`
does the API calls):

- :func:`base_policy` is the namespace's one *isolation* policy: it selects every opted-in pod
  (``<opt-in label>: "true"``) for ingress and lets in only kubedock's own pods (selected by
  ``kubedock_selector``; empty: none).  Policies add up, so it is both the default deny that holds
  from a pod's first moment (the pod carries the opt-in label when it is created, before any
  per-network policy may exist) and kubedock's way in (reverse-proxy mode dials pod IPs from
  kubedock's pod).  The chart renders it; the server creates it at start-up if it is missing.
- :func:`network_policy` is one network's policy: it selects the pods labelled for the network
  (:func:`kubedock_dns.contract.network_label_key`) and admits ingress from pods with the same
  label, every port.  A pod on several networks is selected by several policies: reachable from
  each of them.  Every network policy is owned (``ownerReferences``) by the isolation policy, so
  that deleting the latter (``helm upgrade`` turning the mode off, ``helm uninstall``) makes the
  cluster's garbage collector delete them all, without kubedock-dns holding any permission then.
- :class:`Membership` follows the watcher's changes to the set of networks wanted: those of pods
  that are Pending or Running (a pod being deleted still counts until it is gone).  :func:`plan` compares the wanted
  manifests with the managed policies listed from the API (``MANAGED_SELECTOR``) and says what to
  create, replace and delete; it never touches a policy without the managed-by label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from kubedock_dns.contract import (
    NETWORK_LABEL_PREFIX, PHASES_ASKING, Change, Deleted, PodRecord, Relisted, Upserted, network_label_key,
)

MANAGED_BY = {"app.kubernetes.io/managed-by": "kubedock-dns", "app.kubernetes.io/component": "network-isolation"}
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
NETWORK_POLICY_PREFIX = "kubedock-dns-net-"
DEFAULT_BASE_NAME = "kubedock-dns-isolation"


@dataclass(frozen=True)
class PolicyConfig:
    """What shapes the policies: the opt-in label, kubedock's own pods, the isolation policy's name."""

    opt_in_label: str = "kubedock"
    kubedock_selector: Mapping[str, str] = field(default_factory=dict)
    base_name: str = DEFAULT_BASE_NAME


def parse_selector(text: str) -> dict[str, str]:
    """``key=value[,key=value...]`` as a dict; ValueError naming the bad part."""
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not key=value (e.g. app.kubernetes.io/name=kubedock)")
        selector[key.strip()] = value.strip()
    return selector


def base_policy(config: PolicyConfig) -> dict[str, Any]:
    """The isolation policy (see the module docstring)."""
    ingress = [{"from": [{"podSelector": {"matchLabels": dict(config.kubedock_selector)}}]}] \
        if config.kubedock_selector else []
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": config.base_name, "labels": dict(MANAGED_BY)},
        "spec": {
            "podSelector": {"matchLabels": {config.opt_in_label: "true"}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def policy_name(network: str) -> str:
    """``kubedock-dns-net-`` and the short form of the network's label key (a valid object name)."""
    return NETWORK_POLICY_PREFIX + network_label_key(network)[len(NETWORK_LABEL_PREFIX):]


def network_policy(network: str, owner: Mapping[str, str]) -> dict[str, Any]:
    """``network``'s policy, owned by the isolation policy ``owner`` (``name`` and ``uid``)."""
    label = {network_label_key(network): "true"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": policy_name(network),
            "labels": dict(MANAGED_BY),
            "annotations": {"kubedock-dns.net/network": network},
            "ownerReferences": [{
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "name": owner["name"], "uid": owner["uid"],
            }],
        },
        "spec": {
            "podSelector": {"matchLabels": dict(label)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": dict(label)}}]}],
        },
    }


class Membership:
    """Which networks have pods, followed from the watcher's changes.

    Kept apart from the name index because that one drops ``--unresolved-network`` networks
    (kubedock's default bridge): their names never resolve, but as on Docker's bridge their
    pods still reach each other, so they need a policy too.
    """

    def __init__(self) -> None:
        self._networks: dict[str, tuple[str, ...]] = {}
        self.synced = False

    def apply(self, changes: Iterable[Change]) -> None:
        for change in changes:
            if isinstance(change, Relisted):
                self._networks = {r.uid: r.networks for r in change.records if _counts(r)}
                self.synced = True
            elif isinstance(change, Upserted):
                if _counts(change.record):
                    self._networks[change.record.uid] = change.record.networks
                else:
                    self._networks.pop(change.record.uid, None)
            elif isinstance(change, Deleted):
                self._networks.pop(change.uid, None)

    def networks(self) -> frozenset[str]:
        return frozenset(n for networks in self._networks.values() for n in networks)


def _counts(record: PodRecord) -> bool:
    return bool(record.networks) and record.phase in PHASES_ASKING and not record.host_network


@dataclass(frozen=True)
class Plan:
    create: tuple[dict[str, Any], ...] = ()
    replace: tuple[dict[str, Any], ...] = ()
    delete: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.create or self.replace or self.delete)


def plan(wanted: Iterable[dict[str, Any]], existing: Iterable[Mapping[str, Any]], keep: Iterable[str] = ()) -> Plan:
    """What turns the managed policies ``existing`` (as listed) into ``wanted``; names in
    ``keep`` (the isolation policy) are never deleted."""
    current = {p["metadata"]["name"]: p for p in existing}
    want = {p["metadata"]["name"]: p for p in wanted}
    create = tuple(p for name, p in sorted(want.items()) if name not in current)
    replace = tuple(
        p for name, p in sorted(want.items())
        if name in current and (
            current[name].get("spec") != p["spec"]
            or _owners(current[name]) != _owners(p)
        )
    )
    delete = tuple(sorted(set(current) - set(want) - set(keep)))
    return Plan(create, replace, delete)


def _owners(policy: Mapping[str, Any]) -> list[str]:
    return sorted(o.get("uid", "") for o in (policy.get("metadata") or {}).get("ownerReferences") or ())
