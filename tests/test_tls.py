"""The webhook's TLS: certificates from files, checked at start, followed when they are rotated.

The reload rules are checked on :class:`ReloadingServerTLS` directly with a fake clock.  One real
server, listening on 127.0.0.1 with the real reactor, is checked with an independent client (the
standard library's ``ssl`` in a thread) that verifies the served certificate against the CA,
before and after the files are replaced.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import ssl
import http.client
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase

from kubedock_dns.admission.tls import ReloadingServerTLS, TLSConfigError, load_certificate
from testbed.tls import generate_ca_and_cert
from kubedock_dns.admission.review import WebhookConfig
from kubedock_dns.admission.service import WebhookApp, webhook_service


def served_serial(tls: ReloadingServerTLS) -> int:
    """The serial number of the certificate a newly accepted connection would present."""
    connection = tls.serverConnectionForTLS(None)
    certificate = connection.get_certificate()
    assert certificate is not None
    return certificate.get_serial_number()  # type: ignore[no-any-return]


# -- loading and reloading, no sockets -------------------------------------------------------------


def test_generated_certificate_names_the_hosts(tmp_path: Path) -> None:
    """The generated serving certificate carries each host as a DNS or IP subject alternative
    name, is for server authentication, and is signed by the generated CA."""
    generated = generate_ca_and_cert(["kubedock-dns.ci.svc", "127.0.0.1", "::1"], tmp_path)
    cert = x509.load_pem_x509_certificate(generated.cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(generated.ca_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["kubedock-dns.ci.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    cert.verify_directly_issued_by(ca)
    assert cert.serial_number == generated.serial
    assert generated.key_path.stat().st_mode & 0o077 == 0


def test_missing_files_are_named(tmp_path: Path) -> None:
    """A missing certificate or key file is reported at start with its path and the flag to fix."""
    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path)
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(TLSConfigError, match=f"certificate '{missing}'.*--tls-cert"):
        ReloadingServerTLS(missing, str(generated.key_path), clock=Clock())
    with pytest.raises(TLSConfigError, match="key '.*nope.key'.*--tls-key"):
        load_certificate(str(generated.cert_path), str(tmp_path / "nope.key"))


def test_invalid_files_are_named(tmp_path: Path) -> None:
    """A file that holds no PEM certificate or key, or a key of another certificate, is reported
    at start with the path of the offending file."""
    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path / "a")
    other = generate_ca_and_cert(["127.0.0.1"], tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(TLSConfigError, match=f"certificate file '{garbage}' holds no valid PEM"):
        load_certificate(str(garbage), str(generated.key_path))
    with pytest.raises(TLSConfigError, match=f"key file '{garbage}' holds no usable PEM private key"):
        load_certificate(str(generated.cert_path), str(garbage))
    with pytest.raises(TLSConfigError, match=f"key in '{other.key_path}' does not belong"):
        load_certificate(str(generated.cert_path), str(other.key_path))


def test_chain_file_is_accepted(tmp_path: Path) -> None:
    """A certificate file holding the serving certificate followed by its chain loads."""
    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path)
    chain = tmp_path / "chain.crt"
    chain.write_bytes(generated.cert_path.read_bytes() + generated.ca_pem)
    assert load_certificate(str(chain), str(generated.key_path)).serial == generated.serial


def test_rotation_is_picked_up_at_most_once_per_interval(tmp_path: Path) -> None:
    """Rotated files are served to connections accepted after the check interval has passed, not
    before; unchanged files keep the loaded certificate."""
    clock = Clock()
    first = generate_ca_and_cert(["127.0.0.1"], tmp_path)
    tls = ReloadingServerTLS(str(first.cert_path), str(first.key_path), clock=clock, check_interval=1.0)
    assert served_serial(tls) == first.serial
    second = generate_ca_and_cert(["127.0.0.1"], tmp_path)
    clock.advance(0.5)
    assert served_serial(tls) == first.serial
    clock.advance(0.5)
    assert served_serial(tls) == second.serial
    clock.advance(5)
    assert served_serial(tls) == second.serial


def test_half_finished_rotation_keeps_the_old_certificate(tmp_path: Path) -> None:
    """While the certificate file is new but the key is still old (or the file is truncated), the
    previous certificate stays in service and the problem is logged; once the key arrives the new
    certificate is served."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        clock = Clock()
        first = generate_ca_and_cert(["127.0.0.1"], tmp_path / "live")
        tls = ReloadingServerTLS(str(first.cert_path), str(first.key_path), clock=clock, check_interval=0)
        second = generate_ca_and_cert(["127.0.0.1"], tmp_path / "next")
        shutil.copy(second.cert_path, first.cert_path)
        assert served_serial(tls) == first.serial
        assert served_serial(tls) == first.serial  # the same bad content is not parsed again
        first.cert_path.write_bytes(b"")
        assert served_serial(tls) == first.serial
        shutil.copy(second.cert_path, first.cert_path)
        shutil.copy(second.key_path, first.key_path)
        assert served_serial(tls) == second.serial
    finally:
        globalLogPublisher.removeObserver(observer)
    errors = [e for e in events if e.get("log_format", "").startswith("keeping the current TLS")]
    assert len(errors) == 2
    assert "does not belong" in errors[0]["error"]
    assert "holds no valid PEM" in errors[1]["error"]


