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
  With ``network_labels`` (``--network-policies``) the patch also gives the pod one label
  ``kubedock-dns.net/<short network ID>: "true"`` per network (:func:`network_label_patch`,
  :func:`kubedock_dns.contract.network_label_key`) and removes any other label under that prefix.
  A pod with no ``kubedock.network/N`` annotation is admitted and mutated with a warning: it is on
  no network, so no other pod can resolve its names.
- UPDATE of a pod that is opted in before or after the change: the ``kubedock.hostalias/*`` and
  ``kubedock.network/*`` annotations and the opt-in label (with ``network_labels``, the network
  labels too) must not change (code 403); any other
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
import io
import json
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from klein import Klein
from klein.resource import KleinResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from kubedock_dns.contract import (
    DEFAULT_OPT_IN_LABEL,
    HOSTALIAS_PREFIX,
    NETWORK_LABEL_PREFIX,
    NETWORK_PREFIX,
    CONTAINER_NAME_ANNOTATION,
    AnnotationError,
    canonical_ip,
    check_pod_annotations,
    contract_view,
    network_label_key,
    networks_from,
    pod_search_list,
    sort_names,
)
from kubedock_dns.limits import ConnectionCap, RateLimitedLog
from kubedock_dns.tls import ReloadingServerTLS

__all__ = [
    "ADMISSION_API_VERSION",
    "MalformedReview",
    "WebhookApp",
    "WebhookConfig",
    "WebhookService",
    "admit",
    "dns_patch",
    "network_label_patch",
    "parse_review",
    "review",
    "webhook_service",
]

log = Logger()

ADMISSION_API_VERSION = "admission.k8s.io/v1"
_MAX_LOG_TEXT = 2000
_LABEL_KEY_PREFIX = "label "  # how contract_view names the opt-in label among annotation keys


@dataclass(frozen=True)
class WebhookConfig:
    """What the webhook injects: the kubedock-dns Service IP, the cluster domain and ndots."""

    nameserver_ip: str
    cluster_domain: str = "cluster.local"
    ndots: int = 5
    opt_in_label: str = DEFAULT_OPT_IN_LABEL
    network_labels: bool = False  # --network-policies: label pods per network (network_label_patch)

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
        return pod_search_list(namespace, self.cluster_domain)


class MalformedReview(ValueError):
    """The request body is not an AdmissionReview v1 for a Pod; the message says what is wrong."""


# -- parsing ---------------------------------------------------------------------------------------


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters and 3 levels: values from a request end up in
    messages and log lines, and a 1 MB uid or a deeply nested label must not make them huge."""
    return _REPR.repr(value)


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


def _optional(container: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> None:
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MalformedReview(
            f"{where}.{key} must be {names.replace('str', 'a string').replace('bool', 'a boolean').replace('dict', 'a JSON object').replace('list', 'a JSON array')} "
            f"(got {_type_name(value)} {shown(value)})"
        )


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview v1 about a Pod, checked; else :class:`MalformedReview`."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedReview(f"the request body is not JSON ({shown(str(e))}); expected an AdmissionReview") from None
    except RecursionError:
        raise MalformedReview("the request body is JSON nested too deeply to be an AdmissionReview") from None
    if not isinstance(document, dict):
        raise MalformedReview(f"expected an AdmissionReview JSON object, got a JSON {_type_name(document)}")
    if document.get("kind") != "AdmissionReview":
        raise MalformedReview(f"kind must be 'AdmissionReview' (got {shown(document.get('kind'))})")
    if document.get("apiVersion") != ADMISSION_API_VERSION:
        raise MalformedReview(
            f"apiVersion must be {ADMISSION_API_VERSION!r} (got {shown(document.get('apiVersion'))}); "
            f"set admissionReviewVersions: [v1] in the webhook configuration"
        )
    request = _object_field(document, "request", "AdmissionReview", required=True)
    assert request is not None
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview(f"request.uid must be a non-empty string (got {shown(uid)})")
    kind = request.get("kind")
    if kind is not None and (
        not isinstance(kind, dict) or kind.get("group", "") != "" or kind.get("kind") != "Pod"
    ):
        raise MalformedReview(
            f"request.kind must be the core Pod kind (got {shown(kind)}); "
            f"register this webhook for pods only"
        )
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE", "DELETE", "CONNECT"):
        raise MalformedReview(
            f"request.operation must be CREATE, UPDATE, DELETE or CONNECT (got {shown(operation)})"
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
                f"request.{key} must be a v1 Pod (got apiVersion {shown(obj.get('apiVersion'))}, "
                f"kind {shown(obj.get('kind'))}); register this webhook for pods only"
            )
        metadata = _object_field(obj, "metadata", f"request.{key}", required=True)
        assert metadata is not None
        _string_map(metadata, "labels", f"request.{key}")
        _string_map(metadata, "annotations", f"request.{key}")
        for field in ("name", "generateName", "namespace"):
            _optional(metadata, field, f"request.{key}.metadata", str)
        spec = _object_field(obj, "spec", f"request.{key}", required=key == "object")
        if spec is not None:
            # Every field the decision reads has its type checked here: a wrong type anywhere
            # is the sender's mistake (400 with the reason), never a crash (500).
            _optional(spec, "dnsPolicy", f"request.{key}.spec", str)
            _optional(spec, "hostNetwork", f"request.{key}.spec", bool)
            _optional(spec, "dnsConfig", f"request.{key}.spec", dict)
            dns_config = spec.get("dnsConfig")
            if isinstance(dns_config, dict):
                _optional(dns_config, "options", f"request.{key}.spec.dnsConfig", list)
    for field in ("name", "namespace"):
        _optional(request, field, "request", str)
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


def network_label_patch(labels: Mapping[str, str], networks: tuple[str, ...]) -> list[dict[str, Any]]:
    """JSON patch operations leaving the pod exactly one ``<NETWORK_LABEL_PREFIX>...: "true"``
    label per network in ``networks`` and no other label under that prefix: a label the pod
    brought itself would let it into a network's NetworkPolicy it is not in."""
    wanted = {network_label_key(network): "true" for network in networks}
    operations: list[dict[str, Any]] = []
    if not labels and wanted:
        return [{"op": "add", "path": "/metadata/labels", "value": wanted}]
    for key in sorted(labels):
        if key.startswith(NETWORK_LABEL_PREFIX) and key not in wanted:
            operations.append({"op": "remove", "path": "/metadata/labels/" + _pointer(key)})
    for key, value in wanted.items():
        if labels.get(key) != value:
            operations.append({"op": "add", "path": "/metadata/labels/" + _pointer(key), "value": value})
    return operations


def _pointer(key: str) -> str:
    """``key`` as one JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


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
        if config.network_labels:
            patch += network_label_patch(labels, networks_from(annotations))
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
        before = contract_view(*_meta_maps(old), label, network_labels=config.network_labels)
        after = contract_view(*_meta_maps(obj), label, network_labels=config.network_labels)
        if before != after:
            network_labels = f" and {NETWORK_LABEL_PREFIX}* labels" if config.network_labels else ""
            return _deny(
                uid,
                403,
                f"{_describe(request)}: the {HOSTALIAS_PREFIX}*, {NETWORK_PREFIX}* annotations and "
                f"the {label!r} label{network_labels} cannot change once the pod exists "
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

    Never raises, and never answers 500: whatever a request holds is either a review we decide
    or a malformed one.  An unexpected error while deciding (a field of a type the parser did
    not foresee, or a bug) is logged with its traceback and answered 400 naming the error.
    """
    try:
        request = parse_review(request_body)
    except MalformedReview as e:
        return 400, _status(400, str(e))
    try:
        response = admit(request, config)
    except RecursionError:
        return 400, _status(400, "a field of the pod is JSON nested too deeply to review")
    except Exception as e:
        log.failure("admission review {uid} failed", uid=shown(request.get("uid")))
        return 400, _status(400, f"cannot review this request ({type(e).__name__}: {shown(str(e))}); "
                                 f"it does not look like a pod the API server would send")
    return 200, {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


@dataclass(frozen=True)
class Rendered:
    """A finished HTTP answer to ``POST /mutate``, and the line to log about it."""

    status: int
    content_type: bytes
    body: bytes
    log_level: str  # "warn", "info" or "debug"
    log_text: str


def render_review(request_body: bytes, config: WebhookConfig) -> Rendered:
    """:func:`review`, encoded for HTTP: a review as JSON, a refusal of the body as plain text.

    Pure and picklable both ways, so that it can run in a worker process
    (:mod:`kubedock_dns.reviewing`); the reactor then only moves bytes.
    """
    status, document = review(request_body, config)
    if status != 200:
        return Rendered(status, b"text/plain; charset=utf-8", (document["message"] + "\n").encode(),
                        "warn", f"rejected an admission request: HTTP {status}: {document['message']}")
    response = document["response"]
    try:
        body = json.dumps(document).encode()
    except (RecursionError, ValueError) as e:
        message = f"cannot encode the answer ({type(e).__name__}); a field of the pod is nested too deeply"
        return Rendered(400, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                        f"rejected an admission request: HTTP 400: {message}")
    if not response["allowed"]:
        text = f"denied {shown(response['uid'])}: {response['status']['message']}"
        return Rendered(200, b"application/json", body, "info", text)
    return Rendered(200, b"application/json", body, "debug",
                    f"allowed {shown(response['uid'])} (patched: {'patch' in response})")


# -- HTTP ------------------------------------------------------------------------------------------


class WebhookApp:
    """The webhook's HTTP routes: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``.

    :param ready: called for ``/readyz``; True means ready (200), anything else 503.
    :param reviewer: turns a request body into a :class:`Rendered` answer, or a Deferred of
        one; by default :func:`render_review` in this thread (in-memory tests), in production a
        :class:`kubedock_dns.reviewing.ReviewPool` so that DNS never waits for a review.
    """

    app = Klein()
    log = Logger()

    def __init__(self, config: WebhookConfig, ready: Callable[[], bool] = lambda: True,
                 reviewer: Callable[[bytes], Rendered | Deferred[Rendered]] | None = None) -> None:
        self.config = config
        self._ready = ready
        self._reviewer = reviewer if reviewer is not None else (lambda body: render_review(body, config))

    def resource(self) -> KleinResource:
        """The twisted.web resource serving these routes."""
        return self.app.resource()

    @staticmethod
    def _text(request: Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()

    @app.route("/mutate", methods=["POST"])
    def mutate(self, request: Request) -> bytes | Deferred[bytes]:
        body = request.content.read() if request.content is not None else b""
        result = self._reviewer(body)
        if isinstance(result, Rendered):
            return self._send(result, request)
        return result.addCallback(self._send, request)

    def _send(self, rendered: Rendered, request: Request) -> bytes:
        text = rendered.log_text
        if len(text) > _MAX_LOG_TEXT:  # values from the request are in it: keep lines bounded
            text = text[:_MAX_LOG_TEXT] + f"... ({len(text) - _MAX_LOG_TEXT} more characters)"
        getattr(self.log, rendered.log_level)("{text}", text=text)
        request.setResponseCode(rendered.status)
        request.setHeader(b"content-type", rendered.content_type)
        return rendered.body

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


# The API server refuses request bodies over 3 MiB and etcd objects over 1.5 MiB, so a review (the
# object, and on UPDATE its old version) stays well below this; anything larger is not from it.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
# Bodies being received are held in memory (never spooled to /tmp, which the chart sizes at
# 16 MiB); all of them together stay below this, past which new bytes get 503.
MAX_BUFFERED_BYTES = 24 * 1024 * 1024
# A request must arrive whole (headers and body) within this many seconds of its first byte,
# however slowly its bytes trickle in (the API server's webhook timeout is 10 s by default).
REQUEST_SECONDS = 10.0
MAX_CONNECTIONS = 64


def _refuse_and_close(channel: Any, code: int, phrase: str, text: str) -> None:
    """Answer a request that will not be read to its end, and close the connection."""
    body = (text + "\n").encode()
    channel.transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (code, phrase.encode(), len(body)) + body
    )
    channel.loseConnection()


class _BoundedRequest(Request):
    """A request whose body is held in memory up to :data:`MAX_REVIEW_BYTES`; a larger one is
    answered 413 as soon as its Content-Length, or its streamed size, says so."""

    _refused = False
    _counted = 0
    _site: Any = None  # the channel's site, from gotLength on
    channel: Any  # a _LimitedChannel of a _Site
    content: Any

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self.notifyFinish().addBoth(self._release)
        # Kept: when the client goes away mid-body the channel is detached before _release runs,
        # and the bytes counted against the site's budget must still be given back.
        site: _Site = self.channel.site
        self._site = site
        if length is not None and length > site.max_body:
            self._refuse(413, "Content Too Large",
                         f"the request body has {length} bytes; an AdmissionReview has at most {site.max_body}")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        site: _Site = self.channel.site
        size = self._counted + len(data)
        if size > site.max_body:
            self._refuse(413, "Content Too Large",
                         f"the request body exceeds {site.max_body} bytes; an AdmissionReview is smaller")
            return
        if site.buffered + len(data) > site.max_buffered:
            self._refuse(503, "Service Unavailable",
                         "too many request bodies are being received at once; retry")
            return
        site.buffered += len(data)
        self._counted = size
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        channel: Any = self.channel
        channel.request_complete()
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self, code: int, phrase: str, text: str) -> None:
        self._refused = True
        self._release()
        self.channel.request_complete()  # answered: no 408 for it later
        self.content = io.BytesIO()
        site: _Site = self.channel.site
        site.limits_log.bite(f"webhook {code}", f"webhook: answered {code} to {self.getClientAddress()}: {text}")
        _refuse_and_close(self.channel, code, phrase, text)

    def _release(self, result: object = None) -> object:
        counted, self._counted = self._counted, 0
        if counted:
            self._site.buffered -= counted
        return None

    def process(self) -> None:
        self._release()  # the body is read whole by now; the review holds its own copy
        super().process()


class _LimitedChannel(HTTPChannel):
    """An HTTP channel giving each request :data:`REQUEST_SECONDS` from its first byte to its
    last; a request still incomplete then gets 408 and the connection is closed."""

    _deadline: Any = None
    _abort_call: Any = None
    site: Any  # set by the Site that builds the channel
    transport: Any

    def dataReceived(self, data: bytes) -> None:
        if self._abort_call is not None:
            return  # answered 408 and closing: read nothing more
        if self._deadline is None and data:
            site: _Site = self.site
            self._deadline = site.clock.callLater(site.request_seconds, self._too_slow)
        super().dataReceived(data)

    def request_complete(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        site: _Site = self.site
        site.limits_log.bite(
            "webhook slow request",
            f"webhook: closed a connection from {self.transport.getPeer().host}: its request did "
            f"not arrive whole within {site.request_seconds:.0f}s",
        )
        _refuse_and_close(self, 408, "Request Timeout",
                          f"the request did not arrive whole within {site.request_seconds:.0f}s")
        # A client that reads nothing keeps the TLS close from completing: abort it then.
        self._abort_call = site.clock.callLater(5, self.transport.abortConnection)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.request_complete()
        abort = self._abort_call
        if abort is not None and abort.active():
            abort.cancel()
        super().connectionLost(reason)


class _Site(Site):
    """A Site with bounded requests (see :class:`_BoundedRequest`, :class:`_LimitedChannel`)
    and without per-request access logging (probes would flood the log)."""

    protocol = _LimitedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no h2 wrapper
    requestFactory = _BoundedRequest

    def __init__(self, resource: Resource, clock: Any, limits_log: RateLimitedLog, *,
                 max_body: int = MAX_REVIEW_BYTES, max_buffered: int = MAX_BUFFERED_BYTES,
                 request_seconds: float = REQUEST_SECONDS, timeout: float = 60) -> None:
        super().__init__(resource, timeout=timeout, reactor=clock)
        self.clock = clock
        self.limits_log = limits_log
        self.max_body = max_body
        self.max_buffered = max_buffered
        self.request_seconds = request_seconds
        self.buffered = 0  # body bytes held by requests being received, all connections

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


class _ConnectionTracker(ConnectionCap):
    protocol = _TrackedProtocol  # type: ignore[assignment]


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
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_body: int = MAX_REVIEW_BYTES,
        request_seconds: float = REQUEST_SECONDS,
    ) -> None:
        self.limits_log = RateLimitedLog(reactor)
        self.site = _Site(resource, reactor, self.limits_log, max_body=max_body,
                          request_seconds=request_seconds)
        self.tls = tls
        self._connections = _ConnectionTracker(self.site, max_connections, "webhook", self.limits_log)
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
        log.info("webhook listening on {interface}:{port}", interface=self._interface or "*", port=self.port)

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
    **limits: Any,
) -> WebhookService:
    """A service serving ``app_resource`` over TLS on ``interface:port`` (``""``: all IPv4).

    The certificate and key are loaded now (``TLSConfigError`` names a bad file), and re-read
    at most every ``check_interval`` seconds when connections arrive.  ``reactor`` must provide
    ``IReactorSSL`` and ``IReactorTime``.  ``limits`` (``max_connections``, ``max_body``,
    ``request_seconds``) override the defaults of :class:`WebhookService`.
    """
    tls = ReloadingServerTLS(cert_path, key_path, clock=reactor, check_interval=check_interval)
    return WebhookService(app_resource, port, interface, tls, reactor, **limits)

