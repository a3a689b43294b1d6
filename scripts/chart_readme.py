#!/usr/bin/env python3
"""Write the chart's README (``helm/kubedock-dns/README.md``) from its template, Chart.yaml and the
``# --`` comments of values.yaml (the helm-docs convention), so the list of values cannot drift.

    python3 scripts/chart_readme.py           # rewrite README.md
    python3 scripts/chart_readme.py --check   # exit 1, saying why, when README.md is not current

Contract: every key of values.yaml is documented by a comment block directly above it whose
documenting part starts with ``# --`` (ordinary comments before that line are not part of it).
A documented key is one row of the table (its dotted path, type, default as JSON, description);
the keys below a documented mapping need no comment of their own (they are part of its default),
but get a row of their own when they have one.  An undocumented mapping is walked into; an
undocumented value anywhere else is an error naming it, so a new value cannot be added without a
description.  The template (``README.md.tmpl`` beside Chart.yaml, not packaged) may use
``{{ name }}``, ``{{ version }}``, ``{{ appVersion }}``, ``{{ kubeVersion }}``, ``{{ description }}``
and ``{{ values }}`` (the table); any other ``{{ ... }}`` is an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "kubedock-dns"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?: |$)")
PLACEHOLDER = re.compile(r"{{ *([A-Za-z]+) *}}")


class ValuesDocError(ValueError):
    """values.yaml or the template cannot be turned into a README; the message says where."""


@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    description: str


def _type_name(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"),
                       (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "string"  # null: a value to fill in


def _lookup(values: Any, path: list[str]) -> Any:
    for part in path:
        values = values[part]
    return values


def documented_keys(text: str) -> dict[str, str]:
    """Dotted key path -> description, for every key with a ``# --`` comment block above it."""
    descriptions: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped)
            continue
        if not stripped or stripped.startswith("- "):
            comments = []  # a description must sit directly above its key
            continue
        match = KEY.match(line)
        if match is None:
            raise ValuesDocError(f"values.yaml line {number}: cannot read a key from {line!r}")
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        starts = [i for i, c in enumerate(comments) if c == "# --" or c.startswith("# -- ")]
        if starts:
            block = comments[starts[-1]:]
            words = " ".join(c[1:].strip() for c in block)[2:]
            descriptions[".".join(k for _, k in stack)] = re.sub(r"\s+", " ", words).strip()
        comments = []
    return descriptions


def value_rows(values_text: str) -> list[Row]:
    """The table's rows, in the order of values.yaml (see the module docstring)."""
    values = yaml.safe_load(values_text)
    descriptions = documented_keys(values_text)
    rows: list[Row] = []

    def walk(node: Any, path: list[str], covered: bool) -> None:
        dotted = ".".join(path)
        if dotted in descriptions:
            rows.append(Row(dotted, _type_name(node), json.dumps(node, separators=(", ", ": ")),
                            descriptions[dotted]))
            covered = True
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, [*path, key], covered)
        elif not covered and path:
            raise ValuesDocError(f"values.yaml: {dotted} has no '# --' description above it")

    walk(values, [], False)
    unknown = set(descriptions) - {r.path for r in rows}
    if unknown:
        raise ValuesDocError(f"values.yaml: described keys not found in the values: {sorted(unknown)}")
    return rows


def table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        # Markdown: '|' ends a cell; '<release>' outside a code span would be taken for HTML.
        parts = text.replace("|", "\\|").split("`")
        for i in range(0, len(parts), 2):
            parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
        return "`".join(parts)

    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    lines += [f"| `{r.path}` | {r.type} | `{r.default.replace('|', chr(92) + '|')}` | {cell(r.description)} |"
              for r in rows]
    return "\n".join(lines)


def render(chart_dir: Path = CHART) -> str:
    """The README the chart should carry."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    fields = {
        "name": chart["name"], "version": str(chart["version"]), "appVersion": str(chart["appVersion"]),
        "kubeVersion": str(chart.get("kubeVersion", "")), "description": " ".join(chart["description"].split()),
        "values": table(value_rows((chart_dir / "values.yaml").read_text())),
    }
    template = (chart_dir / "README.md.tmpl").read_text()

    def fill(match: re.Match[str]) -> str:
        if match[1] not in fields:
            raise ValuesDocError(f"README.md.tmpl: unknown placeholder {match[0]!r} (known: {', '.join(fields)})")
        return fields[match[1]]

    return PLACEHOLDER.sub(fill, template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is current")
    parser.add_argument("--chart", type=Path, default=CHART, help="the chart directory")
    args = parser.parse_args(argv)
    try:
        wanted = render(args.chart)
    except ValuesDocError as e:
        print(f"chart_readme: {e}", file=sys.stderr)
        return 2
    readme = args.chart / "README.md"
    if args.check:
        if not readme.exists() or readme.read_text() != wanted:
            print(f"chart_readme: {readme} is not current: run python3 scripts/chart_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
