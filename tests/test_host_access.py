"""``host.testcontainers.internal``, per Testcontainers session (issue 22).

Testcontainers' ``withAccessToHost(true)`` / ``Testcontainers.exposeHostPorts(...)`` starts an sshd
container that tunnels the host's ports, and points ``host.testcontainers.internal`` at it through
``ExtraHosts``, which kubedock drops.  Every container of a session carries the label
``org.testcontainers.sessionId`` (kubedock copies it into the pod's annotations); all sessions'
sshd pods share kubedock's ``bridge`` network, so the session is the only thing that tells which
sshd is whose.  The contract: an asker gets the A record of its own session's sshd pod, never
another session's, NODATA for other types, NXDOMAIN when its session has none (after a hold, as
for a container not started yet) or when it belongs to no session.

The first part holds the pure core to it (contract, index, resolver, the fast path's cache); the
second asks a real server over real sockets and its ``/explain``.  The real node and the real
Testcontainers-Java run it in tests/test_kubedock_clients.py.
"""

from __future__ import annotations

import dataclasses
import json

import dns.message
import dns.rcode
import pytest
from twisted.internet import defer
from twisted.python import usage

from kubedock_dns.contract import (
    HOST_ACCESS_NAME,
    Deleted,
    ImagePattern,
    Relisted,
    Upserted,
    parse_image,
    pod_record_from_dict,
)
from kubedock_dns.dns.fastpath import FastPath
from kubedock_dns.index import NetworkIndex, Touched
from kubedock_dns.options import Options
from kubedock_dns.dns.wire import TYPE_A, TYPE_AAAA
from kubedock_dns.resolver import Answer, Forward, Hold, NotFound, Resolver, ResolverConfig, ServFail
from tests.podfactory import kubedock_pod, network_id, record
from tests.test_explain import ExplainTestCase, records_of

TYPE_MX = 15
SSHD = "testcontainers/sshd:1.4.0"
BRIDGE = network_id("kubedock-bridge")  # every session's sshd is on kubedock's default network
NET_1, NET_2 = network_id("session-1-net"), network_id("session-2-net")
S1, S2 = "0b6e2f0e-1111-4c6b-9d8e-5f2a1b3c4d01", "0b6e2f0e-2222-4c6b-9d8e-5f2a1b3c4d02"


def two_sessions(**sshd_overrides) -> list:
    """Two Testcontainers sessions with the same names: each an sshd on the bridge, an app and a
    db on its own network.  Addresses x.x.1.* are session 1's, x.x.2.* session 2's."""
    return [
        record("sshd", [BRIDGE], ip="10.0.1.9", uid="s1-sshd", session=S1, image=SSHD, **sshd_overrides),
        record("app", [NET_1], ip="10.0.1.2", uid="s1-app", session=S1),
        record("db", [NET_1], ip="10.0.1.1", uid="s1-db", session=S1),
        record("sshd", [BRIDGE], ip="10.0.2.9", uid="s2-sshd", session=S2, image=SSHD),
        record("app", [NET_2], ip="10.0.2.2", uid="s2-app", session=S2),
        record("db", [NET_2], ip="10.0.2.1", uid="s2-db", session=S2),
        record("loner", [NET_1], ip="10.0.3.1", uid="loner"),  # no session: docker CLI, Compose
    ]


def resolver_with(records, **index_options) -> Resolver:
    index = NetworkIndex(**index_options)
    index.apply([Relisted(tuple(records))])
    return Resolver(index, ResolverConfig())


# -- the contract -----------------------------------------------------------------------------------


