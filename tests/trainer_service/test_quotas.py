"""Per-tenant quotas of the trainer API on SQLite and PostgreSQL: live training clients
and unfinished jobs. The limit+1-th create is RESOURCE_EXHAUSTED naming the limit and
leaves no row; other tenants are unaffected; freeing one makes room; a concurrent burst
never passes the limit. No worker runs, so admitted jobs stay PENDING."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from tensafe.common.db import Database
from tensafe.common.errors import ConfigError, ResourceExhausted
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.store.models import FUTURES, JobRow, TrainingClientRow

from .conftest import BASE_MODEL, Stack, trainer_config
from .helpers import expect_code

MAX_CLIENTS = 3
MAX_JOBS = 3


async def _count(url: str, table: Any, tenant: str) -> int:
    database = Database.from_url(url)
    try:
        async with database.transaction(read_only=True) as session:
            query = sa.select(sa.func.count()).select_from(table).where(table.c.tenant == tenant)
            return int((await session.execute(query)).scalar_one())
    finally:
        await database.dispose()


def _create_request(request_id: str = "") -> pb.CreateTrainingClientRequest:
    return pb.CreateTrainingClientRequest(
        base_model=BASE_MODEL, lora=pb.LoraConfig(rank=4, alpha=8, seed=1), request_id=request_id
    )


def _step(client_id: str) -> pb.OptimStepRequest:
    return pb.OptimStepRequest(
        training_client_id=client_id, adam_params=pb.AdamParams(learning_rate=1e-3)
    )


def _assert_quota_error(error: grpc.aio.AioRpcError, limit: str, maximum: int) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    typed = from_rpc_error(error)
    assert isinstance(typed, ResourceExhausted)
    assert typed.reason == "QUOTA_EXCEEDED"
    assert typed.metadata == {"limit": limit, "max": str(maximum)}
    assert f"{limit}={maximum}" in typed.message


async def _outcome(call: Any) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


def test_zero_or_negative_limits_are_refused_at_start_up(
    tmp_path: Path, base_models_dir: Path
) -> None:
    base = trainer_config(
        database_url="sqlite+aiosqlite:///x.db",
        nats_url="nats://127.0.0.1:4222",
        data_dir=tmp_path,
        base_models_dir=base_models_dir,
    )
    for name in (
        "max_training_clients_per_tenant",
        "max_pending_jobs_per_tenant",
        "max_dataset_storage_bytes_per_tenant",
    ):
        for value in (0, -5):
            with pytest.raises(ConfigError) as info:
                dataclasses.replace(base, **{name: value})
            assert info.value.setting == f"TENSAFE_{name.upper()}"


async def test_training_clients_per_tenant(make_stack: Any, database_url: str) -> None:
    stack: Stack = await make_stack(
        database_url, worker=False, max_training_clients_per_tenant=MAX_CLIENTS
    )
    table = TrainingClientRow.__table__
    created = []
    for index in range(MAX_CLIENTS):
        response = await stack.trainer.CreateTrainingClient(
            _create_request(f"c-{index}"), metadata=stack.auth
        )
        created.append(response.training_client.id)
    error = await expect_code(
        stack.trainer.CreateTrainingClient(_create_request("c-extra"), metadata=stack.auth),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    _assert_quota_error(error, "max_training_clients_per_tenant", MAX_CLIENTS)
    assert await _count(database_url, table, stack.tenant) == MAX_CLIENTS
    # A retry of an accepted create is answered, not refused.
    again = await stack.trainer.CreateTrainingClient(_create_request("c-0"), metadata=stack.auth)
    assert again.training_client.id == created[0]
    # Another tenant is unaffected.
    other = stack.tokens.metadata("tenant-other")
    await stack.trainer.CreateTrainingClient(_create_request(), metadata=other)
    # Deleting one makes room for exactly one more.
    await stack.trainer.DeleteTrainingClient(
        pb.DeleteTrainingClientRequest(training_client_id=created[1]), metadata=stack.auth
    )
    await stack.trainer.CreateTrainingClient(_create_request("c-new"), metadata=stack.auth)
    await expect_code(
        stack.trainer.CreateTrainingClient(_create_request(), metadata=stack.auth),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_concurrent_client_creates_never_pass_the_limit(
    make_stack: Any, database_url: str
) -> None:
    stack: Stack = await make_stack(
        database_url, worker=False, max_training_clients_per_tenant=MAX_CLIENTS
    )
    outcomes = await asyncio.gather(
        *(
            _outcome(stack.trainer.CreateTrainingClient(_create_request(), metadata=stack.auth))
            for _ in range(10)
        )
    )
    assert sorted(outcomes) == ["OK"] * MAX_CLIENTS + ["RESOURCE_EXHAUSTED"] * (10 - MAX_CLIENTS)
    live = await _count(database_url, TrainingClientRow.__table__, stack.tenant)
    assert live == MAX_CLIENTS


async def test_pending_jobs_per_tenant(make_stack: Any, database_url: str) -> None:
    stack: Stack = await make_stack(
        database_url, worker=False, max_pending_jobs_per_tenant=MAX_JOBS
    )
    client = await stack.trainer.CreateTrainingClient(_create_request(), metadata=stack.auth)
    client_id = client.training_client.id
    futures = [
        (await stack.trainer.OptimStep(_step(client_id), metadata=stack.auth)).future
        for _ in range(MAX_JOBS)
    ]
    error = await expect_code(
        stack.trainer.OptimStep(_step(client_id), metadata=stack.auth),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    _assert_quota_error(error, "max_pending_jobs_per_tenant", MAX_JOBS)
    # Nothing half-created: no future, no job row, no sequence number spent.
    assert await _count(database_url, FUTURES, stack.tenant) == MAX_JOBS
    assert await _count(database_url, JobRow.__table__, stack.tenant) == MAX_JOBS
    # Another tenant is unaffected.
    other = stack.tokens.metadata("tenant-other")
    other_client = await stack.trainer.CreateTrainingClient(_create_request(), metadata=other)
    await stack.trainer.OptimStep(_step(other_client.training_client.id), metadata=other)
    # A finished (here: cancelled) job frees its place.
    await stack.futures.CancelFuture(
        common_pb2.CancelFutureRequest(future_id=futures[0].id), metadata=stack.auth
    )
    await stack.trainer.OptimStep(_step(client_id), metadata=stack.auth)
    await expect_code(
        stack.trainer.OptimStep(_step(client_id), metadata=stack.auth),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_concurrent_jobs_never_pass_the_limit(make_stack: Any, database_url: str) -> None:
    stack: Stack = await make_stack(
        database_url, worker=False, max_pending_jobs_per_tenant=MAX_JOBS
    )
    ids = [
        (
            await stack.trainer.CreateTrainingClient(_create_request(), metadata=stack.auth)
        ).training_client.id
        for _ in range(2)
    ]
    # Spread over two clients: the per-client row lock alone would not serialise them.
    outcomes = await asyncio.gather(
        *(
            _outcome(stack.trainer.OptimStep(_step(ids[i % 2]), metadata=stack.auth))
            for i in range(10)
        )
    )
    assert sorted(outcomes) == ["OK"] * MAX_JOBS + ["RESOURCE_EXHAUSTED"] * (10 - MAX_JOBS)
    assert await _count(database_url, FUTURES, stack.tenant) == MAX_JOBS


async def test_a_job_of_more_steps_than_the_limit_is_refused(
    make_stack: Any, tmp_path: Path
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'steps.db'}"
    stack: Stack = await make_stack(database_url, worker=False, max_steps_per_job=50)
    audit = pb.AuditPrivacyRequest(
        base_model=BASE_MODEL,
        lora=pb.LoraConfig(rank=4),
        dp=pb.DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
        batch_size=4,
        sampling=pb.SAMPLING_CLIENT_BATCHES,
        canaries=100,
        guesses_per_side=10,
        canary_kind=pb.CANARY_KIND_WHITE_BOX,
    )
    audit.steps = 51
    error = await expect_code(
        stack.trainer.AuditPrivacy(audit, metadata=stack.auth), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    _assert_quota_error(error, "max_steps_per_job", 50)
    assert await _count(database_url, FUTURES, stack.tenant) == 0
    audit.steps = 50
    accepted = await stack.trainer.AuditPrivacy(audit, metadata=stack.auth)
    assert accepted.future.id
    assert await _count(database_url, FUTURES, stack.tenant) == 1
