"""The registry and the HE runtime's adapter loading with KEKs in a real PKCS#11 token
(SoftHSM2, a fresh token per test): publish, download and verify, the audited unwrap,
and an HE-runtime load, all through the token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from tensafe import tgsp
from tensafe.common.auth import ServiceCredentials
from tensafe.common.registry_client import RegistryClient
from tensafe.he_runtime.domain.adapters import RegistryAdapterSource
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry.domain.service import UNWRAP_AUDIT_KIND
from tensafe.tgsp.hsm import Pkcs11KekProvider
from testkit.softhsm import SoftHsmToken

from .conftest import Registry, lora_tensors, package_fields, start_registry


@pytest.fixture
async def registry_hsm(tmp_path: Path, softhsm: SoftHsmToken) -> AsyncIterator[Registry]:
    """Auth and registry on SQLite, the registry's KEKs in the SoftHSM2 token."""
    async for harness in start_registry(
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", tmp_path, **softhsm.settings()
    ):
        yield harness


async def test_publish_download_unwrap_and_he_load_go_through_the_token(
    registry_hsm: Registry,
) -> None:
    registry = registry_hsm
    a = registry.tenant_a
    assert isinstance(registry.kek, Pkcs11KekProvider)
    assert not registry.config.kek_dir.exists()  # no key file anywhere
    package = registry.package(a.tenant_id, "hsm-bot", seed=7)
    published = await registry.publish(a.admin, "hsm-bot", package)
    _, data = await registry.download(a.reader, "hsm-bot", version=published.version)
    assert data == package
    manifest = tgsp.verify(
        data, trusted_keys=[registry.signing_key.verifying_key], expected_tenant=a.tenant_id
    )
    assert manifest.adapter.adapter_id == "hsm-bot"
    opened = tgsp.open(
        data,
        trusted_keys=[registry.signing_key.verifying_key],
        kek_provider=registry.kek,
        tenant_id=a.tenant_id,
    )
    assert all(
        opened.numpy_tensors()[name].tobytes() == tensor.tobytes()
        for name, tensor in lora_tensors(7).items()
    )
    # The registry's audited unwrap, done by the token, returns the package's DEK.
    key = await registry.stub.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(adapter_name="hsm-bot", version=1), metadata=a.reader
    )
    assert len(key.data_key) == 32
    assert [r.kind for r in registry.audit.records].count(UNWRAP_AUDIT_KIND) == 1

    # The HE runtime's loader: download, verify, audited unwrap (acting for the tenant),
    # open. Its weights are the published ones, in the delta's orientation.
    async with grpc.aio.insecure_channel(registry.auth_address) as auth_channel:
        client = RegistryClient(
            grpc.aio.insecure_channel(registry.address),
            ServiceCredentials(auth_channel, registry.he_runtime_api_key),
        )
        source = RegistryAdapterSource(client)
        try:
            loaded = await source.load(tenant_id=a.tenant_id, name="hsm-bot", version=0)
        finally:
            await source.close()
    assert (loaded.version, loaded.rank, loaded.alpha) == (1, 4, 8.0)
    tensors = lora_tensors(7)
    layer = "model.layers.0.self_attn.q_proj"
    prefix = f"base_model.model.{layer}"
    np.testing.assert_array_equal(loaded.layers[layer].lora_a, tensors[f"{prefix}.lora_A.weight"].T)
    events = [r for r in registry.audit.records if r.kind == UNWRAP_AUDIT_KIND]
    assert events[-1].principal_id == registry.he_runtime_principal
    assert events[-1].payload["acting_for_tenant"] is True


async def test_a_package_of_a_tenant_without_a_kek_in_the_token_is_refused(
    registry_hsm: Registry, tmp_path: Path
) -> None:
    registry = registry_hsm
    a = registry.tenant_a
    # Sealed under a local KEK file of the same tenant: the token cannot unwrap it.
    folder = tmp_path / "foreign"
    folder.mkdir(mode=0o700)
    foreign = tgsp.LocalFileKekProvider(folder)
    foreign.create_tenant_kek(a.tenant_id)
    package = tgsp.write(
        weights=lora_tensors(1),
        kek_provider=foreign,
        signing_key=registry.signing_key,
        chunk_size=4096,
        **package_fields(a.tenant_id, "foreign"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.publish(a.admin, "foreign", package)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "wrapped key" in (info.value.details() or "")
