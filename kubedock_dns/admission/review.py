"""Admission reviews, decided: JSON bytes in, the HTTP answer out (pure: no Twisted, no I/O).

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
  mutated with a JSON patch setting ``spec.dnsPolicy: None`` and ``spec.dnsConfig``.  In that
  ``dnsConfig`` kubedock-dns owns ``nameservers`` (exactly the configured IP) and ``searches``
  (``<ns>.svc.<domain>``, ``svc.<domain>``, ``<domain>``: the cluster's usual list) and the
  ``ndots`` option; the pod's other options are kept, in their order, after ``ndots``.  The patch
  uses ``add``, which per RFC 6902 creates a missing member and replaces an existing one, so it
  is correct whether or not the pod already had a ``dnsConfig``; nothing is emitted when the pod
  already has exactly that config.  With ``network_labels`` (``--network-policies``) the patch
  also gives the pod one label ``kubedock-dns.net/<short network ID>: "true"`` per network
  (:func:`network_label_patch`, :func:`kubedock_dns.contract.network_label_key`) and removes any
  other label under that prefix.  A pod with no ``kubedock.network/N`` annotation is admitted and
  mutated with a warning: it is on no network, so no other pod can resolve its names.
- UPDATE of a pod that is opted in before or after the change: the ``kubedock.hostalias/*`` and
  ``kubedock.network/*`` annotations and the opt-in label (with ``network_labels``, the network
  labels too) must not change (code 403); any other change is allowed and nothing is patched (a
  pod's DNS settings cannot change after creation).  Unchanged annotations are not validated
  again, so that a pod admitted while the webhook was absent can still be updated (e.g. to remove
  a finalizer) and deleted.
- DELETE and CONNECT are allowed.  The answer depends on the request alone: no state, no side
  effects, so dry-run requests get the same answer and any replica can answer.

:func:`render_review` is what the review worker process (:mod:`kubedock_dns.admission.workers`)
runs: this module imports only the standard library and :mod:`kubedock_dns.contract`, so the
worker loads neither Twisted nor klein nor OpenSSL to parse JSON.  An unexpected error while
deciding is answered 400 and its traceback travels back in :attr:`Rendered.log_text` (the worker
has no log of its own).
"""

from __future__ import annotations

import base64
import json
import reprlib
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

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

__all__ = [
    "ADMISSION_API_VERSION",
    "MAX_ANSWER_BYTES",
    "MAX_MESSAGE",
    "MAX_WARNINGS",
    "MAX_WARNING_CHARS",
    "MalformedReview",
    "Rendered",
    "WebhookConfig",
    "admit",
    "dns_patch",
    "network_label_patch",
    "parse_review",
    "render_review",
    "review",
    "shown",
]

ADMISSION_API_VERSION = "admission.k8s.io/v1"
# Bounds on an answer, whatever the request holds (docs/design.md, "Bounds").  The API server
# shows warnings to the client and cuts long or many ones itself ("limit warnings to 120
# characters if possible; warnings over 256 characters and large numbers of warnings may be
# truncated"), so at most MAX_WARNINGS of at most MAX_WARNING_CHARS, the last one saying how many
# more there were; a denial's message has at most MAX_MESSAGE characters; and an answer (the
# patch copies the pod's dnsConfig, so it grows with the request) at most MAX_ANSWER_BYTES.
MAX_WARNINGS = 10
MAX_WARNING_CHARS = 256
MAX_MESSAGE = 1024
MAX_ANSWER_BYTES = 6 * 1024 * 1024
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
    """``pod <namespace>/<name>``, each cut to a DNS label's length (the API server validates
    names only after mutating webhooks: here a name may still be 100,000 characters)."""
    metadata = (request.get("object") or request.get("oldObject") or {}).get("metadata") or {}
    name = request.get("name") or metadata.get("name")
    if not name:
        name = _shorten(metadata.get("generateName") or "", 63) + "<generated>"
    return f"pod {_shorten(_namespace(request) or '?', 63)}/{_shorten(name, 63)}"


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
    message = _shorten(message, MAX_MESSAGE)
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


def _describe_changes(old: Mapping[str, str], new: Mapping[str, str], shown_at_most: int = 5) -> str:
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    changes = []
    for key in changed[:shown_at_most]:
        what = (
            f"label {_shorten(key[len(_LABEL_KEY_PREFIX):])!r}"
            if key.startswith(_LABEL_KEY_PREFIX)
            else f"annotation {_shorten(key)!r}"
        )
        if key not in old:
            changes.append(f"{what} added ({_shorten(new[key])!r})")
        elif key not in new:
            changes.append(f"{what} removed (was {_shorten(old[key])!r})")
        else:
            changes.append(f"{what} changed from {_shorten(old[key])!r} to {_shorten(new[key])!r}")
    if len(changed) > shown_at_most:
        changes.append(f"{len(changed) - shown_at_most} more")
    return "; ".join(changes)


