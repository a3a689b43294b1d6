"""The pod contract written by kubedock and read by kubedock-dns.

kubedock creates every Docker container as a pod labelled ``kubedock: "true"`` and annotated with
``kubedock.hostalias/N`` (N = 0 is the Docker hostname, 1.. the network aliases),
``kubedock.network/N`` (Docker network IDs), ``kubedock.containername`` and the label
``kubedock.containerid`` (the 12-hex short ID).  This module turns the raw JSON of such a pod into
a small frozen :class:`PodRecord` holding only what the index needs, and checks annotations for the
admission webhook.  It is pure: no Twisted, no kubernetes client.

Testcontainers' host access (``host.testcontainers.internal``) is part of the contract too: every
container of one Testcontainers session carries the label ``org.testcontainers.sessionId``, which
kubedock copies into the pod's annotations, and the session's sshd container runs the image
Testcontainers uses for it (``testcontainers/sshd`` unless configured).  :class:`PodRecord` keeps
the session and the container's image; :class:`ImagePattern` says which images are sshd images.

Docker accepts names that cannot be DNS names (longer than 63 characters, ``db:5432``): such a
container runs but cannot be found by that name.  So a name that is not a DNS name never makes a pod
invalid: it is left out of ``PodRecord.names`` and kept, with the reason, in
``PodRecord.refused_names``.  Only a malformed *network* annotation is an error
(:class:`AnnotationError`).  Every other annotation (kubedock copies the container's labels into
annotations) is none of our business.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

HOSTALIAS_PREFIX = "kubedock.hostalias/"
NETWORK_PREFIX = "kubedock.network/"
CONTAINER_NAME_ANNOTATION = "kubedock.containername"
CONTAINER_ID_LABEL = "kubedock.containerid"
DEFAULT_OPT_IN_LABEL = "kubedock"
# With --network-policies the webhook labels each opted-in pod once per network, for the
# NetworkPolicies to select (they select labels, never annotations): see network_label_key.
NETWORK_LABEL_PREFIX = "kubedock-dns.net/"
NETWORK_LABEL_HEX = 20
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")

# Docker container names and aliases: [a-zA-Z0-9][a-zA-Z0-9_.-]*.  As DNS names they must also fit
# in labels of at most 63 octets and 253 in all.
_DOCKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NETWORK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ASCII_DIGITS = re.compile(r"[0-9]+")  # not \d: that matches every script's digits
# Annotation indexes: kubedock counts from 0; nine digits is far beyond any real pod.
MAX_INDEX_DIGITS = 9

PHASES_ASKING = frozenset({"Pending", "Running"})

# Testcontainers labels every container of a session with the session's ID (Java and Go as
# org.testcontainers.sessionId, Node, .NET and Rust as org.testcontainers.session-id); kubedock copies
# labels into annotations.
SESSION_ANNOTATION = "org.testcontainers.sessionId"
SESSION_ANNOTATIONS = (SESSION_ANNOTATION, "org.testcontainers.session-id")
# The name Testcontainers gives its containers for the host (an ExtraHosts entry, which kubedock
# drops), and the image of the sshd container that tunnels the host's ports to them.
HOST_ACCESS_NAME = "host.testcontainers.internal"
DEFAULT_SSHD_IMAGE = "testcontainers/sshd"
_MAX_SESSION = 253


def pod_search_list(namespace: str, cluster_domain: str) -> list[str]:
    """The DNS search list the webhook gives an opted-in pod of ``namespace``, the same as the
    kubelet's ClusterFirst list; explain walks it as glibc would.  Without a namespace, the two
    cluster-wide suffixes."""
    domain = cluster_domain.strip(".")
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain] if namespace else [f"svc.{domain}", domain]


_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True, slots=True)
class ImageReference:
    """An image reference split as Docker reads it: registry ('' for Docker Hub), repository
    path (Docker Hub's ``library/`` dropped), tag and digest ('' when absent)."""

    registry: str
    path: str
    tag: str = ""
    digest: str = ""


def parse_image(text: str) -> ImageReference:
    """Split ``[registry/]path[:tag][@digest]``; ValueError naming the part that is not valid."""
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise ValueError(f"{text!r} is not an image reference (such as testcontainers/sshd:1.4.0)")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ValueError(f"image {text!r}: {digest!r} is not a digest such as sha256:<64 hex>")
    head, _, last = rest.rpartition("/")
    name, colon, tag = last.partition(":")
    if colon and not _TAG.match(tag):
        raise ValueError(f"image {text!r}: tag {tag!r} is not valid (letters, digits, '_', '.', '-')")
    components = (head.split("/") if head else []) + [name]
    registry = ""
    if len(components) > 1 and ("." in components[0] or ":" in components[0] or components[0] == "localhost"):
        registry = components.pop(0).lower()
    if registry in _DOCKER_HUB:
        registry = ""
    for component in components:
        if not _PATH_COMPONENT.match(component):
            raise ValueError(f"image {text!r}: {component!r} is not a valid repository name part "
                             "(lower-case letters and digits, separated by '.', '_', '__' or '-')")
    if not registry and len(components) == 2 and components[0] == "library":
        components.pop(0)
    return ImageReference(registry, "/".join(components), tag, digest.lower())


@dataclass(frozen=True, slots=True)
class ImagePattern:
    """Which images are Testcontainers' sshd: a reference whose unset parts match anything.

    ``testcontainers/sshd`` matches every tag, on Docker Hub and on any registry or under any
    prefix that mirrors it (``registry.example.com/mirror/testcontainers/sshd:1.4.0``, as
    Testcontainers' ``hub.image.name.prefix`` writes it); a registry, tag or digest in the pattern
    must be the image's own.
    """

    text: str
    reference: ImageReference

    @classmethod
    def parse(cls, text: str) -> "ImagePattern":
        """The pattern ``text`` spells; ValueError saying what is wrong with it."""
        stripped = text.strip() if isinstance(text, str) else text
        return cls(stripped, parse_image(stripped))

    def matches(self, image: str) -> bool:
        try:
            found = parse_image(image)
        except ValueError:
            return False
        want = self.reference
        if want.registry:
            if found.registry != want.registry or found.path != want.path:
                return False
        elif found.path != want.path and not found.path.endswith("/" + want.path):
            return False
        if want.tag and (found.tag or "latest") != want.tag:
            return False
        return not want.digest or found.digest == want.digest


class AnnotationError(ValueError):
    """An annotation of a pod does not follow the contract; the message names key and value."""


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the index keeps of one pod: identity, addresses, networks and names.

    ``names`` are lower-cased DNS names, the primary name (``hostalias/0``) first.  ``networks``
    keep annotation index order, which decides which network wins for an asker in several.
    ``reverse_name`` is what a PTR query for its address answers (the container name when it is a
    valid DNS name, else ``hostalias/0``); ``refused_names`` the ``(name, reason)`` pairs that cannot be
    DNS names, for the networks view.
    """

    uid: str
    namespace: str = ""
    name: str = ""
    ips: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    reverse_name: str | None = None
    refused_names: tuple[tuple[str, str], ...] = ()
    phase: str = "Pending"
    terminating: bool = False
    host_network: bool = False
    ready: bool = False
    session: str = ""  # the Testcontainers session (annotation org.testcontainers.sessionId/session-id)
    image: str = ""    # the image of the pod's (kubedock's one) container

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError(f"pod {self.namespace}/{self.name} has no uid")
        # Interned: every network's pods repeat the same names (db, api), namespace, phase and
        # network IDs, and each decoded JSON string would otherwise be a copy of its own.
        object.__setattr__(self, "ips", tuple(canonical_ip(ip) for ip in self.ips))
        object.__setattr__(self, "names", tuple(dict.fromkeys(sys.intern(n.lower()) for n in self.names)))
        object.__setattr__(self, "networks", tuple(dict.fromkeys(sys.intern(n) for n in self.networks)))
        object.__setattr__(self, "namespace", sys.intern(self.namespace))
        object.__setattr__(self, "phase", sys.intern(self.phase))
        object.__setattr__(self, "session", sys.intern(self.session))
        object.__setattr__(self, "image", sys.intern(self.image))
        if self.reverse_name is not None:
            # Interned too: it is one of the names, and so becomes the same string object.
            object.__setattr__(self, "reverse_name", sys.intern(self.reverse_name.lower()))

    @property
    def primary_name(self) -> str | None:
        return self.names[0] if self.names else None

    @property
    def is_asker(self) -> bool:
        """Its source address selects its networks: it has an IP and has not finished."""
        return bool(self.ips) and self.phase in PHASES_ASKING and not self.host_network

    def is_answer(self, require_ready: bool = False) -> bool:
        """Its names resolve to its IPs: Running with an IP (ready, if so configured), and not
        being deleted (``docker rm`` removes the name at once, whatever the grace period)."""
        return (
            bool(self.ips)
            and self.phase == "Running"
            and not self.terminating
            and not self.host_network
            and (self.ready or not require_ready)
        )

    @property
    def awaits_ip(self) -> bool:
        """An opted-in pod that will soon ask questions from an address we do not know yet."""
        return not self.ips and self.phase == "Pending" and not self.host_network


@dataclass(frozen=True, slots=True)
class Relisted:
    """The complete set of opted-in pods, as a fresh list returned it; marks the index synced."""

    records: tuple[PodRecord, ...]


@dataclass(frozen=True, slots=True)
class Upserted:
    """One pod was added or changed."""

    record: PodRecord


@dataclass(frozen=True, slots=True)
class Deleted:
    """One pod is gone."""

    uid: str


@dataclass(frozen=True, slots=True)
class WatchInterrupted:
    """The watch lost changes (it failed, or its resourceVersion expired): until the next
    :class:`Relisted`, the index may lack pods the API server has (or have some it deleted)."""


Change = Relisted | Upserted | Deleted | WatchInterrupted


@functools.lru_cache(maxsize=65536)
def canonical_ip(text: str) -> str:
    """The canonical text of an IP address; IPv4-mapped IPv6 addresses become IPv4."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def ascii_decimal(text: str, max_digits: int) -> int:
    """The number ``text`` spells in 1 to ``max_digits`` ASCII digits; ValueError otherwise.

    The one parser for numbers taken from outside (annotation keys, PTR names, ports, flags):
    ``str.isdigit`` accepts superscripts that ``int`` then rejects, ``int`` itself accepts other
    scripts' digits, signs, ``_`` and whitespace, and thousands of digits trip Python's
    int-conversion limit.  Leading zeros are the caller's policy.
    """
    if not isinstance(text, str) or not 0 < len(text) <= max_digits or not _ASCII_DIGITS.fullmatch(text):
        shown = text if not isinstance(text, str) or len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"{shown!r} is not a number of at most {max_digits} digits 0-9")
    return int(text)


