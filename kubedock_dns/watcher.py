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
  arrived in one network read are delivered in one tuple, in order; nothing waits for company.

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

Pods are parsed from raw JSON (``_preload_content=False``) into
:class:`~kubedock_dns.contract.PodRecord` at once; no ``V1Pod`` models are built or kept.  This
is the only module that imports ``kubernetes``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

import kubernetes.client
import kubernetes.config
import urllib3
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from kubedock_dns.policies import MANAGED_SELECTOR, Plan, PolicyConfig, base_policy, network_policy, plan
from kubedock_dns.contract import (
    DEFAULT_OPT_IN_LABEL,
    Change,
    Deleted,
    PodRecord,
    Relisted,
    Upserted,
    pod_record_from_dict,
)

log = Logger(namespace="kubedock_dns.watcher")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class WatcherConfig:
    """What to watch and how patiently.

    ``watch_timeout`` is the server-side ``timeoutSeconds`` of one watch request;
    ``connect_timeout``/``read_timeout`` are the client's socket timeouts (the read timeout must
    exceed ``watch_timeout``, the longest a healthy watch stays silent; see the module docstring);
    ``list_page_size`` pages the list (0: one request); the backoff after a failure starts at
    ``backoff_initial`` and doubles up to ``backoff_max``, with jitter; ``stop_timeout`` bounds
    how long stopping the service waits for the thread.
    """

    namespace: str
    opt_in_label: str = DEFAULT_OPT_IN_LABEL
    watch_timeout: int = 10
    connect_timeout: float = 5.0
    read_timeout: float = 12.0
    list_page_size: int = 500
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    stop_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("the watcher needs a namespace (give --namespace NS)")
        if not self.opt_in_label or "=" in self.opt_in_label or "," in self.opt_in_label:
            raise ValueError(
                f"opt-in label {self.opt_in_label!r} is not a label key (expected e.g. 'kubedock')"
            )
        if self.watch_timeout < 1:
            raise ValueError(f"watch_timeout must be at least 1 second (got {self.watch_timeout!r})")
        for name in ("connect_timeout", "read_timeout", "backoff_initial", "stop_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)!r})")
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max!r}) must not be below backoff_initial "
                f"({self.backoff_initial!r})"
            )
        if self.list_page_size < 0:
            raise ValueError(f"list_page_size must be 0 (no paging) or more (got {self.list_page_size!r})")

    @property
    def label_selector(self) -> str:
        return f"{self.opt_in_label}=true"


