"""The local development CA behind ``tensafe up --tls``.

``tensafe up --tls`` secures every listener of the local stack with mutual TLS. What
production mounts from its secret store (docs/operations.md, "TLS and mTLS") is created
here, explicitly, once per data dir, in ``<data dir>/tls/``:

* ``ca.pem`` / ``ca.key`` — a self-signed CA (ECDSA P-256), trusted by every service
  and by the SDK, and only for this data dir;
* ``<service>.pem`` / ``.key`` — each service's server certificate (``serverAuth``,
  SAN ``127.0.0.1`` and ``localhost`` plus the stack's host);
* ``<process>-client.pem`` / ``.key`` — the client certificate each service process
  (and the trainer worker) presents when it calls another service;
* ``user-client.pem`` / ``.key`` — the certificate of the CLI and SDK user, named in the
  connection file.

Private keys are written with mode 0600. A second ``up`` reuses the files; a
certificate that is missing, expires within a day or was not issued by the CA on disk
is issued again.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=397)
"""At most 397 days, the CA/Browser Forum limit for server certificates (ballot SC31)."""
RENEW_BEFORE = datetime.timedelta(days=1)
USER = "user"
"""The CLI/SDK user's client certificate name."""


@dataclasses.dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as files.

    Attributes:
        cert_file: PEM certificate.
        key_file: PEM private key (mode 0600).
    """

    cert_file: Path
    key_file: Path


@dataclasses.dataclass(frozen=True)
class DevCertificates:
    """The files of the local development CA.

    Attributes:
        directory: ``<data dir>/tls``.
        ca_file: The CA certificate (the trust bundle of every party).
        servers: Server certificate of each service.
        clients: Client certificate of each process, and of the user (:data:`USER`).
        created: Whether this call created the CA (rather than reusing one).
    """

    directory: Path
    ca_file: Path
    servers: dict[str, CertPair]
    clients: dict[str, CertPair]
    created: bool


def ensure_dev_certificates(
    directory: Path,
    *,
    servers: Iterable[str],
    clients: Iterable[str],
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
) -> DevCertificates:
    """Create (or reuse) the development CA and the certificates the stack needs.

    Args:
        directory: Where the files live.
        servers: Services that get a server certificate.
        clients: Processes that get a client certificate (:data:`USER` is added).
        hosts: Names and IP addresses the server certificates are valid for.

    Returns:
        The file names.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_file, ca_key_file = directory / "ca.pem", directory / "ca.key"
    created = not (ca_file.exists() and ca_key_file.exists())
    if created:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key)
        _write_key(ca_key_file, ca_key)
        ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    san = [_general_name(host) for host in dict.fromkeys(hosts)]
    server_pairs = {
        name: _ensure_leaf(directory, name, ca_cert, ca_key, server=True, san=san)
        for name in servers
    }
    client_pairs = {
        name: _ensure_leaf(directory, f"{name}-client", ca_cert, ca_key, server=False, san=[])
        for name in (*clients, USER)
    }
    return DevCertificates(directory, ca_file, server_pairs, client_pairs, created)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TenSafe local development CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _ensure_leaf(
    directory: Path,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    san: list[x509.GeneralName],
) -> CertPair:
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    if _still_valid(pair, ca_cert, san):
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tensafe-{name}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pair.key_file, key)
    pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _still_valid(pair: CertPair, ca_cert: x509.Certificate, san: list[x509.GeneralName]) -> bool:
    if not (pair.cert_file.exists() and pair.key_file.exists()):
        return False
    cert = x509.load_pem_x509_certificate(pair.cert_file.read_bytes())
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # another CA, or another key type
        return False
    if san:
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        return all(name in names for name in san)
    return True


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key atomically, readable by the owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    os.replace(tmp, path)
