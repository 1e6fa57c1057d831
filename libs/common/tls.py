"""TLS and mutual TLS for every TenSafe listener and every service-to-service channel.

Certificates are files (PEM), named by :class:`~tensafe.common.config.ServiceConfig`:

* ``tls_cert_file`` + ``tls_key_file`` — the certificate the service's gRPC server
  presents. Set, the listener speaks TLS only (there is no second plaintext port).
* ``tls_client_ca_file`` — the CA bundle client certificates must chain to. Set, the
  listener is **mutual** TLS: a client without a valid certificate is refused during the
  handshake (the caller sees UNAVAILABLE before any RPC runs).
* ``tls_ca_file`` — the CA bundle that verifies the servers this service calls (auth,
  the registry). Set, every outgoing channel is TLS and presents this service's own
  certificate as its client certificate: ``tls_client_cert_file``/``tls_client_key_file``,
  else the server certificate (one certificate with both ``serverAuth`` and
  ``clientAuth`` usages, as cert-manager issues them).

Files are read once at start-up; a missing, unreadable or non-PEM file is a
:class:`~tensafe.common.errors.ConfigError` naming the setting, never a TLS failure at
the first call. Production mounts the files from its secret store; ``tensafe up --tls``
creates a local development CA (:mod:`tensafe.client.stack`).
"""

from __future__ import annotations

import ssl
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tensafe.common.errors import ConfigError

if TYPE_CHECKING:
    from tensafe.common.config import ServiceConfig

PEM_CERTIFICATE = "certificate"
PEM_PRIVATE_KEY = "private key"


def read_pem(setting: str, path: Path, kind: str) -> bytes:
    """Read a PEM file and check that it holds what the setting promises.

    Args:
        setting: The environment variable that named the file (for the error).
        path: The file.
        kind: :data:`PEM_CERTIFICATE` (one or more certificates) or
            :data:`PEM_PRIVATE_KEY` (one unencrypted key).

    Returns:
        The file's bytes.

    A private key must not be accessible to others (mode ``o=``): group read stays
    allowed, because Kubernetes mounts secrets for a pod's ``fsGroup`` (the chart uses
    0440).

    Raises:
        ConfigError: The file cannot be read, does not hold a PEM ``kind``, or is a
            private key that others may read.
    """
    try:
        data = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if kind == PEM_CERTIFICATE:
            x509.load_pem_x509_certificates(data)
        else:
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(setting, f"{path} is not a PEM {kind}: {exc}") from None
    if kind == PEM_PRIVATE_KEY and mode & 0o007:
        raise ConfigError(
            setting, f"{path} is accessible to others (mode {mode:04o}): chmod o= (e.g. 0600)"
        )
    return data


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    """The listener's credentials: TLS, mutual TLS, or ``None`` for plaintext.

    Args:
        config: The service's configuration (validated: the files are readable).

    Returns:
        ``None`` without ``tls_cert_file``; otherwise TLS credentials that require and
        verify a client certificate when ``tls_client_ca_file`` is set.
    """
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    client_ca = (
        read_pem("TENSAFE_TLS_CLIENT_CA_FILE", config.tls_client_ca_file, PEM_CERTIFICATE)
        if config.tls_client_ca_file is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [
            (
                read_pem("TENSAFE_TLS_KEY_FILE", config.tls_key_file, PEM_PRIVATE_KEY),
                read_pem("TENSAFE_TLS_CERT_FILE", config.tls_cert_file, PEM_CERTIFICATE),
            )
        ],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def client_identity(config: ServiceConfig) -> tuple[Path, Path] | None:
    """The certificate and key this service presents when it calls another service:
    the client pair if configured, else the server pair, else none."""
    if config.tls_client_cert_file is not None and config.tls_client_key_file is not None:
        return config.tls_client_cert_file, config.tls_client_key_file
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        return config.tls_cert_file, config.tls_key_file
    return None


def channel_credentials(config: ServiceConfig) -> grpc.ChannelCredentials | None:
    """Credentials of this service's outgoing channels, or ``None`` for plaintext.

    Returns:
        ``None`` without ``tls_ca_file``; otherwise TLS credentials trusting that CA
        bundle and presenting :func:`client_identity` (for servers that require mTLS).
    """
    if config.tls_ca_file is None:
        return None
    identity = client_identity(config)
    key = cert = None
    if identity is not None:
        cert = read_pem(_client_setting(config, "CERT"), identity[0], PEM_CERTIFICATE)
        key = read_pem(_client_setting(config, "KEY"), identity[1], PEM_PRIVATE_KEY)
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem("TENSAFE_TLS_CA_FILE", config.tls_ca_file, PEM_CERTIFICATE),
        private_key=key,
        certificate_chain=cert,
    )


