"""The networks view: what the server believes, shaped for people (pure; no I/O, no Twisted).

Input is :meth:`NetworkIndex.describe` as JSON (``/debug/networks``), so the command line
(``kubedock-dns networks``, which only has the JSON the ops endpoint sent) and the ops endpoint's
HTML page render the same data the same way:

- :func:`summaries`: one row per network (short ID, pods, names, IPs, pods waiting for an IP,
  names refused as invalid with the reason), and :func:`render_table` for a terminal;
- :func:`inspect`: one network in the shape of ``docker network inspect`` (``Id``, ``Containers``
  keyed by pod, each with its names, addresses and state), found by full ID or unique prefix;
- :func:`render_html`: a small read-only page of both.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

SHORT = 12  # ``docker network ls`` shows 12 characters of the ID


class NoSuchNetwork(LookupError):
    """No network, or more than one, matches the ID or prefix asked for; the message says which."""


def short_id(network: str) -> str:
    return network[:SHORT]


def _waiting(member: Mapping[str, Any]) -> bool:
    return not member.get("ips") and member.get("phase") == "Pending"


def _refused(member: Mapping[str, Any]) -> list[dict[str, str]]:
    # Names the pod carries that cannot be DNS names (issue 10): [{"name", "reason"}].
    return list(member.get("refused_names") or ())


def summaries(described: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One summary per network, in ID order."""
    rows = []
    for network, members in described.get("networks", {}).items():
        answering = [m for m in members if m.get("answers")]
        rows.append({
            "id": network,
            "short_id": short_id(network),
            "pods": len(members),
            "names": sorted({n for m in answering for n in m.get("names", ())}),
            "ips": sorted({ip for m in answering for ip in m.get("ips", ())}),
            "waiting": sorted(m["pod"] for m in members if _waiting(m)),
            "refused": [dict(pod=m["pod"], **r) for m in members for r in _refused(m)],
        })
    return rows


def find_network(described: Mapping[str, Any], wanted: str) -> str:
    """The full ID of the network ``wanted`` names (full ID or unique prefix, case-insensitive)."""
    networks = list(described.get("networks", {}))
    lowered = wanted.lower()
    exact = [n for n in networks if n.lower() == lowered]
    if exact:
        return exact[0]
    matches = [n for n in networks if n.lower().startswith(lowered)] if wanted else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(short_id(n) for n in networks) or "none"
        raise NoSuchNetwork(f"no network {wanted!r} (known: {known}); give a full ID or a unique prefix "
                            f"as `kubedock-dns networks` lists them")
    raise NoSuchNetwork(f"{wanted!r} is a prefix of {len(matches)} networks "
                        f"({', '.join(short_id(n) for n in matches)}): give more characters")


def inspect(described: Mapping[str, Any], wanted: str) -> dict[str, Any]:
    """One network, shaped like ``docker network inspect`` (a list of one object)."""
    network = find_network(described, wanted)
    members = described["networks"][network]
    containers = {}
    for m in members:
        containers[m["pod"]] = {
            "Name": m["names"][0] if m.get("names") else m["pod"],
            "Pod": m["pod"],
            "Names": list(m.get("names", ())),
            "IPv4Address": next((ip for ip in m.get("ips", ()) if ":" not in ip), ""),
            "IPv6Address": next((ip for ip in m.get("ips", ()) if ":" in ip), ""),
            "Phase": m.get("phase", ""),
            "Answers": bool(m.get("answers")),
            "Asks": bool(m.get("asks")),
            "Terminating": bool(m.get("terminating")),
            "WaitingForIP": _waiting(m),
            "RefusedNames": _refused(m),
        }
    return {
        "Name": short_id(network),
        "Id": network,
        "Scope": "kubedock-dns",
        "Synced": bool(described.get("synced")),
        "Containers": containers,
    }


