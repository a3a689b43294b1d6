"""``kubedock-dns explain``: why a pod gets the answer it gets, from the code that answers it.

:func:`explain` takes an asker (pod name or address) and a name, walks the forms a pod's resolver
sends (glibc's search list and ndots, as the webhook configured them) and, for each, asks the
server's own :class:`~kubedock_dns.resolver.Resolver` with a trace: the same ``decide`` that
answers real queries, so the story cannot drift from the behaviour.  A form that would be held is
also decided as it would be when the hold runs out without the name appearing; a form the
resolver forwards is really asked of the upstreams, through the server's forwarder, so the
report shows what the cluster DNS answered.  Nothing here changes what later queries get: the
memory of held names is read, never written.
"""

from __future__ import annotations

import copy
import ipaddress
import random
import socket
from typing import Any

from twisted.internet import defer
from twisted.names import dns

from kubedock_dns.contract import canonical_ip, pod_search_list
from kubedock_dns.dns.forwarder import Forwarder
from kubedock_dns.dns.wire import RCODE_NAMES, TYPE_A, TYPE_AAAA, TYPE_PTR
from kubedock_dns.resolver import Answer, Decision, Forward, Hold, NotFound, Resolver

TYPES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "PTR": TYPE_PTR}


class ExplainError(ValueError):
    """The question cannot be explained as asked (unknown pod, bad type); the message says why."""


def resolver_forms(name: str, searches: list[str], ndots: int) -> list[str]:
    """The names glibc's res_search sends for ``name``, in order: with fewer than ``ndots`` dots,
    each search suffix first and the name as given last; otherwise the name first; a trailing dot
    means the name alone."""
    if name.endswith("."):
        return [name.rstrip(".")]
    suffixed = [f"{name}.{s}" for s in searches]
    return suffixed + [name] if name.count(".") < ndots else [name] + suffixed


def find_asker(index: Any, asker: str) -> tuple[str, dict[str, Any]]:
    """``(address, description)`` of the pod named ``asker`` (``name`` or ``namespace/name``), or of
    the address ``asker``."""
    try:
        ip = canonical_ip(asker)
    except ValueError:
        namespace, _, name = asker.rpartition("/")
        pods = [p for p in index.pods() if p.name == name and (not namespace or p.namespace == namespace)]
        if not pods:
            raise ExplainError(f"no opted-in pod named {asker!r} in the index (give a pod name as "
                               "`kubectl get pods` shows it, or the pod's IP)") from None
        if len(pods) > 1:
            raise ExplainError(f"several pods are named {asker!r}: give namespace/name or the IP")
        pod = pods[0]
        if not pod.ips:
            raise ExplainError(f"pod {asker!r} has no IP address yet (phase {pod.phase}): its questions "
                               "come from an address kubedock-dns cannot attribute; ask again when it has one")
        ip = next((a for a in pod.ips if ":" not in a), pod.ips[0])
    owners = [p for p in index.pods() if ip in p.ips]
    described: dict[str, Any] = {"address": ip, "pods": [
        {"pod": p.name, "namespace": p.namespace, "phase": p.phase, "networks": list(p.networks),
         "asks": p.is_asker} for p in owners]}
    return ip, described


def decision_view(decision: Decision, ttl: int) -> dict[str, Any]:
    view: dict[str, Any] = {"rule": type(decision).__name__}
    if isinstance(decision, Answer):
        view.update(rcode="NOERROR", network=decision.network, records=list(decision.values), ttl=ttl,
                    why=("answered from " + decision.source) if decision.values
                    else "NODATA: the name is in " + decision.source + " but has no record of this type")
        if decision.session:
            view["session"] = decision.session
            if not decision.values:
                view["why"] = ("NODATA: host.testcontainers.internal has only the IPv4 address of "
                               + decision.source)
        if decision.qtype == TYPE_PTR:
            view["why"] = "answered from the asker's networks"
    elif isinstance(decision, NotFound):
        view.update(rcode="NXDOMAIN", why=decision.reason)
    elif isinstance(decision, Forward):
        view.update(rcode=None, why="forwarded to the upstream resolvers: " + decision.reason)
    elif isinstance(decision, Hold):
        view.update(rcode=None, why="held: " + decision.reason)
    else:
        view.update(rcode="SERVFAIL", why=decision.reason)
    return view


def _query_bytes(name: str, qtype: int) -> bytes:
    message = dns.Message(id=random.getrandbits(16), recDes=1)
    message.queries = [dns.Query(name, qtype, dns.IN)]
    return message.toStr()


