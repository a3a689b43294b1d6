"""The watcher: follows the opted-in pods of one namespace and hands changes to the reactor.

Contract
--------
A :class:`PodWatcher` runs in one daemon thread.  It lists the pods of ``config.namespace`` that
carry ``<opt_in_label>=true`` and then watches them from the list's ``resourceVersion``.  Every
change reaches the reactor as one call ``reactor.callFromThread(deliver, changes)`` where
``changes`` is a non-empty tuple of :data:`~kubedock_dns.contract.Change` values (frozen):

- after every complete list: ``(Relisted(records),)``, alone.  It replaces the whole state, so
  pods deleted while the watch was down disappear; the first one marks the index synced;
- ``ADDED``/``MODIFIED`` -> ``Upserted(record)``; ``DELETED`` -> ``Deleted(uid)``.  Events that
  arrived in one network read are delivered in one tuple, in order; nothing waits for company;
- when the watch loses changes (any failure, or ``410 Gone``): ``(WatchInterrupted(),)``, once,
  before the list that recovers, so that a miss is held meanwhile instead of answered from a
  state that may be behind.

The thread touches nothing but ``callFromThread``; the counters on the watcher (``relists``,
``watch_restarts``, ``errors``, ``events``, ``skipped``) are plain ints it alone writes.

The cycle (:meth:`PodWatcher.cycle`, kopf's split): list (paged) -> ``Relisted`` -> watch from
the resourceVersion with bookmarks.  ``BOOKMARK`` only advances the resourceVersion.  A watch that
ends quietly (server-side ``timeoutSeconds``, or the client read timeout on a silent connection)
is resumed from the last resourceVersion without a relist.  ``410 Gone`` (an ``ERROR`` event or
the HTTP status) ends the cycle and the loop relists at once.  Any other failure (connection
refused or dropped, 5xx, an ``ERROR`` event, undecodable JSON) is counted, logged with its
specifics, and followed by a capped exponential backoff with jitter, then a relist; forever,
until stopped.  A successful list starts the failure count (and so the backoff) from zero,
unless the failure before it was a watch that broke before delivering anything (a server that
lists but refuses watches must not be listed five times a second).

A silent connection is noticed within seconds: every watch asks the server to end it after
``watch_timeout`` (10 s; the API server sends a bookmark 2 s before, so the resourceVersion stays
fresh), and the client gives up on a connection that stays silent for ``read_timeout`` (12 s),
longer than any gap of a healthy watch.  A black-holed connection (open, nothing flows) is thus
dropped at most ``read_timeout`` after its last byte, the pooled connections with it, and the
watch resumes on a new connection: a change made meanwhile arrives within about 13 s.

Stopping: :meth:`PodWatcher.stop` sets a flag and shuts down the socket of the request in
flight, which unblocks the thread at once.

Pods are parsed from raw JSON into :class:`~kubedock_dns.contract.PodRecord` at once, one at a
time as a list page is read (:mod:`kubedock_dns.kube.listing`); no ``V1Pod`` models are built or
kept.  The loop talks to the API server only through the
:class:`PodApi` seam (:class:`~kubedock_dns.kube.client.KubernetesPodApi` on the real one), so
this module does not import ``kubernetes`` itself.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from kubedock_dns.contract import (
    Change,
    Deleted,
    PodRecord,
    Relisted,
    Upserted,
    WatchInterrupted,
    pod_record_from_dict,
)
from kubedock_dns.kube.client import (
    Aborted,
    ApiError,
    KubernetesPodApi,
    WatcherConfig,
    api_client_from,
    describe_failure,
)
from kubedock_dns.kube.listing import ListBody
from kubedock_dns.ops.latency import LatencyHistogram

# The kube side has always logged under this namespace; kept so log filters keep working.
log = Logger(namespace="kubedock_dns.watcher")


class HandOver(Protocol):
    """How the watcher thread reaches the reactor thread: ``reactor.callFromThread``."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None: ...


