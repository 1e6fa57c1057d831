"""The production wiring (``tensafe.registry.server.build``): remote token verification
against a real auth server, KEKs in a real PKCS#11 token (SoftHSM2), and audit events
through a real NATS JetStream into auth's hash chain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tensafe import tgsp
from tensafe.auth.audit_stream import AuditStreamConsumer
from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError
from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry import admin
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.service import UNWRAP_AUDIT_KIND
from tensafe.registry.server import build
from testkit.softhsm import SoftHsmToken
from tests.auth.conftest import AuthHarness
from tests.auth.helpers import make_tenant

from .conftest import expect_code, lora_tensors, package_fields


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


async def test_build_serves_with_remote_auth_and_audits_unwraps(
    auth_sqlite: AuthHarness, nats: NatsServer, tmp_path: Path, softhsm: SoftHsmToken
) -> None:
    signing_key = tgsp.SigningKey.generate()
    key_file = tmp_path / "registry-signing.pem"
    key_file.write_bytes(signing_key.to_pem())
    key_file.chmod(0o600)
    config = RegistryConfig(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
        data_dir=tmp_path / "registry",
        auth_url=auth_sqlite.address,
        service_api_key=auth_sqlite.bootstrap.service_api_keys["registry"],
        nats_url=nats.url,
        registry_signing_key_file=key_file,
        **softhsm.settings(),
    )
    root = await auth_sqlite.bearer(auth_sqlite.bootstrap.admin_api_key)
    tenant = await make_tenant(auth_sqlite.stub, root, "tenant-w")
    assembly = await build(config)
    # The operator's path: `python -m tensafe.registry.admin create-tenant-kek TENANT`.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**softhsm.env(), **registry_env(config)}.items():
            patch.setenv(name, value)
        assert admin.main(["create-tenant-kek", tenant.tenant_id]) == 0
        assert admin.main(["create-tenant-kek", tenant.tenant_id]) == 3  # never replaced
    kek = config.open_kek_provider(config.kek_dir)  # the trainer's side of the token
    server = GrpcServer(
        config=config, services=assembly.services, interceptors=assembly.interceptors
    )
    consumer = await AuditStreamConsumer.connect(auth_sqlite.domain, nats.url)
    consumer.start()
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            await expect_code(
                stub.ListAdapters(pb.ListAdaptersRequest()), grpc.StatusCode.UNAUTHENTICATED
            )
            keys = (
                await stub.GetSigningKeys(pb.GetSigningKeysRequest(), metadata=tenant.reader)
            ).keys
            assert [k.key_id for k in keys] == [signing_key.key_id]
            package = tgsp.write(
                weights=lora_tensors(2),
                kek_provider=kek,
                signing_key=signing_key,
                **package_fields(tenant.tenant_id, "wired"),
            )

            def requests() -> Iterator[pb.PublishAdapterRequest]:
                yield pb.PublishAdapterRequest(
                    header=pb.PublishAdapterHeader(adapter_name="wired", size_bytes=len(package))
                )
                yield pb.PublishAdapterRequest(chunk=package)

            await expect_code(
                stub.PublishAdapter(requests(), metadata=tenant.reader),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            version = (await stub.PublishAdapter(requests(), metadata=tenant.admin)).version
            key = await stub.UnwrapDataKey(
                pb.UnwrapDataKeyRequest(adapter_name="wired", version=version.version),
                metadata=tenant.reader,
            )
            assert len(key.data_key) == 32
            events = await wait_for_events(auth_sqlite, root, 3)
    finally:
        kek.close()
        await consumer.close()
        await server.stop()
        assert assembly.close is not None
        await assembly.close()
    assert not config.kek_dir.exists()  # no key file anywhere: the KEK is in the token
    kinds = sorted(e.kind for e in events)
    assert kinds == ["auth.failed", "permission.denied", UNWRAP_AUDIT_KIND]
    unwrap = next(e for e in events if e.kind == UNWRAP_AUDIT_KIND)
    assert (unwrap.tenant_id, unwrap.principal_id) == (tenant.tenant_id, tenant.reader_id)
    verdict = await auth_sqlite.stub.VerifyAuditLog(auth_pb.VerifyAuditLogRequest(), metadata=root)
    assert verdict.ok, verdict.reason


async def wait_for_events(
    auth: AuthHarness, root: tuple[tuple[str, str], ...], count: int
) -> list[auth_pb.AuditEvent]:
    deadline = time.monotonic() + 20
    while True:
        response = await auth.stub.ListAuditEvents(
            auth_pb.ListAuditEventsRequest(page_size=1000), metadata=root
        )
        events = [e for e in response.events if e.service == "registry"]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)  # polling a condition with a deadline, not a fixed wait


def registry_env(config: RegistryConfig) -> dict[str, str]:
    return {
        "TENSAFE_DATABASE_URL": config.database_url,
        "TENSAFE_DATA_DIR": str(config.data_dir),
        "TENSAFE_REGISTRY_SIGNING_KEY_FILE": str(config.registry_signing_key_file),
    }


async def test_build_refuses_to_start_without_a_signing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        RegistryConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", data_dir=tmp_path)
    assert info.value.setting == "TENSAFE_REGISTRY_SIGNING_KEY_FILE"


def test_the_local_file_kek_provider_is_refused_outside_dev_mode(tmp_path: Path) -> None:
    key_file = tmp_path / "registry-signing.pem"
    key_file.write_bytes(tgsp.SigningKey.generate().to_pem())
    key_file.chmod(0o600)
    common = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
        "data_dir": tmp_path,
        "registry_signing_key_file": key_file,
    }
    with pytest.raises(ConfigError, match="dev mode") as info:
        RegistryConfig(**common)  # local-file is the default, and only for dev mode
    assert info.value.setting == "TENSAFE_KEK_PROVIDER"
    with pytest.raises(ConfigError) as info:
        RegistryConfig(**common, kek_provider="local-file")
    assert info.value.setting == "TENSAFE_KEK_PROVIDER"
    with pytest.raises(ConfigError) as info:
        RegistryConfig(**common, kek_provider="pkcs11", kek_pkcs11_module=Path("/x.so"))
    assert info.value.setting == "TENSAFE_KEK_PKCS11_TOKEN_LABEL"
    # From the environment, as the process starts: the error names the setting.
    environ = {
        "TENSAFE_DATABASE_URL": str(common["database_url"]),
        "TENSAFE_DATA_DIR": str(tmp_path),
        "TENSAFE_REGISTRY_SIGNING_KEY_FILE": str(key_file),
        "TENSAFE_KEK_PROVIDER": "local-file",
    }
    with pytest.raises(ConfigError) as info:
        load_config(RegistryConfig, environ)
    assert info.value.setting == "TENSAFE_KEK_PROVIDER"
    assert RegistryConfig(**common, dev_mode=True).kek_provider == "local-file"
