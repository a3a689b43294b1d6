"""What an operator sees of a running server: Prometheus metrics (every one documented, with
HELP, histograms and process metrics) and logs (one JSON event a line with ``--log-format json``,
a structured debug line per decision with ``--verbose``, warnings rate-limited).

The end-to-end test runs the real ``twistd kubedock-dns`` with a pods file, asks it real
questions from pod addresses with dnspython, and scrapes and reads what it published; the unit
tests pin down the pieces the end-to-end run cannot show deterministically.
"""

from __future__ import annotations

import json
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.opcode
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from kubedock_dns.ops.latency import LatencyHistogram
from kubedock_dns.ops.logs import WarningLimiter
import kubedock_dns
from kubedock_dns.ops.metrics import DEPRECATED, HISTOGRAMS, LABELS, METRICS, PREFIX, REMOVED_IN
from kubedock_dns.kube.watcher import StampedHandOver
from testbed.upstream import free_port
from tests.podfactory import kubedock_pod, network_id
from tests.scripted_upstream import ScriptedUpstream
from tests.test_twistd import twistd_env, urlopen, wait_for

REPO = Path(__file__).resolve().parent.parent

# Names published before prometheus_client replaced the hand-written text; dashboards use them.
PUBLISHED_BEFORE = [
    "kubedock_dns_queries_udp_total", "kubedock_dns_queries_tcp_total", "kubedock_dns_answered_local_total",
    "kubedock_dns_answered_nodata_total", "kubedock_dns_forwarded_total", "kubedock_dns_servfail_total",
    "kubedock_dns_refused_total", "kubedock_dns_formerr_total", "kubedock_dns_notimp_total",
    "kubedock_dns_dropped_total", "kubedock_dns_held_total", "kubedock_dns_hold_overflow_total",
    "kubedock_dns_hold_expired_total", "kubedock_dns_truncated_total", "kubedock_dns_fast_path_total",
    "kubedock_dns_ip_conflicts_seen_total", "kubedock_dns_forwards_failed_total",
    "kubedock_dns_forwards_refused_overload_total", "kubedock_dns_pods", "kubedock_dns_pods_awaiting_ip",
    "kubedock_dns_conflicted_addresses", "kubedock_dns_synced", "kubedock_dns_forwards_in_flight",
    "kubedock_dns_holding",
]


def samples(text: str) -> dict[str, float]:
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served(tmp_path):
    """twistd kubedock-dns with two pods of one network, JSON logs, debug decisions, every query
    timed, and an upstream that answers SERVFAIL to everything."""
    net = network_id("obs")
    pods = [kubedock_pod("db", [net], ip="127.21.0.1", uid="db"),
            kubedock_pod("app", [net], ip="127.21.0.2", uid="app")]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    upstream = ScriptedUpstream(rcode=2)
    dns_port, ops_port = free_port(), free_port()
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"),
            "--dns-port", str(dns_port), "--dns-interface", "127.0.0.1",
            "--upstream", upstream.upstream_arg, "--ops-port", str(ops_port),
            "--ops-interface", "127.0.0.1", "--log-format", "json", "--verbose",
            "--latency-sample-every", "1", "--forward-timeout", "0.5"]
    proc = subprocess.Popen(argv, env=twistd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(tmp_path))
    ops = f"http://127.0.0.1:{ops_port}"
    try:
        wait_for(lambda: urlopen(ops + "/readyz", timeout=1).status == 200, what="/readyz")
        yield proc, dns_port, ops
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        upstream.close()


def ask(dns_port: int, name: str, source: str = "127.21.0.2"):
    return dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=dns_port, source=source,
                         timeout=5)