def _is_ip(text: str) -> bool:
    try:
        canonical_ip(text)
    except ValueError:
        return False
    return True


def indexed_annotations(annotations: Mapping[str, str], prefix: str) -> list[tuple[int, str, str]]:
    """``(N, key, value)`` for every ``<prefix>N`` annotation, in numeric order of N.

    Raises :class:`AnnotationError` for a key whose suffix is not a non-negative integer.
    """
    found = []
    for key, value in annotations.items():
        if not key.startswith(prefix):
            continue
        suffix = key[len(prefix):]
        try:
            number = ascii_decimal(suffix, MAX_INDEX_DIGITS)
        except ValueError:
            number = -1
        if number < 0 or (len(suffix) > 1 and suffix.startswith("0")):
            shown = suffix if len(suffix) <= 20 else suffix[:20] + "..."
            raise AnnotationError(
                f"annotation {prefix + shown!r}: the part after {prefix!r} must be an index such as "
                f"0, 1, 2 (digits 0-9, at most {MAX_INDEX_DIGITS}, no leading zero; got {shown!r})"
            )
        found.append((number, key, value))
    found.sort()
    return found


def check_network(key: str, value: Any) -> str:
    """The value of a network annotation (a Docker network ID or name), checked."""
    if not isinstance(value, str) or not value:
        raise AnnotationError(f"annotation {key!r} must name a network (got {value!r})")
    if len(value) > 253 or not _NETWORK_ID.match(value):
        raise AnnotationError(
            f"annotation {key}={value!r} is not a valid network ID: expected a Docker network ID "
            f"(64 hexadecimal characters) or name (letters, digits, '-', '_', '.')"
        )
    return value