def default_namespace(path: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace this process runs in, from its service account; clear error outside a pod."""
    try:
        with open(path, encoding="utf-8") as f:
            namespace = f.read().strip()
    except OSError as e:
        raise ValueError(
            f"cannot read the pod's namespace from {path} ({e.strerror}): not running in a pod? "
            f"give --namespace NS"
        ) from None
    if not namespace:
        raise ValueError(f"{path} is empty: give --namespace NS")
    return namespace


def api_client_from(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """An API client from a kubeconfig file, or from the in-cluster service account if None.

    Touches no global client configuration.
    """
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
    else:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


# --------------------------------------------------------------------------------------------
# The API seam


class ApiError(Exception):
    """The API server answered with an error status (HTTP, or a watch ``ERROR`` event)."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(status, reason, message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def expired(self) -> bool:
        """The resourceVersion or continue token is too old: relist."""
        return self.status == 410

    def __str__(self) -> str:
        text = f"HTTP {self.status}"
        if self.reason:
            text += f" {self.reason}"
        if self.message:
            text += f": {self.message}"
        return text


class Aborted(Exception):
    """The request was cut short because the watcher is stopping."""


class PodApi(Protocol):
    """What the watcher needs from the API server (one namespace, one label selector)."""

    def list_pods(self, continue_token: str | None) -> Mapping[str, Any]:
        """One page of the pod list as the parsed JSON ``PodList``; raises :class:`ApiError`."""

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        """The watch response body as it arrives, in pieces of any size.  Ends when the server
        ends the watch (or the connection stays silent for the read timeout); raises
        :class:`ApiError` for an error status and anything else for connection trouble.
        Closing the iterator releases the request."""

    def abort(self) -> None:
        """From any thread: cut the request in flight short and refuse further ones."""


def _status_of(body: bytes | str | None) -> tuple[str, str]:
    """``(reason, message)`` of a ``Status`` body, or of anything else as text."""
    if not body:
        return "", ""
    try:
        status = json.loads(body)
        return str(status.get("reason") or ""), str(status.get("message") or "")
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return "", text[:200]


class KubernetesPodApi:
    """:class:`PodApi` on the official client's ``CoreV1Api``, raw JSON throughout."""

    def __init__(self, api_client: kubernetes.client.ApiClient, config: WatcherConfig) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._config = config
        self._lock = threading.Lock()
        self._aborted = False
        self._current: Any = None

    def _call(self, **kwargs: Any) -> Any:
        if self._aborted:
            raise Aborted()
        try:
            response = self._core.list_namespaced_pod(
                self._config.namespace,
                label_selector=self._config.label_selector,
                _preload_content=False,
                _request_timeout=(float(self._config.connect_timeout), float(self._config.read_timeout)),
                **kwargs,
            )
        except kubernetes.client.ApiException as e:
            reason, message = _status_of(e.body)
            raise ApiError(int(e.status or 0), reason or str(e.reason or ""), message) from None
        except urllib3.exceptions.HTTPError:
            self._drop_pooled_connections()
            raise
        with self._lock:
            if self._aborted:
                response.close()
                raise Aborted()
            self._current = response
        return response

    def _done(self, response: Any, complete: bool) -> None:
        with self._lock:
            if self._current is response:
                self._current = None
        if not complete:
            # A half-read connection must not go back to the pool.
            response.close()
        response.release_conn()

    def list_pods(self, continue_token: str | None) -> Mapping[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._config.list_page_size:
            kwargs["limit"] = self._config.list_page_size
        if continue_token:
            kwargs["_continue"] = continue_token
        response = self._call(**kwargs)
        complete = False
        try:
            data = response.data
            complete = True
        finally:
            self._done(response, complete)
        return json.loads(data)

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        response = self._call(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=int(self._config.watch_timeout),
        )
        complete = False
        try:
            for chunk in response.stream(amt=None, decode_content=True):
                if chunk:
                    yield chunk
            complete = True
        except urllib3.exceptions.ReadTimeoutError:
            # A silent connection (a healthy watch is never silent this long): end quietly, the
            # watcher resumes from its resourceVersion on a new connection.
            log.info("pod watch silent for {timeout}s: dropping the connection and watching again",
                     timeout=self._config.read_timeout)
            self._drop_pooled_connections()
        finally:
            self._done(response, complete)

    def _drop_pooled_connections(self) -> None:
        """Close the idle pooled connections: whatever silenced one (a black hole, a dead NAT
        entry) has most likely silenced them too, and reusing one would cost another timeout."""
        try:
            self._core.api_client.rest_client.pool_manager.clear()
        except AttributeError:  # a client without a urllib3 pool manager
            pass

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            response = self._current
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # already closed or released: nothing left to unblock
                pass


# --------------------------------------------------------------------------------------------
# The watcher


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
                    delay = self.backoff_delay()
                    log.warn(
                        "pod watch in namespace {namespace} failed ({error}); "
                        "failure {failures} in a row, relisting in {delay:.2f}s",
                        namespace=cfg.namespace,
                        error=_describe(e),
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
                return
            except _Expired:
                log.info(
                    "pod watch in namespace {namespace}: resourceVersion {rv} expired, relisting",
                    namespace=self._config.namespace,
                    rv=resource_version,
                )
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
                if not isinstance(page, Mapping):
                    raise ValueError(f"the pod list is not a JSON object: {type(page).__name__}")
                for item in page.get("items") or ():
                    record = decode_pod(item)
                    if record is None:
                        self.skipped += 1
                    else:
                        records.append(record)
                metadata = page.get("metadata") or {}
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


def _describe(error: BaseException) -> str:
    """A one-line account of a failure for the log."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text and not isinstance(error, ApiError) else (text or name)


# --------------------------------------------------------------------------------------------
# The service


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
    ) -> None:
        self.setName("watcher")
        self._reactor = reactor
        self.config = config
        self._deliver = deliver
        self._api_factory = api_factory
        self.watcher: PodWatcher | None = None

    @classmethod
    def for_cluster(
        cls, reactor: Any, config: WatcherConfig, deliver: Deliver, kubeconfig: str | None = None
    ) -> WatcherService:
        """The service on the real API server (kubeconfig file, or in-cluster if None).  The
        client configuration is loaded now, so a bad kubeconfig fails before start-up."""
        api_client = api_client_from(kubeconfig)
        return cls(reactor, config, deliver, lambda: KubernetesPodApi(api_client, config))

    def metrics(self) -> WatcherMetrics:
        if self.watcher is None:
            return WatcherMetrics(0, 0, 0, 0, 0)
        return self.watcher.metrics()

    def startService(self) -> None:
        Service.startService(self)
        self.watcher = PodWatcher(self._api_factory(), self.config, self._reactor, self._deliver)
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


def service_cluster_ip(kubeconfig: str | None, namespace: str, name: str, timeout: float = 10.0) -> str:
    """The clusterIP of Service ``namespace/name`` (what the webhook injects as nameserver).

    Called once at start-up, before the reactor runs.  Raises ``ValueError`` naming the Service
    and what to do when it cannot be read or has no cluster IP.
    """
    api = kubernetes.client.CoreV1Api(api_client_from(kubeconfig))
    try:
        response = api.read_namespaced_service(name, namespace, _preload_content=False,
                                               _request_timeout=timeout)
        service = json.loads(response.data)  # type: ignore[attr-defined]  # raw urllib3 response
    except Exception as error:
        raise ValueError(
            f"cannot read Service {namespace}/{name} for --dns-service-name ({_describe(error)}); "
            f"check the name and that the service account may 'get' it, or pass --dns-service-ip"
        ) from None
    ip = (service.get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        raise ValueError(f"Service {namespace}/{name} has no cluster IP (headless?): pass --dns-service-ip")
    return ip


# --------------------------------------------------------------------------------------------
# --network-policies: the writer


class NetworkPolicyWriter:
    """Keeps the namespace's managed NetworkPolicies equal to the wanted networks.

    :meth:`want` (any thread, cheap: the reactor thread calls it after every index change) records
    the latest set of networks with pods; a daemon thread makes the API match it: at its first pass
    it makes sure the isolation policy exists (created from
    :func:`kubedock_dns.policies.base_policy` if missing, never changed: the chart owns it; deleted
    later, it stops all writing, see :meth:`isolation_policy`), then creates, replaces and deletes per-network policies as
    :func:`kubedock_dns.policies.plan` says.  Nothing per network is written before the first
    :meth:`want` (the index must be synced first, or every policy would look unwanted).  It
    reconciles again every ``resync`` seconds (a policy deleted by hand comes back), and after a
    failure with a capped backoff.  Another replica doing the same is harmless: 409 on create and
    404 on delete count as done.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, config: PolicyConfig,
                 resync: float = 60.0, request_timeout: float = 10.0) -> None:
        self._api = kubernetes.client.NetworkingV1Api(api_client)
        self.namespace = namespace
        self.config = config
        self.resync = resync
        self._timeout = request_timeout
        self._condition = threading.Condition()
        self._wanted: frozenset[str] | None = None
        self._dirty = True
        self._stopping = False
        self._base_missing = False
        self._thread: threading.Thread | None = None
        # Written by the writer thread alone; read anywhere (plain ints).
        self.reconciles = self.errors = self.created = self.replaced = self.deleted = 0

    def want(self, networks: frozenset[str]) -> None:
        with self._condition:
            if networks != self._wanted:
                self._wanted = networks
                self._dirty = True
                self._condition.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kubedock-dns-policies", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        failures = 0
        while True:
            with self._condition:
                if failures:
                    # Backoff: new wishes wait too (an API server in trouble gets no burst).
                    deadline = time.monotonic() + min(30.0, 0.5 * 2 ** failures)
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._condition.wait(left)
                elif not self._dirty and not self._stopping:
                    self._condition.wait(self.resync)
                if self._stopping:
                    return
                self._dirty = False
                wanted = self._wanted
            try:
                self.reconcile(wanted)
                failures = 0
            except Exception as error:
                failures += 1
                self.errors += 1
                log.warn("network policies not reconciled ({error}); retrying in {delay:.1f}s",
                         error=_describe(error), delay=min(30.0, 0.5 * 2 ** failures))

    def _request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._api, method)(*args, _request_timeout=self._timeout, **kwargs)
        except kubernetes.client.ApiException as e:
            reason, message = _status_of(e.body)
            raise ApiError(int(e.status or 0), reason or str(e.reason or ""), message) from None

    def isolation_policy(self) -> dict[str, Any] | None:
        """The isolation policy as stored; created if it is missing at the first pass only.

        Later it is missing because somebody deleted it: ``helm upgrade`` turning the mode off
        while this replica still runs, or an admin by hand.  Re-creating it would undo that, so
        nothing is written until it is back (the garbage collector removes the rest meanwhile).
        """
        name = self.config.base_name
        try:
            response = self._request("read_namespaced_network_policy", name, self.namespace, _preload_content=False)
        except ApiError as e:
            if e.status != 404:
                raise
            if self.reconciles:
                if not self._base_missing:
                    log.warn("the isolation NetworkPolicy {name} was deleted (network policies turned "
                             "off?): writing no network policies until it is back", name=name)
                self._base_missing = True
                return None
            try:
                response = self._request("create_namespaced_network_policy", self.namespace,
                                         base_policy(self.config), _preload_content=False)
                log.info("created the isolation NetworkPolicy {name}", name=name)
            except ApiError as created:
                if created.status != 409:
                    raise
                response = self._request("read_namespaced_network_policy", name, self.namespace,
                                         _preload_content=False)
        self._base_missing = False
        return json.loads(response.data)

    def reconcile(self, networks: frozenset[str] | None) -> Plan:
        """One pass (blocking): the isolation policy, then, once networks are known, one policy
        per network and none for any other."""
        base = self.isolation_policy()
        if base is None:
            return Plan()
        if networks is None:
            self.reconciles += 1
            return Plan()
        owner = {"name": base["metadata"]["name"], "uid": base["metadata"]["uid"]}
        listed = json.loads(self._request("list_namespaced_network_policy", self.namespace,
                                          label_selector=MANAGED_SELECTOR, _preload_content=False).data)
        existing = {p["metadata"]["name"]: p for p in listed.get("items") or ()}
        todo = plan((network_policy(n, owner) for n in networks), existing.values(), keep=(self.config.base_name,))
        for body in todo.create:
            try:
                self._request("create_namespaced_network_policy", self.namespace, body, _preload_content=False)
                self.created += 1
            except ApiError as e:
                if e.status != 409:
                    raise
        for body in todo.replace:
            name = body["metadata"]["name"]
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": existing[name]["metadata"]["resourceVersion"]}}
            self._request("replace_namespaced_network_policy", name, self.namespace, body, _preload_content=False)
            self.replaced += 1
        for name in todo.delete:
            try:
                self._request("delete_namespaced_network_policy", name, self.namespace, _preload_content=False)
                self.deleted += 1
            except ApiError as e:
                if e.status != 404:
                    raise
        self.reconciles += 1
        if todo:
            log.info("network policies: {created} created, {replaced} replaced, {deleted} deleted",
                     created=len(todo.create), replaced=len(todo.replace), deleted=len(todo.delete))
        return todo


class NetworkPolicyService(Service):
    """Runs a :class:`NetworkPolicyWriter` while the server runs (``--network-policies``)."""

    def __init__(self, writer: NetworkPolicyWriter) -> None:
        self.setName("network-policies")
        self.writer = writer

    @classmethod
    def for_cluster(cls, kubeconfig: str | None, namespace: str, config: PolicyConfig) -> NetworkPolicyService:
        return cls(NetworkPolicyWriter(api_client_from(kubeconfig), namespace, config))

    def startService(self) -> None:
        Service.startService(self)
        self.writer.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.writer.stop()
