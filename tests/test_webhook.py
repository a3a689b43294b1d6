"""The admission webhook, driven over in-memory HTTP exactly as the API server would call it.

Each test posts an AdmissionReview v1 to the Klein resource through ``treq.testing.StubTreq``
(no sockets) and checks what the API server would do with the answer: apply the JSON patch
(with the ``jsonpatch`` library, RFC 6902 semantics), reject with our message, or show warnings.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any, Callable

import jsonpatch  # type: ignore[import-untyped]
import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from treq.testing import StubTreq

from kubedock_dns.admission.review import WebhookConfig, review
from kubedock_dns.admission.service import WebhookApp

NETWORK_ID = "4f2a" * 16
CONFIG = WebhookConfig(nameserver_ip="10.96.0.53", cluster_domain="cluster.local", ndots=5)
EXPECTED_DNS_CONFIG = {
    "nameservers": ["10.96.0.53"],
    "searches": ["team-a.svc.cluster.local", "svc.cluster.local", "cluster.local"],
    "options": [{"name": "ndots", "value": "5"}],
}


def pod(
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A pod as kubedock creates it, opted in and on one network unless told otherwise."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "db",
            "namespace": "team-a",
            "labels": {"kubedock": "true", "kubedock.containerid": "0123456789ab"}
            if labels is None
            else labels,
            "annotations": {
                "kubedock.hostalias/0": "db",
                "kubedock.hostalias/1": "postgres",
                "kubedock.network/0": NETWORK_ID,
                "kubedock.containername": "/my_db",
            }
            if annotations is None
            else annotations,
        },
        "spec": {
            "containers": [{"name": "main", "image": "postgres:16"}],
            "restartPolicy": "Never",
            "dnsPolicy": "ClusterFirst",
            **spec,
        },
    }


def admission_review(
    operation: str,
    obj: dict[str, Any] | None,
    old: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "db",
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:team-a:kubedock"},
            "object": obj,
            "oldObject": old,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred already has (StubTreq answers synchronously)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the deferred has no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Client:
    """The API server's side of the webhook, over in-memory HTTP."""

    def __init__(self, ready: Callable[[], bool] = lambda: True) -> None:
        self.treq: Any = StubTreq(WebhookApp(CONFIG, ready=ready).resource())

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, str, bytes]:
        response = result_of(self.treq.request(method, "https://webhook.example" + path, data=body))
        content = result_of(self.treq.content(response))
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, content_type, content

    def post_review(self, document: Any) -> dict[str, Any]:
        """The AdmissionResponse for an AdmissionReview that must be well formed."""
        code, content_type, body = self.request("POST", "/mutate", json.dumps(document).encode())
        assert (code, content_type) == (200, "application/json"), body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == document["request"]["uid"]
        return answer["response"]  # type: ignore[no-any-return]


@pytest.fixture
def client() -> Client:
    return Client()


def admitted(response: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """The pod the API server stores: the object with the response's JSON patch applied."""
    assert response["allowed"] is True, response
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, patch)  # type: ignore[no-any-return]


# -- mutation --------------------------------------------------------------------------------------


def test_create_without_dns_config_gets_policy_none_and_our_dns_config(client: Client) -> None:
    """An opted-in pod without dnsConfig is stored with dnsPolicy None and a dnsConfig naming only
    the kubedock-dns Service IP, the namespace's cluster search list and ndots; nothing else in the
    pod changes."""
    obj = pod()
    response = client.post_review(admission_review("CREATE", obj))
    stored = admitted(response, copy.deepcopy(obj))
    expected = copy.deepcopy(obj)
    expected["spec"]["dnsPolicy"] = "None"
    expected["spec"]["dnsConfig"] = EXPECTED_DNS_CONFIG
    assert stored == expected
    assert "warnings" not in response


