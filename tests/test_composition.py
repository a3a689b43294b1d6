"""The whole composition against the real API server (issue: Kubernetes side).

``twistd -n kubedock-dns --kubeconfig ... --namespace ...`` runs as a subprocess; the API server
itself calls its webhook over TLS (a MutatingWebhookConfiguration with a caBundle and a url); the
kubelet stand-in gives pods their IP and phase through the status subresource; DNS questions
are asked with dnspython from each pod's address (the loopback data plane: 127.0.0.0/8 source
addresses), so this runs without network namespaces.  The end-to-end tests repeat the scenarios
from inside real pod network namespaces with glibc.
"""

from __future__ import annotations

import json
import time

import dns.message
import dns.query
import dns.rcode
import dns.reversename
import pytest

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def bed(control_plane):
    from testbed.bed import EndToEndBed

    with EndToEndBed(control_plane=control_plane, dataplane="loopback",
                     namespace_prefix="composition", server_args=["--hold-timeout", "1.0"]) as bed:
        yield bed


def ask(bed, pod, name, rdtype="A"):
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, "127.0.0.1", port=bed.dns_port, source=pod.ip, timeout=5)


def addresses(response):
    return sorted(r.address for rrset in response.answer for r in rrset)


def eventually(check, timeout=10.0):
    """Poll ``check`` (a DNS observation) until it holds: the watcher delivers asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def raw_pod(bed, name, annotations, labels=None, host_network=False):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"kubedock": "true", **(labels or {})},
                     "annotations": annotations},
        "spec": {"hostNetwork": host_network, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "busybox"}]},
    }


def api_error(bed, body):
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as caught:
        bed.core.create_namespaced_pod(bed.namespace, body=body)
    return caught.value


def test_api_server_stores_opted_in_pods_mutated_by_the_webhook(bed):
    """Pods created through the API carry dnsPolicy None and our nameserver, the namespace's
    search list and ndots; pods without the label are left alone."""
    from testbed.bed import new_network_id

    pod = bed.create_kubedock_pod("mutated", [new_network_id()])
    spec = bed.stored_pod(pod)["spec"]
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == [bed.service_ip]
    assert spec["dnsConfig"]["searches"] == [f"{bed.namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    assert {"name": "ndots", "value": "5"} in spec["dnsConfig"]["options"]
    plain = bed.create_kubedock_pod("plain", [new_network_id()], opt_in=False)
    assert bed.stored_pod(plain)["spec"].get("dnsPolicy") == "ClusterFirst"


def test_bad_network_annotations_and_host_network_are_refused_with_our_message(bed):
    """The client gets an API error naming the bad network annotation and value, or hostNetwork;
    a name that cannot be a DNS name is no reason to refuse: the pod is stored, mutated, and the
    API server passes our warning naming it to the client."""
    error = api_error(bed, raw_pod(bed, "bad-key", {"kubedock.hostalias/0": "db", "kubedock.network/first": "n1"}))
    assert "kubedock.network/first" in error.body
    error = api_error(bed, raw_pod(bed, "hostnet", {"kubedock.hostalias/0": "db", "kubedock.network/0": "n1"},
                                   host_network=True))
    assert "hostNetwork" in error.body
    response = bed.core.create_namespaced_pod(
        bed.namespace, body=raw_pod(bed, "bad-name", {"kubedock.hostalias/0": "no spaces",
                                                      "kubedock.network/0": "n1"}),
        _preload_content=False)
    [warning] = response.headers.getlist("Warning")
    assert "no spaces" in warning and "kubedock.hostalias/0" in warning, warning
    assert json.loads(response.data)["spec"]["dnsPolicy"] == "None"


def admission_counts(bed) -> dict[str, float]:
    """The webhook's counters from the server's /metrics, by short name (outcome=... for reviews)."""
    found = {}
    for key, value in bed.metrics().items():
        if key.startswith("kubedock_dns_admission_reviews_total{"):
            found[key.split('outcome="', 1)[1].split('"', 1)[0]] = value
        elif key in ("kubedock_dns_admission_warnings_total", "kubedock_dns_admission_worker_restarts_total",
                     "kubedock_dns_admission_review_duration_seconds_count"):
            found[key.removeprefix("kubedock_dns_admission_")] = value
    return found


def review_worker_pid(server_pid: int) -> int:
    """The review worker among the server's child processes (it runs
    kubedock_dns.admission.review_process)."""
    import pathlib

    children = pathlib.Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    workers = [int(pid) for pid in children
               if b"kubedock_dns.admission.review_process" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 1, (children, workers)
    return workers[0]


def test_admission_metrics_count_each_answer_the_api_server_gets(bed):
    """Each review the API server sends is counted once in the replica, from the answer the
    worker process rendered: patched pods, a warning, denials, an unchanged UPDATE, a body that is
    no review (posted straight to the webhook), and a 503 when the review worker is stuck (the API
    server then refuses the pod); the next pod is admitted by a new worker."""
    import os
    import signal
    import ssl
    import urllib.error
    import urllib.request

    from testbed.bed import BedError, new_network_id

    before = admission_counts(bed)
    pod = bed.create_kubedock_pod("counted", [new_network_id()])
    bed.core.create_namespaced_pod(bed.namespace, body=raw_pod(bed, "warned", {"kubedock.hostalias/0": "no spaces",
                                                                              "kubedock.network/0": "n1"}))
    api_error(bed, raw_pod(bed, "denied-key", {"kubedock.hostalias/0": "db", "kubedock.network/first": "n1"}))
    api_error(bed, raw_pod(bed, "denied-host", {"kubedock.hostalias/0": "db", "kubedock.network/0": "n1"},
                           host_network=True))
    bed.core.patch_namespaced_pod(pod.name, bed.namespace, {"metadata": {"labels": {"team": "red"}}})
    context = ssl.create_default_context(cadata=bed.tls.ca_pem.decode())
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)).open(
            urllib.request.Request(f"https://127.0.0.1:{bed.webhook_port}/mutate", data=b"not a review",
                                   headers={"content-type": "application/json"}), timeout=10)
    assert rejected.value.code == 400
    # A stuck worker (stopped): the review in flight misses its deadline and is answered 503,
    # the worker is killed and replaced.  (A worker that dies between reviews is replaced before
    # the next one, which no review notices.)
    os.kill(review_worker_pid(bed.server.popen.pid), signal.SIGSTOP)
    with pytest.raises(BedError) as refused:
        bed.create_kubedock_pod("refused", [new_network_id()], wait=False)
    assert "failed to call webhook: the server is currently unable to handle the request" in str(refused.value)
    bed.create_kubedock_pod("after", [new_network_id()])
    after = admission_counts(bed)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert delta == {"allowed": 1, "patched": 3, "denied": 2, "rejected": 1, "unavailable": 1,
                     "warnings_total": 1, "worker_restarts_total": 1, "review_duration_seconds_count": 8}


def test_network_annotations_are_immutable_while_other_updates_pass(bed):
    """Changing a network annotation is refused; an unrelated label change on the same pod works."""
    from kubernetes.client.exceptions import ApiException

    from testbed.bed import new_network_id

    pod = bed.create_kubedock_pod("immutable", [new_network_id()])
    with pytest.raises(ApiException) as caught:
        bed.core.patch_namespaced_pod(pod.name, bed.namespace,
                                      {"metadata": {"annotations": {"kubedock.network/0": new_network_id()}}})
    assert "kubedock.network/0" in caught.value.body
    patched = bed.core.patch_namespaced_pod(pod.name, bed.namespace, {"metadata": {"labels": {"team": "blue"}}})
    assert patched.metadata.labels["team"] == "blue"


def test_watched_pods_resolve_by_network_and_disappear_when_deleted_or_finished(bed):
    """Pods set Running with an IP resolve each other within their network only; deletion and
    phase Succeeded remove them."""
    from testbed.bed import new_network_id

    net_a, net_b = new_network_id(), new_network_id()
    db_a = bed.create_kubedock_pod("db", [net_a])
    svc_a = bed.create_kubedock_pod("service", [net_a])
    db_b = bed.create_kubedock_pod("db", [net_b])
    svc_b = bed.create_kubedock_pod("service", [net_b])

    def resolves():
        assert addresses(ask(bed, svc_a, "db")) == [db_a.ip]
        assert addresses(ask(bed, svc_b, f"db.{bed.namespace}.svc.cluster.local")) == [db_b.ip]
        ptr = ask(bed, svc_a, dns.reversename.from_address(db_a.ip), "PTR")
        assert [r.target.to_text() for r in ptr.answer[0]] == [db_a.container_name.lower() + "."]
    eventually(resolves)
    bed.delete_pod(db_a)
    eventually(lambda: _not_resolved(bed, svc_a, db_a.ip))
    bed.finish(db_b)
    eventually(lambda: _not_resolved(bed, svc_b, db_b.ip))


def _not_resolved(bed, asker, ip):
    assert ip not in addresses(ask(bed, asker, "db"))


def test_api_server_restart_and_expired_resource_version_leave_no_stale_answers(bed):
    """After an API server restart (with etcd compacted, so the old resourceVersion is gone), the
    watcher relists: a pod deleted right after the restart disappears, a new one appears."""
    from testbed.bed import new_network_id

    net = new_network_id()
    old = bed.create_kubedock_pod("old", [net])
    asker = bed.create_kubedock_pod("asker", [net])
    eventually(lambda: _resolved(bed, asker, "old", old.ip))
    relists_before = bed.metrics().get("kubedock_dns_watcher_relists_total", 0)
    bed.control_plane.compact_etcd()
    bed.control_plane.restart_apiserver()
    bed.delete_pod(old)
    new = bed.create_kubedock_pod("new", [net])
    eventually(lambda: _resolved(bed, asker, "new", new.ip), timeout=30)
    eventually(lambda: _not_resolved_name(bed, asker, "old", old.ip), timeout=30)
    assert bed.metrics()["kubedock_dns_watcher_relists_total"] > relists_before


def _resolved(bed, asker, name, ip):
    assert addresses(ask(bed, asker, name)) == [ip]


def _not_resolved_name(bed, asker, name, ip):
    assert ip not in addresses(ask(bed, asker, name))


def test_names_keep_resolving_while_the_api_server_is_down(bed):
    """An API server outage loses nothing: once the server's watcher has failed to reach the API
    server, known pods keep answering from the last state, the server stays ready, and changes
    made after the outage arrive."""
    from testbed.bed import new_network_id

    net = new_network_id()
    db = bed.create_kubedock_pod("db", [net])
    asker = bed.create_kubedock_pod("asker", [net])
    eventually(lambda: _resolved(bed, asker, "db", db.ip))
    errors = bed.metrics().get("kubedock_dns_watcher_errors_total", 0)
    bed.control_plane.stop_apiserver()
    try:
        # The outage as the server sees it: its watcher has failed to reach the API server (an
        # event, not a pause that hopes the outage has begun to matter).
        def outage_noticed():
            assert bed.metrics()["kubedock_dns_watcher_errors_total"] > errors
        eventually(outage_noticed, timeout=60)
        _resolved(bed, asker, "db", db.ip)
        assert bed.ready()
    finally:
        bed.control_plane.start_apiserver()
    late = bed.create_kubedock_pod("late", [net])
    eventually(lambda: _resolved(bed, asker, "late", late.ip), timeout=30)