def _name_warnings(request: Mapping[str, Any], annotations: Mapping[str, str],
                   labels: Mapping[str, str], room: int) -> list[str]:
    """A warning per name that cannot be a DNS name (the pod runs, that name does not resolve),
    at most ``room`` of them: past that, the last one counts the rest."""
    container = annotations.get(CONTAINER_NAME_ANNOTATION)
    who = _describe(request)
    if container:
        who = f"container {_shorten(container.lstrip('/'), 40)!r} ({who})"
    refused = sort_names(annotations, labels).refused
    shown = refused if len(refused) <= room else refused[: room - 1]
    warnings = [
        _shorten(f"{who}: {_shorten(key, 40)}={_shorten(value, 44)!r} cannot be a DNS name: {reason}; the "
                 f"container runs, but nothing can resolve it by this name", MAX_WARNING_CHARS)
        for key, value, reason in shown
    ]
    if len(shown) < len(refused):
        warnings.append(_shorten(f"{who}: {len(refused) - len(shown)} more names cannot be DNS names; "
                                 "`kubedock-dns networks` lists every one", MAX_WARNING_CHARS))
    return warnings


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
        on_no_network = not any(key.startswith(NETWORK_PREFIX) for key in annotations)
        warnings = _name_warnings(request, annotations, labels, MAX_WARNINGS - on_no_network)
        if on_no_network:
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
    not foresee, or a bug) is answered 400 naming the error (:func:`render_review` also logs its
    traceback).
    """
    status, document, _ = _review(request_body, config)
    return status, document


def _review(request_body: bytes, config: WebhookConfig) -> tuple[int, dict[str, Any], str | None]:
    """:func:`review`, plus the traceback of an unexpected error (None when there was none)."""
    try:
        request = parse_review(request_body)
    except MalformedReview as e:
        return 400, _status(400, str(e)), None
    try:
        response = admit(request, config)
    except RecursionError:
        return 400, _status(400, "a field of the pod is JSON nested too deeply to review"), None
    except Exception as e:
        message = (f"cannot review this request ({type(e).__name__}: {shown(str(e))}); "
                   f"it does not look like a pod the API server would send")
        return 400, _status(400, message), (f"admission review {shown(request.get('uid'))} failed:\n"
                                            + traceback.format_exc(limit=20))
    return 200, {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}, None


@dataclass(frozen=True)
class Rendered:
    """A finished HTTP answer to ``POST /mutate``, the line to log about it, and what to count:
    its ``outcome`` (one of :data:`REVIEW_OUTCOMES`) and the admission ``warnings`` it carries."""

    status: int
    content_type: bytes
    body: bytes
    log_level: str  # "error", "warn", "info" or "debug"
    log_text: str
    outcome: str = "rejected"
    warnings: int = 0


# allowed (unchanged), patched (allowed with a patch), denied, rejected (HTTP 400: not a review
# that can be read or decided), unavailable (HTTP 503: no worker to decide it now).
REVIEW_OUTCOMES = ("allowed", "patched", "denied", "rejected", "unavailable")


def render_review(request_body: bytes, config: WebhookConfig) -> Rendered:
    """:func:`review`, encoded for HTTP: a review as JSON, a refusal of the body as plain text.

    Pure and picklable both ways, so that it can run in a worker process
    (:mod:`kubedock_dns.admission.workers`); the reactor then only moves bytes.
    """
    status, document, failure = _review(request_body, config)
    if status != 200:
        text = f"rejected an admission request: HTTP {status}: {document['message']}"
        return Rendered(status, b"text/plain; charset=utf-8", (document["message"] + "\n").encode(),
                        "warn" if failure is None else "error",
                        text if failure is None else f"{text}\n{failure}")
    response = document["response"]
    try:
        body = json.dumps(document).encode()
    except (RecursionError, ValueError) as e:
        message = f"cannot encode the answer ({type(e).__name__}); a field of the pod is nested too deeply"
        return Rendered(400, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                        f"rejected an admission request: HTTP 400: {message}")
    if len(body) > MAX_ANSWER_BYTES:
        message = (f"the answer would be {len(body)} bytes, more than the {MAX_ANSWER_BYTES} a review "
                   f"is answered with: the pod's dnsConfig is too large")
        return Rendered(400, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                        f"rejected an admission request: HTTP 400: {message}")
    if not response["allowed"]:
        text = f"denied {shown(response['uid'])}: {response['status']['message']}"
        return Rendered(200, b"application/json", body, "info", text, "denied")
    return Rendered(200, b"application/json", body, "debug",
                    f"allowed {shown(response['uid'])} (patched: {'patch' in response})",
                    "patched" if "patch" in response else "allowed", len(response.get("warnings", ())))
