"""``kubedock-dns explain`` tells the story of each rule of the DNS semantics table (DESIGN
section 4), and the story matches what a real query gets.

Every test asks the real server twice, side by side: a real query from the pod's address with
dnspython (as the pod's resolver would), and the ops endpoint's ``/explain`` over HTTP, which
``kubedock-dns explain`` prints.  The explanation must name the rule and give the same rcode and
records the query got.  Names are asked absolute (``db.``) where the query is compared, so both
see exactly one form; search-list walks are asked relative, as applications do.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse

import dns.rcode
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from kubedock_dns.contract import Deleted, Relisted, Upserted
from kubedock_dns.ops.cli import main as cli_main
from kubedock_dns.ops.cli import render_explain
from tests.podfactory import record
from tests.test_dns_server import (
    A_DB, A_SVC, B_DB, B_SVC, MULTI, NET_A, NET_C, NS, OUTSIDER, DNSServerTestCase, addresses, base_pods,
)
from tests.test_twistd import urlopen


def records_of(response) -> list[str]:
    out = []
    for rrset in response.answer:
        for r in rrset:
            out.append(getattr(r, "address", None) or r.to_text().rstrip("."))
    return sorted(out)


class ExplainTestCase(DNSServerTestCase):
    hold_timeout = 0.5

    @property
    def ops(self) -> str:
        port = self.server.ops.port
        return f"http://127.0.0.1:{port}"

    def explain(self, asker: str, name: str, rdtype: str = "A", expect_status: int = 200):
        query = urllib.parse.urlencode({"from": asker, "name": name, "type": rdtype})

        def get():
            try:
                with urlopen(f"{self.ops}/explain?{query}", timeout=20) as r:
                    return r.status, json.load(r)
            except Exception as error:  # HTTPError: status and JSON body
                return error.code, json.load(error)

        def check(result):
            status, body = result
            self.assertEqual(status, expect_status, body)
            return body
        return deferToThread(get).addCallback(check)

    @defer.inlineCallbacks
    def both(self, source: str, name: str, rdtype: str = "A", explain_first: bool = False):
        """The real answer and the explanation, checked to agree; returns the explanation.
        ``explain_first``: explain before asking (a real question that is held changes what the
        next one gets, which the explanation then rightly reports)."""
        if explain_first:
            report = yield self.explain(source, name, rdtype)
            response = yield self.ask(source, name, rdtype)
        else:
            response = yield self.ask(source, name, rdtype)
            report = yield self.explain(source, name, rdtype)
        result = report["result"]
        self.assertEqual(result["rcode"], dns.rcode.to_text(response.rcode()), report)
        self.assertEqual(sorted(result["records"]), records_of(response), report)
        render_explain(report)  # the command's text form renders every case
        return report


class SemanticsTableTests(ExplainTestCase):
    @defer.inlineCallbacks
    def test_name_in_the_askers_network_is_answered_from_that_network(self):
        """Row 1: the explanation names the asker's pod and networks and the network that answered."""
        report = yield self.both(A_SVC, "db.")
        self.assertEqual(report["result"]["records"], [A_DB])
        form = report["forms"][0]
        self.assertEqual(form["decision"]["network"], NET_A)
        self.assertEqual(report["asker"]["pods"][0]["networks"], [NET_A])
        self.assertIn(f"db looked up in {NET_A}: found in {NET_A}", form["trace"])

    @defer.inlineCallbacks
    def test_missing_family_is_nodata(self):
        """Row 2: AAAA of an IPv4-only pod is NOERROR without records, and says so."""
        report = yield self.both(A_SVC, "db.", "AAAA")
        self.assertEqual(report["forms"][0]["decision"]["rcode"], "NOERROR")
        self.assertIn("NODATA", report["forms"][0]["decision"]["why"])

    @defer.inlineCallbacks
    def test_first_network_with_the_name_wins(self):
        """Row 4: an asker in networks C then A gets A's db while C has none, then C's once it has one;
        the trace lists the networks looked at in order."""
        report = yield self.both(MULTI, "db.")
        self.assertEqual(report["result"]["records"], [A_DB])
        self.assertIn(f"db looked up in {NET_C}, {NET_A}: found in {NET_A}", report["forms"][0]["trace"])
        self.index.apply([Upserted(record("db", [NET_C], ip="127.10.3.1", namespace=NS, uid="c-db"))])
        report = yield self.both(MULTI, "db.")
        self.assertEqual(report["result"]["records"], ["127.10.3.1"])
        self.assertIn(f"db looked up in {NET_C}: found in {NET_C}", report["forms"][0]["trace"])

    @defer.inlineCallbacks
    def test_search_suffix_is_stripped_and_the_walk_stops_at_the_first_answer(self):
        """Row 5: asked as an application asks (relative), the first form a resolver sends is
        db.<ns>.svc.cluster.local, answered locally from the stripped name; no later form is sent."""
        response = yield self.ask(B_SVC, f"db.{NS}.svc.cluster.local")
        report = yield self.explain(B_SVC, "db")
        self.assertEqual([f["name"] for f in report["forms"]], [f"db.{NS}.svc.cluster.local"])
        self.assertIn(f"cluster search suffix stripped: db.{NS}.svc.cluster.local -> db", report["forms"][0]["trace"])
        self.assertEqual(report["result"]["records"], addresses(response))
        self.assertEqual(report["search"]["list"][0], f"{NS}.svc.cluster.local")

    @defer.inlineCallbacks
    def test_name_dot_network(self):
        """Row 6: db.<short network ID> resolves in that network when the asker is in it."""
        report = yield self.both(MULTI, f"db.{NET_A[:12]}.")
        self.assertEqual(report["result"]["records"], [A_DB])
        self.assertTrue(any(s.startswith(f"as name.<network>: db in a network of the asker labelled {NET_A[:12]}: found")
                            for s in report["forms"][0]["trace"]), report)

    @defer.inlineCallbacks
    def test_ptr_inside_and_outside_the_askers_networks(self):
        """Rows 7 and 8: PTR of a peer's address is answered with its name; PTR of an address outside
        the asker's networks is forwarded and the upstream's answer is shown."""
        report = yield self.both(B_SVC, "1.2.10.127.in-addr.arpa.", "PTR")
        self.assertEqual(report["result"]["records"], ["test_db_b"])  # the container name
        report = yield self.both(A_SVC, "8.8.10.127.in-addr.arpa.", "PTR")
        self.assertEqual(report["forms"][0]["decision"]["rule"], "Forward")
        self.assertIn("outside.example", report["forms"][0]["upstream"]["records"][0])
        by_address = yield self.explain(B_SVC, B_DB, "PTR")  # an address is turned into its reverse name
        self.assertEqual(by_address["result"]["records"], ["test_db_b"])

    @defer.inlineCallbacks
    def test_unknown_asker_is_a_plain_forwarder(self):
        """Row 9: an address that is no pod's gets the cluster DNS's answers, never a network's."""
        report = yield self.both(OUTSIDER, f"db.{NS}.svc.cluster.local.")
        self.assertEqual(report["asker"]["pods"], [])
        self.assertEqual(report["result"]["records"], [self.dnsmasq.service_ip])
        self.assertIn("asker is not a known pod", report["forms"][0]["decision"]["why"])

    @defer.inlineCallbacks
    def test_unknown_single_label_is_nxdomain_at_once(self):
        """Rows 10 and 11: a container name nobody of the asker's networks has, and no pod there
        will answer to soon, is NXDOMAIN at once, never forwarded; the explanation says so."""
        report = yield self.both(A_SVC, "nosuch.")
        form = report["forms"][0]
        self.assertEqual((form["decision"]["rule"], form["decision"]["rcode"]), ("NotFound", "NXDOMAIN"))
        self.assertNotIn("upstream", form)
        self.assertTrue(any("answered at once" in step for step in form["trace"]), form["trace"])
        walk = yield self.explain(A_SVC, "nosuch2")
        self.assertEqual([f["decision"]["rule"] for f in walk["forms"]], ["NotFound"] * 4)
        self.assertEqual(walk["result"]["rcode"], "NXDOMAIN")

    @defer.inlineCallbacks
    def test_a_name_a_peer_will_answer_to_soon_is_held_then_nxdomain(self):
        """A name a pod of the asker's network will answer to once it starts is held, then
        NXDOMAIN if it does not start in time; the explanation says both, and that the next forms
        are not held again."""
        self.index.apply([Upserted(record("starting", [NET_A], phase="Pending", namespace=NS, uid="starting"))])
        report = yield self.both(A_SVC, "starting.", explain_first=True)
        form = report["forms"][0]
        self.assertEqual(form["decision"]["rule"], "Hold")
        self.assertEqual(form["after_hold"]["rcode"], "NXDOMAIN")
        self.assertTrue(any("does not answer yet" in step for step in form["trace"]), form["trace"])
        walk = yield self.explain(B_SVC, "starting")
        self.assertEqual([f["decision"]["rule"] for f in walk["forms"]], ["NotFound"] * 4)  # not B's

    @defer.inlineCallbacks
    def test_outside_multi_label_name_is_forwarded_at_once(self):
        """Multi-label names no network holds go to the cluster DNS without a hold."""
        report = yield self.both(A_SVC, self.dnsmasq.kubernetes_name + ".")
        self.assertEqual(report["forms"][0]["decision"]["rule"], "Forward")
        self.assertEqual(report["result"]["records"], [self.dnsmasq.kubernetes_ip])

    @defer.inlineCallbacks
    def test_deleted_and_terminating_pods_are_not_found(self):
        """Rows 12: a pod being deleted is no longer answered for; a deleted one neither."""
        self.index.apply([Upserted(dataclasses.replace(base_pods()[0], terminating=True))])
        report = yield self.both(A_SVC, "db.", explain_first=True)
        self.assertEqual(report["result"]["rcode"], "NXDOMAIN")
        self.index.apply([Deleted("a-db")])
        report = yield self.both(B_SVC, "service.")  # others are unaffected
        self.assertEqual(report["result"]["records"], [B_SVC])

    @defer.inlineCallbacks
    def test_duplicate_address_is_servfail(self):
        """Two live pods on one address: SERVFAIL, and the explanation says which address."""
        self.index.apply([Upserted(record("ghost", [NET_A], ip=A_DB, namespace=NS, uid="ghost"))])
        report = yield self.both(A_SVC, "db.")
        self.assertEqual(report["result"]["rcode"], "SERVFAIL")
        self.assertIn(f"address {A_DB} is claimed by several live pods", report["forms"][0]["decision"]["why"])

    @defer.inlineCallbacks
    def test_not_synced_is_held_then_servfail(self):
        """Before the first complete list, local questions wait and then fail."""
        self.index.synced = False
        report = yield self.both(A_SVC, "db.")
        self.assertEqual(report["forms"][0]["decision"]["rule"], "Hold")
        self.assertIn("not synced", report["forms"][0]["after_hold"]["why"])
        self.index.apply([Relisted(tuple(base_pods()))])


