"""Signers bound to tenants: a package signed by a trusted key that is bound to tenant A,
published for tenant B, is refused by the registry, by the HE runtime's adapter loader
and by the SDK, each checking a trust list pinned on its own side."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tensafe import tgsp
from tensafe.client.registry import RegistryClient as SdkRegistryClient
from tensafe.common.auth import ServiceCredentials
from tensafe.common.errors import IntegrityError, InvalidArgument
from tensafe.common.registry_client import RegistryClient
from tensafe.he_runtime.domain.adapters import RegistryAdapterSource
from tests.auth.helpers import TenantUsers

from .conftest import Registry, expect_code, lora_tensors, package_fields, start_registry

TENANT_KEY = tgsp.SigningKey.generate()
"""A key tenant A's own tooling signs with (e.g. `tensafe registry import`)."""


def pinned(registry: Registry) -> tgsp.TrustList:
    """The trust list a reader pins: the registry's key for every tenant, TENANT_KEY
    for tenant A only."""
    return tgsp.TrustList(
        [
            tgsp.TrustedSigner(
                key=registry.signing_key.verifying_key, tenants=frozenset({tgsp.EVERY_TENANT})
            ),
            tgsp.TrustedSigner(
                key=TENANT_KEY.verifying_key, tenants=frozenset({registry.tenant_a.tenant_id})
            ),
        ]
    )


def signed_by_tenant_key(registry: Registry, tenant_id: str, name: str) -> bytes:
    return tgsp.write(
        weights=lora_tensors(11),
        kek_provider=registry.kek,
        signing_key=TENANT_KEY,
        chunk_size=4096,
        **package_fields(tenant_id, name),
    )


def trust_list_file(path: Path) -> Callable[[TenantUsers, TenantUsers], Path]:
    def write(tenant_a: TenantUsers, tenant_b: TenantUsers) -> Path:
        listed = tgsp.TrustList(
            [
                tgsp.TrustedSigner(
                    key=TENANT_KEY.verifying_key, tenants=frozenset({tenant_a.tenant_id})
                )
            ]
        )
        path.write_text(json.dumps(listed.to_json()))
        return path

    return write


@pytest.fixture
async def bound_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry whose trust list binds TENANT_KEY to tenant A only."""
    async for harness in start_registry(
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        tmp_path,
        registry_trust_list_file=trust_list_file(tmp_path / "trust-list.json"),
    ):
        yield harness


@pytest.fixture
async def lax_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry that trusts TENANT_KEY for every tenant (misconfigured or compromised)."""
    key_file = tmp_path / "tenant-key.pub.pem"
    key_file.write_bytes(TENANT_KEY.verifying_key.to_pem())
    async for harness in start_registry(
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        tmp_path,
        registry_trusted_signing_key_files=(key_file,),
    ):
        yield harness


async def test_the_registry_refuses_a_key_signing_for_a_tenant_it_is_not_bound_to(
    bound_registry: Registry,
) -> None:
    registry = bound_registry
    a, b = registry.tenant_a, registry.tenant_b
    await registry.publish(a.admin, "own", signed_by_tenant_key(registry, a.tenant_id, "own"))
    error = await expect_code(
        registry.publish(
            b.admin, "foreign", signed_by_tenant_key(registry, b.tenant_id, "foreign")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "signer not bound to tenant" in (error.details() or "")
    # The registry's own key still signs for every tenant.
    await registry.publish(b.admin, "platform", registry.package(b.tenant_id, "platform"))


async def test_the_he_runtime_and_the_sdk_refuse_it_whatever_the_registry_says(
    lax_registry: Registry, tmp_path: Path
) -> None:
    registry = lax_registry
    b = registry.tenant_b
    # The registry accepts it: its own trust list lets TENANT_KEY sign for anyone.
    await registry.publish(
        b.admin, "smuggled", signed_by_tenant_key(registry, b.tenant_id, "smuggled")
    )
    await registry.publish(b.admin, "fine", registry.package(b.tenant_id, "fine", seed=2))

    async with grpc.aio.insecure_channel(registry.auth_address) as auth_channel:
        source = RegistryAdapterSource(
            RegistryClient(
                grpc.aio.insecure_channel(registry.address),
                ServiceCredentials(auth_channel, registry.he_runtime_api_key),
            ),
            trust=pinned(registry),
        )
        try:
            with pytest.raises(IntegrityError, match="signer not bound to tenant"):
                await source.load(tenant_id=b.tenant_id, name="smuggled", version=0)
            loaded = await source.load(tenant_id=b.tenant_id, name="fine", version=0)
            assert loaded.rank == 4
        finally:
            await source.close()

    connection = tmp_path / "connection.json"
    connection.write_text(
        json.dumps(
            {
                "services": {"auth": registry.auth_address, "registry": registry.address},
                "api_key": b.admin_key,
                "data_dir": str(tmp_path / "no-stack"),
                "dev_mode": False,
            }
        )
    )

    def sdk_open(trust_list: tgsp.TrustList | None, name: str) -> tgsp.OpenedAdapter:
        with SdkRegistryClient.connect(connection_file=connection, trust_list=trust_list) as client:
            return client.open(name)

    with pytest.raises(IntegrityError, match="signer not bound to tenant"):
        await asyncio.to_thread(sdk_open, pinned(registry), "smuggled")
    assert (await asyncio.to_thread(sdk_open, pinned(registry), "fine")).manifest.tenant_id == (
        b.tenant_id
    )
    # Unpinned, the SDK takes the registry's word, which is the weakness pinning removes.
    await asyncio.to_thread(sdk_open, None, "smuggled")


def test_trust_lists_round_trip_and_refuse_malformed_files(tmp_path: Path) -> None:
    listed = tgsp.TrustList(
        [tgsp.TrustedSigner(key=TENANT_KEY.verifying_key, tenants=frozenset({"t-1", "t-2"}))]
    )
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(listed.to_json()))
    again = tgsp.TrustList.from_file(path)
    again.check(TENANT_KEY.key_id, "t-2")
    with pytest.raises(IntegrityError, match="signer not bound to tenant"):
        again.check(TENANT_KEY.key_id, "t-3")
    for bad in (
        {},
        {"signers": []},
        {"signers": [{"public_key": "!", "tenants": ["a"]}]},
        {"signers": [{"public_key": "AAAA", "tenants": []}]},
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidArgument):
            tgsp.TrustList.from_file(path)
