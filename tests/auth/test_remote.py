"""Another service authenticates through the shared interceptor: local verification
against auth's JWKS, per-RPC scopes, and audit events over a real JetStream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.auth.audit_stream import AuditStreamConsumer
from tensafe.common.auth import (
    SCOPE_TRAIN,
    AuditRecord,
    AuthInterceptor,
    GrpcKeySource,
    JetStreamAuditSink,
    JsonWebKey,
    Revocations,
    ServiceCredentials,
    TokenVerifier,
    VerifierOptions,
    audit_stream_config,
    connect_authentication,
    current_identity,
    require_scope,
)
from tensafe.common.config import ServiceConfig
from tensafe.common.errors import ConfigError
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.common.jetstream import JetStream
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc

from .conftest import AuthHarness
from .helpers import bearer, exchange, expect_code, make_tenant


class ProbeService(common_pb2_grpc.FutureServiceServicer):
    """Answers with the caller's identity; ``train`` needs the train scope."""

    async def GetFuture(
        self, request: common_pb2.GetFutureRequest, context: Any
    ) -> common_pb2.GetFutureResponse:
        if request.future_id == "train":
            require_scope(SCOPE_TRAIN)
        identity = current_identity()
        return common_pb2.GetFutureResponse(
            future=common_pb2.Future(id=f"{identity.tenant_id}/{identity.principal_id}")
        )


@dataclasses.dataclass
class CountingSource:
    inner: GrpcKeySource
    jwks_calls: int = 0
    revocation_calls: int = 0

    async def jwks(self) -> Sequence[JsonWebKey]:
        self.jwks_calls += 1
        return await self.inner.jwks()

    async def revocations(self) -> Revocations:
        self.revocation_calls += 1
        return await self.inner.revocations()


@dataclasses.dataclass
class Remote:
    address: str
    source: CountingSource
    verifier: TokenVerifier
    channel: grpc.aio.Channel

    @property
    def stub(self) -> common_pb2_grpc.FutureServiceStub:
        return common_pb2_grpc.FutureServiceStub(self.channel)


@pytest.fixture
def nats(tmp_path: Path) -> Any:
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