def test_metrics_keep_their_names_and_every_one_has_help(served):
    """The scrape (prometheus_client's format) keeps every previously published name, gives each
    family a HELP text, adds process metrics, and the sampled latency histograms count the
    answered and forwarded questions that were asked."""
    _, dns_port, ops = served
    assert ask(dns_port, "db").rcode() == dns.rcode.NOERROR
    assert ask(dns_port, "db").rcode() == dns.rcode.NOERROR
    assert ask(dns_port, "outside.example").rcode() == dns.rcode.SERVFAIL
    text = urlopen(ops + "/metrics", timeout=5).read().decode()
    values = samples(text)
    for name in PUBLISHED_BEFORE:
        assert name in values, f"{name} is no longer published"
    assert values["kubedock_dns_answered_local_total"] == 2
    assert values["kubedock_dns_forwards_failed_total"] == 1
    assert values['kubedock_dns_responses_total{"outcome": "upstream_failed", "rcode": "SERVFAIL"}'] == 1
    assert values['kubedock_dns_responses_total{"outcome": "answered", "rcode": "NOERROR"}'] == 2
    assert values["kubedock_dns_answer_duration_seconds_count"] == 2
    assert values["kubedock_dns_forward_duration_seconds_count"] == 1
    assert values['kubedock_dns_answer_duration_seconds_bucket{"le": "+Inf"}'] == 2
    assert values["process_resident_memory_bytes"] > 1e6
    assert values["process_open_fds"] > 0
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP text"


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_logs_carry_one_event_per_line_and_one_line_per_decision(served):
    """With --log-format json every line of output is one JSON object in the common shape: time
    (RFC 3339, UTC), level, logger, the rendered msg, then the event's own fields, and none of
    twisted.logger's bookkeeping; with --verbose each decision is a debug line whose fields say
    who asked what and what happened; three failing forwards give one upstream warning, not three."""
    proc, dns_port, _ = served
    ask(dns_port, "db")
    for _ in range(3):
        assert ask(dns_port, "outside.example").rcode() == dns.rcode.SERVFAIL
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line parses
    for event in events:
        assert list(event)[:4] == ["time", "level", "logger", "msg"], event
        assert RFC3339.match(event["time"]) and event["level"] in ("debug", "info", "warn", "error", "critical")
        assert "{" not in event["msg"] or "}" not in event["msg"], event  # rendered, no placeholders left
        assert not [key for key in event if key.startswith("log_")], event
    decisions = [e for e in events if e.get("outcome")]
    answered = [e for e in decisions if e["name"] == "db"]
    assert answered and answered[0]["outcome"] == "answered"
    assert answered[0]["client"] == "127.21.0.2" and answered[0]["records"] == ["127.21.0.1"]
    assert (answered[0]["level"], answered[0]["logger"]) == ("debug", "kubedock_dns.dns.server")
    assert answered[0]["msg"].startswith("127.21.0.2 asked db A: answered from network ")
    forwarded = [e for e in decisions if e["name"] == "outside.example"]
    assert [e["outcome"] for e in forwarded] == ["forward"] * 3
    warnings = [e for e in events if e.get("warning") == "upstreams-failed"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warn"
    assert warnings[0]["msg"].startswith("SERVFAIL for a forwarded question: no upstream answered")
    assert any(e["msg"].startswith("twistd ") and e["msg"].endswith("starting up.") for e in events)
    # Twisted's own old-style lines ("... starting on <port>") carry no message tuple or isError.
    legacy = [e for e in events if e["logger"] == "log_legacy"]
    assert any(" starting on " in e["msg"] for e in legacy)
    assert all(list(e) == ["time", "level", "logger", "msg"] for e in legacy), legacy
    assert "Traceback" not in out + err


def test_log_level_keeps_the_lines_at_or_above_it(tmp_path):
    """A real server run with --log-level warn (text format, the default) writes its upstream
    warning as a text line and none of its info lines (start-up, listening, shutdown), which
    the same server writes at the default level."""
    upstream = ScriptedUpstream(rcode=2)
    (tmp_path / "pods.json").write_text("[]")
    try:
        outputs = {}
        for level in ("warn", None):
            dns_port, ops_port = free_port(), free_port()
            argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"),
                    "--dns-port", str(dns_port), "--dns-interface", "127.0.0.1",
                    "--upstream", upstream.upstream_arg, "--ops-port", str(ops_port),
                    "--ops-interface", "127.0.0.1", "--forward-timeout", "0.5", "--drain-seconds", "0"]
            argv += ["--log-level", level] if level else []
            proc = subprocess.Popen(argv, env=twistd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=str(tmp_path))
            try:
                wait_for(lambda: urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=1).status == 200,
                         what="/readyz")
                assert ask(dns_port, "outside.example").rcode() == dns.rcode.SERVFAIL
            finally:
                proc.send_signal(signal.SIGTERM)
                outputs[level] = proc.communicate(timeout=30)[0]
    finally:
        upstream.close()
    text_line = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^]]+\] ")
    for out in outputs.values():
        lines = out.splitlines()
        assert lines and all(text_line.match(line) for line in lines if line.strip()), out
    warning = "[kubedock_dns.dns.server#warn] SERVFAIL for a forwarded question"
    assert warning in outputs["warn"] and warning in outputs[None]
    for info in ("starting up.", "dns listening on 127.0.0.1:", "Server Shut Down."):
        assert info in outputs[None] and info not in outputs["warn"], info


