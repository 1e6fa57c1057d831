"""Wiring of the registry service: build the object graph from config and serve it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tensafe.common.auth import AuditSink, connect_authentication
from tensafe.common.db import Database
from tensafe.common.grpc_errors import ServerInterceptorBase
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.access import AccessPolicy
from tensafe.registry.domain.keys import load_signing_keys
from tensafe.registry.domain.rotation import KekRotations
from tensafe.registry.domain.service import RegistryDomain
from tensafe.registry.servicer import RegistryServiceServicer
from tensafe.registry.store.objects import LocalObjectStore
from tensafe.registry.store.sql import RegistryStore

log = logging.getLogger(__name__)


async def build_service(
    config: RegistryConfig,
    *,
    audit: AuditSink,
    interceptors: Sequence[ServerInterceptorBase],
) -> tuple[Assembly, RegistryDomain]:
    """Build the registry's gRPC service and domain with given authentication.

    Args:
        config: The registry's settings.
        audit: Where key unwraps are recorded.
        interceptors: The authentication interceptor (and any others).

    Returns:
        The assembly (its ``close`` disposes of the database) and the domain.

    Raises:
        ConfigError: Missing or unreadable signing key outside dev mode, bad settings.
        Unavailable: The database cannot be reached.
    """
    keys = load_signing_keys(
        signing_key_file=config.registry_signing_key_file,
        trusted_key_files=config.registry_trusted_signing_key_files,
        dev_mode=config.dev_mode,
        data_dir=Path(config.data_dir),
        trust_list_file=config.registry_trust_list_file,
    )
    kek_provider = config.open_kek_provider(config.kek_dir)
    database = Database.from_url(config.database_url, application_name="tensafe-registry")
    store = RegistryStore(database)
    try:
        await store.migrate()
    except BaseException:
        kek_provider.close()
        await database.dispose()
        raise
    objects = LocalObjectStore(config.object_dir)
    domain = RegistryDomain(
        store=store,
        objects=objects,
        keys=keys,
        kek_provider=kek_provider,
        audit=audit,
        max_package_bytes=config.registry_max_package_bytes,
        max_storage_bytes_per_tenant=config.registry_max_storage_bytes_per_tenant,
        chunk_bytes=config.registry_chunk_bytes,
    )
    policy = AccessPolicy(
        acting_service_principals=frozenset(config.registry_acting_service_principals),
        platform_tenant_id=config.registry_platform_tenant_id,
    )
    log.info(
        "registry signing key %s; %d trusted keys; objects in %s; KEK provider %s",
        keys.signing_key.key_id,
        len(keys.trusted),
        config.object_dir,
        config.kek_provider,
    )

    async def close() -> None:
        try:
            await database.dispose()
        finally:
            kek_provider.close()

    assembly = Assembly(
        services=[
            ServiceRegistration(
                "tensafe.registry.v1.RegistryService",
                registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
                RegistryServiceServicer(
                    domain,
                    policy,
                    KekRotations(
                        store=store,
                        objects=objects,
                        keys=keys,
                        kek_provider=kek_provider,
                    ),
                ),
            )
        ],
        interceptors=list(interceptors),
        close=close,
    )
    return assembly, domain


async def build(config: RegistryConfig) -> Assembly:
    """Build the registry service's gRPC services from its config."""
    authentication = await connect_authentication(config, service="registry")
    try:
        assembly, _ = await build_service(
            config, audit=authentication.audit, interceptors=[authentication.interceptor]
        )
    except BaseException:
        await authentication.close()
        raise
    close_database = assembly.close

    async def close() -> None:
        try:
            if close_database is not None:
                await close_database()
        finally:
            await authentication.close()

    assembly.close = close
    return assembly


def main() -> int:
    """Entry point of ``python -m tensafe.registry``."""
    return run_service("registry", RegistryConfig, build)
