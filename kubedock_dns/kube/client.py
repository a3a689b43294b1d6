"""Talking to the Kubernetes API server: clients, raw pod requests, errors.

Contract
--------
:func:`api_client_from` builds a client from a kubeconfig file or the in-cluster service account
without touching the global client configuration.  :class:`KubernetesPodApi` is the real
:class:`~kubedock_dns.kube.watcher.PodApi`: it lists and watches the pods of one namespace and
label selector as raw JSON (no ``V1Pod`` models are built), every request bounded by the connect
and read timeouts, and :meth:`~KubernetesPodApi.abort` unblocks the request in flight from any
thread.  A list page is a :class:`~kubedock_dns.kube.listing.ListBody` decoded while it is read,
its connection released once its items are consumed.  An error status becomes :class:`ApiError`
(status, reason and message from the ``Status`` body); a connection that stays silent for the
read timeout ends the watch quietly and drops the pooled connections.
:class:`WatcherConfig` says what the watcher asks for and how patiently.
:func:`service_cluster_ip` reads one Service at start-up.  :func:`describe_failure` is the
one-line account of any failure the kube side logs.

Requests go through the official client's own request path, :func:`get` (``ApiClient``:
its configuration, authentication, TLS and connection pool), but not through the generated
``CoreV1Api``: that class imports its 250 pydantic models and an 8 MB module of parameter
descriptions, 21 MiB of memory for the two requests we make (docs/benchmarks.md, memory at
10,000 pods).  This needs the generator of kubernetes 37 (``param_serialize``/``call_api``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import kubernetes.client
import kubernetes.config
import urllib3
from twisted.logger import Logger

from kubedock_dns.contract import DEFAULT_OPT_IN_LABEL
from kubedock_dns.kube.listing import ListBody

# The kube side has always logged under this namespace; kept so log filters keep working.
log = Logger(namespace="kubedock_dns.watcher")


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

PODS_PATH = "/api/v1/namespaces/{namespace}/pods"
SERVICE_PATH = "/api/v1/namespaces/{namespace}/services/{name}"
# Bytes read from a list response at a time: the most of a page's text alive at once.
LIST_CHUNK = 64 * 1024


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


def status_of(body: bytes | str | None) -> tuple[str, str]:
    """``(reason, message)`` of a ``Status`` body, or of anything else as text."""
    if not body:
        return "", ""
    try:
        status = json.loads(body)
        return str(status.get("reason") or ""), str(status.get("message") or "")
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return "", text[:200]


def get(
    api_client: kubernetes.client.ApiClient,
    path: str,
    path_params: Mapping[str, str],
    query: list[tuple[str, Any]],
    timeout: float | tuple[float, float],
) -> urllib3.BaseHTTPResponse:
    """GET ``path`` with the client's authentication; the unread ``urllib3`` response.

    The generated API classes do the same (``param_serialize`` then ``call_api``) after
    validating their arguments with pydantic.  An error status raises :class:`ApiError`.
    """
    request = api_client.param_serialize(
        method="GET", resource_path=path, path_params=dict(path_params), query_params=query,
        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
    )
    try:
        response = api_client.call_api(*request, _request_timeout=timeout)
    except kubernetes.client.ApiException as e:  # e.g. a TLS failure, raised as status 0
        reason, message = status_of(e.body)
        raise ApiError(int(e.status or 0), reason or str(e.reason or ""), message) from None
    if not 200 <= response.status <= 299:
        reason, message = status_of(response.read())
        raise ApiError(response.status, reason or str(response.reason or ""), message)
    return response.response


class KubernetesPodApi:
    """:class:`~kubedock_dns.kube.watcher.PodApi` on the official client, raw JSON throughout."""

    def __init__(self, api_client: kubernetes.client.ApiClient, config: WatcherConfig) -> None:
        self._api_client = api_client
        self._config = config
        self._lock = threading.Lock()
        self._aborted = False
        self._current: Any = None

    def _call(self, query: list[tuple[str, Any]]) -> Any:
        if self._aborted:
            raise Aborted()
        try:
            response = get(
                self._api_client, PODS_PATH, {"namespace": self._config.namespace},
                [("labelSelector", self._config.label_selector), *query],
                (float(self._config.connect_timeout), float(self._config.read_timeout)),
            )
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

    def list_pods(self, continue_token: str | None) -> ListBody:
        query: list[tuple[str, Any]] = []
        if self._config.list_page_size:
            query.append(("limit", self._config.list_page_size))
        if continue_token:
            query.append(("continue", continue_token))
        response = self._call(query)
        return ListBody(self._read(response))

    def _read(self, response: Any) -> Iterator[bytes]:
        """The body in chunks of at most LIST_CHUNK bytes; the connection is released when the
        body is read whole, and closed if the reader stops early or the read fails."""
        complete = False
        try:
            yield from response.stream(LIST_CHUNK, decode_content=True)
            complete = True
        finally:
            self._done(response, complete)

    def watch_pods(self, resource_version: str) -> Iterator[bytes]:
        response = self._call([
            ("watch", True),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", True),
            ("timeoutSeconds", int(self._config.watch_timeout)),
        ])
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
            self._api_client.rest_client.pool_manager.clear()
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


def describe_failure(error: BaseException) -> str:
    """A one-line account of a failure for the log."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text and not isinstance(error, ApiError) else (text or name)



def service_cluster_ip(kubeconfig: str | None, namespace: str, name: str, timeout: float = 10.0) -> str:
    """The clusterIP of Service ``namespace/name`` (what the webhook injects as nameserver).

    Called once at start-up, before the reactor runs.  Raises ``ValueError`` naming the Service
    and what to do when it cannot be read or has no cluster IP.
    """
    try:
        response = get(api_client_from(kubeconfig), SERVICE_PATH, {"namespace": namespace, "name": name}, [],
                       timeout)
        service = json.loads(response.data)
    except Exception as error:
        raise ValueError(
            f"cannot read Service {namespace}/{name} for --dns-service-name ({describe_failure(error)}); "
            f"check the name and that the service account may 'get' it, or pass --dns-service-ip"
        ) from None
    ip = (service.get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        raise ValueError(f"Service {namespace}/{name} has no cluster IP (headless?): pass --dns-service-ip")
    return ip