def test_json_line_renders_failures_and_keeps_every_field():
    """A failure's traceback travels as ``traceback``; a field named like a common key is kept
    as ``field_<name>``; a value JSON cannot hold is written as its repr, and a field holding
    itself still gives a line."""
    from twisted.python.failure import Failure

    from kubedock_dns.ops.logs import json_line

    seen = []
    log = Logger(namespace="kubedock_dns.example", observer=seen.append)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("while {doing}", Failure(), doing="dividing", msg="mine", time=3, thing=object())
    line = json_line(seen[0])
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert (record["level"], record["logger"], record["msg"]) == ("critical", "kubedock_dns.example", "while dividing")
    assert "ZeroDivisionError" in record["traceback"]
    assert (record["field_msg"], record["field_time"], record["doing"]) == ("mine", 3, "dividing")
    assert record["thing"].startswith("<object object at ")
    loop: list = []
    loop.append(loop)
    log.info("a loop", loop=loop)
    assert json.loads(json_line(seen[1]))["loop"] == "[[...]]"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_observer_filters_by_level_and_writes_where_twistd_would(fmt, tmp_path, capsys):
    """The observer twistd installs keeps events at or above --log-level; without --logfile it
    writes to standard output in the foreground, with one to that file."""
    from kubedock_dns.ops import logs

    def emit(observer):
        log = Logger(namespace="kubedock_dns.example", observer=observer)
        for level in ("debug", "info", "warn", "error"):
            getattr(log, level)("a {severity} line", severity=level)

    try:
        for threshold, shown in (("debug", 4), ("info", 3), ("warn", 2), ("error", 1)):
            logs.configure(logs.LogSettings(format=fmt, level=threshold, foreground=True))
            emit(logs.observer())
            lines = capsys.readouterr().out.splitlines()
            assert [re.search(r"a (\w+) line", line).group(1) for line in lines] == ["debug", "info", "warn", "error"][-shown:]
        logs.configure(logs.LogSettings(format=fmt, level="info", logfile=str(tmp_path / "server.log")))
        emit(logs.observer())
        assert capsys.readouterr().out == ""
        written = (tmp_path / "server.log").read_text().splitlines()
        assert len(written) == 3
        if fmt == "json":
            assert [json.loads(line)["level"] for line in written] == ["info", "warn", "error"]
    finally:
        logs.configure(logs.LogSettings())


def test_every_metric_is_documented():
    """docs/metrics.md names every metric the collector can publish and every label of the
    labelled ones, and lists each deprecated name in its own section beside its replacement."""
    doc = (REPO / "docs" / "metrics.md").read_text()
    names = [PREFIX + n + ("_total" if METRICS[n][0] == "counter" else "") for n in METRICS]
    names += [PREFIX + n for n in HISTOGRAMS]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/metrics.md does not list {missing}"
    for name, labels in LABELS.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{PREFIX}{name}"))
        assert all(f"`{label}`" in row for label in labels), (name, labels, row)
    deprecated = doc.split("## Deprecated names", 1)[1].split("\n## ", 1)[0]
    for name, replacement in DEPRECATED.items():
        assert f"| `{PREFIX}{name}_total` | `{replacement.replace('|', chr(92) + '|')}`" in deprecated, name
    assert f"(removed in {REMOVED_IN})" in doc


@pytest.fixture
def fast_served(tmp_path):
    """twistd kubedock-dns as deployed (fast path and UDP read loop on, decisions not logged),
    two pods of one network and a third still starting there (Pending, no address), an upstream
    that answers NXDOMAIN to everything."""
    net = network_id("labels")
    pods = [kubedock_pod("db", [net], ip="127.21.0.1", uid="db"),
            kubedock_pod("app", [net], ip="127.21.0.2", uid="app"),
            kubedock_pod("late", [net], uid="late", phase="Pending")]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    upstream = ScriptedUpstream(rcode=3)
    dns_port, ops_port = free_port(), free_port()
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"),
            "--dns-port", str(dns_port), "--dns-interface", "127.0.0.1",
            "--upstream", upstream.upstream_arg, "--ops-port", str(ops_port),
            "--ops-interface", "127.0.0.1", "--hold-timeout", "0.2", "--drain-seconds", "0"]
    proc = subprocess.Popen(argv, env=twistd_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=str(tmp_path))
    ops = f"http://127.0.0.1:{ops_port}"
    try:
        wait_for(lambda: urlopen(ops + "/readyz", timeout=1).status == 200, what="/readyz")
        yield dns_port, ops
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        upstream.close()


