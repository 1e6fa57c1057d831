"""Wiring of the HE runtime service: build the object graph from config and serve it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensafe import tgsp
from tensafe.common import tls
from tensafe.common.auth import connect_authentication
from tensafe.common.config import env_name
from tensafe.common.db import Database
from tensafe.common.errors import ConfigError, InvalidArgument
from tensafe.common.grpc_errors import ServerInterceptorBase
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.common.registry_client import RegistryClient
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.he_runtime.domain.adapters import (
    AdapterSource,
    LocalPeftAdapterSource,
    RegistryAdapterSource,
)
from tensafe.he_runtime.domain.parallel import EvaluationPeers
from tensafe.he_runtime.domain.sessions import HeSessions, SessionLimits
from tensafe.he_runtime.servicer import HeRuntimeServiceServicer
from tensafe.he_runtime.store.keys import KeyFiles
from tensafe.he_runtime.store.sql import SessionStore
from tensafe.proto.he.v1 import he_service_pb2_grpc

log = logging.getLogger(__name__)

#: Longest pause between two sweeps for expired sessions.
MAX_REAP_INTERVAL_SECONDS = 30.0

#: Age after which a key file without a session row is an abandoned creation (a crash
#: between writing the file and committing the row); younger ones may still commit.
ORPHAN_KEY_FILE_GRACE_SECONDS = 600.0


def key_files_dir(config: HeRuntimeConfig) -> Path:
    """Where sessions' Galois keys are kept: ``<data_dir>/he_runtime/keys/``."""
    return Path(config.data_dir) / "he_runtime" / "keys"


def local_adapters_dir(config: HeRuntimeConfig) -> Path:
    """The dev-mode adapter folder: ``<data_dir>/adapters/<adapter_name>/``."""
    return Path(config.data_dir) / "adapters"


def adapter_source(config: HeRuntimeConfig) -> AdapterSource | None:
    """The adapter source this configuration allows.

    A configured registry (``TENSAFE_REGISTRY_URL``) is always the source. Without one,
    only explicit dev mode reads unverified PEFT directories from the data folder;
    otherwise there is none and CreateSession fails with FAILED_PRECONDITION: weights
    never come from anywhere weaker.

    Raises:
        ConfigError: A registry is configured without the service's credentials.
    """
    if config.registry_url:
        trust = None
        if config.trust_list_file is not None:
            try:
                trust = tgsp.TrustList.from_file(config.trust_list_file)
            except InvalidArgument as error:
                raise ConfigError(env_name("trust_list_file"), error.message) from error
        return RegistryAdapterSource(
            RegistryClient.connect(
                registry_url=config.registry_url,
                auth_url=config.auth_url,
                service_api_key=config.service_api_key,
                channel_credentials=tls.channel_credentials(config),
            ),
            trust=trust,
        )
    if config.dev_mode:
        return LocalPeftAdapterSource(local_adapters_dir(config))
    return None


async def build_service(
    config: HeRuntimeConfig,
    *,
    interceptors: Sequence[ServerInterceptorBase],
    clock: Callable[[], float] = time.time,
) -> tuple[Assembly, HeSessions]:
    """Build the HE runtime's services with the given authentication interceptors.

    Args:
        config: The configuration.
        interceptors: The authentication interceptor(s) (from ``connect_authentication``
            in production; tests pass one built on their own key source).
        clock: Wall clock of session expiry (tests advance it by hand).

    Returns:
        The assembly to serve and the sessions domain.
    """
    database = Database.from_url(config.database_url, application_name="tensafe-he-runtime")
    try:
        store = SessionStore(database)
        await store.migrate()
        keys = KeyFiles(key_files_dir(config))
    except BaseException:
        await database.dispose()
        raise
    pool = ThreadPoolExecutor(
        max_workers=config.evaluation_threads, thread_name_prefix="he-evaluation"
    )
    peers = EvaluationPeers(config.cores - 1) if config.cores > 1 else None
    source = adapter_source(config)
    sessions = HeSessions(
        limits=SessionLimits(
            max_session_key_bytes=config.max_session_key_bytes,
            max_sessions_per_tenant=config.max_sessions_per_tenant,
            max_key_bytes_per_tenant=config.max_key_bytes_per_tenant,
            idle_ttl_seconds=config.session_idle_ttl_seconds,
            max_apply_bytes=config.max_apply_bytes,
        ),
        adapter_source=source,
        pool=pool,
        store=store,
        keys=keys,
        clock=clock,
        peers=peers,
    )
    removed = await sessions.sweep_files(grace_seconds=ORPHAN_KEY_FILE_GRACE_SECONDS)
    if removed:
        log.info("removed %d abandoned HE key files from %s", removed, keys.root)
    if isinstance(source, RegistryAdapterSource):
        log.info("adapters come from the registry at %s", config.registry_url)
    elif source is not None:
        log.warning(
            "DEV MODE: adapters come from unverified PEFT folders in %s (no registry "
            "configured: set TENSAFE_REGISTRY_URL)",
            local_adapters_dir(config),
        )
    else:
        log.warning(
            "no adapter source: TENSAFE_REGISTRY_URL is not set, so CreateSession fails "
            "with FAILED_PRECONDITION (dev mode reads %s)",
            local_adapters_dir(config),
        )
    stop = asyncio.Event()
    reaper = asyncio.create_task(
        sessions.run_reaper(
            stop,
            interval_seconds=min(MAX_REAP_INTERVAL_SECONDS, config.session_idle_ttl_seconds / 4),
        )
    )

    async def close() -> None:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await sessions.close_all()
        pool.shutdown(wait=True, cancel_futures=True)
        if peers is not None:
            peers.close()
        if isinstance(source, RegistryAdapterSource):
            await source.close()
        await database.dispose()

    assembly = Assembly(
        services=[
            ServiceRegistration(
                "tensafe.he.v1.HeRuntimeService",
                he_service_pb2_grpc.add_HeRuntimeServiceServicer_to_server,
                HeRuntimeServiceServicer(sessions, max_message_bytes=config.max_message_bytes),
            )
        ],
        interceptors=list(interceptors),
        close=close,
    )
    return assembly, sessions


async def build(config: HeRuntimeConfig) -> Assembly:
    """Build the HE runtime's gRPC services from its config."""
    authentication = await connect_authentication(config, service="he_runtime")
    try:
        assembly, _ = await build_service(config, interceptors=[authentication.interceptor])
    except BaseException:
        await authentication.close()
        raise
    close_service = assembly.close

    async def close() -> None:
        if close_service is not None:
            await close_service()
        await authentication.close()

    assembly.close = close
    return assembly


def main() -> int:
    """Entry point of ``python -m tensafe.he_runtime``."""
    return run_service("he_runtime", HeRuntimeConfig, build)
