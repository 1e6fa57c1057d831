"""What every SDK service client shares: how its gRPC channels are opened (plaintext,
TLS, or mutual TLS with a client certificate) and owning and closing them.

Every channel the SDK and the CLI open is made by :func:`open_channel`, so a CA bundle
given once — ``ca_file=``, ``$TENSAFE_CA_FILE``, or the ``tls`` block of the connection
file that ``tensafe up --tls`` writes — secures every call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import grpc

from tensafe.common import errors

CA_FILE_ENV = "TENSAFE_CA_FILE"
"""PEM CA bundle that verifies the services (a private CA, e.g. ``tensafe up --tls``)."""

CLIENT_CERT_ENV = "TENSAFE_CLIENT_CERT_FILE"
"""PEM certificate the SDK presents to services that require mutual TLS."""

CLIENT_KEY_ENV = "TENSAFE_CLIENT_KEY_FILE"
"""PEM private key of the client certificate."""


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """How the SDK speaks TLS to a deployment.

    Attributes:
        ca_file: PEM CA bundle that verifies the servers; ``None`` uses the system's
            root certificates.
        client_cert_file: PEM certificate presented for mutual TLS, if any.
        client_key_file: Its PEM private key.
    """

    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            missing = "client_key_file" if self.client_key_file is None else "client_cert_file"
            raise errors.InvalidArgument(
                missing, "a client certificate and its key are given together"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (the files are read now).

        Raises:
            InvalidArgument: A file cannot be read; the error names the setting.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read("ca_file", self.ca_file),
            private_key=_read("client_key_file", self.client_key_file),
            certificate_chain=_read("client_cert_file", self.client_cert_file),
        )

    def to_json(self) -> dict[str, str]:
        """The ``tls`` block of a connection file."""
        return {
            name: str(value)
            for name, value in dataclasses.asdict(self).items()
            if value is not None
        }

    @classmethod
    def from_json(cls, block: Mapping[str, Any]) -> ClientTls:
        """Read the ``tls`` block of a connection file (paths as written)."""
        return cls(
            **{
                field.name: Path(str(block[field.name]))
                for field in dataclasses.fields(cls)
                if block.get(field.name)
            }
        )


def _read(setting: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.InvalidArgument(setting, f"cannot read {path}: {exc.strerror}") from None


def resolve_tls(
    *,
    ca_file: str | os.PathLike[str] | None = None,
    client_cert_file: str | os.PathLike[str] | None = None,
    client_key_file: str | os.PathLike[str] | None = None,
    connection_tls: ClientTls | None = None,
) -> ClientTls | None:
    """The TLS settings to use, each from the first place that has it: the argument,
    the environment (``TENSAFE_CA_FILE``, ``TENSAFE_CLIENT_CERT_FILE``,
    ``TENSAFE_CLIENT_KEY_FILE``), the connection file's ``tls`` block.

    Returns:
        ``None`` when nothing asks for TLS (plaintext, or ``grpcs://`` with the system's
        roots), else the settings.
    """
    fallback = connection_tls or ClientTls()

    def pick(explicit: str | os.PathLike[str] | None, env: str, stored: Path | None) -> Path | None:
        value = explicit or os.environ.get(env, "").strip()
        return Path(value) if value else stored

    tls = ClientTls(
        ca_file=pick(ca_file, CA_FILE_ENV, fallback.ca_file),
        client_cert_file=pick(client_cert_file, CLIENT_CERT_ENV, fallback.client_cert_file),
        client_key_file=pick(client_key_file, CLIENT_KEY_ENV, fallback.client_key_file),
    )
    return None if tls == ClientTls() else tls


def open_channel(
    address: str,
    *,
    tls: ClientTls | None = None,
    system_roots: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``host:port``: TLS with ``tls``, TLS with the system's root
    certificates with ``system_roots``, plaintext otherwise.

    Args:
        address: ``host:port``.
        tls: The CA bundle and client certificate (:func:`resolve_tls`).
        system_roots: Use TLS even without ``tls`` (a ``grpcs://`` URL).
        options: gRPC channel options.
    """
    if tls is not None:
        return grpc.secure_channel(address, tls.credentials(), options)
    if system_roots:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(), options)
    return grpc.insecure_channel(address, options)


class OwnedChannels:
    """Owns a client's channel and the channels it depends on (e.g. the auth channel
    of its token provider); closes them all, also as a context manager."""

    def __init__(self, channel: grpc.Channel, also_close: Sequence[grpc.Channel] = ()) -> None:
        self._channel = channel
        self._also_close = tuple(also_close)

    def close(self) -> None:
        """Close the channel and the channels it depends on."""
        self._channel.close()
        for channel in self._also_close:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
