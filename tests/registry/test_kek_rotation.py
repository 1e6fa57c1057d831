"""KEK rotation against a real PKCS#11 token (SoftHSM2): packages published before a
rotation open after it, an interrupted re-wrap is finished by the resumed job, and the
old KEK version can be destroyed only once no package needs it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tensafe import tgsp
from tensafe.client import cli
from tensafe.common.db import Database
from tensafe.common.errors import FailedPrecondition, IntegrityError
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.registry import admin
from tensafe.registry.domain import rotation
from tensafe.registry.domain.rotation import KekRotations
from tensafe.registry.store.objects import LocalObjectStore
from tensafe.registry.store.sql import RegistryStore
from testkit.softhsm import SoftHsmToken

from .conftest import Registry, lora_tensors, package_fields, start_registry


@pytest.fixture
async def registry_hsm(tmp_path: Path, softhsm: SoftHsmToken) -> AsyncIterator[Registry]:
    async for harness in start_registry(
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", tmp_path, **softhsm.settings()
    ):
        yield harness


@pytest.fixture
async def rotations(registry_hsm: Registry) -> AsyncIterator[KekRotations]:
    database = Database.from_url(registry_hsm.config.database_url)
    try:
        yield KekRotations(
            store=RegistryStore(database),
            objects=LocalObjectStore(registry_hsm.config.object_dir),
            keys=registry_hsm.domain.signing_keys,
            kek_provider=registry_hsm.kek,
        )
    finally:
        await database.dispose()


async def opened_tensors(registry: Registry, name: str) -> dict[str, Any]:
    _, data = await registry.download(registry.tenant_a.reader, name, version=1)
    opened = tgsp.open(
        data,
        trusted_keys=[registry.signing_key.verifying_key],
        kek_provider=registry.kek,
        tenant_id=registry.tenant_a.tenant_id,
    )
    return {k: v.tobytes() for k, v in opened.numpy_tensors().items()}


async def test_packages_published_before_a_rotation_open_after_it(
    registry_hsm: Registry, rotations: KekRotations, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = registry_hsm
    a = registry.tenant_a
    names = ["bot-1", "bot-2", "bot-3"]
    originals = {}
    for seed, name in enumerate(names):
        originals[name] = registry.package(a.tenant_id, name, seed=seed)
        await registry.publish(a.admin, name, originals[name])
    legacy = tgsp.write(
        weights=lora_tensors(9),
        kek_provider=registry.kek,
        signing_key=registry.signing_key,
        chunk_size=4096,
        format_version=1,
        **package_fields(a.tenant_id, "legacy"),
    )
    await registry.publish(a.admin, "legacy", legacy)
    old_kek = registry.kek.tenant_kek_ids(a.tenant_id)[0]

    # The job dies after re-wrapping one package (the second re-wrap fails).
    real_rewrap = rotation.rewrap_to
    calls = []

    def failing_rewrap(*args: Any, **kwargs: Any) -> tgsp.WrappedKey:
        calls.append(1)
        if len(calls) == 2:
            raise IntegrityError("injected: the registry died here")
        return real_rewrap(*args, **kwargs)

    monkeypatch.setattr(rotation, "rewrap_to", failing_rewrap)
    with pytest.raises(IntegrityError, match="injected"):
        await rotations.rotate(a.tenant_id)
    monkeypatch.setattr(rotation, "rewrap_to", real_rewrap)
    new_kek = registry.kek.tenant_kek_ids(a.tenant_id)[-1]
    usage = await rotations.usage(a.tenant_id)
    assert len(usage[new_kek]) == 1 and len(usage[old_kek]) == 3  # 2 v2 + legacy left
    with pytest.raises(FailedPrecondition, match="still running"):
        await rotations.destroy(a.tenant_id, old_kek)

    # The resumed job keeps the rotation's KEK version and finishes the rest.
    report = await rotations.rotate(a.tenant_id)
    assert report.resumed and report.kek_id == new_kek
    assert report.rewrapped == 2
    assert report.pinned == ("legacy@1",)
    assert report.kek_ids == (old_kek, new_kek)  # no third version was made

    for seed, name in enumerate(names):
        assert await opened_tensors(registry, name) == {
            k: v.tobytes() for k, v in lora_tensors(seed).items()
        }
        _, data = await registry.download(a.reader, name, version=1)
        assert tgsp.read_envelope(data).wrapped_key.kek_id == new_kek
        assert data[-64:] == originals[name][-64:]  # the same signature
        assert data != originals[name]
    # Tenant B's packages and KEK are untouched.
    assert len(registry.kek.tenant_kek_ids(registry.tenant_b.tenant_id)) == 1

    # The format-1 package still needs the old version; once it is gone, it can go.
    with pytest.raises(FailedPrecondition, match=r"legacy@1"):
        await rotations.destroy(a.tenant_id, old_kek)
    await registry.stub.DeleteAdapter(
        pb.DeleteAdapterRequest(adapter_name="legacy"), metadata=a.admin
    )
    with pytest.raises(FailedPrecondition, match="current KEK"):
        await rotations.destroy(a.tenant_id, new_kek)
    await rotations.destroy(a.tenant_id, old_kek)
    assert registry.kek.tenant_kek_ids(a.tenant_id) == [new_kek]
    for name in names:
        key = await registry.stub.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(adapter_name=name, version=1), metadata=a.reader
        )
        assert len(key.data_key) == 32
        await opened_tensors(registry, name)


async def test_the_operator_commands_rotate_and_report(
    registry_hsm: Registry,
    softhsm: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = registry_hsm
    b = registry.tenant_b
    await registry.publish(b.admin, "b-bot", registry.package(b.tenant_id, "b-bot", seed=4))
    for name, value in {
        **softhsm.env(),
        "TENSAFE_DATABASE_URL": registry.config.database_url,
        "TENSAFE_DATA_DIR": str(registry.config.data_dir),
        "TENSAFE_DEV_MODE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    old = registry.kek.tenant_kek_ids(b.tenant_id)[0]
    assert await _admin("rotate-kek", b.tenant_id) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewrapped"] == 1 and report["kek_ids"][0] == old
    assert await _admin("kek-usage", b.tenant_id) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage == {old: [], report["kek_id"]: ["b-bot@1"]}
    assert await _admin("destroy-kek", b.tenant_id, report["kek_id"]) == 4  # current
    assert await _admin("destroy-kek", b.tenant_id, old) == 0
    _, data = await registry.download(b.reader, "b-bot", version=1)
    tgsp.open(
        data,
        trusted_keys=[registry.signing_key.verifying_key],
        kek_provider=registry.kek,
        tenant_id=b.tenant_id,
    )
    await _expect_unwrap_ok(registry)


async def _admin(*argv: str) -> int:
    return await asyncio.to_thread(admin.main, list(argv))


async def _expect_unwrap_ok(registry: Registry) -> None:
    b = registry.tenant_b
    response = await registry.stub.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(adapter_name="b-bot", version=1), metadata=b.reader
    )
    assert len(response.data_key) == 32


async def test_tensafe_admin_rotate_kek_over_grpc_needs_the_platform_admin(
    registry_hsm: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_hsm
    b = registry.tenant_b
    await registry.publish(b.admin, "b-bot", registry.package(b.tenant_id, "b-bot", seed=4))

    def run(api_key: str) -> int:
        path = tmp_path / "connection.json"
        path.write_text(
            json.dumps(
                {
                    "services": {"auth": registry.auth_address, "registry": registry.address},
                    "api_key": api_key,
                    "data_dir": str(tmp_path / "no-stack"),
                    "dev_mode": False,
                }
            )
        )
        return cli.main(
            ["admin", "rotate-kek", "--tenant", b.tenant_id, "--connection-file", str(path)]
        )

    assert await asyncio.to_thread(run, b.admin_key) == 2  # a tenant admin may not
    assert "platform_admin" in capsys.readouterr().err
    assert len(registry.kek.tenant_kek_ids(b.tenant_id)) == 1
    assert await asyncio.to_thread(run, registry.root_api_key) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewrapped"] == 1 and not report["resumed"]
    assert report["kek_ids"] == registry.kek.tenant_kek_ids(b.tenant_id)
    assert len(report["kek_ids"]) == 2
    await _expect_unwrap_ok(registry)
