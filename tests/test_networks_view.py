"""The networks view: ``kubedock-dns networks`` (a table like ``docker network ls`` with names),
``kubedock-dns networks <id>`` (like ``docker network inspect``) and the read-only HTML page at
the ops port, shown in a real headless Chromium.

The data is what the running server's index believes, fetched from its ops endpoint over HTTP:
the tests start the real server (real sockets) and change its index as the watcher would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile

import pytest
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from kubedock_dns.ops import views
from kubedock_dns.ops.cli import main as cli_main
from kubedock_dns.contract import Relisted, Upserted, pod_record_from_dict
from kubedock_dns.index import NetworkIndex
from tests.podfactory import kubedock_pod, network_id, record
from tests.test_dns_server import A_DB, A_SVC, NET_A, NET_B, NET_C, NS, DNSServerTestCase
from tests.test_twistd import urlopen

CHROMIUM = shutil.which("chromium")


def described_with_refused_and_waiting() -> dict:
    net = network_id("view")
    bad = kubedock_pod("cache", [net], aliases=["cache:6379"], ip="10.0.0.3", namespace=NS, uid="bad")
    index = NetworkIndex()
    index.apply([Relisted((
        record("db", [net], aliases=["database"], ip="10.0.0.1", namespace=NS, uid="db"),
        record("app", [net, network_id("other")], ip="10.0.0.2", namespace=NS, uid="app"),
        record("late", [net], phase="Pending", namespace=NS, uid="late"),
        pod_record_from_dict(bad),
    ))])
    return index.describe()


def test_summary_lists_names_ips_waiting_pods_and_refused_names():
    """One row per network: member count, every name and address that answers, pods waiting for an
    IP, and names refused as invalid with the reason (from the pod's annotations)."""
    described = described_with_refused_and_waiting()
    rows = {r["short_id"]: r for r in views.summaries(described)}
    row = rows[network_id("view")[:12]]
    assert row["pods"] == 4
    assert {"db", "database", "app", "cache"} <= set(row["names"])
    assert row["ips"] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert row["waiting"] == ["late"]
    assert [(r["pod"], r["name"]) for r in row["refused"]] == [("cache", "cache:6379")]
    assert "kubedock.hostalias/1" in row["refused"][0]["reason"]
    table = views.render_table(views.summaries(described), described)
    assert network_id("view")[:12] in table and "late" in table
    assert "pod cache: 'cache:6379'" in table


def test_inspect_finds_a_network_by_id_or_unique_prefix_like_docker():
    """A full ID or a unique prefix selects one network; an ambiguous or unknown one is refused
    with the candidates named."""
    described = described_with_refused_and_waiting()
    full = network_id("view")
    for wanted in (full, full[:12], full[:3].upper()):
        found = views.inspect(described, wanted)
        assert found["Id"] == full
    assert found["Containers"]["db"]["IPv4Address"] == "10.0.0.1"
    assert found["Containers"]["late"]["WaitingForIP"] is True
    assert found["Containers"]["cache"]["RefusedNames"][0]["name"] == "cache:6379"
    with pytest.raises(views.NoSuchNetwork, match="no network 'zzz'"):
        views.inspect(described, "zzz")
    with pytest.raises(views.NoSuchNetwork, match=r"'ab' is a prefix of 2 networks \(ab1, ab2\)"):
        views.inspect({"networks": {"ab1": [], "ab2": []}}, "ab")


def test_html_escapes_what_pods_wrote():
    """Names and pod names reach the page escaped: a pod cannot inject markup into it."""
    described = {"synced": True, "pods": 1, "networks": {"n<b>": [
        {"pod": "<script>x</script>", "names": ["a"], "ips": ["10.0.0.1"], "phase": "Running",
         "answers": True, "refused_names": [{"name": "<i>", "reason": "r&d"}]}]}}
    page = views.render_html(described)
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<i>" not in page and "r&amp;d" in page


class NetworksViewTests(DNSServerTestCase):
    """The server's ops endpoint and the command, against the running server."""

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.server.ops.port}"

    def command(self, *argv):
        def call():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(["--ops", self.ops, *argv])
            return code, out.getvalue(), err.getvalue()
        return deferToThread(call)

    @defer.inlineCallbacks
    def test_networks_table_and_inspect(self):
        """`kubedock-dns networks` lists each network of the running server with its names and
        addresses and a pod that waits for its IP; `networks <prefix>` inspects one; an unknown
        prefix exits 1 naming the known networks; a server that is not there exits 2."""
        self.index.apply([Upserted(record("late", [NET_A], phase="Pending", namespace=NS, uid="late"))])
        code, out, _ = yield self.command("networks")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("NETWORK ID"))
        row = next(line for line in lines if line.startswith(NET_A[:12]))
        self.assertIn(A_DB, row)
        self.assertIn("late", row)
        self.assertTrue(any(line.startswith(NET_B[:12]) for line in lines))
        code, out, _ = yield self.command("networks", NET_C[:6])
        self.assertEqual(code, 0)
        inspected = json.loads(out)[0]
        self.assertEqual(inspected["Id"], NET_C)
        self.assertEqual(list(inspected["Containers"]), ["multi"])
        code, _, err = yield self.command("networks", "fffffffffff0")
        self.assertEqual(code, 1)
        self.assertIn(NET_A[:12], err)
        code, _, err = yield deferToThread(lambda: _quiet(cli_main, ["--ops", "http://127.0.0.1:1", "networks"]))
        self.assertEqual(code, 2)

    @defer.inlineCallbacks
    def test_html_page_in_headless_chromium(self):
        """The page at / renders in a real browser: Chromium's DOM has one row per network with its
        names, and a screenshot is drawn (docs/networks.png is one, taken from examples/pods.json)."""
        if CHROMIUM is None:
            raise SkipTest("chromium is not installed (scripts/setup installs the Debian package)")
        work = tempfile.mkdtemp(prefix="kubedock-dns-chromium-")
        self.addCleanup(shutil.rmtree, work, True)
        dom = yield deferToThread(chromium, self.ops + "/", work, "--dump-dom")
        self.assertIn("<table id=\"networks\">", dom)
        self.assertIn(f"<code>{NET_A[:12]}</code>", dom)
        self.assertIn(A_SVC, dom)
        shot = os.path.join(work, "page.png")
        yield deferToThread(chromium, self.ops + "/", work, f"--screenshot={shot}", "--window-size=1200,700")
        with open(shot, "rb") as f:
            head = f.read(24)
        self.assertEqual(head[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual(struct.unpack("!II", head[16:24]), (1200, 700))
        self.assertGreater(os.path.getsize(shot), 10_000)  # drawn, not blank


def _quiet(function, argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(argv), "", ""


def chromium(url: str, work: str, *action: str) -> str:
    """Headless Chromium as root in a fresh profile, without network chatter; its stdout."""
    profile = tempfile.mkdtemp(dir=work)
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--no-proxy-server", *action, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
