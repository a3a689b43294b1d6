"""TLS for the admission webhook: a server certificate read from files and re-read when they change.

Contract:

- :class:`ReloadingServerTLS` serves the certificate (PEM, optionally followed by its chain) and
  private key (PEM, unencrypted) found in two files.  It is a Twisted
  ``IOpenSSLServerConnectionCreator``, so it can be passed to ``reactor.listenSSL`` or
  ``SSL4ServerEndpoint``.
- A mounted Kubernetes Secret changes without any file event, so before accepting a new connection
  the files are read again and their SHA-256 digest compared, at most once per ``check_interval``
  seconds of the clock passed in.  New content is parsed and checked (the key must match the
  certificate) before it replaces the old; content that does not load (a half-finished rotation)
  is logged and the previous certificate stays in service until a later check loads the new one.
  Connections already open keep the certificate they started with.
- At construction the files must load: otherwise :class:`TLSConfigError` says which path is wrong
  and why.  No global reactor is imported; the clock is passed in.

Certificates are issued elsewhere (cert-manager, the chart's own, or for tests and the demo
:func:`testbed.tls.generate_ca_and_cert`).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "Clock",
    "LoadedCertificate",
    "ReloadingServerTLS",
    "TLSConfigError",
    "load_certificate",
]


class Clock(Protocol):
    """What the reloader needs of a reactor: the time (``IReactorTime.seconds``)."""

    def seconds(self) -> float: ...


class TLSConfigError(ValueError):
    """The certificate or key files cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class LoadedCertificate:
    """One loaded certificate/key pair: the OpenSSL context serving it and what identifies it."""

    context: SSL.Context
    digest: str
    serial: int
    subject: str
    not_after: datetime.datetime


def _read(path: str, what: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(
            f"cannot read the TLS {what} {path!r}: {e.strerror or e}; "
            f"pass {flag} with the path of a PEM file"
        ) from e


def _digest(cert_pem: bytes, key_pem: bytes) -> str:
    h = hashlib.sha256()
    for part in (cert_pem, key_pem):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


_SERVING_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are all of that already).
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


def _server_context(
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
) -> SSL.Context:
    """A server context for TLS 1.2 and later, without compression, renegotiation or sessions."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_RENEGOTIATION
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_cipher_list(_TLS12_CIPHERS)
    context.use_certificate(leaf)
    for certificate in chain:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(key)
    context.check_privatekey()
    return context


def _parse(cert_path: str, cert_pem: bytes, key_path: str, key_pem: bytes) -> LoadedCertificate:
    """Parse and cross-check PEM contents; :class:`TLSConfigError` names the offending path."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise TLSConfigError(
            f"the TLS certificate file {cert_path!r} holds no valid PEM certificate "
            f"(expected '-----BEGIN CERTIFICATE-----' blocks, the serving certificate first): {e}"
        ) from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(
            f"the TLS key file {key_path!r} holds no usable PEM private key "
            f"(it must be unencrypted, e.g. '-----BEGIN PRIVATE KEY-----'): {e}"
        ) from e
    if not isinstance(key, _SERVING_KEY_TYPES):
        raise TLSConfigError(
            f"the TLS key file {key_path!r} holds a {type(key).__name__}, which cannot sign a "
            f"TLS handshake; use an RSA, ECDSA or Ed25519 key"
        )
    leaf = chain[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TLSConfigError(
            f"the TLS key in {key_path!r} does not belong to the first certificate in "
            f"{cert_path!r} (serial {leaf.serial_number:x}); the certificate file must start "
            f"with the serving certificate, and both files must come from the same issuance"
        )
    try:
        context = _server_context(leaf, chain[1:], key)
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL refused the certificate {cert_path!r} with the key {key_path!r}: {e}"
        ) from e
    return LoadedCertificate(
        context=context,
        digest=_digest(cert_pem, key_pem),
        serial=leaf.serial_number,
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
    )


def load_certificate(cert_path: str, key_path: str) -> LoadedCertificate:
    """Read and check a certificate (chain) file and its key file."""
    cert_pem = _read(cert_path, "certificate", "--tls-cert")
    key_pem = _read(key_path, "key", "--tls-key")
    return _parse(cert_path, cert_pem, key_path, key_pem)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """Server TLS whose certificate follows the files it came from.

    :param clock: supplies ``seconds()``; the reactor in production, a ``Clock`` in tests.
    :param check_interval: minimum seconds between two reads of the files (0: every connection).
    """

    log = Logger()

    def __init__(
        self, cert_path: str, key_path: str, clock: Clock, check_interval: float = 1.0
    ) -> None:
        self.cert_path = str(cert_path)
        self.key_path = str(key_path)
        self._clock = clock
        self._check_interval = check_interval
        self.current = load_certificate(self.cert_path, self.key_path)
        self._checked_at = clock.seconds()
        self._failed_digest: str | None = None
        self._log_loaded()

    def _log_loaded(self) -> None:
        c = self.current
        self.log.info(
            "serving TLS certificate {subject} serial {serial:x} (valid until {not_after}) "
            "from {cert_path}",
            subject=c.subject,
            serial=c.serial,
            not_after=c.not_after.isoformat(),
            cert_path=self.cert_path,
        )

    def reload_if_changed(self) -> bool:
        """Read the files now; switch to their content if it changed and loads.  True if switched."""
        self._checked_at = self._clock.seconds()
        try:
            cert_pem = _read(self.cert_path, "certificate", "--tls-cert")
            key_pem = _read(self.key_path, "key", "--tls-key")
        except TLSConfigError as e:
            self.log.error("keeping the current TLS certificate: {error}", error=str(e))
            return False
        digest = _digest(cert_pem, key_pem)
        if digest == self.current.digest or digest == self._failed_digest:
            return False
        try:
            loaded = _parse(self.cert_path, cert_pem, self.key_path, key_pem)
        except (TLSConfigError, SSL.Error) as e:
            # Often a rotation caught half-way (new certificate, old key): retried when it changes.
            self._failed_digest = digest
            self.log.error("keeping the current TLS certificate: {error}", error=str(e))
            return False
        self._failed_digest = None
        self.current = loaded
        self._log_loaded()
        return True

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection for a newly accepted client, with the newest certificate that loads."""
        if self._clock.seconds() - self._checked_at >= self._check_interval:
            self.reload_if_changed()
        return SSL.Connection(self.current.context, None)
