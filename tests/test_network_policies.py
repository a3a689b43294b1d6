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


@pytest.fixture(scope="module")
def bed(control_plane):
    from testbed.bed import EndToEndBed

    with EndToEndBed(control_plane=control_plane, dataplane="loopback", namespace_prefix="netpol",
                     server_args=["--network-policies"]) as bed:
        yield bed


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
    letting nothing in, so a pod is isolated from its first moment."""
    def check():
        base = policies(bed)["kubedock-dns-isolation"]
        assert base["spec"]["podSelector"] == {"matchLabels": {"kubedock": "true"}}
        assert base["spec"]["policyTypes"] == ["Ingress"]
        assert not base["spec"].get("ingress")
    eventually(check)


def test_one_policy_per_network_with_pods_and_none_once_its_pods_are_gone(bed):
    """Networks A and B with pods (one pod on both) get one policy each: the network's pods,
    ingress from the network's pods only, owned by the isolation policy; deleting A's pods
    removes A's policy and leaves B's; a policy somebody else made is never touched."""
    from kubernetes.client import NetworkingV1Api

    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    NetworkingV1Api(bed.core.api_client).create_namespaced_network_policy(bed.namespace, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "users-own"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    a, b = new_network_id(), new_network_id()
    only_a = bed.create_kubedock_pod("only-a", [a])
    both = bed.create_kubedock_pod("both-ab", [a, b])

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
    bed.delete_pod(only_a)
    bed.delete_pod(both)

    def a_gone():
        found = policies(bed)
        assert policy_name(a) not in found and policy_name(b) not in found
        assert "users-own" in found and "kubedock-dns-isolation" in found
    eventually(a_gone)


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


def test_once_the_isolation_policy_is_deleted_nothing_is_written_again(bed):
    """Deleting the isolation policy is how the mode is turned off (helm deletes it; the garbage
    collector then removes the policies it owns): a replica still running must not undo that, so it
    neither re-creates it nor writes a policy for a new network.  (Last: it turns the mode off.)"""
    from kubernetes.client import NetworkingV1Api

    from kubedock_dns.kube.policies import policy_name
    from testbed.bed import new_network_id

    NetworkingV1Api(bed.core.api_client).delete_namespaced_network_policy("kubedock-dns-isolation", bed.namespace)
    network = new_network_id()
    bed.create_kubedock_pod("late", [network], wait=False)
    time.sleep(3)  # the writer reacts to a new network within a fraction of a second (see above)
    found = policies(bed)
    assert "kubedock-dns-isolation" not in found and policy_name(network) not in found
    assert "deleted (network policies turned off?)" in bed.server_log(200)


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
        deadline = time.monotonic() + 20
        while writer.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.errors >= 1
        first = writer.errors
        time.sleep(2.0)
        assert writer.errors - first <= 2  # retries after 1 s and 2 s at most; a tight loop makes hundreds
        assert writer.reconciles == 0
    finally:
        writer.stop()
        assert writer.join(15)
        api_client.close()
