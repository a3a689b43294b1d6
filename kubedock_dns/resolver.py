"""What to do with one question from one asker: answer, hold, forward or fail.

Pure decisions (no I/O, no Twisted) over a :class:`~kubedock_dns.index.NetworkIndex`; the DNS
semantics table of DESIGN section 4 lives here.  The server turns a :data:`Decision` into bytes.
Given a ``trace`` list, :meth:`Resolver.decide` also appends what it looked at and why it decided
(``kubedock-dns explain`` shows it): the explanation comes from the code that answers, not from a
second implementation of the rules.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Union

from kubedock_dns.contract import HOST_ACCESS_NAME, SESSION_ANNOTATIONS
from kubedock_dns.dns.wire import TYPE_A, TYPE_AAAA, TYPE_PTR
from kubedock_dns.index import (
    FAMILY_V4,
    FAMILY_V6,
    Asker,
    Conflict,
    NetworkIndex,
    family_of,
    reverse_name_to_ip,
)


@dataclass(frozen=True)
class ResolverConfig:
    cluster_domain: str = "cluster.local"
    ttl: int = 5
    hold_seconds: float = 1.5
    miss_memory_seconds: float = 30.0
    miss_memory_size: int = 65536
    # ... and at most this many bytes of (asker address, name), counted with MISS_OVERHEAD each.
    miss_memory_bytes: int = 8 * 1024 * 1024
    # Let single-label names that no network of the asker holds through to the cluster DNS, so
    # the namespace's Services answer them.  Off: a Service must never stand in for a container.
    forward_single_label: bool = False


@dataclass(frozen=True)
class Answer:
    """NOERROR with these record values (addresses for A/AAAA, a name for PTR); none is NODATA.
    ``network`` is the network that answered; ``session`` the Testcontainers session whose sshd
    answered ``host.testcontainers.internal`` instead."""

    qtype: int
    values: tuple[str, ...]
    network: str = ""
    session: str = ""

    @property
    def source(self) -> str:
        """Where the answer comes from, for logs and explain."""
        if self.session:
            return f"the sshd container of Testcontainers session {self.session}"
        return f"network {self.network[:12]}" if self.network else "the asker's networks"


@dataclass(frozen=True)
class ServFail:
    reason: str


@dataclass(frozen=True)
class NotFound:
    """NXDOMAIN: a container name that no network of the asker holds (Docker: not found)."""

    reason: str


@dataclass(frozen=True)
class Forward:
    """Not ours: relay to the upstream resolvers.  ``cacheable``: the decision follows from the
    index alone (not from the time-bound memory of held names)."""

    reason: str
    cacheable: bool = True


@dataclass(frozen=True)
class Hold:
    """Maybe ours soon: wait for the index to change (bounded), then decide again."""

    reason: str
    miss_key: tuple[str, str] | None = None


Decision = Union[Answer, ServFail, NotFound, Forward, Hold]

NOT_SYNCED = ServFail("the pod index is not synced with the API server yet")
# Made once: the common outcome for an outside name (frozen, so it can be shared).
NOT_LOCAL = Forward("name not in the asker's networks")


# What one remembered (asker, name) costs beyond the two strings' characters: the key tuple, the
# strings' headers, the expiry float and the ordered dictionary's slot and link.
MISS_OVERHEAD = 300


class MissMemory:
    """Remembers (asker address, name) pairs that were held and never appeared, for a while.

    glibc tries every search suffix of a name it cannot resolve; without this memory each suffix
    would wait out the hold again.  At most ``size`` pairs and ``max_bytes`` bytes (the oldest go
    first): an asker inventing names cannot grow it further.
    """

    def __init__(self, seconds: float, size: int, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.seconds = seconds
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()

    def remember(self, key: tuple[str, str], now: float) -> None:
        if key not in self._expiry:
            self.bytes += _miss_cost(key)
        self._expiry[key] = now + self.seconds
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.size or self.bytes > self.max_bytes:
            forgotten, _ = self._expiry.popitem(last=False)
            self.bytes -= _miss_cost(forgotten)

    def overlay(self) -> "MissOverlay":
        """A memory that reads this one and keeps its own additions (explain walks a pod's search
        list on one without changing what real queries get), in O(1)."""
        return MissOverlay(self)

    def recently_missed(self, key: tuple[str, str], now: float) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry < now:
            del self._expiry[key]
            self.bytes -= _miss_cost(key)
            return False
        return True


def _miss_cost(key: tuple[str, str]) -> int:
    return MISS_OVERHEAD + len(key[0]) + len(key[1])


class MissOverlay(MissMemory):
    """Remembers on its own, answers from its own and the underlying :class:`MissMemory`."""

    def __init__(self, base: MissMemory) -> None:
        super().__init__(base.seconds, base.size, base.max_bytes)
        self.base = base
        self._added: dict[tuple[str, str], float] = {}

    def remember(self, key: tuple[str, str], now: float) -> None:
        self._added[key] = now + self.seconds

    def recently_missed(self, key: tuple[str, str], now: float) -> bool:
        expiry = self._added.get(key)
        return (expiry is not None and expiry >= now) or self.base.recently_missed(key, now)


class Resolver:
    """Decides for (source address, question name, type), per DESIGN section 4."""

    def __init__(self, index: NetworkIndex, config: ResolverConfig, shuffle=random.shuffle) -> None:
        self.index = index
        self.config = config
        self.misses = MissMemory(config.miss_memory_seconds, config.miss_memory_size, config.miss_memory_bytes)
        self._shuffle = shuffle
        domain = config.cluster_domain.strip(".").lower()
        self._svc_suffix = ".svc." + domain
        self._domain_suffix = "." + domain

    def strip_search_suffix(self, name: str, namespace: str) -> str:
        """``db.<ns>.svc.<domain>``, ``db.svc.<domain>`` and ``db.<domain>`` all mean ``db``."""
        for suffix in (
            "." + namespace + self._svc_suffix if namespace else None,
            self._svc_suffix,
            self._domain_suffix,
        ):
            if suffix and name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
        return name

    def decide(self, source_ip: str, name: str, qtype: int, held: bool = False, now: float = 0.0,
               trace: list[str] | None = None) -> Decision:
        """``name`` is the question name in lower case without the trailing dot.  ``trace``, when
        given, receives one line per step taken."""
        index = self.index
        if not index.synced:
            if trace is not None:
                trace.append("the index has no complete list of pods yet")
            return NOT_SYNCED if held else Hold("index not synced")
        try:
            asker = index.asker(source_ip)
        except Conflict as conflict:
            if trace is not None:
                trace.append(f"the asker's address {source_ip} is claimed by several live pods")
            return ServFail(str(conflict))
        if asker is None:
            if trace is not None:
                trace.append(f"no live pod has the address {source_ip}: the asker is unknown")
            return self._decide_unknown(source_ip, name, qtype, held, now, trace)
        if trace is not None:
            trace.append(f"asker: pod uid {asker.uid} in namespace {asker.namespace or '-'}, networks in order: "
                         f"{', '.join(asker.networks) or 'none'}")
        if qtype == TYPE_PTR:
            address = reverse_name_to_ip(name.split("."))
            if address is None:
                return Forward("not a reverse name")
            if trace is not None:
                trace.append(f"reverse name of {address}")
            try:
                owner = index.reverse(asker.networks, address)
            except Conflict as conflict:
                return ServFail(str(conflict))
            if trace is not None:
                trace.append(f"{address} looked up in {', '.join(asker.networks) or 'no network'}: "
                             + (f"the pod named {owner}" if owner else "in none of them"))
            if owner is None:
                return Forward("address not in the asker's networks")
            return Answer(TYPE_PTR, (owner,))
        base = self.strip_search_suffix(name, asker.namespace)
        if trace is not None and base != name:
            trace.append(f"cluster search suffix stripped: {name} -> {base}")
        if not asker.networks:
            if base == HOST_ACCESS_NAME:
                return self._host_access(asker, source_ip, qtype, held, now, trace)
            # On no (resolved) network: nothing can ever be local to it, so nothing is held.
            return self._not_local(base, "the asker is on no resolved network")
        head = label = ""  # of name.<network>, when base has a dot
        try:
            found = index.lookup(asker.networks, base)
            if trace is not None:
                checked = asker.networks if found is None else asker.networks[: asker.networks.index(found.network) + 1]
                trace.append(f"{base} looked up in {', '.join(checked)}: "
                             + (f"found in {found.network}" if found else "in none of them"))
            if found is None and "." in base:
                head, _, label = base.rpartition(".")
                found = index.lookup_in_network(asker.networks, label, head)
                if trace is not None:
                    trace.append(f"as name.<network>: {head} in a network of the asker labelled {label}: "
                                 + (f"found in {found.network}" if found else "no"))
        except Conflict as conflict:
            return ServFail(str(conflict))
        if found is not None:
            if qtype == TYPE_A or qtype == TYPE_AAAA:
                family = FAMILY_V4 if qtype == TYPE_A else FAMILY_V6
                values = [ip for ip in found.addresses if family_of(ip) == family]
                if len(values) > 1:
                    self._shuffle(values)
                return Answer(qtype, tuple(values), found.network)
            return Answer(qtype, (), found.network)
        # Not in the asker's networks.  Held only while something there can still change that:
        # a pod of one of them that will answer to this name soon, or a watch that lost changes.
        # Never because of what other networks hold: how long a miss takes would tell the asker.
        waiting = index.answers_later(asker.networks, base)
        if waiting is None and base == HOST_ACCESS_NAME:
            # No network of the asker has it as an alias, nor will soon (testcontainers-go gives
            # its sshd that alias in the container's network): the asker's session's sshd.
            return self._host_access(asker, source_ip, qtype, held, now, trace)
        if waiting is None and label:
            waiting = index.answers_later_in_network(asker.networks, label, head)
        # While the watch is behind, a container name (a single label) may be missing only here:
        # held.  Dotted names are almost always outside names; holding them for a watch that
        # may stay down for a while would slow every outside lookup of every pod.
        if waiting is None and not (index.behind and "." not in base):
            if trace is not None:
                trace.append(f"no pod of the asker's networks will answer to {base} soon"
                             + (", and the pod watch is current" if not index.behind else "")
                             + ": answered at once")
            return NOT_LOCAL if label else self._not_local(base, "name not in the asker's networks")
        if trace is not None:
            trace.append(f"a pod of network {waiting} does not answer yet and will answer to {base}"
                         if waiting is not None else "the pod watch lost changes and has not listed the pods again yet")
        miss_key = (source_ip, base)
        if held or self.misses.recently_missed(miss_key, now):
            if trace is not None and not held:
                trace.append(f"already held once for this asker within {self.config.miss_memory_seconds:g} s: "
                             "not held again")
            return self._not_local(base, "name did not appear while held", cacheable=False)
        return Hold("a pod of the asker's networks will answer to this name soon" if waiting is not None
                    else "the pod watch is behind", miss_key)

    def dependencies(self, source_ip: str, name: str, qtype: int) -> list[tuple[str, str]]:
        """The index facts :meth:`decide` reads for this question, as ``(kind, key)`` pairs in the
        vocabulary of :class:`~kubedock_dns.index.Touched` (``address``, ``network``,
        ``awaiting``, ``session``): a decision stays what it was until an apply touches one of them (or
        ``everything``: the first sync, and the watch falling behind or catching up).

        Kept next to :meth:`decide` because the two must change together; a differential test
        (tests/test_fast_path.py) replays random churn against a cache that relies on this.
        """
        index = self.index
        facts = [("address", source_ip)]
        try:
            asker = index.asker(source_ip)
        except Conflict:
            return facts  # it stays a conflict until a claim on this address changes
        if asker is None:
            facts.append(("awaiting", ""))
            return facts
        # Names, addresses and pods that will answer soon, all of the asker's networks only.
        facts.extend(("network", network) for network in asker.networks)
        if asker.session and qtype != TYPE_PTR and self.strip_search_suffix(name, asker.namespace) == HOST_ACCESS_NAME:
            facts.append(("session", asker.session))  # its session's sshd pods
        return facts

    def _host_access(self, asker: Asker, source_ip: str, qtype: int, held: bool, now: float,
                     trace: list[str] | None) -> Decision:
        """``host.testcontainers.internal`` that no network of the asker holds: Testcontainers'
        sshd container of the asker's own session (its ``withAccessToHost``/``exposeHostPorts``
        tunnel), an A record only; never another session's.  A session without one is NXDOMAIN, held
        first only while its sshd is starting; an asker of no session gets NXDOMAIN at once."""
        if not asker.session:
            if trace is not None:
                trace.append(f"{HOST_ACCESS_NAME}: the asker has no annotation {' or '.join(SESSION_ANNOTATIONS)} "
                             "(not started by a Testcontainers session that sets it)")
            return NotFound(f"{HOST_ACCESS_NAME}: the asker belongs to no Testcontainers session")
        try:
            addresses = self.index.host_gateway(asker.session)
        except Conflict as conflict:
            return ServFail(str(conflict))
        if trace is not None:
            trace.append(f"{HOST_ACCESS_NAME}: the sshd container of Testcontainers session {asker.session}: "
                         + (", ".join(addresses) if addresses else "none is running")
                         + f" (sshd images: {', '.join(p.text for p in self.index.sshd_images) or 'none'})")
        if addresses is not None:
            if qtype != TYPE_A:
                # Testcontainers' sshd tunnels over IPv4 only: no AAAA, so clients take the A.
                return Answer(qtype, (), session=asker.session)
            values = [ip for ip in addresses if family_of(ip) == FAMILY_V4]
            if len(values) > 1:
                self._shuffle(values)
            return Answer(qtype, tuple(values), session=asker.session)
        # Held only while the session's own sshd is starting (or the watch lost changes), as a
        # name of the asker's networks is: never for what other sessions have.
        starting = self.index.host_gateway_later(asker.session)
        miss_key = (source_ip, HOST_ACCESS_NAME)
        if held or not (starting or self.index.behind) or self.misses.recently_missed(miss_key, now):
            return NotFound(f"{HOST_ACCESS_NAME}: Testcontainers session {asker.session} has no sshd "
                            "container running (withAccessToHost/exposeHostPorts starts one)")
        if trace is not None:
            trace.append("the session's sshd container is starting" if starting
                         else "the pod watch lost changes and has not listed the pods again yet")
        return Hold("the session's sshd container is starting" if starting else "the pod watch is behind", miss_key)

    def _not_local(self, base: str, why: str, cacheable: bool = True) -> Decision:
        """A name that is not in the asker's networks: NXDOMAIN for a single label (no Service
        may stand in for a missing container), forwarded otherwise."""
        if "." not in base and not self.config.forward_single_label:
            return NotFound(f"{why}: single-label name {base!r}")
        return Forward(why, cacheable=cacheable)

    def _decide_unknown(self, source_ip: str, name: str, qtype: int, held: bool, now: float,
                        trace: list[str] | None = None) -> Decision:
        """An address that is no pod's: a plain forwarder, except that while opted-in pods wait
        for their address (or the watch is behind) it may be one of them, so its question is held
        once per (asker, name), whatever the name: which names could become local would depend
        on the networks' names, and how long a question takes must not tell them."""
        index = self.index
        if held or not (index.pods_awaiting_ip or index.behind):
            return Forward("asker is not a known pod", cacheable=not held)
        if trace is not None:
            trace.append(f"{index.pods_awaiting_ip} opted-in pod(s) wait for their address: the asker may be one"
                         if index.pods_awaiting_ip else "the pod watch is behind: the asker may be a pod not seen yet")
        if qtype == TYPE_PTR:
            base = name
        else:
            base = min(self.strip_search_suffix(name, namespace) for namespace in index.namespaces_awaiting_ip() or {""})
        miss_key = (source_ip, base)
        if self.misses.recently_missed(miss_key, now):
            return Forward("asker is not a known pod; held once already", cacheable=False)
        return Hold("unknown asker while opted-in pods wait for their address", miss_key)