def test_webhook_service_reports_bad_files_when_built(tmp_path: Path) -> None:
    """Building the webhook service with a missing key fails at once, naming the file."""
    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path)
    resource = WebhookApp(WebhookConfig(nameserver_ip="10.0.0.10")).resource()
    with pytest.raises(TLSConfigError, match="missing.key"):
        webhook_service(resource, 0, "127.0.0.1", str(generated.cert_path), str(tmp_path / "missing.key"), reactor)


# -- a real TLS server -----------------------------------------------------------------------------


def https_request(
    port: int, ca_pem: bytes, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes, int]:
    """(status, body, serial of the server's certificate), verifying it against ``ca_pem`` for
    the address 127.0.0.1; runs in a thread."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        headers = {"Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=body, headers=headers)
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
        assert der is not None
        response = connection.getresponse()
        content = response.read()
        return response.status, content, x509.load_der_x509_certificate(der).serial_number
    finally:
        connection.close()


class RealTLSServerTests(TestCase):
    """The webhook served over TLS on a real loopback socket."""

    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that would write into the current directory.
        self.dir = Path(tempfile.mkdtemp(prefix="kubedock-dns-tls-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.first = generate_ca_and_cert(["127.0.0.1", "localhost"], self.dir)
        app = WebhookApp(WebhookConfig(nameserver_ip="10.96.0.53"))
        self.service = webhook_service(
            app.resource(), 0, "127.0.0.1", str(self.first.cert_path), str(self.first.key_path),
            reactor, check_interval=0,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)

    async def test_healthz_then_rotated_certificate(self) -> None:
        """A client trusting the CA gets /healthz over TLS; after the files are replaced by a
        certificate from another CA, new connections are served the new certificate (a client
        trusting only the old CA now fails verification), without restarting the server."""
        port = self.service.port
        assert port != 0
        status, body, serial = await deferToThread(https_request, port, self.first.ca_pem, "GET", "/healthz")
        assert (status, body, serial) == (200, b"ok\n", self.first.serial)

        second = generate_ca_and_cert(["127.0.0.1"], self.dir)
        assert second.serial != self.first.serial
        status, body, serial = await deferToThread(https_request, port, second.ca_pem, "GET", "/healthz")
        assert (status, body, serial) == (200, b"ok\n", second.serial)
        with pytest.raises(ssl.SSLCertVerificationError):
            await deferToThread(https_request, port, self.first.ca_pem, "GET", "/healthz")

    async def test_mutate_over_tls(self) -> None:
        """An AdmissionReview posted over TLS gets its patched answer, as the API server would."""
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "ci",
                "operation": "CREATE",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": "db",
                        "labels": {"kubedock": "true"},
                        "annotations": {"kubedock.hostalias/0": "db", "kubedock.network/0": "n1"},
                    },
                    "spec": {"containers": [{"name": "main", "image": "postgres"}]},
                },
            },
        }
        status, body, _ = await deferToThread(
            https_request, self.service.port, self.first.ca_pem, "POST", "/mutate", json.dumps(review).encode()
        )
        assert status == 200
        response = json.loads(body)["response"]
        assert (response["uid"], response["allowed"], response["patchType"]) == ("u-1", True, "JSONPatch")

    def open_idle_connection(self) -> ssl.SSLSocket:
        """A TLS connection that made one request and is kept alive (HTTP/1.1 keep-alive)."""
        context = ssl.create_default_context(cadata=self.first.ca_pem.decode())
        connection = http.client.HTTPSConnection("127.0.0.1", self.service.port, context=context, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok\n"
        assert connection.sock is not None
        return connection.sock

    async def test_stopping_closes_idle_connections(self) -> None:
        """Stopping the service stops listening and closes kept-alive connections (a reading
        client sees the end of the stream), and its Deferred fires once they are closed."""
        sock = await deferToThread(self.open_idle_connection)

        def read_to_end() -> bytes:
            try:
                return sock.recv(1)
            finally:
                sock.close()

        end = deferToThread(read_to_end)
        await self.service.stopService()
        assert await end == b""

    async def test_stopping_aborts_connections_that_do_not_close(self) -> None:
        """A client that does not answer the TLS close is cut off after the close timeout, so
        stopping never hangs."""
        sock = await deferToThread(self.open_idle_connection)
        try:
            self.service.close_timeout = 0.2
            started = time.monotonic()
            await self.service.stopService()
            assert 0.2 <= time.monotonic() - started < 3
        finally:
            sock.close()