def labelled(text: str, family: str) -> dict[tuple[str, ...], float]:
    """The samples of ``family`` as label values (in label order) -> value."""
    for metric in text_string_to_metric_families(text):
        if metric.name == PREFIX + family:
            return {tuple(s.labels[label] for label in LABELS[family]): s.value for s in metric.samples
                    if s.name in (metric.name, metric.name + "_total")}
    raise AssertionError(f"{PREFIX}{family} is not published")


def test_labelled_metrics_count_each_query_once_on_every_path(fast_served):
    """Questions answered by the UDP read loop, the fast path, the full path (after a hold, too),
    relayed, malformed, dropped, and over TCP: requests_total counts each once under its
    transport and type, responses_total each reply once under its rcode and outcome, the two add
    up (with the dropped datagram), and the deprecated names keep their meaning."""
    dns_port, ops = fast_served

    def udp(name, rdtype="A", **kw):
        return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=dns_port,
                             source="127.21.0.2", timeout=5, **kw)

    def raw(datagram: bytes, answered: bool) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.21.0.2", 0))
            sock.settimeout(5)
            sock.sendto(datagram, ("127.0.0.1", dns_port))
            return sock.recv(512) if answered else None

    raw(b"\x12\x34\x01", answered=False)  # shorter than a header: dropped
    assert dns.rcode.from_flags(*struct.unpack("!H", raw(struct.pack("!6H", 0x1234, 0x0100, 0, 0, 0, 0),
                                                              answered=True)[2:4]), 0) == dns.rcode.FORMERR
    status = dns.message.make_query("db", "A")
    status.set_opcode(dns.opcode.STATUS)
    assert dns.query.udp(status, "127.0.0.1", port=dns_port, source="127.21.0.2", timeout=5).rcode() == dns.rcode.NOTIMP
    for _ in range(3):  # prepared by the fast path, then answered by the read loop
        assert [r.address for r in udp("db").answer[0]] == ["127.21.0.1"]
    for _ in range(2):
        assert udp("db", "AAAA").answer == []  # NODATA, prepared too
    assert udp("1.0.21.127.in-addr.arpa", "PTR").answer[0][0].target.to_text().startswith("db")
    assert udp("db", "MX").rcode() == dns.rcode.NOERROR  # the full path: NODATA
    assert udp("late").rcode() == dns.rcode.NXDOMAIN  # held (a pod of the network is starting), then not found
    assert udp("missing").rcode() == dns.rcode.NXDOMAIN  # nothing will answer to it: not found at once
    for _ in range(2):
        assert udp("outside.example").rcode() == dns.rcode.NXDOMAIN  # the upstream's answer
    assert udp("outside.example", "TXT").rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):
        tcp = dns.query.tcp(dns.message.make_query("db", "A"), "127.0.0.1", port=dns_port,
                            source="127.21.0.2", timeout=5)
        assert [r.address for r in tcp.answer[0]] == ["127.21.0.1"]

    text = urlopen(ops + "/metrics", timeout=5).read().decode()
    requests = {k: v for k, v in labelled(text, "requests").items() if v}
    assert requests == {("udp", "A"): 7, ("udp", "AAAA"): 2, ("udp", "PTR"): 1, ("udp", "MX"): 1,
                        ("udp", "TXT"): 1, ("udp", "other"): 3, ("tcp", "A"): 2}
    responses = labelled(text, "responses")
    assert {k: v for k, v in responses.items() if v} == {
        ("NOERROR", "answered"): 6, ("NOERROR", "nodata"): 3, ("NXDOMAIN", "nxdomain"): 2,
        ("NXDOMAIN", "forwarded"): 3, ("FORMERR", "malformed"): 1, ("NOTIMP", "malformed"): 1}
    for always in [("SERVFAIL", "servfail"), ("SERVFAIL", "upstream_failed"), ("REFUSED", "overloaded"),
                   ("NOERROR", "forwarded"), ("BADVERS", "malformed")]:
        assert responses[always] == 0, always  # published at 0, so rate() sees the first one
    values = samples(text)
    assert sum(requests.values()) == sum(responses.values()) + values["kubedock_dns_dropped_total"]
    assert {name: values[PREFIX + name + "_total"] for name in DEPRECATED} == {
        "queries_udp": 15, "queries_tcp": 2, "answered_local": 6, "answered_nodata": 3, "nxdomain": 2,
        "forwarded": 3, "servfail": 0, "refused": 0, "formerr": 1, "badvers": 0, "notimp": 1}
    assert values["kubedock_dns_held_total"] == 1 and values["kubedock_dns_dropped_total"] == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["kubedock_dns_nxdomain"].documentation.startswith(
        'Deprecated, removed in 0.2.0: use kubedock_dns_responses_total{outcome="nxdomain"}.')
    (info,) = families["kubedock_dns_build_info"].samples
    assert info.value == 1 and info.labels["version"] == kubedock_dns.__version__
    assert info.labels["python"] == platform.python_version() and re.fullmatch(r"\d+\.\d+.*", info.labels["twisted"])


