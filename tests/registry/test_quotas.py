"""The registry's per-tenant storage quota on SQLite and PostgreSQL: a publish that
would take the tenant's package bytes over ``registry_max_storage_bytes_per_tenant``
is RESOURCE_EXHAUSTED naming the limit, before its bytes are read, and leaves no
object, staging file or row; other tenants are unaffected; deleting frees the bytes;
concurrent publishes never pass the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tensafe.common.errors import ConfigError, ResourceExhausted
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.access import Caller
from tensafe.registry.domain.service import PublishRequest

from .conftest import Registry, start_registry

LIMIT = 12_000
"""Room for two of the test packages (4.5 KB each), not three."""


@pytest.fixture
async def limited(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    async for harness in start_registry(
        database_url, tmp_path, registry_max_storage_bytes_per_tenant=LIMIT
    ):
        yield harness


async def _outcome(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


def test_zero_or_negative_limit_is_refused_at_start_up(tmp_path: Path) -> None:
    for value in (0, -1):
        with pytest.raises(ConfigError) as info:
            RegistryConfig(
                database_url="sqlite+aiosqlite:///x.db",
                data_dir=tmp_path,
                dev_mode=True,
                registry_max_storage_bytes_per_tenant=value,
            )
        assert info.value.setting == "TENSAFE_REGISTRY_MAX_STORAGE_BYTES_PER_TENANT"


async def test_storage_per_tenant(limited: Registry) -> None:
    a, b = limited.tenant_a, limited.tenant_b
    packages = [limited.package(a.tenant_id, f"bot-{i}", seed=i) for i in range(3)]
    size = len(packages[0])
    assert all(len(p) == size for p in packages) and 2 * size <= LIMIT < 3 * size
    await limited.publish(a.admin, "bot-0", packages[0], request_id="p-0")
    await limited.publish(a.admin, "bot-1", packages[1])
    objects = limited.object_files
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await limited.publish(a.admin, "bot-2", packages[2])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(info.value)
    assert isinstance(error, ResourceExhausted) and error.reason == "QUOTA_EXCEEDED"
    assert error.metadata == {"limit": "registry_max_storage_bytes_per_tenant", "max": str(LIMIT)}
    assert f"registry_max_storage_bytes_per_tenant={LIMIT}" in error.message
    # Nothing half-created: no object, no staging file, no adapter or version row.
    assert limited.object_files == objects
    assert limited.staging_files == []
    listed = await limited.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=a.admin)
    assert sorted(adapter.name for adapter in listed.adapters) == ["bot-0", "bot-1"]
    # A retry of an accepted publish is answered, not refused.
    again = await limited.publish(a.admin, "bot-0", packages[0], request_id="p-0")
    assert again.version == 1
    # Another tenant is unaffected.
    await limited.publish(b.admin, "bot-0", limited.package(b.tenant_id, "bot-0", seed=5))
    # Deleting an adapter frees its bytes.
    await limited.stub.DeleteAdapter(
        pb.DeleteAdapterRequest(adapter_name="bot-1"), metadata=a.admin
    )
    await limited.publish(a.admin, "bot-2", packages[2])


async def test_refused_before_the_first_byte_is_read(limited: Registry) -> None:
    a = limited.tenant_a
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(LIMIT // 1000 + 1):
            pulled += 1
            yield b"\0" * 1000

    caller = Caller(
        tenant_id=a.tenant_id,
        principal_id=a.admin_id,
        acting_for_tenant=False,
        caller_tenant_id=a.tenant_id,
    )
    request = PublishRequest(adapter_name="huge", size_bytes=LIMIT + 1, request_id="")
    with pytest.raises(ResourceExhausted) as info:
        await limited.domain.publish(caller, request, chunks())
    assert info.value.metadata["limit"] == "registry_max_storage_bytes_per_tenant"
    assert pulled == 0
    assert limited.staging_files == []


async def test_concurrent_publishes_never_pass_the_limit(limited: Registry) -> None:
    b = limited.tenant_b
    packages = [limited.package(b.tenant_id, f"bot-{i}", seed=i) for i in range(5)]
    outcomes = await asyncio.gather(
        *(_outcome(limited.publish(b.admin, f"bot-{i}", p)) for i, p in enumerate(packages))
    )
    assert sorted(outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 3
    listed = await limited.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=b.admin)
    assert len(listed.adapters) == 2
    assert limited.staging_files == []