def network_label_key(network: str) -> str:
    """The label key marking a pod as a member of ``network`` (value ``"true"``).

    A label name holds at most 63 characters and a network ID has 64, so the key keeps a stable
    short form: for a Docker network ID (64 lowercase hex, random) its first 20 hex characters,
    so that ``docker network ls`` (12 of them) finds it; for anything else a network annotation
    may hold (a name) ``n-`` and the first 20 hex characters of its SHA-256.  The two forms never
    meet ('n' is not hex); 80 random bits make two networks of one namespace sharing a key a
    chance of n**2 / 2**81 (4e-19 for a thousand networks).
    """
    if _HEX_ID.match(network):
        return NETWORK_LABEL_PREFIX + network[:NETWORK_LABEL_HEX]
    digest = hashlib.sha256(network.encode()).hexdigest()
    return NETWORK_LABEL_PREFIX + "n-" + digest[:NETWORK_LABEL_HEX]


def networks_from(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """The pod's networks in annotation index order, each checked."""
    return tuple(check_network(k, v) for _, k, v in indexed_annotations(annotations, NETWORK_PREFIX))


@dataclass(frozen=True, slots=True)
class Names:
    """A pod's names as Docker gives them, sorted into those DNS can carry and those it cannot."""

    names: tuple[str, ...]                     # usable DNS names, hostalias/0 first
    reverse_name: str | None                   # what a PTR query answers, if anything
    refused: tuple[tuple[str, str, str], ...]  # (annotation or label key, value, reason)


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a DNS name for a container, or None when it can."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > 253:
        return f"it has {len(value)} characters, more than the 253 a DNS name may have"
    if not _DOCKER_NAME.match(value) or value.endswith("."):
        bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "_.-"))), None)
        if bad is not None:
            what = f"{bad!r} is not allowed"
        elif value.endswith("."):
            what = "it ends with '.'"
        else:
            what = f"it starts with {value[0]!r}"
        return f"{what} (use letters, digits, '-', '_', '.'; start with a letter or digit)"
    for label in value.split("."):
        if not label:
            return "it has an empty part between dots"
        if len(label) > 63:
            part = "it" if label == value else f"its part {label[:16]!r}..."
            return f"{part} has {len(label)} characters, more than the 63 a DNS label may have"
    return None


