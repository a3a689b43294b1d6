"""The test bed's control plane does what the watcher and webhook tests rely on.

A real kube-apiserver stores kubedock-style pods as given, takes kubelet-style status writes,
streams label-selected changes to a raw list+watch, keeps its data across a restart, expires old
resourceVersions on request, authenticates by token, and leaves nothing behind when stopped.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Generator

import pytest

from testbed.controlplane import Binaries, ControlPlane, ControlPlaneError
from tests.podfactory import creatable_pod

pytestmark = pytest.mark.controlplane

STRATEGIC = "application/strategic-merge-patch+json"


def kubedock_pod(name: str, *, opted_in: bool = True) -> dict[str, Any]:
    """A pod shaped like the ones kubedock creates (tests/podfactory.py)."""
    return creatable_pod(name, opted_in=opted_in)


def running_status(ip: str) -> dict[str, Any]:
    """What a kubelet writes once the pod's sandbox has an address and its containers run."""
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }


def raw(response: Any) -> dict[str, Any]:
    """The JSON body of a ``_preload_content=False`` response."""
    return json.loads(response.data)


def watch_events(core_api: Any, namespace: str, **query: Any) -> Generator[dict[str, Any], None, None]:
    """Raw watch events (one JSON object per line), the way the watcher reads them."""
    response = core_api.list_namespaced_pod(
        namespace, watch=True, timeout_seconds=20, _preload_content=False, _request_timeout=(5, 25), **query
    )
    try:
        buffer = b""
        for chunk in response.stream(amt=None, decode_content=False):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
    finally:
        response.close()  # ends the watch on the server too
        response.release_conn()


def test_pod_is_stored_as_given_and_takes_kubelet_status(core_api: Any, namespace: str) -> None:
    """A kubedock pod keeps its containers, labels and annotations, and a status write to the
    ``status`` subresource (phase Running, podIP, podIPs), as a kubelet does, is stored and read back
    while the spec stays untouched."""
    core_api.create_namespaced_pod(namespace, kubedock_pod("db"))
    stored = raw(core_api.read_namespaced_pod("db", namespace, _preload_content=False))
    assert [c["name"] for c in stored["spec"]["containers"]] == ["main"]
    assert stored["metadata"]["labels"]["kubedock"] == "true"
    assert stored["metadata"]["annotations"]["kubedock.hostalias/1"] == "db-alias"
    assert stored["status"].get("podIP") is None

    core_api.patch_namespaced_pod_status("db", namespace, running_status("10.244.0.7"), _content_type=STRATEGIC)

    after = raw(core_api.read_namespaced_pod("db", namespace, _preload_content=False))
    assert after["status"]["phase"] == "Running"
    assert after["status"]["podIP"] == "10.244.0.7"
    assert after["status"]["podIPs"] == [{"ip": "10.244.0.7"}]
    assert after["spec"]["containers"] == stored["spec"]["containers"]
    assert int(after["metadata"]["resourceVersion"]) > int(stored["metadata"]["resourceVersion"])


def test_list_then_watch_with_label_selector_streams_only_opted_in_changes(
    core_api: Any, namespace: str
) -> None:
    """A list with the opt-in label selector followed by a watch from the list's resourceVersion
    streams, live, the opted-in pod's ADDED, its status change (MODIFIED with the podIP) and its
    DELETED, and nothing of a pod without the label."""
    selector = "kubedock=true"
    core_api.create_namespaced_pod(namespace, kubedock_pod("early"))
    listed = raw(core_api.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))
    assert [p["metadata"]["name"] for p in listed["items"]] == ["early"]

    events = watch_events(
        core_api, namespace, label_selector=selector, allow_watch_bookmarks=True,
        resource_version=listed["metadata"]["resourceVersion"],
    )
    core_api.create_namespaced_pod(namespace, kubedock_pod("web"))
    core_api.create_namespaced_pod(namespace, kubedock_pod("outsider", opted_in=False))
    core_api.patch_namespaced_pod_status("web", namespace, running_status("10.244.0.8"), _content_type=STRATEGIC)
    core_api.patch_namespaced_pod_status(
        "outsider", namespace, running_status("10.244.0.9"), _content_type=STRATEGIC
    )
    core_api.delete_namespaced_pod("web", namespace)

    seen: list[tuple[str, str, str | None, bool]] = []
    for event in events:
        if event["type"] == "BOOKMARK":
            continue
        pod = event["object"]
        terminating = "deletionTimestamp" in pod["metadata"]
        seen.append((event["type"], pod["metadata"]["name"], pod["status"].get("podIP"), terminating))
        if event["type"] == "DELETED":
            break
    events.close()
    # kube-apiserver 1.36 marks even an immediate deletion (an unscheduled pod) with a
    # deletionTimestamp first: one more MODIFIED, for a terminating pod, precedes DELETED.
    assert seen == [
        ("ADDED", "web", None, False),
        ("MODIFIED", "web", "10.244.0.8", False),
        ("MODIFIED", "web", "10.244.0.8", True),
        ("DELETED", "web", "10.244.0.8", True),
    ]


