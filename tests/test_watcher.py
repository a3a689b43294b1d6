"""The watcher's list/watch cycle, driven by scripted API answers.

A scripted :class:`PodApi` stands in for the API server: each list or watch request takes the next
step of a script (a page, a sequence of body pieces, or an error).  When the script runs out the
watcher is stopped.  The tests assert the exact deliveries the reactor receives, the requests
made (which resourceVersion a watch starts from), and the pauses taken.  The kubernetes adapter
itself is exercised against a small local HTTP server here, and against the real API server in
``test_watcher_apiserver.py``.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any, Iterator

import pytest
import urllib3
from twisted.internet.task import Clock

from kubedock_dns.contract import Deleted, Relisted, Upserted, WatchInterrupted, pod_record_from_dict
from kubedock_dns.kube.client import (
    LIST_CHUNK, Aborted, ApiError, KubernetesPodApi, api_client_from,
)
from kubedock_dns.kube.listing import ListBody
from kubedock_dns.kube.watcher import PodWatcher, WatcherConfig, WatcherService

NS = "ns1"
CONFIG = WatcherConfig(namespace=NS)


def pod(name: str, ip: str | None = None, phase: str = "Running", rv: str = "1", **extra: Any) -> dict:
    """A pod as the API server's JSON, opted in, on network ``net1``."""
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    raw: dict[str, Any] = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "labels": {"kubedock": "true", "kubedock.containerid": "0123456789ab"},
            "annotations": {"kubedock.hostalias/0": name, "kubedock.network/0": "net1"},
        },
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": status,
    }
    raw["metadata"].update(extra)
    return raw


def rec(raw: dict):
    return pod_record_from_dict(raw)


def page(items: list[dict], rv: str, continue_token: str | None = None) -> dict:
    metadata: dict[str, Any] = {"resourceVersion": rv}
    if continue_token:
        metadata["continue"] = continue_token
    return {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}


def event(kind: str, obj: dict) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def bookmark(rv: str) -> bytes:
    return event("BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}})


def error(code: int, reason: str, message: str = "") -> bytes:
    return event(
        "ERROR",
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
         "message": message},
    )


class Drop(Exception):
    """A connection cut in the middle of a response."""


class ScriptedApi:
    """A PodApi answering from a script of steps, in order:

    ``("list", expected_continue_token, page_or_exception)`` and
    ``("watch", expected_resource_version, [bytes_or_exception, ...] or exception)``.
    """

    def __init__(self, *steps: tuple) -> None:
        self.steps = list(steps)
        self.requests: list[tuple[str, str | None]] = []
        self.watcher: PodWatcher | None = None
        self.aborted = False

    def _next(self, kind: str, arg: str | None) -> Any:
        self.requests.append((kind, arg))
        if not self.steps:
            assert self.watcher is not None
            self.watcher.stop()
            raise Aborted()
        step_kind, expected, answer = self.steps.pop(0)
        assert (kind, arg) == (step_kind, expected), f"request {(kind, arg)}, script expected {(step_kind, expected)}"
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def list_pods(self, continue_token: str | None) -> ListBody:
        return ListBody.of(json.dumps(self._next("list", continue_token)).encode())

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        pieces = self._next("watch", resource_version)

        def body() -> Iterator[bytes]:
            for piece in pieces:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece

        return body()

    def abort(self) -> None:
        self.aborted = True


class ImmediateReactor:
    """Runs callFromThread calls at once (the tests drive the watcher in their own thread)."""

    def callFromThread(self, f, *args):
        f(*args)


def run(api: ScriptedApi, config: WatcherConfig = CONFIG, *, now: list[float] | None = None,
        jitter: float = 1.0) -> tuple[list[tuple], list[float], PodWatcher]:
    """Run the watcher loop over the script; (deliveries, pauses, watcher)."""
    deliveries: list[tuple] = []
    pauses: list[float] = []
    clock = now if now is not None else [0.0]

    def monotonic() -> float:
        clock[0] += 5.0  # every watch lasts a while unless a test says otherwise
        return clock[0]

    watcher = PodWatcher(
        api, config, ImmediateReactor(), deliveries.append,
        random=lambda: jitter, wait=pauses.append,
        monotonic=(lambda: clock[0]) if now is not None else monotonic,
    )
    api.watcher = watcher
    watcher.run()
    assert not api.steps, f"script not used up: {api.steps}"
    return deliveries, pauses, watcher


