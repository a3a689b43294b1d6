"""--network-policies against the real API server, which itself calls the webhook over TLS.

``twistd kubedock-dns --network-policies`` runs as a subprocess (testbed.bed.EndToEndBed on the
loopback data plane, the kubelet stand-in running pods); what the API server stores is read back.
"""

from __future__ import annotations

import json
import time

import pytest

from kubedock_dns.contract import network_label_key

pytestmark = pytest.mark.controlplane


def policy_bed(control_plane, prefix):
    """kubedock-dns with --network-policies on a fresh namespace, on the loopback data plane."""
    from testbed.bed import EndToEndBed

    return EndToEndBed(control_plane=control_plane, dataplane="loopback", namespace_prefix=prefix,
                       server_args=["--network-policies"])


@pytest.fixture(scope="module")
def bed(control_plane):
    """The bed the tests share, in any order (none turns the mode off here: that test has a bed
    of its own).  ``bed.first_policies`` holds the namespace's policies as first seen after
    start-up, before any pod exists (the server writes the isolation policy at its first pass)."""
    with policy_bed(control_plane, "netpol") as bed:
        assert bed.core.list_namespaced_pod(bed.namespace).items == []
        bed.first_policies = eventually(lambda: with_isolation_policy(policies(bed)))
        bed.pods_when_first_seen = [p.metadata.name for p in bed.core.list_namespaced_pod(bed.namespace).items]
        yield bed


def with_isolation_policy(found):
    assert "kubedock-dns-isolation" in found
    return found


def network_labels(stored):
    return {k: v for k, v in stored["metadata"]["labels"].items() if k.startswith("kubedock-dns.net/")}


def test_the_api_server_stores_one_label_per_network(bed):
    """A pod on two networks is stored with both network labels; a pod not opted in with none."""
    from testbed.bed import new_network_id

    a, b = new_network_id(), new_network_id()
    pod = bed.create_kubedock_pod("both", [a, b], wait=False)
    assert network_labels(bed.stored_pod(pod)) == {network_label_key(a): "true", network_label_key(b): "true"}
    plain = bed.create_kubedock_pod("plain", [a], opt_in=False, wait=False)
    assert network_labels(bed.stored_pod(plain)) == {}


def test_the_api_server_refuses_adding_a_network_label_to_a_pod(bed):
    """A pod cannot join another network's policy later: the update is refused with our reason."""
    from kubernetes.client.exceptions import ApiException

    from testbed.bed import new_network_id

    pod = bed.create_kubedock_pod("joiner", [new_network_id()], wait=False)
    with pytest.raises(ApiException) as caught:
        bed.core.patch_namespaced_pod(pod.name, bed.namespace,
                                      {"metadata": {"labels": {network_label_key(new_network_id()): "true"}}})
    assert "kubedock-dns.net/" in caught.value.body


def policies(bed):
    from kubernetes.client import NetworkingV1Api

    api = NetworkingV1Api(bed.core.api_client)
    listed = json.loads(api.list_namespaced_network_policy(bed.namespace, _preload_content=False).data)
    return {p["metadata"]["name"]: p for p in listed["items"]}


