"""The network index: who asks from which address, and which names each network holds.

A pure data structure (no Twisted, no kubernetes) fed with the change types of
:mod:`kubedock_dns.contract`.  It keeps four maps, updated in O(names x networks) of the one pod
that changed, whatever the number of pods:

- asker address -> the pods claiming it (Pending or Running, with an IP, not hostNetwork);
- (network, name) -> the answering pods (Running, with an IP);
- (network, name) -> the pods that will answer to it soon (live, not answering yet: Pending, with
  or without an address, or not Ready with ``require_ready``), which is what a question for a
  missing name may be held for;
- (network, address) -> the answering pods;
- Testcontainers session -> its answering sshd pods (the session annotation, and an image that
  one of ``sshd_images`` matches), whose addresses ``host.testcontainers.internal`` has for the
  session's containers, whatever networks they are on; and its sshd pods that will answer soon.

``behind`` says that the watch lost changes (:class:`~kubedock_dns.contract.WatchInterrupted`)
and the next complete list has not arrived: any name may be missing for now.

Membership rules (DESIGN section 3): pods in phase Succeeded, Failed or Unknown are dropped at once,
because the network plugin hands their IP to new pods; a pod being deleted still asks but no longer
answers; two live pods claiming one address make that address *conflicted*, and the index then
answers nothing for it.  Networks named in ``unresolved_networks`` (full ID or a prefix of at least
12 characters, e.g. kubedock's default ``bridge``) are left out of every pod: Docker resolves no
names there.  The index is owned by one thread (the reactor's); it does no locking.

After every :meth:`NetworkIndex.apply`, subscribers get a :class:`Touched`: the addresses,
networks and names whose facts the apply may have changed, so that a cache of decisions (the
fast path) drops only what depended on them, not everything, when one pod of 10,000 changes, and
a held question is decided again only when something it read changed.  This is the index's one
way of telling about changes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, NamedTuple

from kubedock_dns.contract import (
    DEFAULT_SSHD_IMAGE,
    Change,
    Deleted,
    ImagePattern,
    PodRecord,
    Relisted,
    Upserted,
    WatchInterrupted,
    ascii_decimal,
)

FAMILY_V4 = 4
_EMPTY: dict = {}  # read-only stand-in for a network with no names
_IMAGES_REMEMBERED = 1024  # whether an image is an sshd image, for at most this many images
FAMILY_V6 = 6


class Conflict(Exception):
    """Two live pods claim one address: the index answers nothing involving it."""

    def __init__(self, ip: str, uids: Iterable[str]) -> None:
        self.ip = ip
        self.uids = tuple(sorted(uids))
        super().__init__(f"address {ip} is claimed by several live pods: {', '.join(self.uids)}")


class Asker(NamedTuple):
    """The pod a query came from: its namespace, its networks in annotation order, and its
    Testcontainers session ('' for none).

    Immutable and made on every full-path question: a named tuple is built in half the time of a
    frozen dataclass (which sets each field through ``object.__setattr__``)."""

    uid: str
    namespace: str
    networks: tuple[str, ...]
    session: str = ""


class ForwardAnswer(NamedTuple):
    """The addresses a name has in one network (possibly none of the asked family); a named
    tuple for the same reason as :class:`Asker`."""

    network: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Touched:
    """What one :meth:`NetworkIndex.apply` may have changed; everything else reads as before.

    - ``addresses``: addresses whose claiming pods, or whose "some network answers here", changed;
    - ``networks``: networks whose names, reverse names or members changed, including every network
      of a pod whose address became (or stopped being) shared with another pod, since a conflict
      changes that pod's answers;
    - ``sessions``: Testcontainers sessions whose sshd pods (answering, or soon) changed;
    - ``awaiting``: the namespaces of the pods awaiting their address changed;
    - ``everything``: the index became synced (every earlier decision was "not synced"), or
      ``behind`` changed.

    Conservative: an address, network or namespace may be named although it ended up as it was.
    """

    addresses: frozenset[str] = frozenset()
    networks: frozenset[str] = frozenset()
    awaiting: bool = False
    everything: bool = False
    sessions: frozenset[str] = frozenset()


def family_of(ip: str) -> int:
    return FAMILY_V6 if ":" in ip else FAMILY_V4


def network_labels(network: str) -> tuple[str, ...]:
    """The DNS labels under which ``name.<network>`` addresses a network.

    Docker network IDs have 64 characters, one more than a DNS label may have, so the 12-character
    short ID (the form ``docker network ls`` shows) is accepted too.
    """
    labels = []
    lowered = network.lower()
    if len(lowered) <= 63 and "." not in lowered:
        labels.append(lowered)
    if len(lowered) == 64 and all(c in "0123456789abcdef" for c in lowered):
        labels.append(lowered[:12])
    return tuple(labels)


class NetworkIndex:
    """Pods by address, names by network; see the module docstring for the rules."""

    def __init__(self, require_ready: bool = False, unresolved_networks: Iterable[str] = (),
                 sshd_images: Iterable[ImagePattern] = (ImagePattern.parse(DEFAULT_SSHD_IMAGE),)) -> None:
        self.require_ready = require_ready
        self.unresolved_networks = tuple(n.lower() for n in unresolved_networks)
        self.sshd_images = tuple(sshd_images)
        self._sshd_by_image: dict[str, bool] = {}  # image -> whether an sshd_images pattern matches it
        self.synced = False
        self._pods: dict[str, PodRecord] = {}
        # Members are tuples, not sets: nearly every one holds a single uid, and a one-element
        # set costs 216 bytes against a tuple's 48 (10,000 pods: 19.1 -> 8.7 MiB of index).
        self._askers: dict[str, tuple[str, ...]] = {}
        # network -> name -> answering pods, and network -> address -> pods: one small dict per
        # network rather than one (network, name) tuple key per entry (10,000 pods in 5,000
        # networks: 40,000 key tuples, 2.2 MiB, against 5,000 dicts).
        self._names: dict[str, dict[str, tuple[str, ...]]] = {}
        self._pending: dict[str, dict[str, tuple[str, ...]]] = {}  # network -> name -> pods not answering yet
        self._reverse: dict[str, dict[str, tuple[str, ...]]] = {}
        # network label (full ID or short ID) -> networks carrying it, for ``name.<network>``.
        self._labels: dict[str, tuple[str, ...]] = {}
        self._label_refs: dict[str, int] = {}
        self._awaiting_ip: set[str] = set()
        # Testcontainers session -> its answering sshd pods (host.testcontainers.internal), and
        # its sshd pods that will answer soon (a question for the name may be held for them).
        self._gateways: dict[str, tuple[str, ...]] = {}
        self._pending_gateways: dict[str, tuple[str, ...]] = {}
        self.behind = False
        self._subscribers: list[Callable[[Touched], None]] = []
        self._awaiting_namespaces: dict[str, int] = {}
        self._touched_addresses: set[str] = set()
        self._touched_networks: set[str] = set()
        self._touched_sessions: set[str] = set()  # sessions whose sshd pods changed (host access)
        self._touched_awaiting = False
        self.conflicts_seen = 0

    # -- updates ----------------------------------------------------------------------------------

    def apply(self, changes: Iterable[Change]) -> None:
        """Apply changes in order, then tell every subscriber what was touched."""
        was_synced, was_behind = self.synced, self.behind
        for change in changes:
            if isinstance(change, Upserted):
                self._upsert(change.record)
            elif isinstance(change, Deleted):
                self._remove(change.uid)
            elif isinstance(change, Relisted):
                self._replace_all(change.records)
                self.behind = False
            elif isinstance(change, WatchInterrupted):
                self.behind = True
            else:
                raise TypeError(f"not an index change: {change!r}")
        if (self.synced and not was_synced) or self.behind != was_behind:
            # Every earlier decision was "not synced", or read "behind" (rare: a watch failure
            # and the list after it): the details would be thrown away (and at the first list of
            # 10,000 pods, copying them costs megabytes at the peak of memory).
            touched = Touched(everything=True)
        else:
            touched = Touched(frozenset(self._touched_addresses), frozenset(self._touched_networks),
                              self._touched_awaiting, sessions=frozenset(self._touched_sessions))
        self._touched_addresses.clear()
        self._touched_networks.clear()
        self._touched_sessions.clear()
        self._touched_awaiting = False
        for subscriber in self._subscribers:
            subscriber(touched)

    def subscribe(self, subscriber: Callable[[Touched], None]) -> None:
        """Call ``subscriber`` with the :class:`Touched` of every :meth:`apply` from now on."""
        self._subscribers.append(subscriber)

    def _replace_all(self, records: Iterable[PodRecord]) -> None:
        fresh = {r.uid: r for r in records}
        for uid in [uid for uid in self._pods if uid not in fresh]:
            self._remove(uid)
        for record in fresh.values():
            self._upsert(record)
        self.synced = True

    def _resolved(self, record: PodRecord) -> PodRecord:
        """``record`` without the networks that are never resolved."""
        if not self.unresolved_networks or not record.networks:
            return record
        kept = tuple(n for n in record.networks if not self.is_unresolved(n))
        return record if kept == record.networks else replace(record, networks=kept)

    def is_unresolved(self, network: str) -> bool:
        lowered = network.lower()
        return any(lowered == u or (len(u) >= 12 and lowered.startswith(u)) for u in self.unresolved_networks)

    def _upsert(self, record: PodRecord) -> None:
        record = self._resolved(record)
        old = self._pods.get(record.uid)
        if old == record:
            return
        finished = record.phase in ("Succeeded", "Failed", "Unknown")
        if old is not None and not finished and self._footprint(old) == self._footprint(record):
            # Readiness without --require-ready, the pod's name, a phase that changes neither
            # predicate: no answer reads these, so nothing is re-indexed or touched.
            self._pods[record.uid] = record
            return
        if old is not None:
            self._unindex(old)
        if finished:
            # Finished: its address is about to belong to somebody else.  Forget it entirely.
            self._pods.pop(record.uid, None)
            return
        self._pods[record.uid] = record
        self._index(record)

    def _footprint(self, record: PodRecord) -> tuple:
        """Everything of a record that the maps or a lookup read."""
        return (record.is_asker, record.is_answer(self.require_ready), self._answers_later(record),
                record.awaits_ip, record.ips, record.networks, record.names, record.reverse_name, record.namespace,
                record.session, self._is_sshd(record))

    def _answers_later(self, record: PodRecord) -> bool:
        """Alive and not answering yet, but it will unless it fails or is deleted first: Pending
        (with or without an address), or Running and not Ready with ``require_ready``."""
        return (record.phase in ("Pending", "Running") and not record.terminating and not record.host_network
                and not record.is_answer(self.require_ready))

    def _is_sshd(self, record: PodRecord) -> bool:
        """A Testcontainers session's sshd pod (answering or not): ``host.testcontainers.internal``
        for that session's containers once it answers."""
        if not record.session:
            return False
        # Asked several times per change of every session's pod (footprints, add, remove); an
        # image is parsed once, and a suite uses a handful of images.
        image = record.image
        known = self._sshd_by_image.get(image)
        if known is None:
            if len(self._sshd_by_image) >= _IMAGES_REMEMBERED:
                self._sshd_by_image.clear()
            known = self._sshd_by_image[image] = any(pattern.matches(image) for pattern in self.sshd_images)
        return known

    def _remove(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is not None:
            self._unindex(old)

    def _index(self, record: PodRecord) -> None:
        self._touch(record)
        if record.awaits_ip:
            self._awaiting_ip.add(record.uid)
            if _claim(self._awaiting_namespaces, record.namespace):
                self._touched_awaiting = True
        # The pod alone under every key it is the only member of, as one shared tuple: a pod with
        # four names sits under six keys (names, reverse, asker), and tuples are immutable.
        alone = (record.uid,)
        if record.is_asker:
            for ip in record.ips:
                _add(self._askers, ip, record.uid, alone)
                if len(self._askers[ip]) > 1:
                    self.conflicts_seen += 1
                self._touch_claimants(ip)
        if self._is_sshd(record):
            self._touched_sessions.add(record.session)
            if record.is_answer(self.require_ready):
                _add(self._gateways, record.session, record.uid, alone)
            elif self._answers_later(record):
                _add(self._pending_gateways, record.session, record.uid, alone)
        if record.is_answer(self.require_ready):
            for network in record.networks:
                for name in record.names:
                    _add(self._names.setdefault(network, {}), name, record.uid, alone)
                for ip in record.ips:
                    _add(self._reverse.setdefault(network, {}), ip, record.uid, alone)
        elif self._answers_later(record):
            for network in record.networks:
                for name in record.names:
                    _add(self._pending.setdefault(network, {}), name, record.uid, alone)
        for network in record.networks:
            self._label_refs[network] = self._label_refs.get(network, 0) + 1
            if self._label_refs[network] == 1:
                for label in network_labels(network):
                    _add(self._labels, label, network)

    def _unindex(self, record: PodRecord) -> None:
        self._touch(record)
        if record.uid in self._awaiting_ip:
            self._awaiting_ip.discard(record.uid)
            if _release(self._awaiting_namespaces, record.namespace):
                self._touched_awaiting = True
        if record.is_asker:
            for ip in record.ips:
                self._touch_claimants(ip)
                _discard(self._askers, ip, record.uid)
        if self._is_sshd(record):
            self._touched_sessions.add(record.session)
            _discard(self._gateways, record.session, record.uid)
            _discard(self._pending_gateways, record.session, record.uid)
        if record.is_answer(self.require_ready):
            for network in record.networks:
                for name in record.names:
                    _discard_in(self._names, network, name, record.uid)
                for ip in record.ips:
                    _discard_in(self._reverse, network, ip, record.uid)
        elif self._answers_later(record):
            for network in record.networks:
                for name in record.names:
                    _discard_in(self._pending, network, name, record.uid)
        for network in record.networks:
            self._label_refs[network] -= 1
            if not self._label_refs[network]:
                del self._label_refs[network]
                for label in network_labels(network):
                    _discard(self._labels, label, network)

    def _touch(self, record: PodRecord) -> None:
        self._touched_addresses.update(record.ips)
        self._touched_networks.update(record.networks)

    def _touch_claimants(self, ip: str) -> None:
        """A claim on ``ip`` is about to change: the answers of every pod claiming it may turn
        into (or out of) a conflict, in all of their networks (and for host access, if it is a
        session's sshd)."""
        for uid in self._askers.get(ip, ()):
            pod = self._pods.get(uid)  # a pod being removed is touched by its caller
            if pod is not None:
                self._touched_networks.update(pod.networks)
                if self._is_sshd(pod):
                    self._touched_sessions.add(pod.session)

    # -- queries ----------------------------------------------------------------------------------

    def asker(self, ip: str) -> Asker | None:
        """The live pod whose address is ``ip``, or None; raises :class:`Conflict` if several."""
        uids = self._askers.get(ip)
        if not uids:
            return None
        if len(uids) > 1:
            raise Conflict(ip, uids)
        pod = self._pods[uids[0]]
        return Asker(pod.uid, pod.namespace, pod.networks, pod.session)

    @property
    def pods_awaiting_ip(self) -> int:
        """Opted-in pods without an address yet: an unknown asker may be one of them."""
        return len(self._awaiting_ip)

    def namespaces_awaiting_ip(self) -> set[str]:
        """The namespaces of the pods awaiting their address (whose search suffixes they use)."""
        return {self._pods[uid].namespace for uid in self._awaiting_ip}

    def answers_later(self, networks: tuple[str, ...], name: str) -> str | None:
        """The first of ``networks`` with a pod that will answer to ``name`` soon (see the
        module), or None."""
        if not self._pending:
            return None  # nobody is starting: the common case, and the cheapest
        for network in networks:
            if name in self._pending.get(network, _EMPTY):
                return network
        return None

    def answers_later_in_network(self, networks: tuple[str, ...], label: str, name: str) -> str | None:
        """:meth:`answers_later` for ``name.<network>``: the network ``label`` designates."""
        for network in self._labels.get(label, ()):
            if network in networks:
                return self.answers_later((network,), name)
        return None

    def host_gateway(self, session: str) -> tuple[str, ...] | None:
        """The addresses of the answering sshd pods of Testcontainers session ``session``, or None
        when it has none.  Raises :class:`Conflict` when one shares its address with another live
        pod."""
        uids = self._gateways.get(session) if session else None
        return self._addresses(uids) if uids else None

    def host_gateway_later(self, session: str) -> bool:
        """Whether Testcontainers session ``session`` has an sshd pod that will answer soon."""
        return bool(session) and session in self._pending_gateways

    def lookup(self, networks: tuple[str, ...], name: str) -> ForwardAnswer | None:
        """The first of ``networks`` (in order) holding ``name`` (lower case), with its addresses.

        Raises :class:`Conflict` when one of the answering pods shares its address with another
        live pod.
        """
        for network in networks:
            uids = self._names.get(network, _EMPTY).get(name)
            if uids:
                return ForwardAnswer(network, self._addresses(uids))
        return None

    def lookup_in_network(self, networks: tuple[str, ...], label: str, name: str) -> ForwardAnswer | None:
        """``name`` in the network that ``label`` designates, if it is one of ``networks``."""
        for network in self._labels.get(label, ()):
            if network in networks:
                return self.lookup((network,), name)
        return None

    def reverse(self, networks: tuple[str, ...], ip: str) -> str | None:
        """The reverse name (container name, else hostname) of the pod holding ``ip`` in the first
        of ``networks`` that has it."""
        for network in networks:
            uids = self._reverse.get(network, _EMPTY).get(ip)
            if uids:
                if len(uids) > 1 or len(self._askers.get(ip, ())) > 1:
                    raise Conflict(ip, set(uids) | set(self._askers.get(ip, ())))
                return self._pods[uids[0]].reverse_name
        return None

    def _addresses(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        addresses = []
        for uid in uids:
            for ip in self._pods[uid].ips:
                claims = self._askers.get(ip)
                if claims is not None and len(claims) > 1:
                    raise Conflict(ip, claims)
                addresses.append(ip)
        return tuple(addresses)

    # -- introspection (debug endpoint, metrics) ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._pods)

    def pods(self) -> Iterator[PodRecord]:
        return iter(self._pods.values())

    def conflicted_addresses(self) -> list[str]:
        return sorted(ip for ip, uids in self._askers.items() if len(uids) > 1)

    def claimants(self, ip: str) -> list[str]:
        """``namespace/name`` of every live pod claiming ``ip``."""
        return sorted(f"{self._pods[uid].namespace}/{self._pods[uid].name}" for uid in self._askers.get(ip, ()))

    def describe(self) -> dict:
        """What the server believes, for humans: networks, their members, names and addresses."""
        networks: dict[str, list[dict]] = {}
        for pod in self._pods.values():
            for network in pod.networks:
                networks.setdefault(network, []).append(
                    {
                        "pod": pod.name,
                        "uid": pod.uid,
                        "names": list(pod.names),
                        "ips": list(pod.ips),
                        "phase": pod.phase,
                        "answers": pod.is_answer(self.require_ready),
                        "asks": pod.is_asker,
                        "terminating": pod.terminating,
                        "refused_names": [{"name": n, "reason": r} for n, r in pod.refused_names],
                    }
                )
        # host.testcontainers.internal, per Testcontainers session: its sshd pods.
        host_access: dict[str, list[dict]] = {
            session: [{"pod": pod.name, "ips": list(pod.ips), "image": pod.image}
                      for pod in sorted((self._pods[uid] for uid in uids), key=lambda p: p.name)]
            for session, uids in sorted(self._gateways.items())
        }
        return {
            "synced": self.synced,
            "behind": self.behind,
            "pods": len(self._pods),
            "pods_awaiting_ip": len(self._awaiting_ip),
            "conflicted_addresses": self.conflicted_addresses(),
            "unresolved_networks": list(self.unresolved_networks),
            "host_access": host_access,
            "networks": {k: sorted(v, key=lambda m: m["pod"]) for k, v in sorted(networks.items())},
        }


def _claim(counts: dict[str, int], key: str) -> bool:
    """Count one more ``key``; whether it is new."""
    held = counts.get(key, 0)
    counts[key] = held + 1
    return not held


def _release(counts: dict[str, int], key: str) -> bool:
    """Count one ``key`` less; whether it is gone."""
    left = counts[key] - 1
    if left:
        counts[key] = left
        return False
    del counts[key]
    return True


def _add(mapping: dict, key, member: str, alone: tuple[str, ...] | None = None) -> None:
    """Add ``member`` under ``key``; ``alone`` is ``(member,)``, shared when it is the only one."""
    members = mapping.get(key, ())
    if not members:
        mapping[key] = alone or (member,)
    elif member not in members:
        mapping[key] = members + (member,)


def _discard(mapping: dict, key, member: str) -> None:
    members = mapping.get(key)
    if members is not None and member in members:
        kept = tuple(m for m in members if m != member)
        if kept:
            mapping[key] = kept
        else:
            del mapping[key]


def _discard_in(mapping: dict[str, dict], outer: str, key: str, member: str) -> None:
    """:func:`_discard` in ``mapping[outer]``, dropping that inner map once it is empty."""
    inner = mapping.get(outer)
    if inner is not None:
        _discard(inner, key, member)
        if not inner:
            del mapping[outer]


def reverse_name_to_ip(labels: list[str]) -> str | None:
    """The address a PTR name (``d.c.b.a.in-addr.arpa`` or nibbles ``.ip6.arpa``) stands for."""
    if len(labels) == 6 and labels[-2:] == ["in-addr", "arpa"]:
        octets = labels[:4]
        try:
            values = [ascii_decimal(o, 3) for o in octets]
        except ValueError:
            return None
        if all(v < 256 and (o == "0" or not o.startswith("0")) for v, o in zip(values, octets)):
            return ".".join(reversed(octets))
        return None
    if len(labels) == 34 and labels[-2:] == ["ip6", "arpa"]:
        nibbles = labels[:32]
        if all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            packed = "".join(reversed(nibbles))
            return str(ipaddress.IPv6Address(int(packed, 16)))
    return None