# ---------------------------------------------------------------------------------------------


def test_list_then_watch_delivers_relisted_then_each_change():
    """The first delivery is the complete list; watch events follow as Upserted/Deleted, and the
    watch starts from the list's resourceVersion."""
    a, b = pod("a", "10.0.0.1"), pod("b")
    b_running = pod("b", "10.0.0.2", rv="12")
    api = ScriptedApi(
        ("list", None, page([a, b], "10")),
        ("watch", "10", [event("MODIFIED", b_running) + event("DELETED", a)]),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [
        (Relisted((rec(a), rec(b))),),
        (Upserted(rec(b_running)), Deleted("uid-a")),
    ]
    assert pauses == []
    assert (watcher.relists, watcher.errors, watcher.events) == (1, 0, 2)


def test_events_in_separate_reads_are_delivered_separately():
    """Nothing waits for company: each network read's complete events go out at once, and an
    event split across reads goes out when its last piece arrives."""
    x, y = pod("x", "10.0.0.1"), pod("y", "10.0.0.2")
    second = event("ADDED", y)
    api = ScriptedApi(
        ("list", None, page([], "5")),
        ("watch", "5", [event("ADDED", x), second[:7], second[7:40], second[40:]]),
    )
    deliveries, _, _ = run(api)
    assert deliveries == [(Relisted(()),), (Upserted(rec(x)),), (Upserted(rec(y)),)]


def test_bookmark_advances_resource_version_without_delivery():
    """A BOOKMARK delivers nothing; when the watch ends quietly the next one resumes from the
    bookmark's resourceVersion, without a relist."""
    x = pod("x", "10.0.0.1", rv="21")
    api = ScriptedApi(
        ("list", None, page([], "5")),
        ("watch", "5", [bookmark("20")]),
        ("watch", "20", [event("ADDED", x)]),
        ("watch", "21", []),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted(()),), (Upserted(rec(x)),)]
    assert (watcher.relists, watcher.watch_restarts, watcher.errors) == (1, 3, 0)
    assert pauses == []


def test_expired_event_relists_and_the_new_list_replaces_the_state():
    """ERROR 410 in the stream: events before it are delivered, then a relist whose Relisted
    holds only the pods that exist now (one deleted meanwhile is simply absent), no pause."""
    a, b = pod("a", "10.0.0.1"), pod("b", "10.0.0.2")
    b2 = pod("b", "10.0.0.2", rv="31", annotations={"kubedock.hostalias/0": "bee", "kubedock.network/0": "net1"})
    api = ScriptedApi(
        ("list", None, page([a, b], "10")),
        ("watch", "10", [bookmark("15") + error(410, "Expired", "too old resource version: 15 (30)")]),
        ("list", None, page([b2], "40")),
        ("watch", "40", []),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted((rec(a), rec(b))),), (WatchInterrupted(),), (Relisted((rec(b2),)),)]
    assert pauses == []
    assert (watcher.relists, watcher.errors) == (2, 0)


def test_changes_before_an_expired_event_in_the_same_read_are_delivered():
    """Events that precede the 410 in the same read are not lost."""
    x = pod("x", "10.0.0.1", rv="11")
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", [event("ADDED", x) + error(410, "Gone")]),
        ("list", None, page([x], "50")),
    )
    deliveries, _, _ = run(api)
    assert deliveries == [(Relisted(()),), (Upserted(rec(x)),), (WatchInterrupted(),), (Relisted((rec(x),)),)]


def test_http_410_on_the_watch_request_relists_at_once():
    """A watch request refused with HTTP 410 leads to a relist, without counting a failure."""
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", ApiError(410, "Expired", "too old resource version")),
        ("list", None, page([], "99")),
        ("watch", "99", []),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted(()),), (WatchInterrupted(),), (Relisted(()),)]
    assert pauses == [] and watcher.errors == 0


def test_connection_drop_backs_off_then_relists():
    """A connection cut mid-watch is a failure: counted, a pause, then a fresh list."""
    x = pod("x", "10.0.0.1")
    api = ScriptedApi(
        ("list", None, page([x], "10")),
        ("watch", "10", [bookmark("12"), Drop("connection reset by peer")]),
        ("list", None, page([], "20")),
        ("watch", "20", []),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted((rec(x),)),), (WatchInterrupted(),), (Relisted(()),)]
    assert pauses == [0.2]
    assert (watcher.errors, watcher.relists) == (1, 2)


