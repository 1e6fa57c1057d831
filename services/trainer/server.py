"""Wiring of the trainer API: build the object graph from config and serve it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from tensafe.common import tls
from tensafe.common.auth import connect_authentication
from tensafe.common.db import Database, migrate
from tensafe.common.futures import SqlFutureStore
from tensafe.common.grpc_errors import ServerInterceptorBase
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.common.jetstream import JetStream
from tensafe.common.metrics import DbGauges, GaugeSpec, Sample
from tensafe.common.wakeups import FutureWakeups
from tensafe.proto.common.v1 import common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.domain.datasets.crypto import keyring_from_settings
from tensafe.trainer.domain.datasets.service import DatasetService, DatasetVault
from tensafe.trainer.domain.jobs import future_wakeup_prefix
from tensafe.trainer.domain.ledger import PrivacyLedger
from tensafe.trainer.domain.service import TrainerDomain
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.servicer import TrainerFutureServicer, TrainerServiceServicer
from tensafe.trainer.store import repository
from tensafe.trainer.store.models import FUTURES, MIGRATIONS, VERSION_TABLE
from tensafe.trainer.store.sql import TrainerStore
from tensafe.trainer.worker import jobs_stream_config

# WaitFuture re-reads the future with backoff between these bounds. A training step
# takes tens to hundreds of milliseconds, so the 250 ms default ceiling of the futures
# store would add up to a quarter of a second of latency to every awaited step; one
# indexed primary-key read per waiting call every 10 ms is cheap for the database.
FUTURE_POLL_INITIAL_SECONDS = 0.002
FUTURE_REREAD_SECONDS = 1.0
"""How often a waiter re-reads its future without a wake-up (a lost wake-up's cost)."""


async def build_api(
    config: TrainerConfig, *, interceptors: Sequence[ServerInterceptorBase]
) -> tuple[Assembly, TrainerDomain]:
    """Build the trainer API's services with the given authentication interceptors.

    Migrates the database, connects to JetStream (publish only), ensures the job stream
    and starts the outbox re-publisher.

    Args:
        config: The trainer configuration.
        interceptors: The authentication interceptor(s) (from ``connect_authentication``
            in production; tests pass one built on their own key source).

    Returns:
        The assembly to serve and the domain object.
    """
    database = Database.from_url(config.database_url)
    try:
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        jetstream = await JetStream.connect(
            jobs_stream_config(config, durable=None),
            client_name="tensafe-trainer-api",
            tls=tls.nats_client_context(config),
        )
    except BaseException:
        await database.dispose()
        raise
    try:
        await jetstream.ensure_stream()
        wakeups = await FutureWakeups.start(
            jetstream.connection, future_wakeup_prefix(config.jobs_subject_prefix)
        )
    except BaseException:
        await jetstream.close()
        await database.dispose()
        raise
    store = TrainerStore(
        database,
        SqlFutureStore(
            database,
            FUTURES,
            poll_initial=FUTURE_POLL_INITIAL_SECONDS,
            poll_max=FUTURE_REREAD_SECONDS,
            wakeups=wakeups,
        ),
    )
    api = TrainerDomain(
        store=store,
        jetstream=jetstream,
        base_models=BaseModelRegistry(config.base_models_path),
        objects=ObjectFolder(Path(config.data_dir) / "trainer"),
        subject_prefix=config.jobs_subject_prefix,
        outbox_grace_seconds=config.outbox_grace_seconds,
        max_clients_per_tenant=config.max_training_clients_per_tenant,
        max_pending_jobs_per_tenant=config.max_pending_jobs_per_tenant,
        ledger=PrivacyLedger(),
        max_steps_per_job=config.max_steps_per_job,
    )
    objects = ObjectFolder(Path(config.data_dir) / "trainer")
    datasets = DatasetService(
        store=store,
        api=api,
        vault=DatasetVault(
            store=store,
            objects=objects,
            keyring=keyring_from_settings(
                kek_file=config.dataset_kek_file,
                dev_mode=config.dev_mode,
                data_dir=config.data_dir,
            ),
        ),
        base_models=BaseModelRegistry(config.base_models_path),
        max_upload_bytes=config.max_dataset_bytes,
        max_storage_bytes_per_tenant=config.max_dataset_storage_bytes_per_tenant,
    )
    gauges = _trainer_gauges(database, config) if config.metrics_port >= 0 else None
    stop_outbox = asyncio.Event()
    outbox = asyncio.create_task(
        api.run_outbox(interval=config.outbox_interval_seconds, stop=stop_outbox)
    )

    async def close() -> None:
        if gauges is not None:
            await gauges.close()
        stop_outbox.set()
        with contextlib.suppress(asyncio.CancelledError):
            await outbox
        await wakeups.close()
        await jetstream.close()
        await database.dispose()

    assembly = Assembly(
        services=[
            ServiceRegistration(
                "tensafe.trainer.v1.TrainerService",
                trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server,
                TrainerServiceServicer(api, datasets=datasets),
            ),
            ServiceRegistration(
                "tensafe.common.v1.FutureService",
                common_pb2_grpc.add_FutureServiceServicer_to_server,
                TrainerFutureServicer(api),
            ),
        ],
        interceptors=list(interceptors),
        close=close,
    )
    return assembly, api


METRICS_MAX_CLIENTS = 1000
"""Training clients with a series of their own in /metrics (the newest active ones):
one series per client per gauge bounds the cardinality at a few thousand."""


def _trainer_gauges(database: Database, config: TrainerConfig) -> DbGauges:
    """Steps and ε per training client and the queued jobs, sampled from the database.

    Clients are labelled by id and tenant: a client belongs to one tenant, so the tenant
    label adds no series (the per-client series are capped at :data:`METRICS_MAX_CLIENTS`).
    """

    async def sample() -> Sample:
        async with database.transaction(read_only=True) as session:
            clients = await repository.client_progress(session, limit=METRICS_MAX_CLIENTS)
            queued = await repository.count_queued_jobs(session)
        labels = [{"training_client": c.client_id, "tenant": c.tenant} for c in clients]
        return {
            "tensafe.trainer.client.steps": [
                (label, c.step) for label, c in zip(labels, clients, strict=True)
            ],
            "tensafe.trainer.client.dp_steps": [
                (label, c.dp_steps) for label, c in zip(labels, clients, strict=True)
            ],
            "tensafe.trainer.client.epsilon_spent": [
                (label, c.epsilon_spent) for label, c in zip(labels, clients, strict=True)
            ],
            "tensafe.trainer.jobs.queued": [({}, queued)],
        }

    gauges = DbGauges(
        [
            GaugeSpec("tensafe.trainer.client.steps", "Optimizer steps committed.", "{step}"),
            GaugeSpec(
                "tensafe.trainer.client.dp_steps",
                "DP steps composed by the accountant (never rolled back).",
                "{step}",
            ),
            GaugeSpec(
                "tensafe.trainer.client.epsilon_spent",
                "Privacy spent (epsilon at the client's delta) per training client.",
            ),
            GaugeSpec(
                "tensafe.trainer.jobs.queued",
                "Jobs accepted and not yet committed by a worker.",
                "{job}",
            ),
        ],
        sample,
        interval=config.metrics_sample_seconds,
    )
    gauges.start()
    return gauges


async def build(config: TrainerConfig) -> Assembly:
    """Build the trainer API's gRPC services from its config."""
    authentication = await connect_authentication(config, service="trainer")
    try:
        assembly, _ = await build_api(config, interceptors=[authentication.interceptor])
    except BaseException:
        await authentication.close()
        raise
    inner_close = assembly.close

    async def close() -> None:
        if inner_close is not None:
            await inner_close()
        await authentication.close()

    assembly.close = close
    return assembly


def main() -> int:
    """Entry point of ``python -m tensafe.trainer``."""
    return run_service("trainer", TrainerConfig, build)
