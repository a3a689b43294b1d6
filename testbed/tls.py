"""Certificates for tests and the demo: a throw-away CA and a serving certificate it signed.

:func:`generate_ca_and_cert` writes ``ca.crt``, ``ca.key``, ``tls.crt`` and ``tls.key``; the
webhook (:mod:`kubedock_dns.admission.tls`) serves the last two, and the API server trusts the
first as the webhook's ``caBundle``.  Production certificates come from cert-manager or the chart;
this lives in the test bed, not in the product.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["GeneratedTLS", "generate_ca_and_cert"]


@dataclass(frozen=True)
class GeneratedTLS:
    """Paths written by :func:`generate_ca_and_cert`, and the CA certificate as PEM."""

    ca_cert_path: Path
    ca_key_path: Path
    cert_path: Path
    key_path: Path
    ca_pem: bytes
    serial: int


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` in one rename, so a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_ca_and_cert(
    hosts: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    common_name: str = "kubedock-dns webhook",
    valid_days: int = 30,
) -> GeneratedTLS:
    """Write ``ca.crt``, ``ca.key``, ``tls.crt`` and ``tls.key`` into ``out_dir``.

    ``hosts`` are DNS names and IP addresses (e.g. ``kubedock-dns.ns.svc``, ``127.0.0.1``); each
    becomes a subject alternative name of the serving certificate, which is what TLS clients such
    as the API server check.  Every call makes a new CA, so its certificate is trusted only by
    clients given this call's ``ca.crt`` (as a webhook's ``caBundle``).  Existing files are
    replaced atomically, as a rotation would.
    """
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("generate_ca_and_cert needs at least one host name or IP address")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    result = GeneratedTLS(
        ca_cert_path=out / "ca.crt",
        ca_key_path=out / "ca.key",
        cert_path=out / "tls.crt",
        key_path=out / "tls.key",
        ca_pem=ca_pem,
        serial=cert.serial_number,
    )
    _write_atomically(result.ca_cert_path, ca_pem, 0o644)
    _write_atomically(result.ca_key_path, _key_pem(ca_key), 0o600)
    # Key before certificate: a reader between the two renames sees a mismatch and keeps the
    # old pair (see ReloadingServerTLS), never a certificate it cannot serve.
    _write_atomically(result.key_path, _key_pem(key), 0o600)
    _write_atomically(result.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return result