def test_a_lost_watch_is_told_once_until_the_next_list():
    """However many failures in a row, the index hears WatchInterrupted once, then the Relisted
    that recovers; a quiet end of a watch (its timeout) is no interruption."""
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", []),  # ended quietly: resumed from 10, nothing lost
        ("watch", "10", [Drop("reset")]),
        ("list", None, Drop("refused")),
        ("list", None, Drop("refused")),
        ("list", None, page([], "20")),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted(()),), (WatchInterrupted(),), (Relisted(()),)]
    assert watcher.errors == 3


def test_repeated_failures_back_off_exponentially_up_to_the_cap_with_jitter():
    """Consecutive failures (API server down, 500s) double the pause from 0.2 s up to 10 s;
    jitter takes each pause down to between half and all of it; success resets the series."""
    down = ConnectionRefusedError("connection refused")
    steps = [("list", None, down)] * 8 + [
        ("list", None, ApiError(500, "InternalError", "etcd unavailable")),
        ("list", None, page([], "7")),
        ("watch", "7", [bookmark("8"), Drop("reset")]),
        ("list", None, page([], "9")),
    ]
    _, pauses, watcher = run(ScriptedApi(*steps), jitter=1.0)
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0, 0.2]
    assert watcher.errors == 10
    _, pauses, _ = run(ScriptedApi(*steps[:3]), jitter=0.0)
    assert pauses == [0.1, 0.2, 0.4]


def test_error_event_other_than_410_is_a_failure():
    """An ERROR event with another code (a 500 from the server) is counted, then backoff, relist."""
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", [error(500, "InternalError", "etcd leader changed")]),
        ("list", None, page([], "11")),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted(()),), (WatchInterrupted(),), (Relisted(()),)]
    assert pauses == [0.2] and watcher.errors == 1


def test_watch_ending_inside_an_event_is_a_failure():
    """A stream that ends with half an event was cut: failure and relist, the half is dropped."""
    x = event("ADDED", pod("x", "10.0.0.1"))
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", [x[:30]]),
        ("list", None, page([], "11")),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(Relisted(()),), (WatchInterrupted(),), (Relisted(()),)]
    assert watcher.errors == 1


def test_undecodable_json_is_a_failure():
    """Garbage in the stream is a failure (relist), never a crash of the thread."""
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", [b"<html>proxy error</html>\n"]),
        ("list", None, page([], "11")),
    )
    deliveries, _, watcher = run(api)
    assert deliveries == [(Relisted(()),), (WatchInterrupted(),), (Relisted(()),)] and watcher.errors == 1


def test_paged_list_is_delivered_as_one_relisted():
    """All pages of a paged list make one Relisted; the watch starts from the last page's
    resourceVersion."""
    a, b, c = pod("a"), pod("b"), pod("c")
    api = ScriptedApi(
        ("list", None, page([a, b], "100", "tok1")),
        ("list", "tok1", page([c], "100")),
        ("watch", "100", []),
    )
    deliveries, _, _ = run(api)
    assert deliveries == [(Relisted((rec(a), rec(b), rec(c))),)]


def test_expired_continue_token_restarts_the_list():
    """An expired continue token restarts the list from the first page; pods of the abandoned
    pages are not delivered twice."""
    a, b = pod("a"), pod("b")
    api = ScriptedApi(
        ("list", None, page([a], "100", "tok1")),
        ("list", "tok1", ApiError(410, "Expired", "continue token too old")),
        ("list", None, page([a], "200", "tok2")),
        ("list", "tok2", page([b], "200")),
        ("watch", "200", []),
    )
    deliveries, pauses, _ = run(api)
    assert deliveries == [(Relisted((rec(a), rec(b))),)]
    assert pauses == []


def test_list_without_resource_version_is_a_failure():
    """A list that carries no resourceVersion cannot start a watch: failure, backoff."""
    api = ScriptedApi(
        ("list", None, {"items": []}),
        ("list", None, page([], "3")),
    )
    deliveries, pauses, watcher = run(api)
    assert deliveries == [(WatchInterrupted(),), (Relisted(()),)] and watcher.errors == 1 and pauses == [0.2]


