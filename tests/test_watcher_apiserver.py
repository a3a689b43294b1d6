"""The watcher against a real kube-apiserver: what the index will be told, and when.

Pods are created with the kubernetes client and given an IP and phase through the status
subresource, the way a kubelet would.  The watcher runs in its own thread as in production; its
``callFromThread`` goes to a thread-safe queue that the test drains into a model of the index
(uid -> record), so the assertions are about the state the index would hold.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Iterator

import pytest

from kubedock_dns.contract import Change, Deleted, PodRecord, Relisted, Upserted
from kubedock_dns.kube.client import ApiError, KubernetesPodApi
from kubedock_dns.kube.watcher import PodWatcher, WatcherConfig, WatcherService
from tests.podfactory import creatable_pod

pytestmark = pytest.mark.controlplane

WAIT = 60.0  # seconds; generous, the machine is shared with builds


def kubedock_pod(name: str, *, opted_in: bool = True) -> dict[str, Any]:
    """A pod shaped like the ones kubedock creates (tests/podfactory.py)."""
    return creatable_pod(name, opted_in=opted_in)


def kubelet_status(ip: str, phase: str = "Running") -> dict[str, Any]:
    """The status a kubelet writes once the sandbox has an address."""
    return {
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}],
        }
    }


class QueueReactor:
    """Only what the watcher uses of a reactor: callFromThread, into a thread-safe queue."""

    def __init__(self) -> None:
        self.thread_calls: queue.Queue[tuple[Callable[..., Any], tuple]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.thread_calls.put((f, args))


def watched(model: "IndexModel", name: str) -> bool:
    """Whether the pod ``name`` reached the model through a watch event (not a list)."""
    return any(isinstance(c, Upserted) and c.record.name == name for d in model.deliveries for c in d)


class IndexModel:
    """What the index would hold, built from the deliveries (in the test's thread)."""

    def __init__(self, reactor: QueueReactor) -> None:
        self.reactor = reactor
        self.pods: dict[str, PodRecord] = {}
        self.deliveries: list[tuple[Change, ...]] = []
        self.seen_uids: set[str] = set()

    def deliver(self, changes: tuple[Change, ...]) -> None:
        assert isinstance(changes, tuple) and changes
        self.deliveries.append(changes)
        for change in changes:
            if isinstance(change, Relisted):
                self.pods = {r.uid: r for r in change.records}
                self.seen_uids.update(self.pods)
            elif isinstance(change, Upserted):
                self.pods[change.record.uid] = change.record
                self.seen_uids.add(change.record.uid)
            elif isinstance(change, Deleted):
                self.pods.pop(change.uid, None)

    @property
    def relists(self) -> int:
        return sum(isinstance(c, Relisted) for d in self.deliveries for c in d)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Run delivered calls until ``predicate()`` holds; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {what}; the index would hold {self.summary()}")
            try:
                f, args = self.reactor.thread_calls.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            f(*args)

    def by_name(self, name: str) -> PodRecord | None:
        return next((r for r in self.pods.values() if r.name == name), None)

    def names(self) -> set[str]:
        return {r.name for r in self.pods.values()}

    def summary(self) -> dict[str, tuple]:
        return {r.name: (r.phase, r.ips) for r in self.pods.values()}


def watcher_config(namespace: str, **overrides: Any) -> WatcherConfig:
    settings: dict[str, Any] = dict(
        namespace=namespace, watch_timeout=30, read_timeout=45, backoff_max=2.0, list_page_size=2
    )
    settings.update(overrides)
    return WatcherConfig(**settings)


@pytest.fixture
def watch(control_plane: Any, namespace: str) -> Iterator[Callable[..., tuple[PodWatcher, IndexModel]]]:
    """Start a watcher thread on ``namespace``; stopped (and joined) after the test."""
    started: list[PodWatcher] = []
    clients: list[Any] = []

    def start(api_wrapper: Callable[[Any], Any] = lambda api: api, **overrides: Any) -> tuple[PodWatcher, IndexModel]:
        config = watcher_config(namespace, **overrides)
        client = control_plane.api_client()
        clients.append(client)
        reactor = QueueReactor()
        model = IndexModel(reactor)
        watcher = PodWatcher(api_wrapper(KubernetesPodApi(client, config)), config, reactor, model.deliver)
        started.append(watcher)
        watcher.start()
        return watcher, model

    yield start
    for watcher in started:
        watcher.stop()
        assert watcher.join(10), "the watcher thread did not stop"
    for client in clients:
        client.close()


def create(core_api: Any, namespace: str, name: str, *, opted_in: bool = True) -> str:
    return core_api.create_namespaced_pod(namespace, kubedock_pod(name, opted_in=opted_in)).metadata.uid


def delete(core_api: Any, namespace: str, name: str) -> None:
    core_api.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def test_labelled_pods_are_followed_from_creation_to_deletion(core_api, namespace, watch):
    """The first delivery is the complete list (the index becomes synced); a labelled pod shows up
    when created, gains its IP and phase Running when the kubelet says so, turns Succeeded, and is
    gone once deleted.  A pod without the opt-in label never appears in any delivery."""
    create(core_api, namespace, "early")
    watcher, model = watch()
    model.wait_for("the first list", lambda: model.relists == 1)
    assert isinstance(model.deliveries[0][0], Relisted) and len(model.deliveries[0]) == 1
    assert model.names() == {"early"}

    outsider = create(core_api, namespace, "outsider", opted_in=False)
    core_api.patch_namespaced_pod_status("outsider", namespace, kubelet_status("127.0.0.99"))
    uid = create(core_api, namespace, "db")
    model.wait_for("db created", lambda: model.by_name("db") is not None)
    db = model.by_name("db")
    assert db is not None and db.uid == uid and db.phase == "Pending" and db.ips == ()
    assert db.names == ("db", "db-alias", "0123456789ab") and db.networks == ("net-a",)

    core_api.patch_namespaced_pod_status("db", namespace, kubelet_status("127.0.0.11"))
    model.wait_for("db running", lambda: (r := model.by_name("db")) is not None and r.phase == "Running")
    db = model.by_name("db")
    assert db is not None and db.ips == ("127.0.0.11",) and db.ready and db.is_answer()

    core_api.patch_namespaced_pod_status("db", namespace, kubelet_status("127.0.0.11", "Succeeded"))
    model.wait_for("db succeeded", lambda: (r := model.by_name("db")) is not None and r.phase == "Succeeded")
    assert not model.by_name("db").is_asker  # type: ignore[union-attr]

    delete(core_api, namespace, "db")
    model.wait_for("db deleted", lambda: model.by_name("db") is None)
    assert any(Deleted(uid) in d for d in model.deliveries)
    assert outsider not in model.seen_uids
    assert watcher.errors == 0 and watcher.relists == 1


def test_a_pod_that_loses_the_opt_in_label_is_deleted(core_api, namespace, watch):
    """Leaving the label selector reads as a deletion (the webhook forbids it, but the API server
    without the webhook allows it, and the index must not keep a stale pod)."""
    watcher, model = watch()
    create(core_api, namespace, "web")
    model.wait_for("web created", lambda: model.by_name("web") is not None)
    core_api.patch_namespaced_pod("web", namespace, {"metadata": {"labels": {"kubedock": "false"}}})
    model.wait_for("web gone", lambda: model.by_name("web") is None)


def test_many_pods_arrive_through_a_paged_list(core_api, namespace, watch):
    """A list larger than one page (page size 2 here) is delivered as one complete Relisted."""
    for i in range(5):
        create(core_api, namespace, f"p{i}")
    watcher, model = watch(list_page_size=2)
    model.wait_for("the first list", lambda: model.relists == 1)
    assert model.names() == {f"p{i}" for i in range(5)}
    assert len(model.deliveries) == 1


def test_apiserver_restart_is_survived_and_changes_after_it_are_seen(control_plane, core_api, namespace, watch):
    """When kube-apiserver goes away and comes back, the watcher reconnects on its own (backing
    off meanwhile) and ends up with exactly the pods that exist: one deleted and one created right
    after the restart are reflected, nothing stale is kept."""
    watcher, model = watch()
    for name, ip in (("a", "127.0.0.21"), ("b", "127.0.0.22")):
        create(core_api, namespace, name)
        core_api.patch_namespaced_pod_status(name, namespace, kubelet_status(ip))
    model.wait_for("a and b running", lambda: {r.name for r in model.pods.values() if r.phase == "Running"} == {"a", "b"})

    control_plane.restart_apiserver()
    delete(core_api, namespace, "a")
    create(core_api, namespace, "c")
    model.wait_for("a gone and c present", lambda: model.names() == {"b", "c"}, timeout=90)
    b = model.by_name("b")
    assert b is not None and b.ips == ("127.0.0.22",)

    # And it keeps following after the outage.
    core_api.patch_namespaced_pod_status("c", namespace, kubelet_status("127.0.0.23"))
    model.wait_for("c running", lambda: (r := model.by_name("c")) is not None and r.ips == ("127.0.0.23",))
    assert watcher.errors + watcher.relists + watcher.watch_restarts > 1


def make_resource_version_1_stale(control_plane: Any) -> None:
    """Compact etcd and restart the API server, so that a watch from resourceVersion "1" is
    answered 410 whatever ran before.  On a fresh API server it is not: its watch cache still
    serves such a watch (both tests below failed when shuffled to run first; in file order they
    relied on the restart test before them)."""
    control_plane.compact_etcd()
    control_plane.restart_apiserver()


def test_apiserver_answers_a_stale_resource_version_with_410(control_plane, core_api, namespace):
    """Watching from a resourceVersion older than the server keeps reports 410 Gone, as an HTTP
    status or as an ERROR event: the two forms the watcher treats as 'relist'."""
    make_resource_version_1_stale(control_plane)
    client = control_plane.api_client()
    try:
        api = KubernetesPodApi(client, watcher_config(namespace))
        try:
            body = b"".join(api.watch_pods("1"))
        except ApiError as e:
            assert e.expired, e
        else:
            assert b'"ERROR"' in body and b'"code":410' in body, body[:300]
    finally:
        client.close()


class StaleOnce:
    """The real API, except that the first watch starts from resourceVersion "1" after deleting a
    pod: as if the watcher came back from a long outage during which the pod went away."""

    def __init__(self, api: KubernetesPodApi, on_first_watch: Callable[[], None]) -> None:
        self.api = api
        self.on_first_watch = on_first_watch
        self.watches: list[str] = []

    def list_pods(self, continue_token: str | None) -> Any:
        return self.api.list_pods(continue_token)

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        self.watches.append(resource_version)
        if len(self.watches) == 1:
            self.on_first_watch()
            resource_version = "1"
        return self.api.watch_pods(resource_version)

    def abort(self) -> None:
        self.api.abort()


def test_expired_resource_version_leads_to_a_relist_without_stale_pods(control_plane, core_api, namespace, watch):
    """A watch whose resourceVersion has expired makes the watcher list again at once; the new
    Relisted replaces the state, so a pod deleted meanwhile disappears, and watching resumes from
    the fresh list."""
    create(core_api, namespace, "gone")
    create(core_api, namespace, "stays")
    wrappers: list[StaleOnce] = []

    def wrap(api: KubernetesPodApi) -> StaleOnce:
        def outage() -> None:
            delete(core_api, namespace, "gone")
            make_resource_version_1_stale(control_plane)
        wrappers.append(StaleOnce(api, outage))
        return wrappers[0]

    watcher, model = watch(api_wrapper=wrap)
    model.wait_for("two lists", lambda: model.relists == 2)
    first, second = [d[0] for d in model.deliveries if isinstance(d[0], Relisted)]
    assert {r.name for r in first.records} == {"gone", "stays"}
    assert {r.name for r in second.records} == {"stays"}
    assert model.names() == {"stays"} and watcher.errors == 0

    create(core_api, namespace, "later")
    model.wait_for("later created", lambda: model.by_name("later") is not None)
    assert wrappers[0].watches[1] not in ("1", wrappers[0].watches[0])


def test_stop_is_prompt_against_a_silent_watch(core_api, namespace, watch):
    """A watcher blocked on an idle watch (it has just delivered a watch event and waits for the
    next) stops at once, not after its 120 s read timeout: stop() shuts the socket down."""
    watcher, model = watch(read_timeout=120, watch_timeout=300)
    model.wait_for("the first list", lambda: model.relists == 1)
    create(core_api, namespace, "into-the-watch")  # the event that the watch is open and waiting
    model.wait_for("a pod through the watch", lambda: watched(model, "into-the-watch"))
    started = time.monotonic()
    watcher.stop()
    # Without the socket shut down the read would wait out read_timeout (120 s): 10 s tells
    # the two apart on any machine.
    assert watcher.join(10)
    assert time.monotonic() - started < 10.0
    assert watcher.errors == 0


def test_watcher_service_runs_against_the_real_apiserver(control_plane, core_api, namespace, tmp_path):
    """The service, built from a kubeconfig file as the twistd plugin will build it, delivers the
    first list and stops without blocking."""
    from twisted.internet.task import Clock

    class Reactor(Clock, QueueReactor):
        def __init__(self) -> None:
            Clock.__init__(self)
            QueueReactor.__init__(self)

    reactor = Reactor()
    model = IndexModel(reactor)  # type: ignore[arg-type]
    create(core_api, namespace, "svc")
    service = WatcherService.for_cluster(
        reactor, watcher_config(namespace), model.deliver, kubeconfig=str(control_plane.kubeconfig_path)
    )
    service.startService()
    try:
        model.wait_for("the first list", lambda: model.relists == 1)
        assert model.names() == {"svc"}
    finally:
        fired: list = []
        service.stopService().addCallback(fired.append)
        model.wait_for("the thread's exit", lambda: fired == [None], timeout=10)