@pytest.fixture
async def remote(
    auth_sqlite: AuthHarness, nats: NatsServer, tmp_path: Path
) -> AsyncIterator[Remote]:
    auth_channel = grpc.aio.insecure_channel(auth_sqlite.address)
    credentials = ServiceCredentials(
        auth_channel, auth_sqlite.bootstrap.service_api_keys["registry"]
    )
    source = CountingSource(GrpcKeySource(auth_channel, credentials))
    verifier = TokenVerifier(
        source,
        options=VerifierOptions(
            revocation_ttl_seconds=30,
            revocation_bound_seconds=30,
            max_revocation_staleness_seconds=60,
        ),
    )
    jetstream = await JetStream.connect(audit_stream_config(nats.url), client_name="probe")
    await jetstream.ensure_stream()
    server = GrpcServer(
        config=ServiceConfig(database_url="sqlite+aiosqlite:///unused.db", data_dir=tmp_path),
        services=[
            ServiceRegistration(
                "tensafe.common.v1.FutureService",
                common_pb2_grpc.add_FutureServiceServicer_to_server,
                ProbeService(),
            )
        ],
        interceptors=[AuthInterceptor(verifier, JetStreamAuditSink(jetstream), service="probe")],
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Remote(f"127.0.0.1:{server.port}", source, verifier, channel)
    await channel.close(None)
    await server.stop()
    await verifier.close()
    await jetstream.close()
    await auth_channel.close(None)


async def test_remote_service_verifies_locally_and_authorises_per_rpc(
    auth_sqlite: AuthHarness, remote: Remote
) -> None:
    root = await auth_sqlite.bearer(auth_sqlite.bootstrap.admin_api_key)
    a = await make_tenant(auth_sqlite.stub, root, "tenant-a")
    request = common_pb2.GetFutureRequest(future_id="read")
    for _ in range(20):
        got = await remote.stub.GetFuture(request, metadata=a.admin)
        assert got.future.id == f"{a.tenant_id}/{a.admin_id}"
    reader = await remote.stub.GetFuture(request, metadata=a.reader)
    assert reader.future.id == f"{a.tenant_id}/{a.reader_id}"
    # Keys and revocations were fetched once: the hot path never calls auth.
    assert (remote.source.jwks_calls, remote.source.revocation_calls) == (1, 1)

    await expect_code(
        remote.stub.GetFuture(common_pb2.GetFutureRequest(future_id="train"), metadata=a.reader),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await remote.stub.GetFuture(common_pb2.GetFutureRequest(future_id="train"), metadata=a.admin)
    await expect_code(remote.stub.GetFuture(request), grpc.StatusCode.UNAUTHENTICATED)
    # Probes need no token.
    health = health_pb2_grpc.HealthStub(remote.channel)
    status = await health.Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_remote_service_follows_rotation_and_revocation(
    auth_sqlite: AuthHarness, remote: Remote
) -> None:
    stub = auth_sqlite.stub
    old = await exchange(stub, auth_sqlite.bootstrap.admin_api_key)
    request = common_pb2.GetFutureRequest(future_id="x")
    await remote.stub.GetFuture(request, metadata=bearer(old.access_token))
    rotated = await stub.RotateSigningKey(
        pb.RotateSigningKeyRequest(), metadata=bearer(old.access_token)
    )
    new = await exchange(stub, auth_sqlite.bootstrap.admin_api_key)
    assert jwt.get_unverified_header(new.access_token)["kid"] == rotated.kid
    await remote.stub.GetFuture(request, metadata=bearer(new.access_token))
    await remote.stub.GetFuture(request, metadata=bearer(old.access_token))
    assert remote.source.jwks_calls == 2

    claims = jwt.decode(old.access_token, options={"verify_signature": False})
    await stub.RevokeToken(
        pb.RevokeTokenRequest(token_id=claims["jti"]), metadata=bearer(new.access_token)
    )
    # Within the cache TTL the remote has not seen the revocation; a refresh (what the
    # TTL triggers) makes it effective.
    await remote.verifier.refresh_revocations()
    await expect_code(
        remote.stub.GetFuture(request, metadata=bearer(old.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await remote.stub.GetFuture(request, metadata=bearer(new.access_token))


async def _wait_for_events(
    auth: AuthHarness, root: tuple[tuple[str, str], ...], service: str, count: int
) -> list[pb.AuditEvent]:
    deadline = time.monotonic() + 20
    while True:
        events = [
            e
            for e in (
                await auth.stub.ListAuditEvents(
                    pb.ListAuditEventsRequest(page_size=1000), metadata=root
                )
            ).events
            if e.service == service
        ]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.05)  # polling a condition with a deadline, not a fixed wait


async def test_audit_events_of_other_services_reach_the_chain_once(
    auth_sqlite: AuthHarness, remote: Remote, nats: NatsServer
) -> None:
    consumer = await AuditStreamConsumer.connect(auth_sqlite.domain, nats.url)
    consumer.start()
    try:
        root = await auth_sqlite.bearer(auth_sqlite.bootstrap.admin_api_key)
        a = await make_tenant(auth_sqlite.stub, root, "tenant-a")
        await expect_code(
            remote.stub.GetFuture(
                common_pb2.GetFutureRequest(future_id="train"), metadata=a.reader
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        await expect_code(
            remote.stub.GetFuture(
                common_pb2.GetFutureRequest(future_id="x"), metadata=bearer("bad")
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        # A publisher retry of the same event must not be stored twice.
        async with await JetStream.connect(
            audit_stream_config(nats.url), client_name="retry"
        ) as jetstream:
            sink = JetStreamAuditSink(jetstream)
            record = AuditRecord(kind="key.unwrapped", service="probe", tenant_id=a.tenant_id)
            await sink.record(record)
            await sink.record(record)
        events = await _wait_for_events(auth_sqlite, root, "probe", 3)
    finally:
        await consumer.close()
    assert sorted(e.kind for e in events) == ["auth.failed", "key.unwrapped", "permission.denied"]
    denied = next(e for e in events if e.kind == "permission.denied")
    assert (denied.tenant_id, denied.principal_id) == (a.tenant_id, a.reader_id)
    verdict = await auth_sqlite.stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=root)
    assert verdict.ok, verdict.reason
    # The same event id delivered again (a redelivery) is skipped by the chain.
    assert await auth_sqlite.domain.record_many([record]) == 0


async def test_other_services_refuse_to_start_without_auth_settings(tmp_path: Path) -> None:
    config = ServiceConfig(database_url="sqlite+aiosqlite:///x.db", data_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        await connect_authentication(config, service="registry")
    assert info.value.setting == "TENSAFE_AUTH_URL"
    config = dataclasses.replace(config, auth_url="127.0.0.1:1")
    with pytest.raises(ConfigError) as info:
        await connect_authentication(config, service="registry")
    assert info.value.setting == "TENSAFE_SERVICE_API_KEY"


@dataclasses.dataclass
class ListSink:
    records: list[AuditRecord] = dataclasses.field(default_factory=list)

    async def record(self, record: AuditRecord) -> None:
        self.records.append(record)


class NoKeys:
    async def jwks(self) -> Sequence[JsonWebKey]:
        return []

    async def revocations(self) -> Revocations:
        return Revocations()


async def test_a_flood_of_bad_tokens_is_recorded_as_a_count(tmp_path: Path) -> None:
    sink = ListSink()
    now = [100.0]
    server = GrpcServer(
        config=ServiceConfig(database_url="sqlite+aiosqlite:///unused.db", data_dir=tmp_path),
        services=[
            ServiceRegistration(
                "tensafe.common.v1.FutureService",
                common_pb2_grpc.add_FutureServiceServicer_to_server,
                ProbeService(),
            )
        ],
        interceptors=[
            AuthInterceptor(
                TokenVerifier(NoKeys()),
                sink,
                service="probe",
                max_failure_events_per_second=2,
                clock=lambda: now[0],
            )
        ],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = common_pb2_grpc.FutureServiceStub(channel)
            request = common_pb2.GetFutureRequest(future_id="x")
            for _ in range(5):
                await expect_code(stub.GetFuture(request), grpc.StatusCode.UNAUTHENTICATED)
            assert [r.kind for r in sink.records] == ["auth.failed"] * 2
            now[0] += 1.0
            await expect_code(stub.GetFuture(request), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await server.stop()
    assert [r.kind for r in sink.records[2:]] == ["auth.failed.suppressed", "auth.failed"]
    assert sink.records[2].payload == {"count": 3}
