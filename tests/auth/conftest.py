"""Fixtures for the auth tests: a real auth server over loopback on SQLite or PostgreSQL.

PostgreSQL: one uniquely named database per test (see :mod:`testkit.postgres`), dropped
afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tensafe.auth.config import AuthConfig
from tensafe.auth.domain.crypto import ApiKeyHasher, HashParameters, SigningKeyCipher
from tensafe.auth.domain.ratelimit import RateLimit
from tensafe.auth.domain.service import AuthDomain, BootstrapResult
from tensafe.auth.server import DomainKeySource
from tensafe.auth.servicer import AuthServiceServicer
from tensafe.auth.store.sql import AuthStore
from tensafe.common.auth import (
    AUTH_PUBLIC_METHODS,
    AuthInterceptor,
    TokenVerifier,
    VerifierOptions,
)
from tensafe.common.config import ServiceConfig
from tensafe.common.db import Database
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from testkit.postgres import create_database, drop_database

# Real argon2id at a low cost so that 50 concurrent exchanges stay fast on 2 cores;
# the production defaults (RFC 9106) are exercised by test_crypto.
TEST_HASH = HashParameters(time_cost=1, memory_cost_kib=1024, parallelism=1)


def default_exchange_rate() -> RateLimit:
    """The production default ExchangeApiKey rate limit (AuthConfig's defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(AuthConfig)}
    return RateLimit(
        per_minute=int(defaults["exchange_api_key_rate_per_minute"]),
        burst=int(defaults["exchange_api_key_burst"]),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database: each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
        return
    database = await create_database("tensafe_auth_test")
    yield database.url
    await drop_database(database)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file (for tests that do not depend on the back end)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"


@dataclasses.dataclass
class Clock:
    """A settable UTC clock for the domain (tokens and keys age without sleeping)."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclasses.dataclass
class AuthHarness:
    """A running auth server and handles into it."""

    address: str
    domain: AuthDomain
    database: Database
    verifier: TokenVerifier
    clock: Clock
    bootstrap: BootstrapResult
    channel: grpc.aio.Channel

    @property
    def stub(self) -> auth_service_pb2_grpc.AuthServiceStub:
        return auth_service_pb2_grpc.AuthServiceStub(self.channel)

    async def token(self, api_key: str, **kwargs: object) -> pb.ExchangeApiKeyResponse:
        return await self.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=api_key, **kwargs))  # type: ignore[arg-type]

    async def bearer(self, api_key: str) -> tuple[tuple[str, str], ...]:
        response = await self.token(api_key)
        return (("authorization", f"Bearer {response.access_token}"),)


def new_kek() -> bytes:
    return os.urandom(32)


async def start_auth(
    url: str,
    tmp_path: Path,
    *,
    kek: bytes,
    clock: Clock,
    revocation_ttl_seconds: float = 5.0,
    max_token_ttl: timedelta = timedelta(minutes=15),
    exchange_rate: RateLimit | None = None,
    rate_clock: Callable[[], float] = time.time,
) -> tuple[GrpcServer, AuthDomain, Database, TokenVerifier]:
    database = Database.from_url(url)
    store = AuthStore(database)
    await store.migrate()
    domain = AuthDomain(
        store,
        cipher=SigningKeyCipher(kek),
        hasher=ApiKeyHasher(TEST_HASH),
        max_token_ttl=max_token_ttl,
        exchange_rate=exchange_rate or default_exchange_rate(),
        rate_clock=rate_clock,
        clock=clock,
    )
    await domain.ensure_signing_key()
    verifier = TokenVerifier(
        DomainKeySource(domain),
        options=VerifierOptions(revocation_ttl_seconds=revocation_ttl_seconds),
    )
    server = GrpcServer(
        config=ServiceConfig(database_url=url, data_dir=tmp_path),
        services=[
            ServiceRegistration(
                "tensafe.auth.v1.AuthService",
                auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
                AuthServiceServicer(domain, on_revocation=verifier.refresh_revocations),
            )
        ],
        interceptors=[
            AuthInterceptor(verifier, domain, service="auth", public_methods=AUTH_PUBLIC_METHODS)
        ],
    )
    await server.start()
    return server, domain, database, verifier


@pytest.fixture
async def auth(database_url: str, tmp_path: Path) -> AsyncIterator[AuthHarness]:
    """A bootstrapped auth server (platform tenant, admin, two service accounts)."""
    async for harness in _harness(database_url, tmp_path):
        yield harness


@pytest.fixture
async def auth_sqlite(sqlite_url: str, tmp_path: Path) -> AsyncIterator[AuthHarness]:
    """As ``auth``, on SQLite only."""
    async for harness in _harness(sqlite_url, tmp_path):
        yield harness


async def _harness(url: str, tmp_path: Path) -> AsyncIterator[AuthHarness]:
    clock = Clock()
    server, domain, database, verifier = await start_auth(url, tmp_path, kek=new_kek(), clock=clock)
    result = await domain.bootstrap(
        tenant_name="platform", admin_name="root", service_accounts=["registry"]
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield AuthHarness(
            address=f"127.0.0.1:{server.port}",
            domain=domain,
            database=database,
            verifier=verifier,
            clock=clock,
            bootstrap=result,
            channel=channel,
        )
    finally:
        await channel.close()
        await server.stop()
        await verifier.close()
        await database.dispose()


def kek_b64(kek: bytes) -> str:
    return base64.b64encode(kek).decode()


def auth_config(url: str, tmp_path: Path, **overrides: object) -> AuthConfig:
    values: dict[str, object] = {
        "database_url": url,
        "data_dir": tmp_path,
        "signing_key_encryption_key": kek_b64(new_kek()),
        "api_key_hash_time_cost": 1,
        "api_key_hash_memory_kib": 1024,
        "api_key_hash_parallelism": 1,
    }
    values.update(overrides)
    return AuthConfig(**values)  # type: ignore[arg-type]


MetadataFactory = Callable[[str], tuple[tuple[str, str], ...]]
