"""Real certificates for the TLS tests: two independent CAs made in a temporary folder
by the same code as ``tensafe up --tls`` (:mod:`tensafe.client.dev_tls`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.client.dev_tls import USER, CertPair, DevCertificates, ensure_dev_certificates
from tensafe.common.config import ServiceConfig
from tensafe.common.grpc_server import GrpcServer


@dataclasses.dataclass(frozen=True)
class Pki:
    """The CA every party trusts, and a second CA nobody trusts."""

    trusted: DevCertificates
    other: DevCertificates

    def server(self, name: str = "server") -> CertPair:
        return self.trusted.servers[name]

    def client(self, name: str = USER) -> CertPair:
        return self.trusted.clients[name]

    def credentials(
        self, *, ca: DevCertificates | None = None, client: CertPair | None = None
    ) -> grpc.ChannelCredentials:
        """Channel credentials trusting ``ca`` (default the trusted one), with ``client``."""
        return grpc.ssl_channel_credentials(
            root_certificates=(ca or self.trusted).ca_file.read_bytes(),
            private_key=client.key_file.read_bytes() if client else None,
            certificate_chain=client.cert_file.read_bytes() if client else None,
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    trusted = ensure_dev_certificates(
        root / "trusted", servers=["server", "auth", "probe"], clients=["probe"]
    )
    other = ensure_dev_certificates(root / "other", servers=["server"], clients=[])
    return Pki(trusted, other)


C = TypeVar("C", bound=ServiceConfig)


def tls_config(
    tmp_path: Path, pki: Pki, *, mutual: bool, cls: type[C] = ServiceConfig, **values: Any
) -> C:
    """A service config whose listener is TLS (``mutual``: requires client certs)."""
    server = pki.server(values.pop("server", "server"))
    values.setdefault("database_url", f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    return cls(
        data_dir=tmp_path,
        tls_cert_file=server.cert_file,
        tls_key_file=server.key_file,
        tls_client_ca_file=pki.trusted.ca_file if mutual else None,
        **values,
    )


HealthCheck = Callable[[grpc.ChannelCredentials | None], Any]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[ServiceConfig], Any]]:
    """Starts a GrpcServer (health only) with a config; returns a health checker."""
    servers: list[GrpcServer] = []

    async def start(config: ServiceConfig) -> HealthCheck:
        server = GrpcServer(config=config, services=[])
        port = await server.start()
        servers.append(server)

        async def check(credentials: grpc.ChannelCredentials | None) -> Any:
            address = f"127.0.0.1:{port}"
            channel = (
                grpc.aio.insecure_channel(address)
                if credentials is None
                else grpc.aio.secure_channel(address, credentials)
            )
            async with channel:
                stub = health_pb2_grpc.HealthStub(channel)
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return response.status

        return check

    yield start
    for server in servers:
        await server.stop()
