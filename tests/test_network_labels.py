"""--network-policies at admission: one label per network on every opted-in pod.

Driven like tests/test_webhook.py (AdmissionReview in, the API server's view of the answer out,
the JSON patch applied with ``jsonpatch``), with the mode on and off.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubedock_dns.contract import network_label_key
from kubedock_dns.admission.review import WebhookConfig, review
from tests.test_webhook import NETWORK_ID, admission_review, admitted, pod

ON = WebhookConfig(nameserver_ip="10.96.0.53", network_labels=True)
OFF = WebhookConfig(nameserver_ip="10.96.0.53")
OTHER_ID = "9c1e" * 16


def answer(config: WebhookConfig, document: dict[str, Any]) -> dict[str, Any]:
    status, body = review(json.dumps(document).encode(), config)
    assert status == 200, body
    return body["response"]  # type: ignore[no-any-return]


def network_labels(obj: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in obj["metadata"].get("labels", {}).items() if k.startswith("kubedock-dns.net/")}


def test_label_key_of_a_docker_network_id_is_its_first_20_hex() -> None:
    """`docker network ls` shows 12 hex of the ID: the label key starts with them."""
    assert network_label_key(NETWORK_ID) == "kubedock-dns.net/" + NETWORK_ID[:20]


def test_label_key_of_a_name_is_a_hash_that_no_id_prefix_can_equal() -> None:
    """Network names (anything but 64 hex) get 'n-' plus 20 hex of SHA-256: a valid label name,
    stable, and never equal to the key of an ID ('n' is not hex)."""
    key = network_label_key("my_net.v2")
    assert key == network_label_key("my_net.v2")
    name = key.split("/", 1)[1]
    assert name.startswith("n-") and len(name) == 22 and name[2:].isalnum()
    assert network_label_key("my_net.v3") != key
    assert network_label_key(NETWORK_ID.upper()).split("/", 1)[1].startswith("n-")


def test_mode_on_labels_the_pod_once_per_network() -> None:
    """Every network of the pod gets its label, value "true"; the opt-in and other labels stay."""
    obj = pod(annotations={"kubedock.hostalias/0": "db", "kubedock.network/0": NETWORK_ID,
                           "kubedock.network/1": OTHER_ID, "kubedock.network/2": "named"})
    stored = admitted(answer(ON, admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert network_labels(stored) == {network_label_key(NETWORK_ID): "true",
                                      network_label_key(OTHER_ID): "true",
                                      network_label_key("named"): "true"}
    assert stored["metadata"]["labels"]["kubedock"] == "true"
    assert stored["metadata"]["labels"]["kubedock.containerid"] == "0123456789ab"
    assert stored["spec"]["dnsPolicy"] == "None"


def test_mode_off_adds_no_label() -> None:
    """Off by default: the pod's labels are exactly what it brought."""
    obj = pod()
    stored = admitted(answer(OFF, admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert stored["metadata"]["labels"] == obj["metadata"]["labels"]


def test_a_network_label_the_pod_brought_itself_is_removed() -> None:
    """A pod cannot let itself into another network's policy by carrying its label."""
    foreign = network_label_key(OTHER_ID)
    obj = pod(labels={"kubedock": "true", foreign: "true", network_label_key(NETWORK_ID): "false"})
    stored = admitted(answer(ON, admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert network_labels(stored) == {network_label_key(NETWORK_ID): "true"}


def test_a_pod_already_labelled_right_gets_only_the_dns_patch() -> None:
    obj = pod(labels={"kubedock": "true", network_label_key(NETWORK_ID): "true"})
    stored = admitted(answer(ON, admission_review("CREATE", obj)), copy.deepcopy(obj))
    assert stored["metadata"]["labels"] == obj["metadata"]["labels"]


def test_pods_not_opted_in_are_not_labelled() -> None:
    obj = pod(labels={"app": "web"})
    response = answer(ON, admission_review("CREATE", obj))
    assert response == {"uid": response["uid"], "allowed": True}


@pytest.mark.parametrize("change", ["add", "remove", "change"])
def test_update_touching_a_network_label_is_refused_in_the_mode(change: str) -> None:
    """Adding a network label would open that network's pods to this one: 403 naming the label;
    with the mode off, such labels are none of our business."""
    key = network_label_key(NETWORK_ID)
    old = pod(labels={"kubedock": "true", key: "true"})
    new = copy.deepcopy(old)
    labels = new["metadata"]["labels"]
    if change == "add":
        labels[network_label_key(OTHER_ID)] = "true"
    elif change == "remove":
        del labels[key]
    else:
        labels[key] = "false"
    response = answer(ON, admission_review("UPDATE", new, old))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "kubedock-dns.net/" in response["status"]["message"]
    assert answer(OFF, admission_review("UPDATE", new, old))["allowed"] is True


def test_update_of_other_labels_is_allowed_in_the_mode() -> None:
    old = pod(labels={"kubedock": "true", network_label_key(NETWORK_ID): "true"})
    new = copy.deepcopy(old)
    new["metadata"]["labels"]["team"] = "blue"
    response = answer(ON, admission_review("UPDATE", new, old))
    assert response["allowed"] is True and "patch" not in response