def _upstream_view(answer: bytes) -> dict[str, Any]:
    message = dns.Message()
    message.fromStr(answer)
    records = []
    for rr in message.answers:
        payload = rr.payload
        if isinstance(payload, (dns.Record_A, dns.Record_AAAA)):
            records.append(payload.dottedQuad() if isinstance(payload, dns.Record_A) else
                           socket.inet_ntop(socket.AF_INET6, payload.address))
        elif isinstance(payload, (dns.Record_PTR, dns.Record_CNAME, dns.Record_NS)):
            records.append(payload.name.name.decode("ascii", "replace"))  # the name they point to
        else:
            records.append(f"{dns.QUERY_TYPES.get(rr.type, rr.type)} {payload}")
    return {"rcode": RCODE_NAMES.get(message.rCode, str(message.rCode)), "records": records}


def _outcome(entry: dict[str, Any]) -> dict[str, Any]:
    """What the client got for one form: the upstream's answer, else the decision after any hold."""
    return entry.get("upstream") or entry.get("after_hold") or entry["decision"]


@defer.inlineCallbacks
def explain(resolver: Resolver, forwarder: Forwarder | None, asker: str, name: str, qtype_name: str,
            now: float, ndots: int = 5):
    """A JSON-ready account of what ``asker`` gets for ``name`` (see the module docstring)."""
    qtype = TYPES.get(qtype_name.upper())
    if qtype is None:
        raise ExplainError(f"--type {qtype_name!r}: expected A, AAAA or PTR")
    if not name or len(name) > 253:
        raise ExplainError(f"{name!r} is not a DNS name")
    index = resolver.index
    ip, asker_view = find_asker(index, asker)
    namespace = next((p["namespace"] for p in asker_view["pods"] if p["asks"]), "")
    question = name.lower()
    if qtype == TYPE_PTR and not question.endswith(".arpa") and not question.endswith(".arpa."):
        try:
            address = canonical_ip(question.rstrip("."))
        except ValueError:
            raise ExplainError(f"PTR needs an address or a reverse name, got {name!r}") from None
        question = ipaddress.ip_address(address).reverse_pointer + "."
    searches = pod_search_list(namespace, resolver.config.cluster_domain)
    forms = resolver_forms(question, searches, ndots) if qtype != TYPE_PTR else [question.rstrip(".")]
    # An overlay on the memory of held names: a real resolver's first held form makes the next
    # forms of the same name answer at once, and the real memory must not change.
    resolver = copy.copy(resolver)
    resolver.misses = resolver.misses.overlay()
    results = []
    for form in forms:
        trace: list[str] = []
        first = resolver.decide(ip, form, qtype, now=now, trace=trace)
        entry: dict[str, Any] = {"name": form, "trace": trace, "decision": decision_view(first, resolver.config.ttl)}
        final = first
        if isinstance(first, Hold):
            later: list[str] = []
            final = resolver.decide(ip, form, qtype, held=True, now=now, trace=later)
            if first.miss_key is not None:
                resolver.misses.remember(first.miss_key, now)
            entry["hold_seconds"] = resolver.config.hold_seconds
            entry["after_hold"] = decision_view(final, resolver.config.ttl)
            entry["after_hold"]["why"] = (f"if the name does not appear within {resolver.config.hold_seconds:g} s: "
                                          + entry["after_hold"]["why"])
        if isinstance(final, Forward) and forwarder is not None:
            try:
                answer = yield forwarder.forward(_query_bytes(form, qtype))
                entry["upstream"] = _upstream_view(answer)
            except Exception as failure:  # every upstream failed, or too many in flight
                entry["upstream"] = {"rcode": "SERVFAIL", "records": [], "error": str(failure)}
        results.append(entry)
        if _outcome(entry).get("records"):
            break  # glibc stops at the first form answered with records: later forms are never sent

    # glibc stops at the first form answered with records; NXDOMAIN, NODATA and SERVFAIL move it on.
    chosen = next((e for e in results if _outcome(e).get("records")), None)
    if chosen is not None:
        got = _outcome(chosen)
        result = {"form": chosen["name"], "rcode": got["rcode"], "records": got["records"],
                  "why": got.get("why") or "answered by the upstream resolvers"}
    else:
        last = _outcome(results[-1])
        result = {"form": None, "rcode": last.get("rcode") or "SERVFAIL", "records": [],
                  "why": "no form of the name was answered with records: the lookup fails"}
    return {
        "asker": asker_view,
        "question": {"name": name, "type": qtype_name.upper()},
        "search": {"list": searches, "ndots": ndots},
        "forms": results,
        "result": result,
    }