def test_the_session_and_the_image_are_read_from_the_pod():
    """kubedock copies the session label into the annotations; the image is the container's."""
    pod = kubedock_pod("sshd", [BRIDGE], ip="10.0.1.9", session=S1, image=SSHD)
    parsed = pod_record_from_dict(pod)
    assert (parsed.session, parsed.image) == (S1, SSHD)
    plain = pod_record_from_dict(kubedock_pod("db", [NET_1], ip="10.0.1.1"))
    assert (plain.session, plain.image) == ("", "busybox")
    pod["metadata"]["annotations"]["org.testcontainers.sessionId"] = ["not", "a", "string"]
    assert pod_record_from_dict(pod).session == ""
    # Testcontainers for Node, .NET and Rust spell the label org.testcontainers.session-id.
    del pod["metadata"]["annotations"]["org.testcontainers.sessionId"]
    pod["metadata"]["annotations"]["org.testcontainers.session-id"] = "node-session"
    assert pod_record_from_dict(pod).session == "node-session"


@pytest.mark.parametrize("image, matches", [
    ("testcontainers/sshd:1.4.0", True),
    ("testcontainers/sshd:1.1.0", True),
    ("testcontainers/sshd", True),
    ("docker.io/testcontainers/sshd:1.2.0", True),
    ("registry.example.com/mirror/testcontainers/sshd:1.4.0", True),  # hub.image.name.prefix
    ("127.0.0.1:5000/testcontainers/sshd:1.4.0", True),
    ("testcontainers/sshd@sha256:" + "a" * 64, True),
    ("testcontainers/sshdx:1.4.0", False),
    ("other/testcontainers-sshd:1.4.0", False),
    ("testcontainers/ryuk:0.11.0", False),
    ("sshd", False),
    ("", False),
    ("Not A Reference", False),
])
def test_the_default_sshd_image_matches_every_tag_and_mirror(image, matches):
    """``testcontainers/sshd`` (Testcontainers' own) matches its every tag, on Docker Hub and
    under any registry or prefix mirroring it; nothing else."""
    assert ImagePattern.parse("testcontainers/sshd").matches(image) is matches


def test_a_tag_or_registry_in_the_pattern_must_match():
    """A configured image with a registry or tag names exactly that (Testcontainers'
    ``sshd.container.image`` set to a private image)."""
    pattern = ImagePattern.parse("registry.local:5000/team/sshd:2")
    assert pattern.matches("registry.local:5000/team/sshd:2")
    assert not pattern.matches("registry.local:5000/team/sshd:3")
    assert not pattern.matches("other.local/team/sshd:2")
    assert not pattern.matches("team/sshd:2")
    assert ImagePattern.parse("team/sshd:latest").matches("team/sshd")
    assert parse_image("docker.io/library/alpine:3") == parse_image("alpine:3")


@pytest.mark.parametrize("bad, says", [
    ("", "not an image reference"),
    ("Team/sshd", "'Team' is not a valid repository name part"),
    ("team/sshd:no good", "tag 'no good' is not valid"),
    ("team/sshd@md5", "'md5' is not a digest"),
    ("team//sshd", "'' is not a valid repository name part"),
])
def test_a_bad_sshd_image_option_is_refused_and_says_why(bad, says):
    """``--testcontainers-sshd-image`` refuses what is no image reference, naming the part."""
    options = Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["--pods-file", __file__, "--testcontainers-sshd-image", bad])
    assert says in str(raised.value)
    assert "--testcontainers-sshd-image" in str(raised.value)


def test_the_option_defaults_to_testcontainers_own_image_and_repeats():
    options = Options()
    options.parseOptions(["--pods-file", __file__])
    assert options.config().sshd_images == ("testcontainers/sshd",)
    options = Options()
    options.parseOptions(["--pods-file", __file__, "--testcontainers-sshd-image", "a/sshd",
                          "--testcontainers-sshd-image", " b/sshd:1 "])
    assert options.config().sshd_images == ("a/sshd", "b/sshd:1")


# -- the resolver -----------------------------------------------------------------------------------