def _client_setting(config: ServiceConfig, part: str) -> str:
    if config.tls_client_cert_file is not None:
        return f"TENSAFE_TLS_CLIENT_{part}_FILE"
    return f"TENSAFE_TLS_{part}_FILE"


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to another service: TLS with ``credentials``, else plaintext.

    Every service→service channel is made here, so none can bypass the configuration.

    Args:
        target: ``host:port``.
        credentials: From :func:`channel_credentials`.
        options: gRPC channel options.
    """
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def service_channel(
    target: str, config: ServiceConfig, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel from this service to ``target``, secured as ``config`` says."""
    return open_channel(target, channel_credentials(config), options)


def nats_client_context(config: ServiceConfig) -> ssl.SSLContext | None:
    """The TLS context of this service's NATS connection (``tls://`` URLs), or ``None``.

    It verifies the server with ``tls_ca_file`` and presents :func:`client_identity`
    (NATS servers configured with ``verify: true`` require it).
    """
    if config.tls_ca_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.tls_ca_file))
    identity = client_identity(config)
    if identity is not None:
        context.load_cert_chain(str(identity[0]), str(identity[1]))
    return context


def validate(config: object) -> None:
    """Check the TLS settings of a config (called by its ``__post_init__``).

    ``config`` is a :class:`ServiceConfig` or any config with the same ``tls_*`` fields
    (an HTTP front door has no ``tls_client_ca_file``: its listener takes no client
    certificates).

    Raises:
        ConfigError: Half a pair is set, mTLS without a server certificate, a client
            certificate without the CA bundle that turns outgoing TLS on, or a file is
            unreadable or not PEM; the error names the setting.
    """
    pairs = (
        ("tls_cert_file", "tls_key_file"),
        ("tls_client_cert_file", "tls_client_key_file"),
    )
    for cert_field, key_field in pairs:
        cert, key = getattr(config, cert_field), getattr(config, key_field)
        if (cert is None) != (key is None):
            missing, given = (key_field, cert_field) if key is None else (cert_field, key_field)
            raise ConfigError(
                f"TENSAFE_{missing.upper()}", f"required with TENSAFE_{given.upper()}"
            )
    client_ca_file = getattr(config, "tls_client_ca_file", None)
    if client_ca_file is not None and getattr(config, "tls_cert_file", None) is None:
        raise ConfigError(
            "TENSAFE_TLS_CLIENT_CA_FILE",
            "mutual TLS needs the server's own certificate: set TENSAFE_TLS_CERT_FILE and "
            "TENSAFE_TLS_KEY_FILE",
        )
    if getattr(config, "tls_client_cert_file", None) is not None and (
        getattr(config, "tls_ca_file", None) is None
    ):
        raise ConfigError(
            "TENSAFE_TLS_CA_FILE",
            "required with TENSAFE_TLS_CLIENT_CERT_FILE: without it outgoing channels are "
            "plaintext and the client certificate is never presented",
        )
    kinds = {
        "tls_cert_file": PEM_CERTIFICATE,
        "tls_key_file": PEM_PRIVATE_KEY,
        "tls_client_ca_file": PEM_CERTIFICATE,
        "tls_ca_file": PEM_CERTIFICATE,
        "tls_client_cert_file": PEM_CERTIFICATE,
        "tls_client_key_file": PEM_PRIVATE_KEY,
    }
    for name, kind in kinds.items():
        path = getattr(config, name, None)
        if path is not None:
            read_pem(f"TENSAFE_{name.upper()}", path, kind)
