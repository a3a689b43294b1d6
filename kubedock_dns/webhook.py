"""The admission webhook: points opted-in pods at kubedock-dns and guards their contract.

Contract (DESIGN section 5):

- :func:`review` maps the bytes of an ``admission.k8s.io/v1`` AdmissionReview to an HTTP status
  and a document, and never raises.  A body that is not such a review (not JSON, wrong
  ``apiVersion``/``kind``, no ``request``/``uid``, an object that is not a Pod, fields of the wrong
  type) gets HTTP 400 and a ``v1`` ``Status`` document whose ``message`` names what is wrong; the
  route sends that message as plain text.  A well-formed review always gets HTTP 200 and an
  AdmissionReview response echoing the request ``uid``.
- Only pods whose opt-in label (default ``kubedock``) is exactly ``"true"`` are ours; every other
  pod is allowed untouched.
- Every pod kubedock creates from a valid Docker request is admitted.  CREATE of an opted-in pod:
  the ``kubedock.network/N`` annotations must follow the contract
  (:func:`kubedock_dns.contract.check_pod_annotations`; denial code 400 naming key and value),
  ``spec.hostNetwork: true`` is refused (code 403); a name that cannot be a DNS name (an alias
  ``db:5432``, a container name longer than 63 characters) is admitted with an admission warning
  naming the container and the name (it is simply not resolvable, as in Docker); other
  annotations (kubedock copies the container's labels into them) are left alone.  The pod is
  mutated with a JSON patch setting ``spec.dnsPolicy: None`` and ``spec.dnsConfig``.  In that ``dnsConfig`` kubedock-dns owns
  ``nameservers`` (exactly the configured IP) and ``searches`` (``<ns>.svc.<domain>``,
  ``svc.<domain>``, ``<domain>``: the cluster's usual list) and the ``ndots`` option; the pod's other
  options are kept, in their order, after ``ndots``.  The patch uses ``add``, which per RFC 6902
  creates a missing member and replaces an existing one, so it is correct whether or not the pod
  already had a ``dnsConfig``; nothing is emitted when the pod already has exactly that config.
  A pod with no ``kubedock.network/N`` annotation is admitted and mutated with a warning: it is on
  no network, so no other pod can resolve its names.
- UPDATE of a pod that is opted in before or after the change: the ``kubedock.hostalias/*`` and
  ``kubedock.network/*`` annotations and the opt-in label must not change (code 403); any other
  change is allowed and nothing is patched (a pod's DNS settings cannot change after creation).
  Unchanged annotations are not validated again, so that a pod admitted while the webhook was
  absent can still be updated (e.g. to remove a finalizer) and deleted.
- DELETE and CONNECT are allowed.  The answer depends on the request alone: no state, no side
  effects, so dry-run requests get the same answer and any replica can answer.

:class:`WebhookApp` serves :func:`review` at ``POST /mutate`` with ``GET /healthz`` and
``GET /readyz``; :func:`webhook_service` serves it over TLS with a certificate that follows its
files (:mod:`kubedock_dns.tls`).  This module never touches the network index.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from klein import Klein
from klein.resource import KleinResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from kubedock_dns.contract import (
    DEFAULT_OPT_IN_LABEL,
    HOSTALIAS_PREFIX,
    NETWORK_PREFIX,
    CONTAINER_NAME_ANNOTATION,
    AnnotationError,
    canonical_ip,
    check_pod_annotations,
    contract_view,
    sort_names,
)
from kubedock_dns.tls import ReloadingServerTLS

__all__ = [
    "ADMISSION_API_VERSION",
    "MalformedReview",
    "WebhookApp",
    "WebhookConfig",
    "WebhookService",
    "admit",
    "dns_patch",
    "parse_review",
    "review",
    "webhook_service",
]

log = Logger()

ADMISSION_API_VERSION = "admission.k8s.io/v1"
_LABEL_KEY_PREFIX = "label "  # how contract_view names the opt-in label among annotation keys


@dataclass(frozen=True)
class WebhookConfig:
    """What the webhook injects: the kubedock-dns Service IP, the cluster domain and ndots."""

    nameserver_ip: str
    cluster_domain: str = "cluster.local"
    ndots: int = 5
    opt_in_label: str = DEFAULT_OPT_IN_LABEL

    def __post_init__(self) -> None:
        try:
            ip = canonical_ip(self.nameserver_ip)
        except ValueError:
            raise ValueError(
                f"nameserver_ip must be an IP address, such as the kubedock-dns Service's "
                f"clusterIP (got {self.nameserver_ip!r})"
            ) from None
        object.__setattr__(self, "nameserver_ip", ip)
        domain = self.cluster_domain.strip(".").lower()
        if not domain or any(not label or len(label) > 63 for label in domain.split(".")):
            raise ValueError(
                f"cluster_domain must be a DNS domain such as 'cluster.local' "
                f"(got {self.cluster_domain!r})"
            )
        object.__setattr__(self, "cluster_domain", domain)
        # resolv.conf caps ndots at 15.
        if isinstance(self.ndots, bool) or not isinstance(self.ndots, int) or not 0 <= self.ndots <= 15:
            raise ValueError(f"ndots must be an integer from 0 to 15 (got {self.ndots!r})")
        if not self.opt_in_label:
            raise ValueError("opt_in_label must be a label key such as 'kubedock'")

    def searches(self, namespace: str) -> list[str]:
        """The cluster search list for pods of ``namespace``."""
        d = self.cluster_domain
        return [f"{namespace}.svc.{d}", f"svc.{d}", d]


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview v1 for a Pod; the message says what is wrong."""


