"""Talking to the Kubernetes API server: clients, raw pod requests, errors.

Contract
--------
:func:`api_client_from` builds a client from a kubeconfig file or the in-cluster service account
without touching the global client configuration.  :class:`KubernetesPodApi` is the real
:class:`~kubedock_dns.kube.watcher.PodApi`: it lists and watches the pods of one namespace and
label selector as raw JSON (``_preload_content=False``; no ``V1Pod`` models are built), every
request bounded by the connect and read timeouts, and :meth:`~KubernetesPodApi.abort` unblocks the
request in flight from any thread.  An error status becomes :class:`ApiError` (status, reason and
message from the ``Status`` body); a connection that stays silent for the read timeout ends the
watch quietly and drops the pooled connections.  :func:`service_cluster_ip` reads one Service at
start-up.  :func:`describe_failure` is the one-line account of any failure the kube side logs.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import kubernetes.client
import kubernetes.config
import urllib3
from twisted.logger import Logger

if TYPE_CHECKING:
    from kubedock_dns.kube.watcher import WatcherConfig

# The kube side has always logged under this namespace; kept so log filters keep working.
log = Logger(namespace="kubedock_dns.watcher")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


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


class KubernetesPodApi:
    """:class:`~kubedock_dns.kube.watcher.PodApi` on the official client's ``CoreV1Api``, raw JSON throughout."""

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
            reason, message = status_of(e.body)
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
    api = kubernetes.client.CoreV1Api(api_client_from(kubeconfig))
    try:
        response = api.read_namespaced_service(name, namespace, _preload_content=False,
                                               _request_timeout=timeout)
        service = json.loads(response.data)  # type: ignore[attr-defined]  # raw urllib3 response
    except Exception as error:
        raise ValueError(
            f"cannot read Service {namespace}/{name} for --dns-service-name ({describe_failure(error)}); "
            f"check the name and that the service account may 'get' it, or pass --dns-service-ip"
        ) from None
    ip = (service.get("spec") or {}).get("clusterIP")
    if not ip or ip == "None":
        raise ValueError(f"Service {namespace}/{name} has no cluster IP (headless?): pass --dns-service-ip")
    return ip