def sort_names(annotations: Mapping[str, str], labels: Mapping[str, str]) -> Names:
    """Every name Docker would resolve for the container, the primary (``hostalias/0``) first:
    host name and aliases, the container name, the short container ID; names that cannot be
    DNS names go to ``refused`` with the reason."""
    candidates: list[tuple[str, Any]] = []
    refused: list[tuple[str, str, str]] = []
    try:
        candidates.extend((k, v) for _, k, v in indexed_annotations(annotations, HOSTALIAS_PREFIX))
    except AnnotationError:
        # A copied container label that merely looks like ours: take the well-formed keys only.
        for key, value in annotations.items():
            if key.startswith(HOSTALIAS_PREFIX):
                suffix = key[len(HOSTALIAS_PREFIX):]
                if suffix.isdigit() and (len(suffix) == 1 or not suffix.startswith("0")):
                    candidates.append((key, value))
                else:
                    refused.append((key, str(value), "the part after 'kubedock.hostalias/' is not an index"))
        candidates.sort(key=lambda kv: int(kv[0][len(HOSTALIAS_PREFIX):]))
    container_name = annotations.get(CONTAINER_NAME_ANNOTATION)
    if container_name:
        # Docker reports names with a leading '/'; kubedock may keep it.
        candidates.append((CONTAINER_NAME_ANNOTATION, container_name.lstrip("/")))
    container_id = labels.get(CONTAINER_ID_LABEL)
    if container_id:
        candidates.append((CONTAINER_ID_LABEL, container_id))
    names: list[str] = []
    for key, value in candidates:
        problem = name_problem(value)
        if problem is None:
            names.append(value)
        else:
            refused.append((key, str(value), problem))
    reverse = None
    if container_name and name_problem(container_name.lstrip("/")) is None:
        reverse = container_name.lstrip("/")
    else:
        primary = annotations.get(HOSTALIAS_PREFIX + "0")
        if primary and name_problem(primary) is None:
            reverse = primary
    return Names(tuple(names), reverse, tuple(refused))


