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


def _shared_bed_params(item: pytest.Item) -> tuple[tuple[str, str], ...]:
    """The parameters of the module- (or wider-) scoped fixtures ``item`` uses, such as
    test_e2e's ``bed`` ("stand-in" or "node")."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return ()
    definitions = item._fixtureinfo.name2fixturedefs  # type: ignore[attr-defined]
    return tuple(sorted((name, str(value)) for name, value in callspec.params.items()
                        if name in definitions and definitions[name][-1].scope != "function"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                   items: list[pytest.Item]) -> None:
    """Runs after any reordering (pytest-random-order's shuffle included), and keeps what the
    beds need whatever the order:

    - tests marked ``own_node`` start (or kill) a node of their own; one node runs per machine,
      so they go first, before the shared ``node`` fixture holds the machine's node lock (the
      ``_own_node_before_the_shared_one`` fixture fails such a test at once should one come late);
    - a module's tests stay together, and those sharing a parametrised module-scoped bed (one
      parameter of test_e2e's ``bed``) run as one group, so that a shuffle changes the order of
      the tests but does not tear a bed down and bring it up again at every turn.

    Within that, the order is whatever it was (the file's, or the shuffle's)."""
    first_seen: dict[object, int] = {}
    for position, item in enumerate(items):
        first_seen.setdefault(item.nodeid.split("::")[0], position)
        first_seen.setdefault((item.nodeid.split("::")[0], _shared_bed_params(item)), position)
    items.sort(key=lambda item: (item.get_closest_marker("own_node") is None,
                                 first_seen[item.nodeid.split("::")[0]],
                                 first_seen[(item.nodeid.split("::")[0], _shared_bed_params(item))]))


_shared_node_started = False


@pytest.fixture(autouse=True)
def _own_node_before_the_shared_one(request: pytest.FixtureRequest) -> None:
    """A test that starts a node of its own cannot run once the shared node holds the machine's
    node lock (it would wait for the lock until the session ends): fail it at once, saying so."""
    if request.node.get_closest_marker("own_node") is not None and _shared_node_started:
        pytest.fail("an own_node test was ordered after the shared node started: "
                    "tests/conftest.py's pytest_collection_modifyitems must run last")


@pytest.fixture(scope="session")
def node() -> Iterator[Any]:
    """A real single node (``testbed.node.Node``) for the whole session; at its end, the proof that
    it left nothing behind (processes, mounts, network namespaces, bridge, kube-proxy's rules,
    its run directory).  Skips, with the reason, only when this machine cannot run a node at all."""
    from testbed.node.cluster import Node
    from testbed.node.errors import NodeUnavailable

    global _shared_node_started
    _shared_node_started = True
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

