"""The trainer's per-tenant dataset storage quota: an upload that would pass
``max_dataset_storage_bytes_per_tenant`` is RESOURCE_EXHAUSTED naming the limit and
leaves neither a row nor an object file; other tenants are unaffected; deleting a
dataset frees its bytes; concurrent uploads never pass the limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import sqlalchemy as sa

from tensafe.common.db import Database
from tensafe.common.errors import ResourceExhausted
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.store.models import DatasetRow

from .conftest import Stack, StackFactory
from .helpers import arithmetic_records, jsonl, upload

DATA = jsonl(arithmetic_records(12))


async def _stored(stack: Stack) -> list[tuple[str, int]]:
    database = Database.from_url(stack.config.database_url)
    try:
        async with database.transaction(read_only=True) as session:
            rows = await session.execute(sa.select(DatasetRow.tenant, DatasetRow.size_bytes))
            return [(tenant, int(size)) for tenant, size in rows]
    finally:
        await database.dispose()


def _objects(stack: Stack) -> int:
    folder = Path(stack.config.data_dir) / "trainer" / "datasets"
    return len([p for p in folder.glob("*.tsds")]) if folder.is_dir() else 0


async def _outcome(stack: Stack, auth: tuple[tuple[str, str], ...]) -> str:
    try:
        await upload(stack, DATA, auth=auth)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def test_dataset_storage_per_tenant(make_stack: StackFactory, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}"
    # Measure what one upload of DATA stores, with the default (10 GiB) limit.
    measuring = await make_stack(database_url=url)
    await upload(measuring, DATA)
    [(_, size)] = await _stored(measuring)
    assert size > len(DATA) // 2
    # Room for one such dataset per tenant, not two.
    limit = 2 * size - 1
    stack = await make_stack(database_url=url, max_dataset_storage_bytes_per_tenant=limit)
    first = await upload(stack, DATA, request_id="ds-1")
    objects_before = _objects(stack)
    try:
        await upload(stack, DATA)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        typed = from_rpc_error(error)
        assert isinstance(typed, ResourceExhausted) and typed.reason == "QUOTA_EXCEEDED"
        assert typed.metadata == {
            "limit": "max_dataset_storage_bytes_per_tenant",
            "max": str(limit),
        }
    else:
        raise AssertionError("the second upload passed the storage quota")
    ours = [s for t, s in await _stored(stack) if t == stack.tenant]
    assert ours == [size]
    assert _objects(stack) == objects_before
    # A retry of the accepted upload is answered, not refused.
    assert (await upload(stack, DATA, request_id="ds-1")).id == first.id
    assert _objects(stack) == objects_before
    # Another tenant: a concurrent burst stores exactly one dataset.
    outcomes = await asyncio.gather(*(_outcome(stack, stack.other_auth) for _ in range(4)))
    assert sorted(outcomes) == ["OK"] + ["RESOURCE_EXHAUSTED"] * 3
    assert _objects(stack) == objects_before + 1
    # Deleting the dataset frees its bytes.
    await stack.trainer.DeleteDataset(
        pb.DeleteDatasetRequest(dataset_id=first.id), metadata=stack.auth
    )
    await upload(stack, DATA)