class AskerAndErrorsTests(ExplainTestCase):
    @defer.inlineCallbacks
    def test_asker_by_pod_name(self):
        """--from takes a pod name (or namespace/name) as kubectl shows it."""
        report = yield self.explain("multi", "db.")
        self.assertEqual(report["asker"]["address"], MULTI)
        report = yield self.explain(f"{NS}/multi", "db.")
        self.assertEqual(report["result"]["records"], [A_DB])

    @defer.inlineCallbacks
    def test_bad_questions_get_a_specific_error(self):
        """An unknown pod, a pod named twice, a pod without an address and a bad type are refused with
        a message that says what to give instead."""
        body = yield self.explain("nobody", "db", expect_status=400)
        self.assertIn("no opted-in pod named 'nobody'", body["error"])
        body = yield self.explain("service", "db", expect_status=400)
        self.assertIn("several pods are named 'service'", body["error"])
        self.index.apply([Upserted(record("newbie", [NET_A], phase="Pending", namespace=NS, uid="newbie"))])
        body = yield self.explain("newbie", "db", expect_status=400)
        self.assertIn("has no IP address yet", body["error"])
        body = yield self.explain(A_SVC, "db", "MX", expect_status=400)
        self.assertIn("expected A, AAAA or PTR", body["error"])

    @defer.inlineCallbacks
    def test_explaining_changes_nothing_a_later_query_gets(self):
        """Explaining a missing name does not make the pod's next real question skip its hold: the
        memory of held names is not written by explain."""
        yield self.explain(A_SVC, "later")
        self.index.apply([Upserted(record("later", [NET_A], ip="127.10.1.30", namespace=NS, uid="later"))])
        response = yield self.ask(A_SVC, "later")
        self.assertEqual(addresses(response), ["127.10.1.30"])
        self.assertEqual(self.index.describe()["pods"], len(base_pods()) + 1)

    @defer.inlineCallbacks
    def test_the_command_prints_the_story_and_json(self):
        """``kubedock-dns explain`` prints the asker, each form with its trace and the result, or the
        JSON report with --json; an unknown pod exits 1 with the server's message."""
        import contextlib
        import io

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(["--ops", self.ops, *argv])
            return code, out.getvalue(), err.getvalue()

        code, out, _ = yield deferToThread(run, "explain", "--from", A_SVC, "db")
        self.assertEqual(code, 0)
        self.assertIn(f"asker: pod service in namespace {NS} at {A_SVC}", out)
        self.assertIn(f"networks, first wins: {NET_A[:12]}", out)
        self.assertIn(f"=> db.{NS}.svc.cluster.local: {A_DB} (answered from network {NET_A[:12]})", out)
        code, out, _ = yield deferToThread(run, "explain", "--from", A_SVC, "db", "--json")
        self.assertEqual(json.loads(out)["result"]["records"], [A_DB])
        code, _, err = yield deferToThread(run, "explain", "--from", "nobody", "db")
        self.assertEqual(code, 1)
        self.assertIn("no opted-in pod named 'nobody'", err)


def test_explain_remembers_held_names_on_an_overlay_only():
    """The overlay explain walks on sees what real queries remembered, keeps what it adds to
    itself (so the walk matches a real one), and leaves the real memory as it was."""
    from kubedock_dns.resolver import MissMemory

    real = MissMemory(30, 100)
    real.remember(("10.0.0.1", "old"), now=0)
    overlay = real.overlay()
    overlay.remember(("10.0.0.1", "new"), now=10)
    assert overlay.recently_missed(("10.0.0.1", "old"), now=10)
    assert overlay.recently_missed(("10.0.0.1", "new"), now=10)
    assert not real.recently_missed(("10.0.0.1", "new"), now=10)
    assert not overlay.recently_missed(("10.0.0.1", "new"), now=41)