def test_create_with_dns_config_replaces_ours_and_keeps_other_options(client: Client) -> None:
    """A pod that already has a dnsConfig gets our nameservers, searches and ndots in place of its
    own, while its other resolver options are kept."""
    obj = pod(
        dnsPolicy="ClusterFirstWithHostNet",
        dnsConfig={
            "nameservers": ["8.8.8.8"],
            "searches": ["example.org"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}, {"name": "timeout", "value": "3"}],
        },
    )
    stored = admitted(client.post_review(admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert stored["spec"]["dnsPolicy"] == "None"
    assert stored["spec"]["dnsConfig"] == {
        "nameservers": ["10.96.0.53"],
        "searches": ["team-a.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        "options": [{"name": "ndots", "value": "5"}, {"name": "edns0"}, {"name": "timeout", "value": "3"}],
    }


def test_create_with_empty_dns_config_and_no_dns_policy(client: Client) -> None:
    """A pod with an empty dnsConfig and no dnsPolicy field at all ends up with the same settings."""
    obj = pod(dnsConfig={})
    del obj["spec"]["dnsPolicy"]
    stored = admitted(client.post_review(admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert stored["spec"]["dnsPolicy"] == "None"
    assert stored["spec"]["dnsConfig"] == EXPECTED_DNS_CONFIG


def test_create_already_configured_pod_gets_no_patch(client: Client) -> None:
    """Reinvoking the webhook on a pod that already has our DNS settings changes nothing."""
    obj = pod(dnsPolicy="None", dnsConfig=copy.deepcopy(EXPECTED_DNS_CONFIG))
    response = client.post_review(admission_review("CREATE", obj))
    assert response == {"uid": response["uid"], "allowed": True}


def test_search_list_follows_namespace_and_cluster_domain() -> None:
    """The search list is built from the pod's namespace and the configured cluster domain, and
    the nameserver IP is canonicalised."""
    config = WebhookConfig(nameserver_ip="fd00:0::53", cluster_domain="Corp.Example.", ndots=2)
    obj = pod()
    obj["metadata"]["namespace"] = "ci"
    request = admission_review("CREATE", obj)
    request["request"]["namespace"] = "ci"
    status, answer = review(json.dumps(request).encode(), config)
    assert status == 200
    stored = admitted(answer["response"], obj)
    assert stored["spec"]["dnsConfig"] == {
        "nameservers": ["fd00::53"],
        "searches": ["ci.svc.corp.example", "svc.corp.example", "corp.example"],
        "options": [{"name": "ndots", "value": "2"}],
    }


def test_config_rejects_bad_values_with_the_value() -> None:
    """A configuration mistake is reported with the offending value."""
    with pytest.raises(ValueError, match="'kubedock-dns'"):
        WebhookConfig(nameserver_ip="kubedock-dns")
    with pytest.raises(ValueError, match="ndots .* 16"):
        WebhookConfig(nameserver_ip="10.0.0.1", ndots=16)
    with pytest.raises(ValueError, match="cluster_domain"):
        WebhookConfig(nameserver_ip="10.0.0.1", cluster_domain="a..b")


def test_pod_without_networks_is_mutated_with_a_warning(client: Client) -> None:
    """An opted-in pod with no network annotation is admitted and mutated, with a warning saying
    that no other pod can resolve its names."""
    obj = pod(annotations={"kubedock.hostalias/0": "loner"})
    response = client.post_review(admission_review("CREATE", obj))
    assert admitted(response, copy.deepcopy(obj))["spec"]["dnsConfig"] == EXPECTED_DNS_CONFIG
    [warning] = response["warnings"]
    assert "kubedock.network/N" in warning
    assert "no other pod can resolve its names" in warning
    assert "team-a/db" in warning


# -- pods that are not ours ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [{}, {"kubedock": "false"}, {"kubedock": "True"}, {"app": "web"}],
    ids=["no-labels", "false", "wrong-case", "other-label"],
)
def test_pods_not_opted_in_are_allowed_untouched(client: Client, labels: dict[str, str]) -> None:
    """A pod whose opt-in label is not exactly "true" is allowed with no patch and no warning,
    even if it carries kubedock-like annotations or hostNetwork."""
    obj = pod(labels=labels, annotations={"kubedock.network/x": "!!"}, hostNetwork=True)
    response = client.post_review(admission_review("CREATE", obj))
    assert response == {"uid": response["uid"], "allowed": True}


def test_custom_opt_in_label() -> None:
    """With a configured opt-in label, only that label opts a pod in."""
    config = WebhookConfig(nameserver_ip="10.96.0.53", opt_in_label="example.com/dns")
    ours = pod(labels={"example.com/dns": "true"})
    status, answer = review(json.dumps(admission_review("CREATE", ours)).encode(), config)
    assert status == 200 and "patch" in answer["response"]
    theirs = pod()  # labelled kubedock=true, which is not the configured label
    status, answer = review(json.dumps(admission_review("CREATE", theirs)).encode(), config)
    assert status == 200 and answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}


def test_delete_is_allowed(client: Client) -> None:
    """Deleting an opted-in pod is always allowed."""
    request = admission_review("DELETE", None, old=pod())
    response = client.post_review(request)
    assert response == {"uid": response["uid"], "allowed": True}


# -- validation on CREATE --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"kubedock.network/0": "net work"}, ["kubedock.network/0", "'net work'", "network ID"]),
        ({"kubedock.network/first": "n1"}, ["'kubedock.network/first'", "'first'", "index"]),
        ({"kubedock.network/1": ""}, ["'kubedock.network/1'", "must name a network"]),
    ],
    ids=["bad-network", "network-index", "empty-network"],
)
def test_malformed_network_annotations_are_refused_naming_key_and_value(
    client: Client, annotations: dict[str, str], expected: list[str]
) -> None:
    """A pod whose network annotations are malformed (kubedock never writes such) is refused with
    code 400 and a message naming the pod, the annotation and its value."""
    base = {"kubedock.hostalias/0": "db", "kubedock.network/0": NETWORK_ID}
    response = client.post_review(admission_review("CREATE", pod(annotations={**base, **annotations})))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    message = response["status"]["message"]
    assert message.startswith("pod team-a/db: ")
    for fragment in expected:
        assert fragment in message
    assert "remove or correct this annotation" in message
    assert "patch" not in response


@pytest.mark.parametrize(
    ("annotations", "labels", "expected"),
    [
        ({"kubedock.hostalias/1": "db:5432"}, {}, ["kubedock.hostalias/1='db:5432'", "':' is not allowed"]),
        ({"kubedock.hostalias/1": "a" * 64}, {}, ["kubedock.hostalias/1", "64 characters", "63"]),
        ({"kubedock.containername": "/" + "c" * 70}, {}, ["kubedock.containername", "70 characters"]),
        ({"kubedock.hostalias/0": "-db"}, {}, ["kubedock.hostalias/0='-db'", "it starts with '-'"]),
        ({"kubedock.containername": "/my db"}, {}, ["kubedock.containername='my db'"]),
        ({}, {"kubedock.containerid": "_bad"}, ["kubedock.containerid='_bad'"]),
        ({"kubedock.hostalias/x": "db2"}, {}, ["kubedock.hostalias/x='db2'", "is not an index"]),
    ],
    ids=["alias-with-port", "long-alias", "long-container-name", "leading-dash", "space", "container-id",
         "alias-key"],
)
def test_names_that_cannot_be_dns_names_are_admitted_with_a_warning(
    client: Client, annotations: dict[str, str], labels: dict[str, str], expected: list[str]
) -> None:
    """Docker runs a container whose name or alias cannot be a DNS name (it just cannot be found
    by it), so the webhook admits and mutates the pod, with one warning naming the container, the
    annotation, the value and why, in at most the 256 characters the API server passes whole."""
    base = {"kubedock.hostalias/0": "db", "kubedock.network/0": NETWORK_ID,
            "kubedock.containername": "/my_db"}
    obj = pod(annotations={**base, **annotations},
              labels={"kubedock": "true", "kubedock.containerid": "0123456789ab", **labels})
    response = client.post_review(admission_review("CREATE", obj))
    stored = admitted(response, copy.deepcopy(obj))
    assert stored["spec"]["dnsConfig"] == EXPECTED_DNS_CONFIG
    [warning] = response["warnings"]
    container = obj["metadata"]["annotations"]["kubedock.containername"].lstrip("/")
    assert warning.startswith(f"container '{container[:20]}")
    assert "pod team-a/db" in warning
    for fragment in expected:
        assert fragment in warning
    assert "cannot be a DNS name" in warning and len(warning) <= 256


def test_copied_container_labels_are_left_alone(client: Client) -> None:
    """kubedock copies the container's labels into annotations (org.testcontainers.* and any
    key or value): the pod is admitted with no warning, and the patch touches only the DNS
    settings."""
    copied = {"org.testcontainers": "true", "org.testcontainers.sessionId": "2f0c-11ef",
              "org.testcontainers.copied_files.hash": "x" * 300,
              "com.example/description": "a db: with spaces, colons & 'quotes'",
              "kubedock.hostalias": "not an index key", "empty": ""}
    obj = pod()
    obj["metadata"]["annotations"].update(copied)
    response = client.post_review(admission_review("CREATE", obj))
    assert "warnings" not in response
    stored = admitted(response, copy.deepcopy(obj))
    assert stored["metadata"] == obj["metadata"]
    assert {k: v for k, v in stored["spec"].items() if k not in ("dnsPolicy", "dnsConfig")} == {
        k: v for k, v in obj["spec"].items() if k not in ("dnsPolicy", "dnsConfig")}


def test_host_network_opt_in_is_refused(client: Client) -> None:
    """An opted-in pod with hostNetwork: true is refused with code 403 saying why and what to do."""
    response = client.post_review(admission_review("CREATE", pod(hostNetwork=True)))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert "pod team-a/db" in message and "hostNetwork: true" in message
    assert "remove hostNetwork" in message


def test_generated_name_is_described(client: Client) -> None:
    """A pod created with generateName (no name yet) is named by its prefix in messages."""
    obj = pod(hostNetwork=True)
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "db-"
    request = admission_review("CREATE", obj)
    del request["request"]["name"]
    response = client.post_review(request)
    assert "pod team-a/db-<generated>" in response["status"]["message"]


# -- UPDATE ----------------------------------------------------------------------------------------


def changed(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = pod(dnsPolicy="None", dnsConfig=copy.deepcopy(EXPECTED_DNS_CONFIG))
    mutate(obj)
    return obj


def _set_annotation(key: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        annotations = obj["metadata"]["annotations"]
        if value is None:
            del annotations[key]
        else:
            annotations[key] = value
    return mutate


def _set_label(key: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        labels = obj["metadata"]["labels"]
        if value is None:
            del labels[key]
        else:
            labels[key] = value
    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set_annotation("kubedock.network/0", "b" * 64), "annotation 'kubedock.network/0' changed from"),
        (_set_annotation("kubedock.network/1", "other"), "annotation 'kubedock.network/1' added ('other')"),
        (_set_annotation("kubedock.hostalias/1", None), "annotation 'kubedock.hostalias/1' removed (was 'postgres')"),
        (_set_annotation("kubedock.hostalias/0", "cache"), "from 'db' to 'cache'"),
        (_set_label("kubedock", None), "label 'kubedock' removed (was 'true')"),
        (_set_label("kubedock", "false"), "label 'kubedock' changed from 'true' to 'false'"),
    ],
    ids=["network-changed", "network-added", "alias-removed", "alias-changed", "label-removed", "label-false"],
)
def test_update_changing_the_contract_is_refused(
    client: Client, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """On UPDATE, any change to network or alias annotations or to the opt-in label is refused
    with code 403, naming the change and telling the user to recreate the pod."""
    old = changed(lambda obj: None)
    response = client.post_review(admission_review("UPDATE", changed(mutate), old=old))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert message.startswith("pod team-a/db: ")
    assert expected in message
    assert "delete the pod and create it again" in message


def test_update_adding_the_opt_in_label_is_refused(client: Client) -> None:
    """A pod created without the opt-in label cannot be opted in later: it never got our DNS."""
    old = pod(labels={})
    new = pod(labels={"kubedock": "true"})
    response = client.post_review(admission_review("UPDATE", new, old=old))
    assert response["allowed"] is False
    assert "label 'kubedock' added ('true')" in response["status"]["message"]


@pytest.mark.parametrize(
    "mutate",
    [
        _set_label("app", "web"),
        _set_label("kubedock.containerid", None),
        _set_annotation("kubedock.containername", "/renamed"),
        _set_annotation("example.com/owner", "ci"),
        lambda obj: obj["metadata"].update(finalizers=[], deletionTimestamp="2025-01-01T00:00:00Z"),
        lambda obj: obj["spec"]["containers"][0].update(image="postgres:17"),
    ],
    ids=["add-label", "remove-id-label", "container-name", "other-annotation", "finalizers", "image"],
)
def test_update_of_anything_else_is_allowed_without_patch(
    client: Client, mutate: Callable[[dict[str, Any]], None]
) -> None:
    """Every change outside the network/alias annotations and the opt-in label is allowed, and an
    UPDATE is never patched."""
    response = client.post_review(
        admission_review("UPDATE", changed(mutate), old=changed(lambda obj: None))
    )
    assert response == {"uid": response["uid"], "allowed": True}


def test_update_of_a_pod_with_preexisting_bad_annotations_is_allowed(client: Client) -> None:
    """A pod admitted while the webhook was absent, with annotations we would refuse, can still be
    updated (e.g. to drop a finalizer) as long as those annotations do not change."""
    bad = _set_annotation("kubedock.network/0", "not a network")

    def drop_finalizer(obj: dict[str, Any]) -> None:
        bad(obj)
        obj["metadata"]["finalizers"] = []

    old = changed(bad)
    old["metadata"]["finalizers"] = ["example.com/keep"]
    response = client.post_review(admission_review("UPDATE", changed(drop_finalizer), old=old))
    assert response["allowed"] is True


# -- dry run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "obj", "old"),
    [
        ("CREATE", pod(), None),
        ("CREATE", pod(hostNetwork=True), None),
        ("CREATE", pod(annotations={"kubedock.hostalias/0": "x"}), None),
        ("UPDATE", pod(labels={"kubedock": "false"}), pod()),
    ],
    ids=["mutated", "refused", "warned", "update-refused"],
)
def test_dry_run_gets_the_same_answer(
    client: Client, operation: str, obj: dict[str, Any], old: dict[str, Any] | None
) -> None:
    """A dry-run request gets exactly the answer of the real one, and asking twice changes nothing:
    the webhook keeps no state."""
    real = client.post_review(admission_review(operation, obj, old))
    dry = client.post_review(admission_review(operation, obj, old, dry_run=True))
    again = client.post_review(admission_review(operation, obj, old))
    assert real == dry == again


# -- malformed requests ----------------------------------------------------------------------------


def _without(path: list[str]) -> bytes:
    document = admission_review("CREATE", pod())
    target = document
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return json.dumps(document).encode()


def _with(path: list[str], value: Any) -> bytes:
    document = admission_review("CREATE", pod())
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "got a JSON list"),
        (_with(["kind"], "ConversionReview"), "kind must be 'AdmissionReview' (got 'ConversionReview')"),
        (_with(["apiVersion"], "admission.k8s.io/v1beta1"), "admissionReviewVersions: [v1]"),
        (_without(["request"]), "AdmissionReview.request must be a JSON object (got null)"),
        (_with(["request"], "x"), "AdmissionReview.request must be a JSON object (got str)"),
        (_without(["request", "uid"]), "request.uid must be a non-empty string"),
        (_with(["request", "uid"], 7), "request.uid must be a non-empty string (got 7)"),
        (_with(["request", "kind"], {"group": "apps", "version": "v1", "kind": "Deployment"}),
         "request.kind must be the core Pod kind"),
        (_with(["request", "operation"], "PATCH"), "request.operation must be"),
        (_with(["request", "object"], None), "request.object must be a JSON object (got null)"),
        (_with(["request", "object", "kind"], "Service"), "request.object must be a v1 Pod"),
        (_with(["request", "object", "metadata"], []), "request.object.metadata must be a JSON object"),
        (_with(["request", "object", "metadata", "labels"], {"kubedock": True}),
         "request.object.metadata.labels must map strings to strings"),
        (_with(["request", "object", "metadata", "annotations"], ["a"]),
         "request.object.metadata.annotations must map strings to strings"),
        (_with(["request", "object", "spec"], None), "request.object.spec must be a JSON object"),
        (_with(["request", "operation"], "UPDATE"), "request.oldObject must be a JSON object"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None,
)
def test_malformed_requests_get_400_with_the_reason(client: Client, body: bytes, reason: str) -> None:
    """A body that is not an AdmissionReview v1 about a Pod gets HTTP 400 with a plain-text reason
    saying what is wrong; it never crashes the webhook."""
    code, content_type, text = client.request("POST", "/mutate", body)
    assert code == 400
    assert content_type.startswith("text/plain")
    assert reason in text.decode()


