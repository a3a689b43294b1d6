"""The pod contract written by kubedock and read by kubedock-dns.

kubedock creates every Docker container as a pod labelled ``kubedock: "true"`` and annotated with
``kubedock.hostalias/N`` (N = 0 is the Docker hostname, 1.. the network aliases),
``kubedock.network/N`` (Docker network IDs), ``kubedock.containername`` and the label
``kubedock.containerid`` (the 12-hex short ID).  This module turns the raw JSON of such a pod into
a small frozen :class:`PodRecord` holding only what the index needs, and checks annotations for the
admission webhook.  It is pure: no Twisted, no kubernetes client.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Mapping

HOSTALIAS_PREFIX = "kubedock.hostalias/"
NETWORK_PREFIX = "kubedock.network/"
CONTAINER_NAME_ANNOTATION = "kubedock.containername"
CONTAINER_ID_LABEL = "kubedock.containerid"
DEFAULT_OPT_IN_LABEL = "kubedock"

# Docker container names and aliases: [a-zA-Z0-9][a-zA-Z0-9_.-]*.  As DNS names they must also fit
# in labels of at most 63 octets and 253 in all.
_DOCKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NETWORK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ASCII_DIGITS = re.compile(r"[0-9]+")  # not \d: that matches every script's digits
# Annotation indexes: kubedock counts from 0; nine digits is far beyond any real pod.
MAX_INDEX_DIGITS = 9

PHASES_ASKING = frozenset({"Pending", "Running"})


class AnnotationError(ValueError):
    """An annotation of a pod does not follow the contract; the message names key and value."""


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the index keeps of one pod: identity, addresses, networks and names.

    ``names`` are lower-cased DNS names, the primary name (``hostalias/0``) first.  ``networks``
    keep annotation index order, which decides which network wins for an asker in several.
    """

    uid: str
    namespace: str = ""
    name: str = ""
    ips: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    phase: str = "Pending"
    terminating: bool = False
    host_network: bool = False
    ready: bool = False

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError(f"pod {self.namespace}/{self.name} has no uid")
        object.__setattr__(self, "ips", tuple(canonical_ip(ip) for ip in self.ips))
        object.__setattr__(self, "names", tuple(dict.fromkeys(n.lower() for n in self.names)))
        object.__setattr__(self, "networks", tuple(dict.fromkeys(self.networks)))

    @property
    def primary_name(self) -> str | None:
        return self.names[0] if self.names else None

    @property
    def is_asker(self) -> bool:
        """Its source address selects its networks: it has an IP and has not finished."""
        return bool(self.ips) and self.phase in PHASES_ASKING and not self.host_network

    def is_answer(self, require_ready: bool = False) -> bool:
        """Its names resolve to its IPs: Running with an IP (ready, if so configured)."""
        return (
            bool(self.ips)
            and self.phase == "Running"
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


Change = Relisted | Upserted | Deleted


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


def check_dns_name(key: str, value: Any) -> str:
    """The value of a name annotation, checked to be a Docker name usable as a DNS name."""
    if not isinstance(value, str) or not value:
        raise AnnotationError(f"annotation {key!r} must be a non-empty host name (got {value!r})")
    if len(value) > 253 or not _DOCKER_NAME.match(value) or value.endswith("."):
        raise AnnotationError(
            f"annotation {key}={value!r} is not a valid host name: use letters, digits, '-', '_' "
            f"and '.', starting with a letter or digit, at most 253 characters"
        )
    for label in value.split("."):
        if not label or len(label) > 63:
            raise AnnotationError(
                f"annotation {key}={value!r} is not a valid host name: every dot-separated part "
                f"must have 1 to 63 characters"
            )
    return value


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


def networks_from(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """The pod's networks in annotation index order, each checked."""
    return tuple(check_network(k, v) for _, k, v in indexed_annotations(annotations, NETWORK_PREFIX))


def names_from(annotations: Mapping[str, str], labels: Mapping[str, str]) -> tuple[str, ...]:
    """Every name Docker would resolve for the container, the primary (``hostalias/0``) first:
    host name and aliases, the container name, the short container ID."""
    names = [check_dns_name(k, v) for _, k, v in indexed_annotations(annotations, HOSTALIAS_PREFIX)]
    container_name = annotations.get(CONTAINER_NAME_ANNOTATION)
    if container_name:
        # Docker reports names with a leading '/'; kubedock may keep it.
        names.append(check_dns_name(CONTAINER_NAME_ANNOTATION, container_name.lstrip("/")))
    container_id = labels.get(CONTAINER_ID_LABEL)
    if container_id:
        names.append(check_dns_name(CONTAINER_ID_LABEL, container_id))
    return tuple(names)


def check_pod_annotations(annotations: Mapping[str, str], labels: Mapping[str, str]) -> None:
    """Raise :class:`AnnotationError` naming the first annotation that breaks the contract."""
    networks_from(annotations)
    names_from(annotations, labels)


def contract_view(annotations: Mapping[str, str], labels: Mapping[str, str], opt_in_label: str) -> dict[str, str]:
    """The annotations and label that must not change once a pod exists."""
    view = {
        k: v
        for k, v in annotations.items()
        if k.startswith(HOSTALIAS_PREFIX) or k.startswith(NETWORK_PREFIX)
    }
    if opt_in_label in labels:
        view["label " + opt_in_label] = labels[opt_in_label]
    return view


def pod_record_from_dict(raw: Mapping[str, Any]) -> PodRecord:
    """Trim a pod, as the API server's JSON, to a :class:`PodRecord`.

    A pod whose annotations break the contract gets no names and no networks (it can neither
    answer nor be answered) rather than poisoning the whole index: the webhook refuses such pods,
    so this only happens to pods created while the webhook was absent.
    """
    metadata = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    try:
        networks = networks_from(annotations)
        names = names_from(annotations, labels)
    except AnnotationError:
        networks, names = (), ()
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
        names=names,
        phase=status.get("phase") or "Pending",
        terminating=bool(metadata.get("deletionTimestamp")),
        host_network=bool(spec.get("hostNetwork")),
        ready=ready,
    )
