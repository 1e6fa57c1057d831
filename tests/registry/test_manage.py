"""Authorisation, names, limits, paging, aliases and deletion of the registry."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry.store.sql import VERSION_TABLE

from .conftest import MAX_PACKAGE_BYTES, Registry, expect_code


async def test_reader_may_download_but_not_change(registry: Registry) -> None:
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "guarded")
    await expect_code(
        registry.publish(a.reader, "guarded", package), grpc.StatusCode.PERMISSION_DENIED
    )
    assert registry.object_files == []
    await registry.publish(a.admin, "guarded", package)
    _, data = await registry.download(a.reader, "guarded", version=1)
    assert data == package
    await expect_code(
        registry.stub.SetAlias(
            pb.SetAliasRequest(adapter_name="guarded", alias="prod", version=1),
            metadata=a.reader,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_code(
        registry.stub.DeleteAdapter(
            pb.DeleteAdapterRequest(adapter_name="guarded"), metadata=a.reader
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    denied = [r for r in registry.audit.records if r.kind == "permission.denied"]
    assert [r.principal_id for r in denied] == [a.reader_id] * 3
    assert all(r.service == "registry" for r in denied)


async def test_another_tenants_adapter_is_not_found_everywhere(registry: Registry) -> None:
    a, b = registry.tenant_a, registry.tenant_b
    await registry.publish(a.admin, "mine", registry.package(a.tenant_id, "mine"))
    stub = registry.stub
    calls = [
        stub.GetAdapter(pb.GetAdapterRequest(adapter_name="mine"), metadata=b.admin),
        stub.ListVersions(pb.ListVersionsRequest(adapter_name="mine"), metadata=b.admin),
        registry.download(b.admin, "mine", version=1),
        stub.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(adapter_name="mine", version=1), metadata=b.admin
        ),
        stub.SetAlias(
            pb.SetAliasRequest(adapter_name="mine", alias="prod", version=1), metadata=b.admin
        ),
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_name="mine"), metadata=b.admin),
    ]
    for call in calls:
        await expect_code(call, grpc.StatusCode.NOT_FOUND)
    listed = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=b.admin)
    assert list(listed.adapters) == []
    # Still there for its owner.
    _, data = await registry.download(a.reader, "mine", version=1)
    assert data


async def test_calls_without_a_token_are_unauthenticated(registry: Registry) -> None:
    await expect_code(
        registry.stub.ListAdapters(pb.ListAdaptersRequest()), grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize(
    "name", ["a/b", "..", "../etc", "a\x00b", "", ".hidden", "x" * 129, "a..b", "sp ace", "é"]
)
async def test_bad_adapter_names_are_invalid(registry_sqlite: Registry, name: str) -> None:
    registry = registry_sqlite
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "valid-name")
    error = await expect_code(
        registry.publish(a.admin, name, package), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "adapter_name" in (error.details() or "")
    await expect_code(
        registry.stub.GetAdapter(pb.GetAdapterRequest(adapter_name=name), metadata=a.admin),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert registry.object_files == []
    assert registry.staging_files == []


async def test_size_limits(registry_sqlite: Registry) -> None:
    registry = registry_sqlite
    a = registry.tenant_a
    package = registry.package(a.tenant_id, "sized")
    error = await expect_code(
        registry.publish(a.admin, "sized", package, size_bytes=MAX_PACKAGE_BYTES + 1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert str(MAX_PACKAGE_BYTES) in (error.details() or "")
    # More bytes than declared, fewer than declared, nothing declared.
    for declared in (len(package) - 1, len(package) + 1, 0):
        await expect_code(
            registry.publish(a.admin, "sized", package, size_bytes=declared),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert registry.object_files == []
    assert registry.staging_files == []


async def test_stream_must_start_with_the_header(registry_sqlite: Registry) -> None:
    registry = registry_sqlite
    a = registry.tenant_a

    def chunks_only() -> Iterator[pb.PublishAdapterRequest]:
        yield pb.PublishAdapterRequest(chunk=b"\x89TGSP")

    await expect_code(
        registry.stub.PublishAdapter(chunks_only(), metadata=a.admin),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_code(
        registry.stub.PublishAdapter(iter(()), metadata=a.admin),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_list_adapters_pages_by_name(registry: Registry) -> None:
    a, b = registry.tenant_a, registry.tenant_b
    names = ["e-five", "a-one", "d-four", "b-two", "c-three"]
    package_cache = {}
    for name in names:
        package_cache[name] = registry.package(a.tenant_id, name)
        await registry.publish(a.admin, name, package_cache[name])
    await registry.publish(b.admin, "b-only", registry.package(b.tenant_id, "b-only"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await registry.stub.ListAdapters(
            pb.ListAdaptersRequest(page_size=2, page_token=token), metadata=a.reader
        )
        assert len(page.adapters) <= 2
        seen += [adapter.name for adapter in page.adapters]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(names)
    assert pages == 3
    everything = await registry.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=a.reader)
    assert [x.name for x in everything.adapters] == sorted(names)
    assert everything.next_page_token == ""
    await expect_code(
        registry.stub.ListAdapters(
            pb.ListAdaptersRequest(page_token="%%%not-a-token"), metadata=a.reader
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_code(
        registry.stub.ListAdapters(pb.ListAdaptersRequest(page_size=-1), metadata=a.reader),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_list_versions_pages_newest_first(registry: Registry) -> None:
    a = registry.tenant_a
    for seed in range(5):
        await registry.publish(
            a.admin, "many", registry.package(a.tenant_id, "many", seed=seed, version=str(seed))
        )
    versions: list[int] = []
    token = ""
    while True:
        page = await registry.stub.ListVersions(
            pb.ListVersionsRequest(adapter_name="many", page_size=2, page_token=token),
            metadata=a.reader,
        )
        versions += [v.version for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert versions == [5, 4, 3, 2, 1]
    await expect_code(
        registry.stub.ListVersions(
            pb.ListVersionsRequest(adapter_name="many", page_token="YWJj"), metadata=a.reader
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_aliases_point_at_versions(registry: Registry) -> None:
    a = registry.tenant_a
    first = registry.package(a.tenant_id, "aliased", seed=1)
    second = registry.package(a.tenant_id, "aliased", seed=2, version="2")
    await registry.publish(a.admin, "aliased", first)
    await registry.publish(a.admin, "aliased", second)
    adapter = (
        await registry.stub.SetAlias(
            pb.SetAliasRequest(adapter_name="aliased", alias="prod", version=1),
            metadata=a.admin,
        )
    ).adapter
    assert dict(adapter.aliases) == {"prod": 1}
    record, data = await registry.download(a.reader, "aliased", alias="prod")
    assert (record.version, data) == (1, first)
    await registry.stub.SetAlias(
        pb.SetAliasRequest(adapter_name="aliased", alias="prod", version=2), metadata=a.admin
    )
    await registry.stub.SetAlias(
        pb.SetAliasRequest(adapter_name="aliased", alias="canary-1", version=1), metadata=a.admin
    )
    record, data = await registry.download(a.reader, "aliased", alias="prod")
    assert (record.version, data) == (2, second)
    got = (
        await registry.stub.GetAdapter(
            pb.GetAdapterRequest(adapter_name="aliased"), metadata=a.reader
        )
    ).adapter
    assert dict(got.aliases) == {"prod": 2, "canary-1": 1}
    await expect_code(
        registry.stub.SetAlias(
            pb.SetAliasRequest(adapter_name="aliased", alias="prod", version=3), metadata=a.admin
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    for alias in ("Prod", "a/b", "", "x" * 33):
        await expect_code(
            registry.stub.SetAlias(
                pb.SetAliasRequest(adapter_name="aliased", alias=alias, version=1),
                metadata=a.admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    await expect_code(
        registry.download(a.reader, "aliased", alias="staging"), grpc.StatusCode.NOT_FOUND
    )


async def test_delete_version_then_adapter_removes_objects(registry: Registry) -> None:
    a = registry.tenant_a
    one = registry.package(a.tenant_id, "doomed", seed=1)
    two = registry.package(a.tenant_id, "doomed", seed=2)
    await registry.publish(a.admin, "doomed", one)  # v1
    await registry.publish(a.admin, "doomed", two)  # v2
    await registry.publish(a.admin, "doomed", one)  # v3: same bytes as v1
    await registry.stub.SetAlias(
        pb.SetAliasRequest(adapter_name="doomed", alias="prod", version=1), metadata=a.admin
    )
    assert len(registry.object_files) == 2

    await registry.stub.DeleteAdapter(
        pb.DeleteAdapterRequest(adapter_name="doomed", version=1), metadata=a.admin
    )
    await expect_code(registry.download(a.reader, "doomed", version=1), grpc.StatusCode.NOT_FOUND)
    # v3 still references the bytes of v1, so the object stays; the alias went with v1.
    assert len(registry.object_files) == 2
    _, data = await registry.download(a.reader, "doomed", version=3)
    assert data == one
    adapter = (
        await registry.stub.GetAdapter(
            pb.GetAdapterRequest(adapter_name="doomed"), metadata=a.admin
        )
    ).adapter
    assert dict(adapter.aliases) == {}
    assert adapter.latest_version == 3
    await expect_code(
        registry.stub.DeleteAdapter(
            pb.DeleteAdapterRequest(adapter_name="doomed", version=1), metadata=a.admin
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await registry.stub.DeleteAdapter(
        pb.DeleteAdapterRequest(adapter_name="doomed", version=2), metadata=a.admin
    )
    assert len(registry.object_files) == 1
    # A new version after a deletion gets a new number, never a reused one.
    assert (await registry.publish(a.admin, "doomed", two)).version == 4

    await registry.stub.DeleteAdapter(
        pb.DeleteAdapterRequest(adapter_name="doomed"), metadata=a.admin
    )
    await expect_code(
        registry.stub.GetAdapter(pb.GetAdapterRequest(adapter_name="doomed"), metadata=a.admin),
        grpc.StatusCode.NOT_FOUND,
    )
    assert registry.object_files == []
    # The name can be used again, from version 1.
    assert (await registry.publish(a.admin, "doomed", one)).version == 1


async def test_shared_object_survives_another_tenants_delete(registry: Registry) -> None:
    a, b = registry.tenant_a, registry.tenant_b
    await registry.publish(a.admin, "x", registry.package(a.tenant_id, "x", seed=1))
    await registry.publish(b.admin, "x", registry.package(b.tenant_id, "x", seed=1))
    assert len(registry.object_files) == 2  # different tenants: different packages
    await registry.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_name="x"), metadata=b.admin)
    assert len(registry.object_files) == 1
    _, data = await registry.download(a.reader, "x")
    assert data


async def test_schema_has_its_own_version_table(registry: Registry) -> None:
    async with registry.domain._store.database.connection(read_only=True) as connection:
        revision = (
            await connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
        ).scalar_one()
        tables = await connection.run_sync(lambda c: sa.inspect(c).get_table_names())
    assert revision == "0002"  # 0002: KEK rotations
    assert {"registry_adapters", "registry_versions", "registry_aliases"} <= set(tables)