def test_histogram_buckets_are_cumulative_with_inf_last():
    """Observations land in the first bucket whose bound is not below them; the Prometheus form
    is cumulative, ending with +Inf = count."""
    h = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 3.0):
        h.observe(seconds)
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.0065)
    with pytest.raises(ValueError, match="ascending"):
        LatencyHistogram((0.1, 0.01))


def test_one_query_in_n_is_timed_and_zero_times_none():
    """--latency-sample-every N (a power of two) times exactly every Nth query (one clock read
    each, observed into the answer histogram); 0 times none."""
    from kubedock_dns.contract import Relisted
    from kubedock_dns.dns.forwarder import Forwarder
    from kubedock_dns.dns.upstreams import Upstream
    from kubedock_dns.index import NetworkIndex
    from kubedock_dns.resolver import Resolver, ResolverConfig
    from kubedock_dns.dns.server import KubedockDNSServerFactory
    from kubedock_dns.dns.fastpath import FastPath
    from tests.podfactory import record

    class Socket:
        def sendto(self, data, address):
            return len(data)

    class Proto:
        transport = type("Transport", (), {"socket": Socket()})()

    net = network_id("sampling")
    query = dns.message.make_query("db.", "A").to_wire()
    for every, timed in ((4, 2), (1, 8), (0, 0)):
        clock = Clock()
        index = NetworkIndex()
        index.apply([Relisted((record("db", [net], ip="10.0.0.1", uid="db"),
                               record("app", [net], ip="10.0.0.2", uid="app")))])
        resolver = Resolver(index, ResolverConfig())
        reads = []
        factory = KubedockDNSServerFactory(clock, resolver, Forwarder(clock, [Upstream("127.0.0.1")]),
                                           fast_path=FastPath(resolver, clock.seconds), latency_sample_every=every,
                                           clock=lambda: reads.append(1) or 1.0 + len(reads) * 0.001)
        for _ in range(8):
            factory.datagram_received(query, Proto, ("10.0.0.2", 5353))
        assert factory.counts()["answered_local"] == 8
        assert factory.sampler.answers.count == timed and len(reads) == 2 * timed
    with pytest.raises(ValueError, match="0 .off. or a power of two"):
        KubedockDNSServerFactory(clock, resolver, Forwarder(clock, [Upstream("127.0.0.1")]), latency_sample_every=-1)


def test_warning_limiter_reports_once_per_interval_with_the_number_swallowed():
    """A repeated problem is logged once per interval per key; the next report says how many
    were swallowed; a different key is reported at once."""
    seen = []
    log = Logger(observer=seen.append)
    clock = Clock()
    limiter = WarningLimiter(log, clock.seconds, interval=60)
    assert limiter.warn("upstreams-failed", "no upstream answered ({why})", why="timeout")
    assert not limiter.warn("upstreams-failed", "no upstream answered ({why})", why="timeout")
    assert not limiter.warn("upstreams-failed", "no upstream answered ({why})", why="timeout")
    assert limiter.warn("duplicate-ip:10.0.0.1", "address {ip} twice", ip="10.0.0.1")
    clock.advance(61)
    assert limiter.warn("upstreams-failed", "no upstream answered ({why})", why="timeout")
    assert [e["log_level"] for e in seen] == [LogLevel.warn] * 3
    assert seen[-1]["suppressed"] == 2
    assert re.search(r"2 more like this", seen[-1]["log_format"].format(**seen[-1]))


