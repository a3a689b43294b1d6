"""Shared fixtures: the real control plane (one per session) and a fresh namespace per test.

``node`` is a real single node (see tests/test_node.py), started on first use.
``control_plane`` is a :class:`testbed.controlplane.ControlPlane` (etcd + kube-apiserver on
loopback); it skips, with the reason, only when the binaries cannot be obtained at all (no cached
build and no Go toolchain).  ``core_api`` is a ``CoreV1Api`` on it, ``namespace`` the name of a
namespace created for the test and torn down after it, the way the namespace controller would
(pods deleted at once, then the namespace finalised), since this control plane has no controllers.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest

from testbed.controlplane import BinariesUnavailable, ControlPlane, find_binaries


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd and kube-apiserver for the whole session; stopped (no process left) at its end."""
    try:
        binaries = find_binaries()
    except BinariesUnavailable as e:
        pytest.skip(f"no Kubernetes control plane available: {e}")
    with ControlPlane(binaries) as plane:
        yield plane


@pytest.fixture(scope="session")
def core_api(control_plane: ControlPlane) -> Iterator[Any]:
    """A ``kubernetes.client.CoreV1Api`` authenticated as the admin of ``control_plane``."""
    from kubernetes import client

    api_client = control_plane.api_client()
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, control_plane: ControlPlane, core_api: Any) -> Iterator[str]:
    """The name of a new namespace (``<test name>-<random>``), deleted with its pods afterwards."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    created = core_api.create_namespace(
        body={"metadata": {"generateName": f"{base}-", "labels": {"kubedock-dns.test/scratch": "true"}}}
    )
    name = created.metadata.name
    try:
        yield name
    finally:
        if not control_plane.apiserver_running:  # a test stopped it and failed before restarting
            control_plane.start_apiserver()
        _delete_namespace(core_api, name)


def _delete_namespace(core_api: Any, name: str) -> None:
    """Do what the namespace controller would: delete the pods, then finalise the namespace."""
    from kubernetes.client.exceptions import ApiException

    try:
        core_api.delete_collection_namespaced_pod(name, grace_period_seconds=0, _request_timeout=30)
        core_api.delete_namespace(name, _request_timeout=30)
        core_api.replace_namespace_finalize(
            name, body={"metadata": {"name": name}, "spec": {"finalizers": []}}, _request_timeout=30
        )
    except ApiException as e:
        if e.status != 404:
            raise


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                   items: list[pytest.Item]) -> None:
    """Tests marked ``own_node`` start (or kill) a node of their own; one node runs per machine, so
    they go first, before the shared ``node`` fixture holds the machine's node lock."""
    items.sort(key=lambda item: item.get_closest_marker("own_node") is None)


@pytest.fixture(scope="session")
def node() -> Iterator[Any]:
    """A real single node (``testbed.node.Node``) for the whole session; at its end, the proof that
    it left nothing behind (processes, mounts, network namespaces, bridge, kube-proxy's rules,
    its run directory).  Skips, with the reason, only when this machine cannot run a node at all."""
    from testbed.node.cluster import Node
    from testbed.node.errors import NodeUnavailable

    bed = Node()
    try:
        bed.start()
    except NodeUnavailable as e:
        pytest.skip(f"no real node on this machine: {e}")
    try:
        yield bed
    finally:
        bed.close()
    left = bed.leftovers()
    assert left == [], f"the node left things behind: {left}"

