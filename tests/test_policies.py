"""The pure shapes of --network-policies (kubedock_dns.kube.policies): manifests, membership, plan."""

from __future__ import annotations

import re

import pytest

from kubedock_dns.contract import Deleted, PodRecord, Relisted, Upserted, network_label_key
from kubedock_dns.kube.policies import (
    Membership, PolicyConfig, base_policy, network_policy, parse_selector, plan, policy_name,
)

A, B = "a1" * 32, "b2" * 32
OWNER = {"name": "kubedock-dns-isolation", "uid": "u-1"}
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def record(uid, networks, phase="Running"):
    return PodRecord(uid=uid, ips=("10.0.0.1",), networks=networks, phase=phase)


def test_base_policy_denies_all_ingress_to_opted_in_pods_but_kubedock():
    """Without a kubedock selector nothing may enter; with one, only kubedock's pods."""
    closed = base_policy(PolicyConfig(opt_in_label="kd"))
    assert closed["spec"] == {"podSelector": {"matchLabels": {"kd": "true"}}, "policyTypes": ["Ingress"],
                              "ingress": []}
    opened = base_policy(PolicyConfig(kubedock_selector={"app.kubernetes.io/name": "kubedock"}))
    assert opened["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubedock"}}}]}]


def test_network_policy_admits_only_its_network_and_is_owned_by_the_base():
    policy = network_policy(A, OWNER)
    label = {"matchLabels": {network_label_key(A): "true"}}
    assert policy["spec"]["podSelector"] == label
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": label}]}]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-1"


@pytest.mark.parametrize("network", [A, "my-net", "UPPER_case.net"])
def test_policy_names_are_valid_object_names(network):
    assert _OBJECT_NAME.match(policy_name(network)) and len(policy_name(network)) <= 63


def test_membership_follows_relists_upserts_deletes_and_finished_pods():
    """A network is wanted while a Pending or Running pod is on it, whatever its name resolution."""
    m = Membership()
    m.apply([Upserted(record("1", (A,)))])
    assert not m.synced
    m.apply([Relisted((record("1", (A,)), record("2", (A, B), phase="Pending")))])
    assert m.synced and m.networks() == {A, B}
    m.apply([Upserted(record("2", (A, B), phase="Succeeded"))])
    assert m.networks() == {A}
    m.apply([Deleted("1")])
    assert m.networks() == frozenset()


def test_plan_creates_missing_replaces_changed_deletes_unwanted_and_keeps_the_base():
    wanted = [network_policy(A, OWNER), network_policy(B, OWNER)]
    stale = network_policy(B, {"name": "old", "uid": "u-0"})
    gone = network_policy("c3" * 32, OWNER)
    existing = [stale, gone, base_policy(PolicyConfig())]
    todo = plan(wanted, existing, keep=["kubedock-dns-isolation"])
    assert [p["metadata"]["name"] for p in todo.create] == [policy_name(A)]
    assert [p["metadata"]["name"] for p in todo.replace] == [policy_name(B)]
    assert todo.delete == (policy_name("c3" * 32),)
    assert not plan(wanted, wanted)


def test_parse_selector_names_the_bad_part():
    assert parse_selector("app=kubedock, tier=ci") == {"app": "kubedock", "tier": "ci"}
    assert parse_selector("") == {}
    with pytest.raises(ValueError, match="'app'"):
        parse_selector("app")