def test_each_session_gets_its_own_sshd_and_never_the_others():
    """Same names in two sessions: each app's host.testcontainers.internal is its own session's
    sshd, although both sshd pods share one network and neither app is on it."""
    r = resolver_with(two_sessions())
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A) == Answer(TYPE_A, ("10.0.1.9",), session=S1)
    assert r.decide("10.0.2.2", HOST_ACCESS_NAME, TYPE_A) == Answer(TYPE_A, ("10.0.2.9",), session=S2)
    # The sshd itself and a db of the session ask too.
    assert r.decide("10.0.2.9", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.2.9",)
    assert r.decide("10.0.1.1", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.1.9",)


def test_the_name_is_answered_in_every_form_glibc_sends():
    """With the pod's search list, the first form glibc sends is the name with the namespace's
    suffix; every cluster suffix means the same, any case."""
    r = resolver_with(two_sessions())
    for form in (f"{HOST_ACCESS_NAME}.tests.svc.cluster.local", f"{HOST_ACCESS_NAME}.svc.cluster.local",
                 f"{HOST_ACCESS_NAME}.cluster.local", HOST_ACCESS_NAME):
        assert r.decide("10.0.1.2", form, TYPE_A).values == ("10.0.1.9",), form


def test_only_an_a_record():
    """AAAA and other types are NODATA (Testcontainers' sshd tunnels over IPv4 only), so that a
    client asking for both takes the A record, even when the sshd pod has an IPv6 address."""
    r = resolver_with(two_sessions(ips=["10.0.1.9", "fd00::9"]))
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.1.9",)
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_AAAA) == Answer(TYPE_AAAA, (), session=S1)
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_MX) == Answer(TYPE_MX, (), session=S1)


def test_no_session_is_not_found_at_once():
    """A container without the session label (docker CLI, Compose, testcontainers-python) gets
    NXDOMAIN without a hold, never another session's sshd and never the cluster DNS's answer."""
    r = resolver_with(two_sessions())
    decision = r.decide("10.0.3.1", HOST_ACCESS_NAME, TYPE_A)
    assert isinstance(decision, NotFound) and "no Testcontainers session" in decision.reason


def test_a_session_without_sshd_is_not_found_at_once_and_held_while_its_sshd_starts():
    """The session's sshd not running: NXDOMAIN at once (nothing of the session will answer, so
    nothing to wait for: a test checking the name is absent waits for nothing); while the
    session's own sshd is starting (Pending), held like a container being started, then answered
    once it runs, or NXDOMAIN after the hold.  The other session's sshd is never the answer, and
    whether a question is held never depends on it."""
    pods = [p for p in two_sessions() if p.uid != "s1-sshd"]
    r = resolver_with(pods)
    at_once = r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A)
    assert isinstance(at_once, NotFound) and S1 in at_once.reason
    sshd = next(p for p in two_sessions() if p.uid == "s1-sshd")
    r.index.apply([Upserted(dataclasses.replace(sshd, phase="Pending"))])
    first = r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A)
    assert isinstance(first, Hold) and first.miss_key == ("10.0.1.2", HOST_ACCESS_NAME)
    after = r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A, held=True)
    assert isinstance(after, NotFound) and S1 in after.reason
    r.misses.remember(first.miss_key, 0.0)
    assert isinstance(r.decide("10.0.1.2", f"{HOST_ACCESS_NAME}.cluster.local", TYPE_A), NotFound)
    r.index.apply([Upserted(sshd)])
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.1.9",)


def test_a_sshd_that_does_not_run_or_is_deleted_is_no_answer():
    """Pending, terminating, finished and deleted sshd pods answer nothing (as any container)."""
    for change in (dict(phase="Pending"), dict(terminating=True), dict(phase="Succeeded")):
        pods = two_sessions()
        pods[0] = dataclasses.replace(pods[0], **change)
        r = resolver_with(pods)
        assert not isinstance(r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A), Answer), change
    r = resolver_with(two_sessions())
    r.index.apply([Deleted("s1-sshd")])
    assert isinstance(r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A, held=True), NotFound)


