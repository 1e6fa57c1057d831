"""Where the SDK and CLI find the services: the connection file written by
``tensafe up`` (or one written by an operator for a remote deployment)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import grpc

from tensafe.client.channels import ClientTls, open_channel, resolve_tls

DEFAULT_DATA_DIR = Path(".tensafe")


@dataclasses.dataclass(frozen=True)
class Connection:
    """Endpoints of a TenSafe deployment.

    Attributes:
        services: Service name (auth, registry, he_runtime, trainer) to ``host:port``.
        path: The file it was read from.
        tls: The CA bundle and client certificate of a TLS deployment (the file's
            ``tls`` block), ``None`` for plaintext.
    """

    services: dict[str, str]
    path: Path
    tls: ClientTls | None = None

    def address(self, service: str) -> str:
        """The ``host:port`` of a service.

        Raises:
            KeyError: The deployment has no such service.
        """
        try:
            return self.services[service]
        except KeyError:
            raise KeyError(f"{self.path} lists no service {service!r}") from None

    def channel(
        self,
        service: str,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert_file: str | os.PathLike[str] | None = None,
        client_key_file: str | os.PathLike[str] | None = None,
    ) -> grpc.Channel:
        """A channel to a service, TLS as :func:`tensafe.client.channels.resolve_tls`
        says (the arguments, the environment, this file's ``tls`` block).

        Raises:
            KeyError: The deployment has no such service.
        """
        tls = resolve_tls(
            ca_file=ca_file,
            client_cert_file=client_cert_file,
            client_key_file=client_key_file,
            connection_tls=self.tls,
        )
        return open_channel(self.address(service), tls=tls)


def connection_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The connection file to use: the argument, else ``$TENSAFE_CONNECTION_FILE``,
    else ``.tensafe/connection.json`` in the working directory."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TENSAFE_CONNECTION_FILE")
    if env:
        return Path(env)
    return DEFAULT_DATA_DIR / "connection.json"


def load_connection(explicit: str | os.PathLike[str] | None = None) -> Connection:
    """Read the connection file.

    Raises:
        FileNotFoundError: No stack is running there; the message says how to start one.
    """
    path = connection_path(explicit)
    if not path.exists():
        raise FileNotFoundError(
            f"no connection file at {path}: start the stack with `tensafe up` "
            "or set TENSAFE_CONNECTION_FILE"
        )
    data = json.loads(path.read_text())
    tls = ClientTls.from_json(data["tls"]) if data.get("tls") else None
    return Connection(services=dict(data["services"]), path=path, tls=tls)