def test_watch_lag_is_measured_from_hand_over_to_application():
    """A batch the watcher hands over at t=10 and the reactor applies at t=10.25 is a 0.25 s
    watch lag; the batch itself reaches the delivery function unchanged."""
    queued = []

    class Reactor:
        def callFromThread(self, f, *args):
            queued.append((f, args))

    now = [10.0]
    lag = LatencyHistogram((0.1, 0.5))
    handover = StampedHandOver(Reactor(), lag, clock=lambda: now[0])
    delivered = []
    handover.callFromThread(delivered.append, ("batch",))
    now[0] = 10.25
    f, args = queued.pop()
    f(*args)
    assert delivered == [("batch",)]
    assert lag.cumulative() == [("0.1", 0), ("0.5", 1), ("+Inf", 1)]


def test_observability_options_are_validated(tmp_path):
    """--latency-sample-every takes 0 (off) or a power of two, --log-format text or json,
    --log-level debug, info, warn or error (info by default; --verbose, which asks for a debug line
    per decision, makes it debug); anything else is refused naming the option and the expected
    form, before anything starts."""
    from twisted.python import usage

    from kubedock_dns.options import Options

    pods = tmp_path / "pods.json"
    pods.write_text("[]")
    base = ["--pods-file", str(pods), "--upstream", "127.0.0.1"]
    options = Options()
    options.parseOptions(base)
    config = options.config()
    assert (config.latency_sample_every, config.log_format, config.log_level) == (16, "text", "info")
    options = Options()
    options.parseOptions(base + ["--latency-sample-every", "0", "--log-format", "json", "--log-level", "warn"])
    config = options.config()
    assert (config.latency_sample_every, config.log_format, config.log_level) == (0, "json", "warn")
    for verbose in (["--verbose"], ["--verbose", "--log-level", "warn"]):  # the chart always gives a level
        options = Options()
        options.parseOptions(base + verbose)
        assert options.config().log_level == "debug"
    for bad in ("-1", "3", "12"):
        with pytest.raises(usage.UsageError, match=f"--latency-sample-every {bad}: must be 0 .off. or a power of two"):
            Options().parseOptions(base + ["--latency-sample-every", bad])
    with pytest.raises(usage.UsageError, match="--log-format 'xml': expected text or json"):
        Options().parseOptions(base + ["--log-format", "xml"])
    with pytest.raises(usage.UsageError, match="--log-level 'warning': expected one of debug, info, warn, error"):
        Options().parseOptions(base + ["--log-level", "warning"])


def test_index_changes_warn_about_duplicate_ips_and_refused_names_rate_limited():
    """Applying pod changes warns once per duplicated address (naming both pods), and about names
    refused as invalid at most once a minute in all, each pod once however often it changes."""
    from kubedock_dns.contract import Relisted, Upserted, pod_record_from_dict
    from kubedock_dns.index import NetworkIndex
    from kubedock_dns.tap import apply_and_warn
    from tests.podfactory import record

    seen = []
    clock = Clock()
    index = NetworkIndex()
    apply = apply_and_warn(index, WarningLimiter(Logger(observer=seen.append), clock.seconds))
    net = network_id("warn")
    bad = [pod_record_from_dict(kubedock_pod(f"bad{i}", [net], aliases=["db:5432"], ip=f"10.0.1.{i}",
                                             uid=f"bad{i}")) for i in range(3)]
    apply([Relisted((record("one", [net], ip="10.0.0.1", uid="one"), bad[0]))])
    apply([Upserted(record("two", [net], ip="10.0.0.1", uid="two"))])
    apply([Upserted(bad[1])])
    apply([Upserted(bad[0])])
    warnings = [(e["warning"], e.get("ip") or e.get("pod")) for e in seen]
    assert warnings == [("refused-name", "bad0"), ("duplicate-ip", "10.0.0.1")]
    assert "tests/one, tests/two" == seen[1]["pods"]
    clock.advance(61)
    apply([Upserted(bad[2])])
    assert (seen[-1]["pod"], seen[-1]["suppressed"]) == ("bad2", 1)  # bad1 was swallowed, bad0 not re-counted
