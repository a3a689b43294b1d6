"""Coverage-guided fuzzing (atheris, libFuzzer) of what clients send: DNS messages through both
answer paths, and AdmissionReview bodies through the webhook's decision.

Targets (each a function of the input bytes that raises only when a contract is broken):

- ``dns``: the first byte picks the asker (known pods of a fixed topology in several networks,
  dual stack, an address two pods claim, an unknown address, two Testcontainers sessions with an
  sshd each), the second whether it came over TCP; the rest is the message.  The full path
  (twisted.names, no fast path) must never raise, must answer with a message dnspython reads,
  carrying the query's ID, and must never answer with an address of a pod outside the asker's
  networks, except its own session's sshd (``host.testcontainers.internal``); wherever the fast path answers, its
  bytes must equal the full path's; where it forwards, so must the full path.
- ``review``: :func:`kubedock_dns.admission.review.render_review` must never raise and never answer 500;
  a 200 carries an AdmissionReview whose patch (if any) is a JSON patch; log lines stay bounded.

Seeds and every crash found are kept in ``tests/fuzz_corpus/<target>/`` and replayed by
``tests/test_fuzz.py`` on every run.  On demand::

    python -m tests.fuzz dns -max_total_time=600        # libFuzzer options after the target

New inputs are kept in ``$TMPDIR/kubedock-dns-fuzz/<target>/``; ``-artifact_prefix`` defaults
to the corpus directory, so a crash is saved there, ready to be committed as a regression case.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


def _imports() -> None:
    global dns_message, Relisted, NetworkIndex, Resolver, ResolverConfig, KubedockDNSServerFactory
    global FORWARD, FastPath, WebhookConfig, render_review, parse_question, scan_records, WireError
    global record, network_id, Clock, defer
    import dns.message as dns_message
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from kubedock_dns.contract import Relisted
    from kubedock_dns.index import NetworkIndex
    from kubedock_dns.resolver import Resolver, ResolverConfig
    from kubedock_dns.dns.server import KubedockDNSServerFactory
    from kubedock_dns.admission.review import WebhookConfig, render_review
    from kubedock_dns.dns.fastpath import FORWARD, FastPath
    from kubedock_dns.dns.wire import WireError, parse_question, scan_records
    from tests.podfactory import network_id, record


class _Transport:
    connected = True

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes, addr: object = None) -> None:
        self.written.append(data)


class _Proto:
    def __init__(self) -> None:
        self.transport = _Transport()

    def sendString(self, data: bytes) -> None:
        self.transport.written.append(data)


class _Forwarder:
    """Records what would be forwarded; never answers (the client would time out)."""

    def __init__(self) -> None:
        self.forwarded: list[bytes] = []

    def forward(self, data: bytes, over_tcp: bool = False):
        self.forwarded.append(data)
        return defer.Deferred()

    def forward_udp(self, data: bytes, on_answer, on_failure, context) -> None:
        self.forwarded.append(data)


def _keep_order(values: list) -> None:
    pass


class DNSHarness:
    """A fixed topology and both paths over it (see the module docstring)."""

    SOURCES = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "fd00::1", "10.1.0.9", "10.1.0.4", "::ffff:10.1.0.2", "10.9.9.9"]

    def __init__(self) -> None:
        _imports()
        a, b, bridge = network_id("fuzz-a"), network_id("fuzz-b"), network_id("fuzz-bridge")
        pods = [
            record("db", [a], ips=["10.1.0.1", "fd00::1"], uid="db-a", namespace="ns", aliases=["postgres"]),
            record("app", [a], ip="10.1.0.2", uid="app-a", namespace="ns", session="s1"),
            record("db", [b], ip="10.1.0.3", uid="db-b", namespace="ns", container_name="/db_b", session="s2"),
            # Each session's sshd, on a network of its own: host.testcontainers.internal.
            record("sshd", [bridge], ip="10.1.0.5", uid="sshd-1", namespace="ns", session="s1",
                   image="testcontainers/sshd:1.4.0"),
            record("sshd", [bridge], ip="10.1.0.6", uid="sshd-2", namespace="ns", session="s2",
                   image="testcontainers/sshd:1.4.0"),
            record("x", [b], ip="10.1.0.9", uid="x1", namespace="ns"),
            record("y", [a], ip="10.1.0.9", uid="x2", namespace="ns"),  # two pods, one IP
            record("lonely", [], ip="10.1.0.4", uid="lonely", namespace="ns"),
        ]
        self.index = NetworkIndex()
        self.index.apply([Relisted(tuple(pods))])
        self.visible = {  # asker -> every address it may ever be told
            "10.1.0.1": {"10.1.0.1", "fd00::1", "10.1.0.2", "10.1.0.9"},
            "10.1.0.2": {"10.1.0.1", "fd00::1", "10.1.0.2", "10.1.0.9", "10.1.0.5"},  # + its sshd
            "fd00::1": {"10.1.0.1", "fd00::1", "10.1.0.2", "10.1.0.9"},
            "10.1.0.3": {"10.1.0.3", "10.1.0.9", "10.1.0.6"},
        }

    def run(self, data: bytes) -> None:
        if len(data) < 2:
            return
        source = self.SOURCES[data[0] % len(self.SOURCES)]
        tcp = bool(data[1] & 1)
        wire = data[2:]
        try:
            parse_question(wire)
            scan_records(wire, parse_question(wire)[0], 0, 0, 0)
        except WireError:
            pass
        except Exception as e:  # only WireError may come out of the strict readers
            if len(wire) >= 12:
                raise AssertionError(f"strict reader raised {e!r}") from e

        clock = Clock()
        resolver = Resolver(self.index, ResolverConfig(), shuffle=_keep_order)
        forwarder = _Forwarder()
        full = KubedockDNSServerFactory(clock, resolver, forwarder)
        proto = _Proto()
        address = None if tcp else (source, 5353)
        if address is None:
            full.message_received(wire, proto, source)
        else:
            full.datagram_received(wire, proto, address)
        clock.advance(5)  # let held questions be decided
        written = proto.transport.written
        assert len(written) + len(forwarder.forwarded) <= 1, (written, forwarder.forwarded)
        for reply in written:
            message = dns_message.from_wire(reply, ignore_trailing=False)
            assert message.id == int.from_bytes(wire[:2], "big")
            canonical = source.removeprefix("::ffff:")
            allowed = self.visible.get(canonical, set())
            for rrset in message.answer:
                for rdata in rrset:
                    address_text = getattr(rdata, "address", None)
                    if address_text is not None:
                        assert address_text in allowed, (source, address_text)

        fast = FastPath(resolver, clock.seconds, shuffle=_keep_order)
        reply = fast.answer(wire, source, tcp)
        if reply is FORWARD:
            assert forwarder.forwarded == [wire], "the fast path forwards what the full path answered"
        elif reply is not None:
            assert written == [reply], "the fast path's bytes differ from the full path's"


class ReviewHarness:
    def __init__(self) -> None:
        _imports()
        self.config = WebhookConfig(nameserver_ip="10.96.0.53")

    def run(self, data: bytes) -> None:
        rendered = render_review(data, self.config)
        assert rendered.status in (200, 400), rendered
        if rendered.status == 200:
            document = json.loads(rendered.body)
            response = document["response"]
            assert isinstance(response["allowed"], bool)
            if "patch" in response:
                patch = json.loads(base64.b64decode(response["patch"]))
                assert isinstance(patch, list) and all(op["op"] == "add" for op in patch)
        else:
            assert rendered.content_type.startswith(b"text/plain")
            assert len(rendered.body) < 2000, len(rendered.body)


HARNESSES = {"dns": DNSHarness, "review": ReviewHarness}


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2 or argv[1] not in HARNESSES:
        raise SystemExit(f"usage: python -m tests.fuzz {{{'|'.join(HARNESSES)}}} [libFuzzer options] [corpus dirs]")
    target = argv[1]
    with atheris.instrument_imports(include=["kubedock_dns"]):
        harness = HARNESSES[target]()
    options = argv[2:]
    corpus = CORPUS / target
    if not any(o.startswith("-artifact_prefix=") for o in options):
        options.append(f"-artifact_prefix={corpus}/")
    if not any(not o.startswith("-") for o in options):
        # New inputs go to a work directory; the seeds (and crashes) in the repository stay small.
        work = Path(tempfile.gettempdir()) / "kubedock-dns-fuzz" / target
        work.mkdir(parents=True, exist_ok=True)
        options += [str(work), str(corpus)]
    atheris.Setup([argv[0], *options], harness.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