class StampedHandOver:
    """The reactor's ``callFromThread`` as the watcher thread uses it, with every batch stamped
    on the watcher thread, so that ``lag`` observes how long it waited for the reactor thread
    to apply it (the watch lag metric)."""

    def __init__(self, reactor: HandOver, lag: LatencyHistogram, clock: Callable[[], float] = time.monotonic) -> None:
        self._reactor = reactor
        self._lag = lag
        self._clock = clock

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self._reactor.callFromThread(self._timed, self._clock(), f, args)

    def _timed(self, stamp: float, f: Callable[..., Any], args: tuple) -> None:
        f(*args)
        self._lag.observe(self._clock() - stamp)


class PodApi(Protocol):
    """What the watcher needs from the API server (one namespace, one label selector)."""

    def list_pods(self, continue_token: str | None) -> ListBody:
        """One page of the pod list, its items decoded as they are read (so that only one pod's
        JSON is alive at a time); raises :class:`ApiError`."""

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        """The watch response body as it arrives, in pieces of any size.  Ends when the server
        ends the watch (or the connection stays silent for the read timeout); raises
        :class:`ApiError` for an error status and anything else for connection trouble.
        Closing the iterator releases the request."""

    def abort(self) -> None:
        """From any thread: cut the request in flight short and refuse further ones."""


@dataclass(frozen=True)
class WatcherMetrics:
    """Counters: complete lists delivered, watches resumed without a relist, failures,
    watch events applied, pods skipped as undecodable."""

    relists: int
    watch_restarts: int
    errors: int
    events: int
    skipped: int


class _Expired(Exception):
    """410 Gone: the cycle ends and the loop relists at once."""


class Reactor(Protocol):
    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None: ...


Deliver = Callable[[tuple[Change, ...]], Any]


def decode_pod(raw: Mapping[str, Any]) -> PodRecord | None:
    """A record for a pod's raw JSON, or None if it cannot be one (logged)."""
    try:
        return pod_record_from_dict(raw)
    except (ValueError, TypeError, AttributeError) as e:
        metadata = raw.get("metadata") if isinstance(raw, Mapping) else None
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        log.warn("skipping pod {name!r}: cannot decode it ({error})", name=name, error=e)
        return None


