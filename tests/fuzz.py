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
- ``readloop``: the bytes are cut into datagrams (a length byte before each; the first byte of a
  datagram picks its asker) and read by the real UDP port's read loop
  (:class:`kubedock_dns.dns.udp.AnsweringPort`, on a stand-in socket) twice over, so that repeated
  questions are answered from prepared bytes: nothing may raise, every reply is a message
  carrying its query's ID (none for junk shorter than a header or a response), every datagram
  is counted, and the prepared replies stay within their byte bounds, in all and per asker.
- ``names``: the bytes become a pod's name (repeated up to 100,000 characters) and up to 1,000
  aliases and a container name (most of them not DNS names): the review is admitted with at most
  MAX_WARNINGS warnings of at most 256 characters, in an answer of a few KB (at most the warnings'
  characters JSON-escaped, and the patch).

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
    global record, network_id, Clock, defer, AnsweringPort, ReadLoopHook, QueryDatagramProtocol
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
    from kubedock_dns.dns.udp import AnsweringPort, ReadLoopHook
    from kubedock_dns.dns.server import QueryDatagramProtocol
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

    max_in_flight = 1024
    in_flight = 0

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


class _FakeSocket:
    """recvfrom hands out the scripted datagrams, then 'nothing more to read'; sendto records."""

    def __init__(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.datagrams = list(datagrams)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        import errno

        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "nothing more")
        data, address = self.datagrams.pop(0)
        return data[:size], address

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append((data, address))
        return len(data)


class ReadLoopHarness:
    """The UDP read loop over the DNS harness's topology, with small cache bounds."""

    def __init__(self) -> None:
        self.topology = DNSHarness()

    def run(self, data: bytes) -> None:
        datagrams, offset = [], 0
        while offset < len(data) and len(datagrams) < 64:
            length = data[offset]
            chunk = data[offset + 1 : offset + 1 + length]
            offset += 1 + length
            if chunk:
                source = DNSHarness.SOURCES[chunk[0] % len(DNSHarness.SOURCES)]
                datagrams.append((chunk[1:], (source, 40000 + len(datagrams))))
        clock = Clock()
        resolver = Resolver(self.topology.index, ResolverConfig(), shuffle=_keep_order)
        fast = FastPath(resolver, clock.seconds, shuffle=_keep_order, max_bytes=12_000, max_asker_bytes=3_000)
        server = KubedockDNSServerFactory(clock, resolver, _Forwarder(), fast_path=fast)
        failures: list[BaseException] = []

        def missed(query) -> None:
            try:
                server._receive(query)
            except BaseException as e:  # the loop would log it: here it is a broken contract
                failures.append(e)
                raise

        real = server.read_loop_hook()
        hook = ReadLoopHook(replies=real.replies, sampler=real.sampler, missed=missed, read=real.read,
                            counts=real.counts)
        protocol = QueryDatagramProtocol(server, clock)
        port = AnsweringPort(0, protocol, "127.0.0.1", clock, hook)
        protocol.transport = port
        for _ in range(2):  # the second time, repeated questions are prepared already
            port.socket = _FakeSocket(datagrams)
            before = server.counters.queries_udp
            port.doRead()
            clock.advance(5)  # held questions are decided
            assert not failures, failures
            assert server.counters.queries_udp - before == len(datagrams)
            queries = {address: query for query, address in datagrams}
            for reply, address in port.socket.sent:
                query = queries[address]
                assert len(query) >= 12 and not query[2] & 0x80, "a reply to junk"
                message = dns_message.from_wire(reply, ignore_trailing=False)
                assert message.id == int.from_bytes(query[:2], "big")
            assert fast.bytes <= fast.max_bytes
            for host in {key[0] for key in fast.replies}:
                assert sum(fast._shares[host].values()) <= fast.max_asker_bytes


class NamesHarness:
    """A review whose names are made of the input (see the module)."""

    def __init__(self) -> None:
        _imports()
        from kubedock_dns.admission.review import MAX_WARNING_CHARS, MAX_WARNINGS

        self.config = WebhookConfig(nameserver_ip="10.96.0.53")
        self.max_warnings, self.max_chars = MAX_WARNINGS, MAX_WARNING_CHARS

    def run(self, data: bytes) -> None:
        if len(data) < 3:
            return
        text = data[3:].decode("utf-8", "replace")
        parts = text.split("\x00") if text else [""]
        name = (parts[0] or "p") * min(100_000, 1 + data[0] * 400) if data[0] else parts[0]
        aliases = (parts[1:] or ["a:"]) * (1 + data[1] * 4)
        annotations = {"kubedock.hostalias/0": parts[0][:300], "kubedock.network/0": "0" * 64,
                       "kubedock.containername": "/" + name[: 1 + data[2] * 40]}
        annotations.update({f"kubedock.hostalias/{i}": alias for i, alias in enumerate(aliases[:1000], 1)})
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "fuzz", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
            "namespace": "ns", "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": "ns", "labels": {"kubedock": "true"}, "annotations": annotations},
                "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
        rendered = render_review(json.dumps(review).encode(), self.config)
        assert rendered.status == 200, rendered
        response = json.loads(rendered.body)["response"]
        assert response["allowed"] is True
        warnings = response.get("warnings", [])
        assert len(warnings) <= self.max_warnings and all(len(w) <= self.max_chars for w in warnings), warnings
        # JSON writes a non-ASCII character as \uXXXX (up to 12 bytes for a surrogate pair).
        assert len(rendered.body) < 12 * self.max_warnings * self.max_chars + 2_000, len(rendered.body)


HARNESSES = {"dns": DNSHarness, "review": ReviewHarness, "readloop": ReadLoopHarness, "names": NamesHarness}


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