def test_only_the_sshd_image_makes_a_pod_the_sessions_host():
    """Another container of the session (its image not an sshd image) is not the host; a
    configured image replaces the default."""
    pods = two_sessions()
    pods[0] = dataclasses.replace(pods[0], image="postgres:16")
    assert isinstance(resolver_with(pods).decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A, held=True), NotFound)
    custom = dataclasses.replace(pods[0], image="127.0.0.1:5000/kubedock-dns-testbed/sshd:abc")
    r = resolver_with([custom, *pods[1:]],
                      sshd_images=[ImagePattern.parse("127.0.0.1:5000/kubedock-dns-testbed/sshd")])
    assert r.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.1.9",)
    assert isinstance(r.decide("10.0.2.2", HOST_ACCESS_NAME, TYPE_A, held=True), NotFound)  # default image: not one


def test_the_sessions_host_is_found_whatever_networks_are_unresolved():
    """kubedock's bridge given to --unresolved-network: names there do not resolve, but the sshd
    on it still answers host.testcontainers.internal, also to a container only on the bridge."""
    pods = two_sessions() + [record("lonely", [BRIDGE], ip="10.0.1.3", uid="s1-lonely", session=S1)]
    r = resolver_with(pods, unresolved_networks=[BRIDGE])
    assert r.decide("10.0.1.3", HOST_ACCESS_NAME, TYPE_A).values == ("10.0.1.9",)
    assert isinstance(r.decide("10.0.1.3", "sshd", TYPE_A), NotFound)


def test_a_conflicted_sshd_address_is_servfail():
    """Two live pods claiming the sshd's address: the answer would be a guess, so SERVFAIL."""
    pods = two_sessions() + [record("squatter", [NET_2], ip="10.0.1.9", uid="squatter")]
    assert isinstance(resolver_with(pods).decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A), ServFail)


def test_an_unknown_asker_is_held_only_while_pods_wait():
    """An address that is no pod's is a forwarder; while a pod waits for its address it may be
    that pod, so its question is held once (then re-decided), whatever sessions have: which
    names could become local must not depend on what others hold."""
    r = resolver_with(two_sessions())
    assert isinstance(r.decide("10.0.9.9", HOST_ACCESS_NAME, TYPE_A), Forward)
    waiting = record("starting", [NET_1], uid="s1-starting", session=S1, phase="Pending")
    r.index.apply([Upserted(waiting)])
    assert isinstance(r.decide("10.0.9.9", HOST_ACCESS_NAME, TYPE_A), Hold)
    assert isinstance(r.decide("10.0.9.9", HOST_ACCESS_NAME, TYPE_A, held=True), Forward)
    r.index.apply([Deleted("s1-sshd"), Deleted("s2-sshd")])
    assert isinstance(r.decide("10.0.9.8", HOST_ACCESS_NAME, TYPE_A), Hold)  # the same, sshds or not


def test_the_trace_says_which_session_and_sshd():
    r = resolver_with(two_sessions())
    trace: list[str] = []
    r.decide("10.0.2.2", HOST_ACCESS_NAME, TYPE_A, trace=trace)
    assert any(f"the sshd container of Testcontainers session {S2}: 10.0.2.9" in line for line in trace), trace
    trace = []
    r.decide("10.0.3.1", HOST_ACCESS_NAME, TYPE_A, trace=trace)
    assert any("no annotation org.testcontainers.sessionId" in line for line in trace), trace


# -- the index and the fast path's cache ---------------------------------------------------------


def test_an_sshd_change_touches_its_session_and_nothing_else():
    """An sshd appearing, leaving, starting or changing its session touches that session (so
    cached answers of host.testcontainers.internal for its containers are dropped) and its own
    address; another pod's change touches no session."""
    index = NetworkIndex()
    index.apply([Relisted(tuple(two_sessions()))])
    seen: list[Touched] = []
    index.subscribe(seen.append)
    index.apply([Upserted(record("sshd", [BRIDGE], ip="10.0.4.9", uid="s4-sshd", session="s4", image=SSHD))])
    assert seen[-1].sessions == {"s4"} and "10.0.4.9" in seen[-1].addresses
    index.apply([Upserted(record("db2", [NET_1], ip="10.0.1.5", uid="s1-db2", session=S1))])
    assert seen[-1].sessions == frozenset()
    moved = dataclasses.replace(index._pods["s4-sshd"], session="s5")
    index.apply([Upserted(moved)])
    assert seen[-1].sessions == {"s4", "s5"}
    index.apply([Upserted(record("sshd", [BRIDGE], uid="s6-sshd", session="s6", image=SSHD, phase="Pending"))])
    assert seen[-1].sessions == {"s6"} and index.host_gateway_later("s6") and index.host_gateway("s6") is None
    index.apply([Deleted("s4-sshd")])
    assert seen[-1].sessions == {"s5"}
    assert index.host_gateway("s4") is None and index.host_gateway("s5") is None