def _cell(values: Sequence[str], limit: int = 60) -> str:
    text = ", ".join(values) if values else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_table(rows: list[dict[str, Any]], described: Mapping[str, Any] | None = None) -> str:
    """A fixed-width table, one line per network, then one line per refused name."""
    header = ("NETWORK ID", "PODS", "NAMES", "IPS", "WAITING FOR IP")
    lines = [header] + [(r["short_id"], str(r["pods"]), _cell(r["names"]), _cell(r["ips"], 40),
                         _cell(r["waiting"], 40)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    refused = [(r["short_id"], x) for r in rows for x in r["refused"]]
    if refused:
        out.append("")
        out.append("NAMES REFUSED AS INVALID (not resolvable, as in Docker):")
        seen = set()
        for network, x in refused:
            key = (x["pod"], x["name"])
            if key in seen:
                continue  # a pod in several networks refuses the same name once
            seen.add(key)
            out.append(f"  {network}  pod {x['pod']}: {x['name']!r}: {x['reason']}")
    if described is not None:
        notes = []
        if not described.get("synced", True):
            notes.append("NOT SYNCED: the server has no complete list of pods yet; local names get SERVFAIL")
        for ip in described.get("conflicted_addresses", ()):
            notes.append(f"address {ip} is claimed by several live pods: questions involving it get SERVFAIL")
        if notes:
            out.append("")
            out.extend(notes)
    if not rows:
        out.append("(no network: no opted-in pod with a kubedock.network annotation)")
    return "\n".join(out) + "\n"


def render_html(described: Mapping[str, Any]) -> str:
    """The read-only page the ops endpoint serves at ``/``: the table, then every network."""
    e = html.escape
    rows = summaries(described)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"refresh\" content=\"10\"><title>kubedock-dns networks</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;vertical-align:top}th{background:#f0f0f0}code{font-size:.95em}",
        ".bad{color:#a00;font-weight:bold}.muted{color:#777}</style></head><body>",
        "<h1>kubedock-dns networks</h1>",
    ]
    synced = described.get("synced")
    parts.append(f"<p id=\"status\">{'synced' if synced else '<span class=bad>NOT SYNCED</span>'}: "
                 f"{int(described.get('pods', 0))} pods, {int(described.get('pods_awaiting_ip', 0))} waiting for "
                 "an address. Refreshes every 10 s; <a href=\"/debug/networks\">JSON</a>.</p>")
    for ip in described.get("conflicted_addresses", ()):
        parts.append(f"<p class=bad>Address {e(ip)} is claimed by several live pods: SERVFAIL.</p>")
    parts.append("<table id=\"networks\"><tr><th>network ID</th><th>pods</th><th>names</th><th>IPs</th>"
                 "<th>waiting for IP</th><th>names refused as invalid</th></tr>")
    for r in rows:
        refused = "<br>".join(f"{e(x['pod'])}: <code>{e(x['name'])}</code> ({e(x['reason'])})" for x in r["refused"])
        parts.append(
            f"<tr><td><a href=\"#{e(r['id'])}\"><code>{e(r['short_id'])}</code></a></td><td>{r['pods']}</td>"
            f"<td>{e(', '.join(r['names'])) or '-'}</td><td>{e(', '.join(r['ips'])) or '-'}</td>"
            f"<td>{e(', '.join(r['waiting'])) or '-'}</td><td>{refused or '-'}</td></tr>")
    parts.append("</table>")
    if not rows:
        parts.append("<p class=muted>No network: no opted-in pod with a kubedock.network annotation.</p>")
    for r in rows:
        detail = inspect(described, r["id"])
        parts.append(f"<h2 id=\"{e(r['id'])}\">network <code>{e(r['short_id'])}</code></h2>"
                     f"<p class=muted><code>{e(r['id'])}</code></p><table><tr><th>pod</th><th>names</th>"
                     "<th>addresses</th><th>phase</th><th>answered for</th></tr>")
        for pod, c in sorted(detail["Containers"].items()):
            addresses = ", ".join(a for a in (c["IPv4Address"], c["IPv6Address"]) if a) or "waiting"
            state = "yes" if c["Answers"] else ("no: being deleted" if c["Terminating"] else "no")
            parts.append(f"<tr><td>{e(pod)}</td><td>{e(', '.join(c['Names'])) or '-'}</td><td>{e(addresses)}</td>"
                         f"<td>{e(c['Phase'])}</td><td>{state}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