class PodWatcher:
    """The list/watch loop over a :class:`PodApi`, delivering to the reactor (see the module).

    ``wait(seconds)`` (default: waiting on the stop flag), ``random()`` and ``monotonic()`` are
    injectable for tests.
    """

    def __init__(
        self,
        api: PodApi,
        config: WatcherConfig,
        reactor: Reactor,
        deliver: Deliver,
        *,
        random: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[float], Any] | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._reactor = reactor
        self._deliver = deliver
        self._random = random
        self._monotonic = monotonic
        self._stopping = threading.Event()
        self._wait = wait if wait is not None else self._stopping.wait
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive failures: the backoff exponent
        self._watch_unproductive = False  # the last failure: a watch that broke with nothing
        self._watch_progressed = False  # the current watch delivered something
        self._interrupted = False  # WatchInterrupted delivered, and no Relisted since
        self._exited = False  # reactor thread only
        self._exit_waiters: list[Deferred[None]] = []  # reactor thread only
        self.relists = 0
        self.watch_restarts = 0
        self.errors = 0
        self.events = 0
        self.skipped = 0

    # -- control (any thread) ------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("a PodWatcher runs once; make a new one")
        self._thread = threading.Thread(target=self.run, name="kubedock-dns-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop and unblock it; returns at once."""
        self._stopping.set()
        self._api.abort()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (from a thread other than the reactor's); True if it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def metrics(self) -> WatcherMetrics:
        return WatcherMetrics(self.relists, self.watch_restarts, self.errors, self.events, self.skipped)

    # -- reactor thread --------------------------------------------------------------------

    def when_exited(self) -> Deferred[None]:
        """(Reactor thread.) Fires once the thread's loop has ended."""
        d: Deferred[None] = Deferred()
        if self._exited or self._thread is None:
            d.callback(None)
        else:
            self._exit_waiters.append(d)
        return d

    def _thread_exited(self) -> None:
        self._exited = True
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)

    # -- the watcher thread ----------------------------------------------------------------

    def _emit(self, changes: list[Change] | tuple[Change, ...]) -> None:
        if changes:
            self._reactor.callFromThread(self._deliver, tuple(changes))

    def _interrupt(self) -> None:
        """Tell the index that changes were lost (once until the next list)."""
        if not self._interrupted:
            self._interrupted = True
            self._emit((WatchInterrupted(),))

    def backoff_delay(self) -> float:
        """The pause before the next attempt after ``self._failures`` consecutive failures:
        doubling from ``backoff_initial`` up to ``backoff_max``, then jittered to 50-100%."""
        cfg = self._config
        ceiling = min(cfg.backoff_max, cfg.backoff_initial * 2 ** max(0, self._failures - 1))
        return ceiling * (0.5 + 0.5 * self._random())

    def run(self) -> None:
        """The loop: cycles, and after each failure a backoff, until stopped."""
        cfg = self._config
        log.info(
            "watching pods labelled {selector} in namespace {namespace}",
            selector=cfg.label_selector,
            namespace=cfg.namespace,
        )
        try:
            while not self._stopping.is_set():
                try:
                    self.cycle()
                except Exception as e:
                    if self._stopping.is_set():
                        break
                    self._failures += 1
                    self.errors += 1
                    self._interrupt()
                    delay = self.backoff_delay()
                    log.warn(
                        "pod watch in namespace {namespace} failed ({error}); "
                        "failure {failures} in a row, relisting in {delay:.2f}s",
                        namespace=cfg.namespace,
                        error=describe_failure(e),
                        failures=self._failures,
                        delay=delay,
                    )
                    self._wait(delay)
        finally:
            log.info("pod watch in namespace {namespace} stopped", namespace=cfg.namespace)
            self._reactor.callFromThread(self._thread_exited)

    def cycle(self) -> None:
        """List, deliver ``Relisted``, then watch (and resume watching) from the list's
        resourceVersion.  Returns on ``410 Gone`` or when stopping; raises on any failure."""
        try:
            resource_version, records = self._list()
        except Exception:
            self._watch_unproductive = False  # the API server itself failed, not only its watch
            raise
        self.relists += 1
        log.info(
            "listed {count} opted-in pods in namespace {namespace} at resourceVersion {rv}"
            "{recovered}",
            count=len(records),
            namespace=self._config.namespace,
            rv=resource_version,
            recovered=f" (recovered after {self._failures} failures)" if self._failures else "",
        )
        if not self._watch_unproductive:
            self._failures = 0  # the API server answers again: the backoff starts over
        self._interrupted = False
        self._emit((Relisted(records),))
        while not self._stopping.is_set():
            started = self._monotonic()
            self._watch_progressed = False
            try:
                resource_version, progressed = self._watch(resource_version)
            except ApiError as e:
                if not e.expired:
                    self._watch_unproductive = not self._watch_progressed
                    raise
                log.info(
                    "pod watch in namespace {namespace} refused ({error}), relisting",
                    namespace=self._config.namespace,
                    error=e,
                )
                self._interrupt()
                return
            except _Expired:
                log.info(
                    "pod watch in namespace {namespace}: resourceVersion {rv} expired, relisting",
                    namespace=self._config.namespace,
                    rv=resource_version,
                )
                self._interrupt()
                return
            except Exception:
                self._watch_unproductive = not self._watch_progressed
                raise
            self._watch_unproductive = False
            if self._stopping.is_set():
                return
            self.watch_restarts += 1
            if not progressed and self._monotonic() - started < 1.0:
                # Ended at once with nothing to show: do not hammer the server.
                self._failures += 1
                self._wait(self.backoff_delay())

    def _list(self) -> tuple[str, tuple[PodRecord, ...]]:
        """The complete list (all pages) and its resourceVersion.  An expired continue token
        restarts the list (at most three times); any other error is a failure."""
        for _attempt in range(3):
            records: list[PodRecord] = []
            token: str | None = None
            while True:
                try:
                    page = self._api.list_pods(token)
                except ApiError as e:
                    if e.expired and token is not None:
                        log.info("pod list continue token expired; listing again from the start")
                        break
                    raise
                for item in page.items():
                    record = decode_pod(item)
                    if record is None:
                        self.skipped += 1
                    else:
                        records.append(record)
                metadata = page.metadata
                token = metadata.get("continue") or None
                if token is None:
                    resource_version = metadata.get("resourceVersion")
                    if not resource_version:
                        raise ValueError("the pod list carries no metadata.resourceVersion")
                    return str(resource_version), tuple(records)
                if self._stopping.is_set():
                    raise Aborted()
        raise ApiError(410, "Expired", "the list's continue token expired three times in a row")

    def _watch(self, resource_version: str) -> tuple[str, bool]:
        """One watch request from ``resource_version``.  Returns the last resourceVersion seen
        and whether any event arrived; raises :class:`_Expired` on 410."""
        stream = self._api.watch_pods(resource_version)
        progressed = False
        buffer = b""
        try:
            for chunk in stream:
                buffer += chunk
                if b"\n" not in chunk:
                    continue
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                changes: list[Change] = []
                try:
                    for line in lines:
                        if line.strip():
                            resource_version = self._apply(line, resource_version, changes)
                            progressed = self._watch_progressed = True
                            self._failures = 0  # the watch works: the backoff starts over
                finally:
                    self._emit(changes)
            if buffer.strip():
                raise ValueError(f"watch stream ended inside an event ({len(buffer)} bytes unparsed)")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return resource_version, progressed

    def _apply(self, line: bytes, resource_version: str, changes: list[Change]) -> str:
        """Decode one watch event into ``changes``; the resourceVersion after it."""
        event = json.loads(line)
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise _Expired()
            raise ApiError(code, str(obj.get("reason") or ""), str(obj.get("message") or ""))
        if kind in ("ADDED", "MODIFIED"):
            record = decode_pod(obj)
            if record is None:
                self.skipped += 1
            else:
                changes.append(Upserted(record))
                self.events += 1
        elif kind == "DELETED":
            uid = (obj.get("metadata") or {}).get("uid")
            if uid:
                changes.append(Deleted(uid))
                self.events += 1
            else:
                self.skipped += 1
        elif kind != "BOOKMARK":
            log.warn("ignoring watch event of unknown type {kind!r}", kind=kind)
        return (obj.get("metadata") or {}).get("resourceVersion") or resource_version


class WatcherService(Service):
    """Runs a :class:`PodWatcher` while the service runs.

    ``api_factory()`` makes a fresh :class:`PodApi` for each start (an aborted one is spent).
    ``stopService`` does not block the reactor: it stops the thread and returns a Deferred that
    fires when the thread has ended, or after ``config.stop_timeout`` (the daemon thread is then
    left to finish its bounded read on its own).
    """

    def __init__(
        self,
        reactor: Any,
        config: WatcherConfig,
        deliver: Deliver,
        api_factory: Callable[[], PodApi],
        lag: LatencyHistogram | None = None,
    ) -> None:
        self.setName("watcher")
        self._reactor = reactor
        # The watcher thread's way to the reactor thread; stamped to measure the watch lag.
        self._hand_over: HandOver = StampedHandOver(reactor, lag) if lag is not None else reactor
        self.config = config
        self._deliver = deliver
        self._api_factory = api_factory
        self.watcher: PodWatcher | None = None

    @classmethod
    def for_cluster(
        cls, reactor: Any, config: WatcherConfig, deliver: Deliver, kubeconfig: str | None = None,
        lag: LatencyHistogram | None = None,
    ) -> WatcherService:
        """The service on the real API server (kubeconfig file, or in-cluster if None).  The
        client configuration is loaded now, so a bad kubeconfig fails before start-up.  ``lag``,
        when given, observes how long each batch waited for the reactor thread."""
        api_client = api_client_from(kubeconfig)
        return cls(reactor, config, deliver, lambda: KubernetesPodApi(api_client, config), lag)

    def metrics(self) -> WatcherMetrics:
        if self.watcher is None:
            return WatcherMetrics(0, 0, 0, 0, 0)
        return self.watcher.metrics()

    def startService(self) -> None:
        Service.startService(self)
        self.watcher = PodWatcher(self._api_factory(), self.config, self._hand_over, self._deliver)
        self.watcher.start()

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        watcher = self.watcher
        if watcher is None:
            return None
        watcher.stop()
        done: Deferred[None] = Deferred()
        exited = watcher.when_exited()

        def give_up() -> None:
            log.warn(
                "the watcher thread did not end within {timeout}s; leaving it behind",
                timeout=self.config.stop_timeout,
            )
            done.callback(None)

        timer = self._reactor.callLater(self.config.stop_timeout, give_up)

        def ended(_: object) -> None:
            if timer.active():
                timer.cancel()
                done.callback(None)

        exited.addCallback(ended)
        return done
