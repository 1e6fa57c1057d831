"""The production wiring (``tensafe.registry.server.build``): remote token verification
against a real auth server and audit events through a real NATS JetStream into auth's
hash chain."""

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
from tensafe.common.errors import ConfigError
from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.service import UNWRAP_AUDIT_KIND
from tensafe.registry.server import build
from tests.auth.conftest import AuthHarness
from tests.auth.helpers import make_tenant

from .conftest import expect_code, lora_tensors, package_fields


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


async def test_build_serves_with_remote_auth_and_audits_unwraps(
    auth_sqlite: AuthHarness, nats: NatsServer, tmp_path: Path
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
    )
    root = await auth_sqlite.bearer(auth_sqlite.bootstrap.admin_api_key)
    tenant = await make_tenant(auth_sqlite.stub, root, "tenant-w")
    assembly = await build(config)
    kek = tgsp.LocalFileKekProvider(config.kek_dir)  # build created the folder
    kek.create_tenant_kek(tenant.tenant_id)
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
        await consumer.close()
        await server.stop()
        assert assembly.close is not None
        await assembly.close()
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


async def test_build_refuses_to_start_without_a_signing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        RegistryConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", data_dir=tmp_path)
    assert info.value.setting == "TENSAFE_REGISTRY_SIGNING_KEY_FILE"