def test_the_fast_path_never_serves_a_stale_host():
    """A cached answer for host.testcontainers.internal goes when the session's sshd is replaced
    (Testcontainers restarts it after reset), or when a second pod claims its address."""
    index = NetworkIndex()
    index.apply([Relisted(tuple(two_sessions()))])
    fast = FastPath(Resolver(index, ResolverConfig()), lambda: 0.0)
    query = dns.message.make_query(f"{HOST_ACCESS_NAME}.tests.svc.cluster.local", "A").to_wire()

    def answered() -> list[str]:
        reply = fast.answer(query, "10.0.1.2", False)
        return [] if not isinstance(reply, bytes) else [r.address for rrset in dns.message.from_wire(reply).answer
                                                         for r in rrset]
    assert answered() == ["10.0.1.9"]
    assert fast.answer(query, "10.0.1.2", False) is not None and len(fast.replies) == 1
    index.apply([Deleted("s1-sshd"),
                 Upserted(record("sshd", [BRIDGE], ip="10.0.1.19", uid="s1-sshd2", session=S1, image=SSHD))])
    assert answered() == ["10.0.1.19"]
    index.apply([Upserted(record("squatter", [NET_2], ip="10.0.1.19", uid="squatter"))])
    assert answered() == []  # the full path decides: SERVFAIL
    assert isinstance(fast.resolver.decide("10.0.1.2", HOST_ACCESS_NAME, TYPE_A), ServFail)


def test_the_networks_view_lists_each_sessions_host():
    index = NetworkIndex()
    index.apply([Relisted(tuple(two_sessions()))])
    described = index.describe()["host_access"]
    assert described == {S1: [{"pod": "sshd", "ips": ["10.0.1.9"], "image": SSHD}],
                         S2: [{"pod": "sshd", "ips": ["10.0.2.9"], "image": SSHD}]}
    json.dumps(described)


# -- a real server, real sockets, and its explanation --------------------------------------------

A_APP, B_APP, A_SSHD, B_SSHD, LONER = "127.10.5.2", "127.10.6.2", "127.10.5.9", "127.10.6.9", "127.10.7.1"


def server_sessions():
    return [
        record("sshd", [BRIDGE], ip=A_SSHD, namespace="ci", uid="ra-sshd", session=S1, image=SSHD),
        record("app", [NET_1], ip=A_APP, namespace="ci", uid="ra-app", session=S1),
        record("sshd", [BRIDGE], ip=B_SSHD, namespace="ci", uid="rb-sshd", session=S2, image=SSHD),
        record("app", [NET_2], ip=B_APP, namespace="ci", uid="rb-app", session=S2),
        record("loner", [NET_1], ip=LONER, namespace="ci", uid="r-loner"),
    ]