def test_missing_namespace_is_malformed(client: Client) -> None:
    """Without a namespace the search list cannot be built: HTTP 400 says so."""
    document = admission_review("CREATE", pod())
    del document["request"]["namespace"]
    del document["request"]["object"]["metadata"]["namespace"]
    code, _, text = client.request("POST", "/mutate", json.dumps(document).encode())
    assert (code, text) == (400, b"request.namespace is missing; pods are namespaced\n")


def test_review_returns_a_status_for_malformed_bodies() -> None:
    """The pure function answers a malformed body with 400 and a v1 Status document."""
    assert review(b"nope", CONFIG) == (
        400,
        {
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "code": 400,
            "reason": "BadRequest",
            "message": review(b"nope", CONFIG)[1]["message"],
        },
    )


def test_mutate_only_accepts_post(client: Client) -> None:
    """GET /mutate is not a review: 405."""
    code, _, _ = client.request("GET", "/mutate")
    assert code == 405


# -- health ----------------------------------------------------------------------------------------


def test_healthz_is_always_ok(client: Client) -> None:
    """/healthz answers 200 "ok" whenever the process serves HTTP."""
    assert Client(ready=lambda: False).request("GET", "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")


def test_readyz_follows_the_readiness_callable() -> None:
    """/readyz answers 200 when the readiness callable returns True, 503 when it returns anything
    else or raises."""
    state = {"ready": False}
    client = Client(ready=lambda: state["ready"])
    assert client.request("GET", "/readyz")[0] == 503
    state["ready"] = True
    assert client.request("GET", "/readyz") == (200, "text/plain; charset=utf-8", b"ok\n")

    def broken() -> bool:
        raise RuntimeError("boom")

    assert Client(ready=broken).request("GET", "/readyz")[0] == 503