def test_pods_that_cannot_be_decoded_are_skipped_and_counted():
    """A pod without a uid is skipped, in the list and in the stream; the rest go through."""
    good = pod("good", "10.0.0.1")
    bad = pod("bad")
    del bad["metadata"]["uid"]
    api = ScriptedApi(
        ("list", None, page([bad, good], "10")),
        ("watch", "10", [event("ADDED", bad) + event("DELETED", {"metadata": {}}) + event("DELETED", good)]),
    )
    deliveries, _, watcher = run(api)
    assert deliveries == [(Relisted((rec(good),)),), (Deleted("uid-good"),)]
    assert watcher.skipped == 3 and watcher.errors == 0


def test_watch_that_ends_at_once_with_nothing_pauses_before_resuming():
    """A watch that the server ends immediately without any event is resumed only after a
    backoff pause (a misbehaving proxy must not turn the watcher into a busy loop)."""
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", []),
        ("watch", "10", []),
        ("watch", "10", [bookmark("11")]),
        ("watch", "11", []),
    )
    _, pauses, watcher = run(api, now=[0.0])
    assert pauses == [0.2, 0.4, 0.2]
    assert watcher.relists == 1 and watcher.errors == 0


def test_unknown_event_type_is_ignored():
    """An event type this watcher does not know is ignored (its resourceVersion still counts)."""
    x = pod("x", "10.0.0.1")
    api = ScriptedApi(
        ("list", None, page([], "10")),
        ("watch", "10", [event("SOMETHING", {"metadata": {"resourceVersion": "11"}}) + event("ADDED", x)]),
    )
    deliveries, _, _ = run(api)
    assert deliveries == [(Relisted(()),), (Upserted(rec(x)),)]


def test_deliveries_are_immutable_tuples():
    """What crosses the thread boundary is immutable: tuples of frozen records."""
    api = ScriptedApi(("list", None, page([pod("a", "10.0.0.1")], "1")))
    deliveries, _, _ = run(api)
    (relisted,) = deliveries[0]
    assert isinstance(deliveries[0], tuple) and isinstance(relisted.records, tuple)
    with pytest.raises(AttributeError):
        relisted.records[0].ips = ()  # type: ignore[misc]