class HostAccessServerTests(ExplainTestCase):
    """The server on real sockets (fast path on), and /explain agreeing with each answer."""

    def setUp(self):
        super().setUp()
        self.index.apply([Upserted(p) for p in server_sessions()])

    @defer.inlineCallbacks
    def test_each_session_is_answered_its_own_sshd_over_udp_and_tcp(self):
        """Both sessions ask the same name, twice each (the second from the fast path's cache),
        over UDP and TCP: each gets its own sshd's address only."""
        for source, sshd in ((A_APP, A_SSHD), (B_APP, B_SSHD)):
            for tcp in (False, True, False):
                response = yield self.ask(source, f"{HOST_ACCESS_NAME}.", tcp=tcp)
                self.assertEqual(response.rcode(), dns.rcode.NOERROR)
                self.assertEqual(records_of(response), [sshd])
        aaaa = yield self.ask(A_APP, f"{HOST_ACCESS_NAME}.", "AAAA")
        self.assertEqual((aaaa.rcode(), aaaa.answer), (dns.rcode.NOERROR, []))

    @defer.inlineCallbacks
    def test_explain_names_the_session_and_its_sshd(self):
        """The explanation gives the answer the query got and says whose sshd it is; for a
        container of no session it says why there is none."""
        report = yield self.both(B_APP, HOST_ACCESS_NAME)
        self.assertEqual(report["result"]["records"], [B_SSHD])
        form = report["forms"][0]
        self.assertEqual(form["name"], f"{HOST_ACCESS_NAME}.ci.svc.cluster.local")
        self.assertEqual(form["decision"]["session"], S2)
        self.assertIn(f"Testcontainers session {S2}", form["decision"]["why"])
        report = yield self.both(LONER, f"{HOST_ACCESS_NAME}.")
        self.assertEqual(report["result"]["rcode"], "NXDOMAIN")
        self.assertIn("no Testcontainers session", report["forms"][0]["decision"]["why"])

    @defer.inlineCallbacks
    def test_a_new_sshd_is_answered_at_once_and_a_removed_one_never_again(self):
        """Replacing session 1's sshd changes its next answer (nothing stale from the cache);
        without one, NXDOMAIN after the hold, and session 2's is never given."""
        first = yield self.ask(A_APP, f"{HOST_ACCESS_NAME}.")
        self.assertEqual(records_of(first), [A_SSHD])
        self.index.apply([Deleted("ra-sshd"), Upserted(record("sshd", [BRIDGE], ip="127.10.5.19", namespace="ci",
                                                              uid="ra-sshd2", session=S1, image=SSHD))])
        moved = yield self.ask(A_APP, f"{HOST_ACCESS_NAME}.")
        self.assertEqual(records_of(moved), ["127.10.5.19"])
        self.index.apply([Deleted("ra-sshd2")])
        gone = yield self.ask(A_APP, f"{HOST_ACCESS_NAME}.")
        self.assertEqual((gone.rcode(), gone.answer), (dns.rcode.NXDOMAIN, []))
        other = yield self.ask(B_APP, f"{HOST_ACCESS_NAME}.")
        self.assertEqual(records_of(other), [B_SSHD])


def test_an_alias_in_the_askers_network_comes_first():
    """testcontainers-go starts one sshd per container that asks for host ports and gives it the
    alias host.testcontainers.internal in that container's network: that alias answers (as any
    alias, A and AAAA by family), not the session's other sshd pods."""
    go_session = "go-session"
    pods = [
        record("sshd-1", [NET_1], aliases=[HOST_ACCESS_NAME], ip="10.0.5.9", uid="g-sshd-1", session=go_session,
               image=SSHD),
        record("app-1", [NET_1], ip="10.0.5.2", uid="g-app-1", session=go_session),
        record("sshd-2", [NET_2], aliases=[HOST_ACCESS_NAME], ip="10.0.6.9", uid="g-sshd-2", session=go_session,
               image=SSHD),
        record("app-2", [NET_2], ip="10.0.6.2", uid="g-app-2", session=go_session),
        record("app-3", [BRIDGE], ip="10.0.7.2", uid="g-app-3", session=go_session),
    ]
    r = resolver_with(pods)
    assert r.decide("10.0.5.2", HOST_ACCESS_NAME, TYPE_A) == Answer(TYPE_A, ("10.0.5.9",), NET_1)
    assert r.decide("10.0.6.2", HOST_ACCESS_NAME, TYPE_A) == Answer(TYPE_A, ("10.0.6.9",), NET_2)
    # Without the alias in its network: every sshd of its session (documented limit).
    assert sorted(r.decide("10.0.7.2", HOST_ACCESS_NAME, TYPE_A).values) == ["10.0.5.9", "10.0.6.9"]