def names_from(annotations: Mapping[str, str], labels: Mapping[str, str]) -> tuple[str, ...]:
    """The usable DNS names of the container, the primary (``hostalias/0``) first."""
    return sort_names(annotations, labels).names


def check_pod_annotations(annotations: Mapping[str, str], labels: Mapping[str, str]) -> None:
    """Raise :class:`AnnotationError` naming the first network annotation that breaks the
    contract.  Names never do: see :func:`sort_names`."""
    networks_from(annotations)


def contract_view(annotations: Mapping[str, str], labels: Mapping[str, str], opt_in_label: str,
                  network_labels: bool = False) -> dict[str, str]:
    """The annotations and labels that must not change once a pod exists (with
    ``network_labels``, the network labels too: adding one would open another network's pods)."""
    view = {
        k: v
        for k, v in annotations.items()
        if k.startswith(HOSTALIAS_PREFIX) or k.startswith(NETWORK_PREFIX)
    }
    if opt_in_label in labels:
        view["label " + opt_in_label] = labels[opt_in_label]
    if network_labels:
        view.update(("label " + k, v) for k, v in labels.items() if k.startswith(NETWORK_LABEL_PREFIX))
    return view


def pod_record_from_dict(raw: Mapping[str, Any]) -> PodRecord:
    """Trim a pod, as the API server's JSON, to a :class:`PodRecord`.

    A pod whose network annotations break the contract gets no networks (it can neither answer
    nor be answered) rather than poisoning the whole index: the webhook refuses such pods, so this
    only happens to pods created while the webhook was absent.  Names that cannot be DNS names
    are left out (see :func:`sort_names`).
    """
    metadata = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    try:
        networks = networks_from(annotations)
    except AnnotationError:
        networks = ()
    sorted_names = sort_names(annotations, labels)
    ips = [entry.get("ip") for entry in status.get("podIPs") or () if entry.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    ips = [ip for ip in ips if _is_ip(ip)]
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()
    )
    return PodRecord(
        uid=metadata.get("uid") or "",
        namespace=metadata.get("namespace") or "",
        name=metadata.get("name") or "",
        ips=tuple(ips),
        networks=networks,
        names=sorted_names.names,
        reverse_name=sorted_names.reverse_name,
        refused_names=tuple((value, f"{key}: {reason}") for key, value, reason in sorted_names.refused),
        phase=status.get("phase") or "Pending",
        terminating=bool(metadata.get("deletionTimestamp")),
        host_network=bool(spec.get("hostNetwork")),
        ready=ready,
        session=session_of(annotations),
        image=_main_image(spec),
    )


def session_of(annotations: Mapping[str, Any]) -> str:
    """The pod's Testcontainers session ID ('' when it has none, or an unusable one)."""
    for key in SESSION_ANNOTATIONS:
        value = annotations.get(key)
        if isinstance(value, str) and value.strip() and len(value) <= _MAX_SESSION:
            return value.strip()
    return ""


def _main_image(spec: Mapping[str, Any]) -> str:
    """The image of the pod's first container: kubedock runs each Docker container as one."""
    containers = spec.get("containers") or ()
    image = containers[0].get("image") if containers and isinstance(containers[0], dict) else None
    return image if isinstance(image, str) and len(image) <= 1024 else ""