def test_restart_keeps_stored_pods_and_clients_reconnect(
    control_plane: ControlPlane, core_api: Any, namespace: str
) -> None:
    """After ``stop_apiserver()`` connections are refused; after ``start_apiserver()`` the same
    client, at the same URL, reads the same pod (same uid, same status) and can write again."""
    created = core_api.create_namespaced_pod(namespace, kubedock_pod("cache"))
    core_api.patch_namespaced_pod_status("cache", namespace, running_status("10.244.1.3"), _content_type=STRATEGIC)
    url = control_plane.url

    control_plane.stop_apiserver()
    assert not control_plane.apiserver_running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/readyz", context=control_plane.ssl_context(), timeout=5)
    control_plane.start_apiserver()

    assert control_plane.url == url
    again = raw(core_api.read_namespaced_pod("cache", namespace, _preload_content=False))
    assert again["metadata"]["uid"] == created.metadata.uid
    assert again["status"]["podIP"] == "10.244.1.3"
    core_api.create_namespaced_pod(namespace, kubedock_pod("after-restart"))
    listed = raw(core_api.list_namespaced_pod(namespace, _preload_content=False))
    assert {p["metadata"]["name"] for p in listed["items"]} == {"cache", "after-restart"}


def test_compaction_and_restart_expire_old_resource_versions(
    control_plane: ControlPlane, core_api: Any, namespace: str
) -> None:
    """``compact_etcd()`` followed by ``restart_apiserver()`` makes a watch from a resourceVersion
    taken before them answer 410 Gone (an ERROR event with code 410 or an HTTP 410), which is how
    the watcher tests provoke a relist."""
    from kubernetes.client.exceptions import ApiException

    listed = raw(core_api.list_namespaced_pod(namespace, _preload_content=False))
    old = listed["metadata"]["resourceVersion"]
    for i in range(3):
        core_api.create_namespaced_pod(namespace, kubedock_pod(f"churn-{i}"))
    assert control_plane.compact_etcd() > int(old)
    control_plane.restart_apiserver()

    try:
        first = next(watch_events(core_api, namespace, resource_version=old))
    except ApiException as e:
        assert e.status == 410
    else:
        assert first["type"] == "ERROR"
        assert first["object"]["code"] == 410


def test_token_authentication_and_kubeconfig(control_plane: ControlPlane) -> None:
    """Requests without the token or with a wrong one are refused with 401; the written kubeconfig
    (token and inline CA) works for an ordinary client, which sees the ``default`` namespace."""
    from kubernetes import client, config

    context = control_plane.ssl_context()
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        request = urllib.request.Request(f"{control_plane.url}/api/v1/namespaces", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=10)
        assert refused.value.code in (401, 403)
        if headers:
            assert refused.value.code == 401

    with config.new_client_from_config(config_file=str(control_plane.kubeconfig_path)) as api_client:
        names = [ns.metadata.name for ns in client.CoreV1Api(api_client).list_namespace().items if ns.metadata]
    assert "default" in names


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_stop_leaves_no_process_and_no_files(control_plane: ControlPlane) -> None:
    """A second, independent control plane starts on other ports, and ``stop()`` kills both of its
    processes and removes its directories; stopping twice is harmless."""
    assert control_plane.binaries is not None
    plane = ControlPlane(control_plane.binaries, progress=None)
    with plane:
        assert plane.url != control_plane.url
        base_dir = plane.base_dir
        assert base_dir is not None and plane.kubeconfig_path.is_file()
        pids = plane.pids()
        assert set(pids) == {"etcd", "kube-apiserver"}
    plane.stop()

    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} survived stop()"
    assert _processes_mentioning(str(base_dir)) == []
    assert not base_dir.exists()
    assert control_plane.apiserver_running  # the session's plane is untouched


def test_a_failing_process_is_reported_with_its_log(tmp_path: Path) -> None:
    """When a binary dies during start-up, start() raises an error naming the process and quoting
    the end of its log, and cleans up its temporary directory."""
    fake = tmp_path / "fake"
    fake.write_text("#!/bin/sh\necho 'fatal: disk on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    plane = ControlPlane(Binaries(kube_apiserver=str(fake), etcd=str(fake)), progress=None, startup_timeout=20)
    began = time.monotonic()
    with pytest.raises(ControlPlaneError) as failed:
        plane.start()
    message = str(failed.value)
    assert message.startswith("etcd exited during start-up (exited with status 3)")
    assert "fatal: disk on fire" in message
    assert time.monotonic() - began < 15
    assert plane.base_dir is None and plane.pids() == {}
