"""Load generation with ``dnsperf``: one process per source pod address, all pinned to one core.

``dnsperf -a`` binds one local address, so a load "from many pods" is several dnsperf processes,
one per source pod (``-a <pod IP>``, that pod's own query file), started together and summed.
The maximum rate is measured with no rate limit (``-Q`` absent, ``-q`` queries outstanding per
process); a latency run limits the total rate with ``-Q rate/processes`` and ``-v``, whose
per-query lines (``> RCODE NAME TYPE SECONDS``) give the percentiles, since dnsperf 2.10 prints
only mean and standard deviation itself.  Lost queries (timed out) are counted, not timed.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import pinning

_VERBOSE_LINE = re.compile(rb"^> (\S+) (\S+) (\S+) ([0-9.]+)$", re.M)
_SUMMARY = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "runtime": re.compile(r"Run time \(s\):\s+([0-9.]+)"),
    "qps": re.compile(r"Queries per second:\s+([0-9.]+)"),
    "mean_latency": re.compile(r"Average Latency \(s\):\s+([0-9.]+)"),
}
_RCODES = re.compile(r"Response codes:\s+(.*)")


class HarnessError(RuntimeError):
    """dnsperf could not run, or printed something this module cannot read."""


def dnsperf_binary() -> str:
    path = shutil.which("dnsperf")
    if not path:
        raise HarnessError("dnsperf is missing: apt-get install dnsperf")
    return path


def dnsperf_version() -> str:
    out = subprocess.run([dnsperf_binary(), "-h"], capture_output=True, text=True, timeout=30)
    match = re.search(r"Version (\S+)", out.stdout + out.stderr)
    return f"dnsperf {match.group(1)}" if match else "dnsperf (unknown version)"


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LoadResult:
    """The summed outcome of one load (all dnsperf processes of one run)."""

    qps: float
    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> sorted seconds
    commands: list[list[str]] = field(default_factory=list)

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.sent if self.sent else 0.0

    @property
    def error_fraction(self) -> float:
        """Answers other than NOERROR (the mix expects NOERROR throughout)."""
        bad = sum(n for code, n in self.rcodes.items() if code != "NOERROR")
        return bad / self.completed if self.completed else 0.0

    def latency(self, p: float, kind: str = "all") -> float | None:
        return percentile(self.latencies.get(kind, []), p)


def parse_summary(text: str) -> dict:
    values: dict = {}
    for key, pattern in _SUMMARY.items():
        match = pattern.search(text)
        if not match:
            raise HarnessError(f"dnsperf printed no {key!r} line:\n{text[-2000:]}")
        values[key] = float(match.group(1)) if key in ("runtime", "qps", "mean_latency") else int(match.group(1))
    rcodes = {}
    match = _RCODES.search(text)
    if match:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", match.group(1)):
            rcodes[code] = int(count)
    values["rcodes"] = rcodes
    return values


def parse_verbose(data: bytes, forwarded_suffix: str) -> dict[str, list[float]]:
    """Per-query latencies from ``dnsperf -v`` output, by kind (all, local, forwarded)."""
    suffix = forwarded_suffix.rstrip(".").encode()
    out: dict[str, list[float]] = {"all": [], "local": [], "forwarded": []}
    for match in _VERBOSE_LINE.finditer(data):
        seconds = float(match.group(4))
        kind = "forwarded" if match.group(2).rstrip(b".").endswith(suffix) else "local"
        out["all"].append(seconds)
        out[kind].append(seconds)
    for values in out.values():
        values.sort()
    return out


def run_load(
    server: str,
    port: int,
    sources: list[tuple[str, Path]],
    work: Path,
    tag: str,
    duration: float,
    rate: float | None = None,
    outstanding: int = 50,
    clients: int = 4,
    timeout: float = 2.0,
    core: int | None = 1,
    forwarded_suffix: str = "example.test",
    targets: dict[str, str] | None = None,
) -> LoadResult:
    """Run one dnsperf process per ``(source address, query file)`` at once and sum them.

    ``rate`` None: as fast as the server answers; else the total queries per second, split evenly,
    with ``-v`` to time every query.  ``targets`` maps a source address to the server address it
    asks, where that is not ``server`` (aardvark-dns answers each network on its gateway)."""
    binary = dnsperf_binary()
    procs = []
    commands = []
    work.mkdir(parents=True, exist_ok=True)
    for i, (address, queries) in enumerate(sources):
        argv = [binary, "-s", (targets or {}).get(address, server), "-p", str(port), "-a", address, "-d", str(queries),
                "-l", f"{duration:g}", "-c", str(clients), "-q", str(outstanding), "-t", f"{timeout:g}"]
        if rate is not None:
            argv += ["-Q", str(max(1, round(rate / len(sources)))), "-v"]
        out = work / f"{tag}.{i}.out"
        commands.append(pinning(core) + argv)
        with open(out, "wb") as f:
            procs.append((subprocess.Popen(pinning(core) + argv, stdout=f, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL), out))
    total = {"qps": 0.0, "sent": 0, "completed": 0, "lost": 0}
    rcodes: dict[str, int] = {}
    latencies: dict[str, list[float]] = {"all": [], "local": [], "forwarded": []}
    for proc, out in procs:
        try:
            proc.wait(duration + timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HarnessError(f"dnsperf did not finish: {out}") from None
        data = out.read_bytes()
        if proc.returncode != 0:
            raise HarnessError(f"dnsperf failed (rc={proc.returncode}):\n{data[-2000:].decode(errors='replace')}")
        summary = parse_summary(data.decode(errors="replace"))
        for key in total:
            total[key] += summary[key]
        for code, count in summary["rcodes"].items():
            rcodes[code] = rcodes.get(code, 0) + count
        if rate is not None:
            for kind, values in parse_verbose(data, forwarded_suffix).items():
                latencies[kind].extend(values)
            out.unlink()  # per-query lines are large; the summary is kept in the result
    for values in latencies.values():
        values.sort()
    return LoadResult(total["qps"], int(total["sent"]), int(total["completed"]), int(total["lost"]),
                      rcodes, latencies if rate is not None else {}, commands)
