"""``kubedock-dns``: ask a running server what it believes and why (console entry point).

    kubedock-dns networks                  a table of every network (docker network ls, with names)
    kubedock-dns networks <id>             one network, like docker network inspect
    kubedock-dns explain --from <pod|IP> <name> [--type A|AAAA|PTR] [--json]
    kubedock-dns --version                 the version, as `twistd kubedock-dns --version` says it

The server answers on its operations port (``--ops``, default ``$KUBEDOCK_DNS_OPS`` or
http://127.0.0.1:8080, which is right inside its container: ``kubectl exec deploy/kubedock-dns --
kubedock-dns networks``).  Standard library only, so it starts fast and needs no reactor.
Exit status: 0 done, 1 the server said no (unknown network or pod), 2 the server could not be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from kubedock_dns.ops import views
from kubedock_dns.ops.build import version_line

DEFAULT_OPS = "http://127.0.0.1:8080"


class Refused(Exception):
    """The server answered with an error (HTTP 4xx) whose message is for the user."""


def fetch(ops: str, path: str, timeout: float = 10.0) -> Any:
    # The ops endpoint is on loopback or the pod network: never through an environment's proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(ops.rstrip("/") + path, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error).get("error")
        except (ValueError, AttributeError):
            message = None
        if message and 400 <= error.code < 500:
            raise Refused(message) from None
        raise


def render_explain(report: dict[str, Any]) -> str:
    lines = []
    asker = report["asker"]
    pods = asker["pods"]
    if not pods:
        lines.append(f"asker: {asker['address']}: no kubedock pod has this address (a plain forwarder for it)")
    for pod in pods:
        state = "" if pod["asks"] else " (not asking: finished or host network)"
        lines.append(f"asker: pod {pod['pod']} in namespace {pod['namespace'] or '-'} at {asker['address']}, "
                     f"phase {pod['phase']}{state}")
        lines.append("  networks, first wins: " + (", ".join(views.short_id(n) for n in pod["networks"])
                                                    or "none (nothing is local to it)"))
    question, search = report["question"], report["search"]
    lines.append(f"question: {question['name']} {question['type']}")
    if len(report["forms"]) > 1:
        lines.append(f"forms a resolver tries (search {' '.join(search['list'])}, ndots {search['ndots']}):")
    for i, form in enumerate(report["forms"], 1):
        d = form["decision"]
        lines.append(f"  {i}. {form['name']}: {_outcome(d)}")
        for step in form["trace"]:
            if not step.startswith("asker: "):  # said above
                lines.append(f"       - {_short_ids(step)}")
        if "after_hold" in form:
            lines.append(f"       then {_outcome(form['after_hold'])}")
        if "upstream" in form:
            up = form["upstream"]
            records = ", ".join(up["records"]) or "no record"
            lines.append(f"       upstream answered {up['rcode']}: {records}" + (f" ({up['error']})" if up.get("error") else ""))
    result = report["result"]
    if result["records"]:
        lines.append(f"=> {result['form']}: {', '.join(result['records'])} ({result['why']})")
    else:
        lines.append(f"=> {result['rcode']}: {result['why']}")
    return "\n".join(lines) + "\n"


def _short_ids(text: str) -> str:
    """64-hex network IDs shortened to the 12 characters `docker network ls` shows."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1", text)


def _outcome(view: dict[str, Any]) -> str:
    head = view["rcode"] or view["rule"].upper()
    records = view.get("records")
    tail = f": {', '.join(records)}" if records else ""
    return f"{head}, {view['why']}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubedock-dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the version (and Python's and Twisted's) and exit")
    parser.add_argument("--ops", default=os.environ.get("KUBEDOCK_DNS_OPS", DEFAULT_OPS),
                        help="the server's operations endpoint (default $KUBEDOCK_DNS_OPS or %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    networks = commands.add_parser("networks", help="the networks and their members")
    networks.add_argument("network", nargs="?", help="a network ID or unique prefix: inspect that one")
    networks.add_argument("--json", action="store_true", help="print the server's JSON")
    explain = commands.add_parser("explain", help="why a pod gets the answer it gets for a name")
    explain.add_argument("--from", dest="asker", required=True, metavar="POD|IP",
                         help="the asking pod: its name (or namespace/name) or its IP address")
    explain.add_argument("name", help="the name as the application asks it (db, db.<ns>.svc..., an IP for PTR)")
    explain.add_argument("--type", default="A", choices=["A", "AAAA", "PTR"], type=str.upper)
    explain.add_argument("--json", action="store_true", help="print the JSON report")
    args = parser.parse_args(argv)
    try:
        if args.command == "networks":
            if args.network:
                found = fetch(args.ops, "/networks/" + urllib.parse.quote(args.network, safe=""))
                sys.stdout.write(json.dumps(found, indent=2) + "\n")
            else:
                listing = fetch(args.ops, "/networks")
                sys.stdout.write(json.dumps(listing, indent=2) + "\n" if args.json
                                 else views.render_table(listing["networks"], listing))
        else:
            query = urllib.parse.urlencode({"from": args.asker, "name": args.name, "type": args.type})
            report = fetch(args.ops, "/explain?" + query, timeout=30)
            sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_explain(report))
    except Refused as refused:
        print(f"kubedock-dns: {refused}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"kubedock-dns: cannot ask the server at {args.ops} ({error}); is it running, and is "
              "--ops (or $KUBEDOCK_DNS_OPS) its operations endpoint?", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