def test_list_decode_time_for_10000_pods(capsys):
    """Decoding a list of 10,000 pods (JSON bytes to records) is cheap; the time is printed."""
    items = []
    for i in range(10_000):
        raw = pod(f"pod-{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", rv=str(i))
        raw["metadata"]["annotations"].update(
            {"kubedock.hostalias/1": f"alias-{i}", "kubedock.containername": f"/c{i}",
             "kubedock.network/1": "f" * 64}
        )
        raw["metadata"]["managedFields"] = [{"manager": "kubedock", "operation": "Update",
                                             "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
        raw["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        items.append(raw)
    body = json.dumps(page(items, "1")).encode()

    class OnePage(ScriptedApi):
        def list_pods(self, continue_token):
            self.requests.append(("list", continue_token))
            return ListBody(body[i:i + LIST_CHUNK] for i in range(0, len(body), LIST_CHUNK))

    api = OnePage()
    deliveries: list = []
    watcher = PodWatcher(api, CONFIG, ImmediateReactor(), deliveries.append)
    api.watcher = watcher
    started = time.perf_counter()
    rv, records = watcher._list()
    elapsed = time.perf_counter() - started
    assert len(records) == 10_000 and rv == "1"
    with capsys.disabled():
        print(f"\nlist decode: 10,000 pods, {len(body) / 1e6:.1f} MB JSON, {elapsed * 1000:.0f} ms "
              f"({elapsed / 10_000 * 1e6:.1f} us/pod)")


# --- the thread and the service ---------------------------------------------------------------


class BlockingApi:
    """Lists nothing, then blocks in the watch until aborted (as a silent API server would)."""

    def __init__(self) -> None:
        self.unblock = threading.Event()
        self.watching = threading.Event()

    def list_pods(self, continue_token):
        return ListBody.of(json.dumps(page([], "1")))

    def watch_pods(self, resource_version):
        self.watching.set()
        self.unblock.wait(30)
        raise ConnectionResetError("shut down")
        yield b""  # pragma: no cover

    def abort(self):
        self.unblock.set()


class QueueReactor(Clock):
    """A Clock whose callFromThread queues calls for the test thread to run (thread-safe)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list = []
        self.lock = threading.Lock()

    def callFromThread(self, f, *args):
        with self.lock:
            self.thread_calls.append((f, args))

    def drain(self) -> None:
        with self.lock:
            calls, self.thread_calls = self.thread_calls, []
        for f, args in calls:
            f(*args)


def test_stop_unblocks_the_thread_promptly():
    """stop() aborts the request in flight: the thread ends at once, not at a read timeout."""
    api = BlockingApi()
    reactor = QueueReactor()
    deliveries: list = []
    watcher = PodWatcher(api, CONFIG, reactor, deliveries.append)
    watcher.start()
    assert api.watching.wait(5)
    started = time.monotonic()
    watcher.stop()
    assert watcher.join(5)
    assert time.monotonic() - started < 1.0
    reactor.drain()
    assert deliveries == [(Relisted(()),)]
    assert watcher.errors == 0  # the abort is not a failure


def test_service_stop_does_not_block_and_fires_when_the_thread_ends():
    """stopService returns a Deferred at once; it fires when the thread has ended."""
    api = BlockingApi()
    reactor = QueueReactor()
    deliveries: list = []
    service = WatcherService(reactor, CONFIG, deliveries.append, lambda: api)
    service.startService()
    assert api.watching.wait(5)
    d = service.stopService()
    assert service.watcher is not None and service.watcher.join(5)
    reactor.drain()  # the thread's goodbye reaches the reactor
    fired: list = []
    d.addCallback(fired.append)
    assert fired == [None]
    assert deliveries == [(Relisted(()),)]
    assert not reactor.getDelayedCalls()


def test_service_stop_gives_up_after_the_bound():
    """If the thread does not end, stopService still finishes after config.stop_timeout."""

    class Stubborn(BlockingApi):
        def abort(self):
            pass  # cannot be unblocked

    api = Stubborn()
    reactor = QueueReactor()
    service = WatcherService(reactor, WatcherConfig(namespace=NS, stop_timeout=2.0), lambda c: None, lambda: api)
    service.startService()
    assert api.watching.wait(5)
    fired: list = []
    service.stopService().addCallback(fired.append)
    reactor.advance(1.9)
    assert fired == []
    reactor.advance(0.2)
    assert fired == [None]
    api.unblock.set()
    assert service.watcher is not None and service.watcher.join(5)


# --- configuration -----------------------------------------------------------------------------


def test_config_validates_early_with_clear_messages():
    """Bad settings are refused when the config is made, naming the setting."""
    with pytest.raises(ValueError, match="namespace"):
        WatcherConfig(namespace="")
    with pytest.raises(ValueError, match="label key"):
        WatcherConfig(namespace=NS, opt_in_label="kubedock=true")
    with pytest.raises(ValueError, match="read_timeout"):
        WatcherConfig(namespace=NS, read_timeout=0)
    with pytest.raises(ValueError, match="backoff_max"):
        WatcherConfig(namespace=NS, backoff_initial=5, backoff_max=1)
    assert WatcherConfig(namespace=NS, opt_in_label="x").label_selector == "x=true"


def test_api_client_from_kubeconfig(tmp_path):
    """A kubeconfig file gives a client for its server, without touching the global config."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    client = api_client_from(str(kubeconfig))
    assert client.configuration.host == "https://127.0.0.1:6443"
    assert "Bearer t0ken" in client.configuration.api_key.values()


# --- the kubernetes adapter over real HTTP ------------------------------------------------------


class FakeApiServer(http.server.ThreadingHTTPServer):
    """A local HTTP/1.1 server speaking just enough of the pod list/watch protocol.

    ``answers`` is a list of (status, [body pieces], pause_after_each) consumed per request;
    pieces are sent as separate chunks; after the last piece the response is held open for
    ``hold`` seconds (a silent watch) unless it is None.
    """

    daemon_threads = True

    def __init__(self) -> None:
        self.answers: list[tuple[int, list[bytes], float | None]] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server: FakeApiServer = self.server  # type: ignore[assignment]
        server.paths.append(self.path)
        status, pieces, hold = server.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        if hold:
            time.sleep(hold)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture
def fake_server():
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def adapter_for(server: FakeApiServer, **config: Any) -> KubernetesPodApi:
    import kubernetes.client

    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    return KubernetesPodApi(kubernetes.client.ApiClient(configuration), WatcherConfig(namespace=NS, **config))


def test_adapter_lists_and_watches_raw_json_with_the_right_parameters(fake_server):
    """The adapter asks for the namespace, the label selector, paging, bookmarks and the server
    timeout, and yields the watch body piece by piece as it arrives."""
    x = pod("x", "10.0.0.1")
    fake_server.answers = [
        (200, [json.dumps(page([x], "10")).encode()], None),
        (200, [bookmark("11"), event("ADDED", x)], None),
    ]
    api = adapter_for(fake_server, watch_timeout=77, list_page_size=50)
    listed = api.list_pods(None)
    assert list(listed.items()) == [x] and listed.metadata["resourceVersion"] == "10"
    assert list(api.watch_pods("10")) == [bookmark("11"), event("ADDED", x)]
    list_path, watch_path = fake_server.paths
    assert list_path.startswith(f"/api/v1/namespaces/{NS}/pods?")
    assert "labelSelector=kubedock%3Dtrue" in list_path and "limit=50" in list_path
    for part in ("watch=True", "resourceVersion=10", "allowWatchBookmarks=True", "timeoutSeconds=77"):
        assert part.lower() in watch_path.lower()


def test_adapter_turns_http_errors_into_api_errors(fake_server):
    """An HTTP error status becomes ApiError with the Status's reason and message."""
    status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 1 (5)"}
    fake_server.answers = [(410, [json.dumps(status).encode()], None)]
    api = adapter_for(fake_server)
    with pytest.raises(ApiError) as caught:
        list(api.watch_pods("1"))
    assert caught.value.expired and caught.value.message == "too old resource version: 1 (5)"


def test_adapter_read_timeout_ends_the_watch_quietly(fake_server):
    """A watch that stays silent past the read timeout ends without an error (to be resumed)."""
    fake_server.answers = [(200, [bookmark("3")], 3.0)]
    api = adapter_for(fake_server, read_timeout=0.5)
    started = time.monotonic()
    assert list(api.watch_pods("2")) == [bookmark("3")]
    assert time.monotonic() - started < 2.5


def test_adapter_abort_unblocks_a_silent_watch(fake_server):
    """abort() from another thread ends a blocked watch read at once (the read fails with
    urllib3's ProtocolError, which the watcher, stopping, does not retry), and refuses new
    requests."""
    fake_server.answers = [(200, [bookmark("3")], 30.0)]
    api = adapter_for(fake_server)
    stream = api.watch_pods("2")
    assert next(stream) == bookmark("3")
    timer = threading.Timer(0.3, api.abort)
    timer.start()
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    # Without the abort the read lasts the server's 30 s stall: 10 s tells the two apart on any
    # machine, however loaded.
    assert time.monotonic() - started < 10.0
    with pytest.raises(Aborted):
        api.list_pods(None)


def test_adapter_decodes_a_list_page_as_it_arrives(fake_server):
    """A page sent in pieces cut anywhere (inside a pod, inside a string) is decoded into the
    same pods, one at a time, and its connection serves the next request once the page is read."""
    pods_ = [pod(f"p{i}", f"10.0.0.{i}") for i in range(1, 40)]
    body = json.dumps(page(pods_, "10", continue_token="next")).encode()
    pieces = [body[i:i + 777] for i in range(0, len(body), 777)]
    fake_server.answers = [(200, pieces, None), (200, [json.dumps(page([], "11")).encode()], None)]
    api = adapter_for(fake_server)
    listed = api.list_pods(None)
    assert list(listed.items()) == pods_ and listed.metadata["continue"] == "next"
    last = api.list_pods("next")
    assert list(last.items()) == [] and last.metadata["resourceVersion"] == "11"
    assert "continue=next" in fake_server.paths[1]


def test_adapter_abort_unblocks_a_list_read_midway(fake_server):
    """abort() from another thread ends a list page that stalls midway, at once."""
    body = json.dumps(page([pod("a", "10.0.0.1"), pod("b", "10.0.0.2")], "10")).encode()
    fake_server.answers = [(200, [body[:len(body) // 2]], 30.0)]
    api = adapter_for(fake_server)
    items = api.list_pods(None).items()
    timer = threading.Timer(0.3, api.abort)
    timer.start()
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        list(items)
    assert time.monotonic() - started < 10.0  # the stall is 30 s (see above)