def eventually(check, timeout=20.0):
    """Poll until ``check`` holds: the writer reconciles in its own thread."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_isolation_policy_exists_before_any_pod(bed):
    """At start-up, before the first pod: one policy selecting every opted-in pod for ingress and
    letting nothing in, so a pod is isolated from its first moment.  What the bed saw before any
    test created a pod (the module's tests run in any order), and it is still there."""
    assert bed.pods_when_first_seen == []
    for found in (bed.first_policies, policies(bed)):
        base = found["kubedock-dns-isolation"]
        assert base["spec"]["podSelector"] == {"matchLabels": {"kubedock": "true"}}
        assert base["spec"]["policyTypes"] == ["Ingress"]
        assert not base["spec"].get("ingress")
    assert sorted(bed.first_policies) == ["kubedock-dns-isolation"]  # nothing per network yet


def test_one_policy_per_network_with_pods_and_none_once_its_pods_are_gone(bed):
    """Networks A and B with pods (one pod on both) get one policy each: the network's pods,
    ingress from the network's pods only, owned by the isolation policy; deleting A's pods
    removes A's policy and leaves B's (its pod lives on) unchanged; deleting B's last pod then
    removes B's; a policy somebody else made is never touched."""
    from kubernetes.client import NetworkingV1Api

    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    NetworkingV1Api(bed.core.api_client).create_namespaced_network_policy(bed.namespace, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "users-own"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    a, b = new_network_id(), new_network_id()
    only_a = bed.create_kubedock_pod("only-a", [a])
    both = bed.create_kubedock_pod("both-ab", [a, b])
    only_b = bed.create_kubedock_pod("only-b", [b])

    def both_exist():
        found = policies(bed)
        base_uid = found["kubedock-dns-isolation"]["metadata"]["uid"]
        for network in (a, b):
            policy = found[policy_name(network)]
            label = {"matchLabels": {network_label_key(network): "true"}}
            assert policy["spec"]["podSelector"] == label
            assert policy["spec"]["ingress"] == [{"from": [{"podSelector": label}]}]
            assert [o["uid"] for o in policy["metadata"]["ownerReferences"]] == [base_uid]
    eventually(both_exist)
    kept = policies(bed)[policy_name(b)]["metadata"]["resourceVersion"]
    bed.delete_pod(only_a)
    bed.delete_pod(both)

    def a_gone():
        found = policies(bed)
        assert policy_name(a) not in found
        assert "users-own" in found and "kubedock-dns-isolation" in found
        return found
    found = eventually(a_gone)
    assert found[policy_name(b)]["metadata"]["resourceVersion"] == kept  # B's, untouched, while its pod lives
    bed.delete_pod(only_b)

    def b_gone():
        found = policies(bed)
        assert policy_name(b) not in found
        assert "users-own" in found and "kubedock-dns-isolation" in found
    eventually(b_gone)


def test_a_network_whose_pod_is_pending_already_has_its_policy(bed):
    """The policy follows the pod from its creation, not from its start."""
    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    network = new_network_id()
    bed.create_kubedock_pod("early", [network], wait=False)
    eventually(lambda: policies(bed)[policy_name(network)])


def test_policies_already_as_wanted_are_not_rewritten(bed):
    """A reconcile (triggered by a new network) leaves an unchanged policy's resourceVersion alone:
    no write per network per pod event."""
    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    first, second = new_network_id(), new_network_id()
    bed.create_kubedock_pod("steady", [first], wait=False)
    version = eventually(lambda: policies(bed)[policy_name(first)])["metadata"]["resourceVersion"]
    bed.create_kubedock_pod("newcomer", [second], wait=False)
    eventually(lambda: policies(bed)[policy_name(second)])
    assert policies(bed)[policy_name(first)]["metadata"]["resourceVersion"] == version


def test_once_the_isolation_policy_is_deleted_nothing_is_written_again(control_plane):
    """Deleting the isolation policy is how the mode is turned off (helm deletes it; the garbage
    collector then removes the policies it owns): a replica still running must not undo that, so it
    neither re-creates it nor writes a policy for a new network.  A bed of its own: it turns the
    mode off for its namespace.  The writer's pass that saw the new network is an event (it logs
    that the isolation policy is gone, once, at that pass), and beside it the positive control: the
    same writer did write a new network's policy before."""
    from kubernetes.client import NetworkingV1Api

    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    with policy_bed(control_plane, "netpol-off") as bed:
        early = new_network_id()
        bed.create_kubedock_pod("early", [early], wait=False)
        eventually(lambda: policies(bed)[policy_name(early)])  # the writer writes
        NetworkingV1Api(bed.core.api_client).delete_namespaced_network_policy("kubedock-dns-isolation", bed.namespace)
        network = new_network_id()
        bed.create_kubedock_pod("late", [network])

        def seen_and_passed():
            # the server has the new network, so the writer was told to want it...
            assert network in bed.debug_networks()["networks"]
            # ...and its first pass since the deletion found the isolation policy gone (logged once)
            assert "deleted (network policies turned off?)" in bed.server_log(200)
        eventually(seen_and_passed)
        found = policies(bed)
        assert "kubedock-dns-isolation" not in found and policy_name(network) not in found
        assert policy_name(early) in found  # nothing deleted either: no garbage collector here


def test_the_writer_backs_off_while_the_api_server_refuses(control_plane):
    """Writes that fail (here: a namespace that does not exist) are retried with a growing delay,
    never in a tight loop, and the thread stops when asked."""
    from kubedock_dns.kube.policies import PolicyConfig
    from kubedock_dns.kube.policy_writer import NetworkPolicyWriter

    api_client = control_plane.api_client()
    writer = NetworkPolicyWriter(api_client, "no-such-namespace-for-policies", PolicyConfig())
    writer.start()
    try:
        writer.want(frozenset({"ab" * 32}))
        # When each of the first three failures was seen: the gaps between them are the backoff
        # (1 s, then 2 s).  A loaded machine only lengthens them; polling late can shorten a
        # measured gap by the poll's lag, hence half the backoff as the bound.  A tight loop
        # fails hundreds of times a second.
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            if writer.errors > len(seen):
                seen += [time.monotonic()] * (writer.errors - len(seen))
            time.sleep(0.01)
        assert len(seen) >= 3 and writer.errors == 3, (seen, writer.errors)
        assert seen[1] - seen[0] > 0.5 and seen[2] - seen[1] > 1.0, seen
        assert writer.reconciles == 0
    finally:
        writer.stop()
        assert writer.join(15)
        api_client.close()
