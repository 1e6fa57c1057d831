"""Wiring of the auth service: build the object graph from config and serve it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from tensafe.auth.audit_stream import AuditStreamConsumer
from tensafe.auth.config import AuthConfig, signing_key_encryption_key
from tensafe.auth.domain.crypto import ApiKeyHasher, HashParameters, SigningKeyCipher
from tensafe.auth.domain.ratelimit import RateLimit
from tensafe.auth.domain.service import SERVICE_NAME, AuthDomain
from tensafe.auth.servicer import AuthServiceServicer
from tensafe.auth.store.sql import AuthStore
from tensafe.common import tls
from tensafe.common.auth import (
    AUTH_PUBLIC_METHODS,
    AuthInterceptor,
    JsonWebKey,
    Revocations,
    TokenVerifier,
    VerifierOptions,
)
from tensafe.common.db import Database
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.common.metrics import DbGauges, GaugeSpec, Sample
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

log = logging.getLogger(__name__)


class DomainKeySource:
    """The auth service's own keys and revocations, read from its database.

    The auth service verifies tokens like every other service, but without calling
    itself over the network.
    """

    def __init__(self, domain: AuthDomain) -> None:
        self._domain = domain

    async def jwks(self) -> Sequence[JsonWebKey]:
        """Current verification keys."""
        return await self._domain.jwks()

    async def revocations(self) -> Revocations:
        """Current revocations."""
        return await self._domain.revocations()


@dataclasses.dataclass(frozen=True)
class AuthComponents:
    """The auth service's object graph (tests and the bootstrap command reuse it)."""

    database: Database
    domain: AuthDomain


async def build_domain(config: AuthConfig) -> AuthComponents:
    """Open and migrate the database and build the domain with its signing key.

    Raises:
        ConfigError: Missing key-encryption key outside dev mode, or bad settings.
        IntegrityError: The active signing key does not decrypt under the configured key.
    """
    kek = signing_key_encryption_key(config)
    database = Database.from_url(config.database_url, application_name="tensafe-auth")
    try:
        store = AuthStore(database)
        await store.migrate()
        domain = AuthDomain(
            store,
            cipher=SigningKeyCipher(kek),
            hasher=ApiKeyHasher(
                HashParameters(
                    time_cost=config.api_key_hash_time_cost,
                    memory_cost_kib=config.api_key_hash_memory_kib,
                    parallelism=config.api_key_hash_parallelism,
                )
            ),
            max_token_ttl=timedelta(seconds=config.token_ttl_seconds),
            exchange_rate=RateLimit(
                per_minute=config.exchange_api_key_rate_per_minute,
                burst=config.exchange_api_key_burst,
            ),
        )
        await domain.ensure_signing_key()
    except BaseException:
        await database.dispose()
        raise
    return AuthComponents(database=database, domain=domain)


def _audit_sample(domain: AuthDomain) -> Callable[[], Awaitable[Sample]]:
    async def sample() -> Sample:
        return {"tensafe.audit.chain.length": [({}, await domain.audit_chain_length())]}

    return sample


async def build(config: AuthConfig) -> Assembly:
    """Build the auth service's gRPC services from its config."""
    components = await build_domain(config)
    domain = components.domain
    verifier = TokenVerifier(
        DomainKeySource(domain),
        options=VerifierOptions.from_config(config),
    )
    interceptor = AuthInterceptor(
        verifier, domain, service=SERVICE_NAME, public_methods=AUTH_PUBLIC_METHODS
    )
    gauges: DbGauges | None = None
    if config.metrics_port >= 0:
        gauges = DbGauges(
            [
                GaugeSpec(
                    "tensafe.audit.chain.length",
                    "Entries in the audit hash chain (the recorded head's seq).",
                    "{event}",
                )
            ],
            _audit_sample(domain),
            interval=config.metrics_sample_seconds,
        )
        gauges.start()
    consumer: AuditStreamConsumer | None = None
    if config.nats_url:
        consumer = await AuditStreamConsumer.connect(
            domain, config.nats_url, tls=tls.nats_client_context(config)
        )
        consumer.start()
    else:
        log.warning(
            "TENSAFE_NATS_URL is not set: audit events of the other services are not "
            "consumed (they wait in the audit stream until an auth with NATS runs)"
        )

    async def close() -> None:
        if gauges is not None:
            await gauges.close()
        if consumer is not None:
            await consumer.close()
        await verifier.close()
        await components.database.dispose()

    return Assembly(
        services=[
            ServiceRegistration(
                "tensafe.auth.v1.AuthService",
                auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
                AuthServiceServicer(domain, on_revocation=verifier.refresh_revocations),
            )
        ],
        interceptors=[interceptor],
        close=close,
    )


def main() -> int:
    """Entry point of ``python -m tensafe.auth``."""
    return run_service("auth", AuthConfig, build)