# -- parsing ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object_field(container: Mapping[str, Any], key: str, where: str, required: bool) -> dict[str, Any] | None:
    value = container.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise MalformedReview(f"{where}.{key} must be a JSON object (got {_type_name(value)})")
    return value


def _string_map(metadata: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = metadata.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise MalformedReview(f"{where}.metadata.{key} must map strings to strings")
    return value


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview v1 about a Pod, checked; else :class:`MalformedReview`."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedReview(f"the request body is not JSON ({e}); expected an AdmissionReview") from None
    if not isinstance(document, dict):
        raise MalformedReview(f"expected an AdmissionReview JSON object, got a JSON {_type_name(document)}")
    if document.get("kind") != "AdmissionReview":
        raise MalformedReview(f"kind must be 'AdmissionReview' (got {document.get('kind')!r})")
    if document.get("apiVersion") != ADMISSION_API_VERSION:
        raise MalformedReview(
            f"apiVersion must be {ADMISSION_API_VERSION!r} (got {document.get('apiVersion')!r}); "
            f"set admissionReviewVersions: [v1] in the webhook configuration"
        )
    request = _object_field(document, "request", "AdmissionReview", required=True)
    assert request is not None
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview(f"request.uid must be a non-empty string (got {uid!r})")
    kind = request.get("kind")
    if kind is not None and (
        not isinstance(kind, dict) or kind.get("group", "") != "" or kind.get("kind") != "Pod"
    ):
        raise MalformedReview(
            f"request.kind must be the core Pod kind (got {kind!r}); "
            f"register this webhook for pods only"
        )
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE", "DELETE", "CONNECT"):
        raise MalformedReview(
            f"request.operation must be CREATE, UPDATE, DELETE or CONNECT (got {operation!r})"
        )
    for key, required in (
        ("object", operation in ("CREATE", "UPDATE")),
        ("oldObject", operation == "UPDATE"),
    ):
        obj = _object_field(request, key, "request", required)
        if obj is None:
            continue
        if obj.get("kind", "Pod") != "Pod" or obj.get("apiVersion", "v1") != "v1":
            raise MalformedReview(
                f"request.{key} must be a v1 Pod (got apiVersion {obj.get('apiVersion')!r}, "
                f"kind {obj.get('kind')!r}); register this webhook for pods only"
            )
        metadata = _object_field(obj, "metadata", f"request.{key}", required=True)
        assert metadata is not None
        _string_map(metadata, "labels", f"request.{key}")
        _string_map(metadata, "annotations", f"request.{key}")
        _object_field(obj, "spec", f"request.{key}", required=key == "object")
    if operation in ("CREATE", "UPDATE") and not _namespace(request):
        raise MalformedReview("request.namespace is missing; pods are namespaced")
    return request


def _namespace(request: Mapping[str, Any]) -> str:
    namespace = request.get("namespace")
    if not namespace:
        obj = request.get("object") or {}
        namespace = (obj.get("metadata") or {}).get("namespace")
    return namespace if isinstance(namespace, str) else ""


def _describe(request: Mapping[str, Any]) -> str:
    metadata = (request.get("object") or request.get("oldObject") or {}).get("metadata") or {}
    name = request.get("name") or metadata.get("name")
    if not name:
        name = (metadata.get("generateName") or "") + "<generated>"
    return f"pod {_namespace(request) or '?'}/{name}"


# -- decisions -------------------------------------------------------------------------------------


def _opted_in(obj: Mapping[str, Any] | None, label: str) -> bool:
    if obj is None:
        return False
    return ((obj.get("metadata") or {}).get("labels") or {}).get(label) == "true"


def _meta_maps(obj: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    metadata = obj.get("metadata") or {}
    return metadata.get("annotations") or {}, metadata.get("labels") or {}


def dns_patch(spec: Mapping[str, Any], namespace: str, config: WebhookConfig) -> list[dict[str, Any]]:
    """JSON patch operations giving ``spec`` kubedock-dns's DNS policy and config (none if it has them)."""
    existing = spec.get("dnsConfig")
    wanted: dict[str, Any] = dict(existing) if isinstance(existing, dict) else {}
    options = wanted.get("options")
    kept_options = [
        option
        for option in (options if isinstance(options, list) else [])
        if not (isinstance(option, dict) and option.get("name") == "ndots")
    ]
    wanted["nameservers"] = [config.nameserver_ip]
    wanted["searches"] = config.searches(namespace)
    wanted["options"] = [{"name": "ndots", "value": str(config.ndots)}, *kept_options]
    operations: list[dict[str, Any]] = []
    if spec.get("dnsPolicy") != "None":
        operations.append({"op": "add", "path": "/spec/dnsPolicy", "value": "None"})
    if existing != wanted:
        operations.append({"op": "add", "path": "/spec/dnsConfig", "value": wanted})
    return operations


def _deny(uid: str, code: int, message: str) -> dict[str, Any]:
    return {
        "uid": uid,
        "allowed": False,
        "status": {
            "status": "Failure",
            "code": code,
            "reason": "Forbidden" if code == 403 else "BadRequest",
            "message": message,
        },
    }


def _describe_changes(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        what = (
            f"label {key[len(_LABEL_KEY_PREFIX):]!r}"
            if key.startswith(_LABEL_KEY_PREFIX)
            else f"annotation {key!r}"
        )
        if key not in old:
            changes.append(f"{what} added ({new[key]!r})")
        elif key not in new:
            changes.append(f"{what} removed (was {old[key]!r})")
        else:
            changes.append(f"{what} changed from {old[key]!r} to {new[key]!r}")
    return "; ".join(changes)


def _name_warnings(request: Mapping[str, Any], annotations: Mapping[str, str],
                   labels: Mapping[str, str]) -> list[str]:
    """One warning per name that cannot be a DNS name: the pod runs, that name does not resolve."""
    # Names shortened: the API server cuts every warning to 256 characters once all exceed 4 KiB.
    container = annotations.get(CONTAINER_NAME_ANNOTATION)
    who = _describe(request)
    if container:
        who = f"container {_shorten(container.lstrip('/'))!r} ({who})"
    return [
        f"{who}: {key}={_shorten(value)!r} cannot be a DNS name: {reason}; the container runs, but "
        f"nothing can resolve it by this name: rename it to make it resolvable"
        for key, value, reason in sort_names(annotations, labels).refused
    ]


def _shorten(value: str, limit: int = 48) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def admit(request: Mapping[str, Any], config: WebhookConfig) -> dict[str, Any]:
    """The AdmissionResponse for a request checked by :func:`parse_review`."""
    uid = request["uid"]
    operation = request["operation"]
    label = config.opt_in_label
    obj = request.get("object")
    old = request.get("oldObject")
    if operation == "CREATE" and _opted_in(obj, label):
        assert obj is not None
        annotations, labels = _meta_maps(obj)
        try:
            check_pod_annotations(annotations, labels)
        except AnnotationError as e:
            return _deny(
                uid, 400,
                f"{_describe(request)}: {e}; kubedock writes {NETWORK_PREFIX}N annotations from the "
                f"container's Docker networks: remove or correct this annotation (or the container "
                f"label it was copied from) and create the pod again",
            )
        spec = obj["spec"]
        if spec.get("hostNetwork") is True:
            return _deny(
                uid,
                403,
                f"{_describe(request)}: kubedock-dns cannot serve a pod with spec.hostNetwork: true "
                f"(it would share the node's address, so its DNS questions could not be told "
                f"apart); remove hostNetwork or the {label}: \"true\" label",
            )
        response: dict[str, Any] = {"uid": uid, "allowed": True}
        patch = dns_patch(spec, _namespace(request), config)
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
        warnings = _name_warnings(request, annotations, labels)
        if not any(key.startswith(NETWORK_PREFIX) for key in annotations):
            warnings.append(
                f"{_describe(request)} has no {NETWORK_PREFIX}N annotation, so it is on no "
                f"kubedock network and no other pod can resolve its names"
            )
        if warnings:
            response["warnings"] = warnings
        return response
    if operation == "UPDATE" and (_opted_in(obj, label) or _opted_in(old, label)):
        assert obj is not None and old is not None
        before = contract_view(*_meta_maps(old), label)
        after = contract_view(*_meta_maps(obj), label)
        if before != after:
            return _deny(
                uid,
                403,
                f"{_describe(request)}: the {HOSTALIAS_PREFIX}*, {NETWORK_PREFIX}* annotations and "
                f"the {label!r} label cannot change once the pod exists "
                f"({_describe_changes(before, after)}); delete the pod and create it again instead",
            )
    return {"uid": uid, "allowed": True}


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": "BadRequest" if code == 400 else "InternalError",
        "message": message,
    }


def review(request_body: bytes, config: WebhookConfig) -> tuple[int, dict[str, Any]]:
    """``(200, AdmissionReview response)``, or ``(400, v1 Status)`` for a malformed body.

    Never raises: an unexpected error (a bug) gives ``(500, v1 Status)`` and is logged.
    """
    try:
        request = parse_review(request_body)
    except MalformedReview as e:
        return 400, _status(400, str(e))
    try:
        response = admit(request, config)
    except Exception:
        log.failure("admission review {uid} failed", uid=request.get("uid"))
        return 500, _status(500, "internal error while reviewing the pod; see the kubedock-dns log")
    return 200, {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


# -- HTTP ------------------------------------------------------------------------------------------


class WebhookApp:
    """The webhook's HTTP routes: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``.

    :param ready: called for ``/readyz``; True means ready (200), anything else 503.
    """

    app = Klein()
    log = Logger()

    def __init__(self, config: WebhookConfig, ready: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self._ready = ready

    def resource(self) -> KleinResource:
        """The twisted.web resource serving these routes."""
        return self.app.resource()

    @staticmethod
    def _text(request: Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()

    @app.route("/mutate", methods=["POST"])
    def mutate(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        status, document = review(body, self.config)
        if status != 200:
            self.log.warn("rejected an admission request: HTTP {status}: {message}",
                          status=status, message=document["message"])
            return self._text(request, status, document["message"])
        response = document["response"]
        if not response["allowed"]:
            self.log.info("denied {uid}: {message}", uid=response["uid"],
                          message=response["status"]["message"])
        else:
            self.log.debug("allowed {uid} (patched: {patched})", uid=response["uid"],
                           patched="patch" in response)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document).encode()

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: Request) -> bytes:
        return self._text(request, 200, "ok")

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: Request) -> bytes:
        try:
            ready = self._ready() is True
        except Exception:
            self.log.failure("readiness check failed")
            ready = False
        return self._text(request, 200, "ok") if ready else self._text(request, 503, "not ready")


class _Site(Site):
    """A Site without per-request access logging (probes would flood the log)."""

    def log(self, request: object) -> None:
        pass


class _TrackedProtocol(ProtocolWrapper):
    """Wraps one connection so that the service can close it and know when it is closed."""

    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.closed.callback(None)


class _ConnectionTracker(WrappingFactory):
    protocol = _TrackedProtocol


class WebhookService(Service):
    """Listens with TLS while running; ``port`` is the bound port (useful when asked for 0).

    Stopping stops listening and closes the open connections (the API server keeps idle ones
    alive), aborting those still open after ``close_timeout`` seconds; the Deferred returned by
    ``stopService`` fires when all are closed.
    """

    close_timeout = 5.0

    def __init__(
        self,
        resource: Resource,
        port: int,
        interface: str,
        tls: ReloadingServerTLS,
        reactor: Any,
    ) -> None:
        self.site = _Site(resource, timeout=60)
        self.tls = tls
        self._connections = _ConnectionTracker(self.site)
        self._port = port
        self._interface = interface
        self._reactor = reactor
        self.listening: Any = None  # an IListeningPort while running

    @property
    def port(self) -> int:
        """The TCP port listened on; only while running."""
        if self.listening is None:
            raise RuntimeError("the webhook service is not listening; start it first")
        return int(self.listening.getHost().port)

    def startService(self) -> None:
        self.listening = self._reactor.listenSSL(
            self._port, self._connections, self.tls, interface=self._interface
        )
        super().startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listening, self.listening = self.listening, None
        waits: list[Deferred[Any]] = []
        if listening is not None:
            waits.append(maybeDeferred(listening.stopListening))
        for connection in list(self._connections.protocols):
            assert isinstance(connection, _TrackedProtocol)
            waits.append(connection.closed)
            transport: Any = connection.transport
            # The HTTP channel stays registered as the TLS layer's producer, and the TLS layer
            # sends its close alert only once no producer is left: unregister it.
            transport.loseConnection()
            transport.unregisterProducer()
            abort = self._reactor.callLater(self.close_timeout, transport.abortConnection)
            connection.closed.addBoth(_cancel_if_active, abort)
        return gatherResults(waits).addCallback(lambda _: None)


def _cancel_if_active(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def webhook_service(
    app_resource: Resource,
    port: int,
    interface: str,
    cert_path: str,
    key_path: str,
    reactor: Any,
    *,
    check_interval: float = 1.0,
) -> WebhookService:
    """A service serving ``app_resource`` over TLS on ``interface:port`` (``""``: all IPv4).

    The certificate and key are loaded now (``TLSConfigError`` names a bad file), and re-read
    at most every ``check_interval`` seconds when connections arrive.  ``reactor`` must provide
    ``IReactorSSL`` and ``IReactorTime``.
    """
    tls = ReloadingServerTLS(cert_path, key_path, clock=reactor, check_interval=check_interval)
    return WebhookService(app_resource, port, interface, tls, reactor)

