"""Fixtures of the registry tests: a real auth server and a real registry server over
loopback, both on SQLite or on PostgreSQL (one fresh database per test, shared by the
two services as a deployment may share one), real tokens for tenants with admin and
reader principals and for platform service accounts, real TGSP packages."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import numpy as np
import pytest

from tensafe import tgsp
from tensafe.common.auth import (
    AuditRecord,
    AuthInterceptor,
    GrpcKeySource,
    ServiceCredentials,
    TokenVerifier,
)
from tensafe.common.grpc_server import GrpcServer
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry.config import RegistryConfig
from tensafe.registry.domain.keys import DEV_SIGNING_KEY_FILE
from tensafe.registry.domain.service import RegistryDomain
from tensafe.registry.server import build_service
from tests.auth.conftest import Clock, auth_sqlite, database_url, sqlite_url, start_auth
from tests.auth.conftest import new_kek as new_auth_kek
from tests.auth.helpers import Metadata, TenantUsers, bearer, exchange, make_tenant

__all__ = ["auth_sqlite", "database_url", "sqlite_url"]

CHUNK = 64 * 1024
MAX_PACKAGE_BYTES = 256 * 1024


class RecordedAudit:
    """Keeps the events the registry and its interceptor record, in order."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def record(self, record: AuditRecord) -> None:
        self.records.append(record)

    def kinds(self) -> list[str]:
        return [r.kind for r in self.records]


def lora_tensors(seed: int, *, width: int = 32, rank: int = 4) -> dict[str, np.ndarray[Any, Any]]:
    """LoRA A/B pairs as PEFT names them, random so that no two seeds agree."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, width), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((width, rank), dtype=np.float32)
    return tensors


def package_fields(tenant_id: str, adapter_id: str, version: str = "1") -> dict[str, Any]:
    """Manifest fields of a trainer-published adapter."""
    return {
        "adapter": tgsp.AdapterRef(adapter_id=adapter_id, version=version),
        "base_model": tgsp.BaseModelRef(model_id="tiny-llama", weights_sha256="cd" * 32),
        "lora": tgsp.LoraSpec(
            rank=4, alpha=8, dropout=0.0, target_modules=("q_proj",), task_type="CAUSAL_LM"
        ),
        "dp_certificate": tgsp.DPGuarantee(
            epsilon=3.0,
            delta=1e-5,
            accountant="rdp",
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            sampling=tgsp.ClientBatches(),
            steps=10,
            assumptions=("each client-supplied example appears at most once per step",),
        ),
        "provenance": tgsp.Provenance(
            tenant_id=tenant_id,
            training_client_id="tc-1",
            code_version="0.1.0+test",
            created_at=dt.datetime(2026, 11, 25, 12, 0, 0, 0, tzinfo=dt.UTC),
        ),
    }


def principal_of(token_metadata: Metadata) -> str:
    """The principal id inside a bearer token (read, not verified: the server verifies)."""
    token = token_metadata[0][1].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims["principal"])


@dataclasses.dataclass
class Registry:
    """A running auth + registry pair and handles into it."""

    config: RegistryConfig
    domain: RegistryDomain
    channel: grpc.aio.Channel
    audit: RecordedAudit
    kek: tgsp.KekProvider
    signing_key: tgsp.SigningKey
    tenant_a: TenantUsers
    tenant_b: TenantUsers
    he_runtime: Metadata
    he_runtime_principal: str
    he_runtime_api_key: str
    root_api_key: str
    root: Metadata
    address: str
    auth_address: str

    @property
    def stub(self) -> registry_service_pb2_grpc.RegistryServiceStub:
        return registry_service_pb2_grpc.RegistryServiceStub(self.channel)

    @property
    def object_files(self) -> list[Path]:
        return sorted((self.config.object_dir / "sha256").rglob("*/*"))

    @property
    def staging_files(self) -> list[Path]:
        return sorted((self.config.object_dir / "staging").iterdir())

    def package(
        self,
        tenant_id: str,
        adapter_id: str,
        *,
        seed: int = 0,
        version: str = "1",
        signing_key: tgsp.SigningKey | None = None,
    ) -> bytes:
        """A real TGSP package of ``tenant_id`` sealed under the registry's KEK provider."""
        return tgsp.write(
            weights=lora_tensors(seed),
            kek_provider=self.kek,
            signing_key=signing_key or self.signing_key,
            chunk_size=4096,
            **package_fields(tenant_id, adapter_id, version),
        )

    async def publish(
        self,
        metadata: Metadata,
        name: str,
        package: bytes,
        *,
        request_id: str = "",
        size_bytes: int | None = None,
        chunk: int = CHUNK,
    ) -> pb.AdapterVersion:
        def messages() -> Iterator[pb.PublishAdapterRequest]:
            yield pb.PublishAdapterRequest(
                header=pb.PublishAdapterHeader(
                    adapter_name=name,
                    size_bytes=len(package) if size_bytes is None else size_bytes,
                    request_id=request_id,
                )
            )
            for start in range(0, len(package), chunk):
                yield pb.PublishAdapterRequest(chunk=package[start : start + chunk])

        response = await self.stub.PublishAdapter(messages(), metadata=metadata)
        return response.version

    async def download(
        self, metadata: Metadata, name: str, *, version: int = 0, alias: str = ""
    ) -> tuple[pb.AdapterVersion, bytes]:
        request = (
            pb.DownloadAdapterRequest(adapter_name=name, alias=alias)
            if alias
            else pb.DownloadAdapterRequest(adapter_name=name, version=version)
        )
        record: pb.AdapterVersion | None = None
        data = bytearray()
        async for part in self.stub.DownloadAdapter(request, metadata=metadata):
            if part.WhichOneof("part") == "version":
                assert record is None, "the version must come once, first"
                record = part.version
            else:
                assert record is not None, "a chunk came before the version"
                data += part.chunk
        assert record is not None
        return record, bytes(data)


def acting(metadata: Metadata, tenant_id: str) -> Metadata:
    """Service metadata plus the acting-tenant header."""
    return (*metadata, ("x-tensafe-acting-tenant", tenant_id))


async def start_registry(
    database_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Registry]:
    clock = Clock()
    auth_server, auth_domain, auth_db, auth_verifier = await start_auth(
        database_url, tmp_path / "auth", kek=new_auth_kek(), clock=clock
    )
    boot = await auth_domain.bootstrap(
        tenant_name="platform", admin_name="root", service_accounts=["registry", "he_runtime"]
    )
    auth_address = f"127.0.0.1:{auth_server.port}"
    auth_channel = grpc.aio.insecure_channel(auth_address)
    auth_stub = auth_service_pb2_grpc.AuthServiceStub(auth_channel)
    root = bearer((await exchange(auth_stub, boot.admin_api_key)).access_token)
    he_runtime = bearer(
        (await exchange(auth_stub, boot.service_api_keys["he_runtime"])).access_token
    )
    he_principal = principal_of(he_runtime)
    tenant_a = await make_tenant(auth_stub, root, "tenant-a")
    tenant_b = await make_tenant(auth_stub, root, "tenant-b")

    data_dir = tmp_path / "registry"
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "dev_mode": True,
        "registry_max_package_bytes": MAX_PACKAGE_BYTES,
        "registry_chunk_bytes": CHUNK,
        "registry_acting_service_principals": (he_principal,),
        "registry_platform_tenant_id": boot.tenant.id,
    }
    # A callable override is given the two tenants (their ids exist only now).
    values.update({k: v(tenant_a, tenant_b) if callable(v) else v for k, v in overrides.items()})
    config = RegistryConfig(**values)
    # The registry verifies tokens remotely, as in production: JWKS and revocations
    # from the auth server, with the registry's own service-account credentials.
    credentials = ServiceCredentials(auth_channel, boot.service_api_keys["registry"])
    verifier = TokenVerifier(GrpcKeySource(auth_channel, credentials))
    audit = RecordedAudit()
    assembly, domain = await build_service(
        config,
        audit=audit,
        interceptors=[AuthInterceptor(verifier, audit, service="registry")],
    )
    server = GrpcServer(
        config=config, services=assembly.services, interceptors=assembly.interceptors
    )
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    kek = config.open_kek_provider(config.kek_dir)  # the registry's provider, a 2nd handle
    for tenant in (tenant_a, tenant_b):
        # The explicit administrative path (`python -m tensafe.registry.admin`).
        kek.create_tenant_kek(tenant.tenant_id)
    signing_key = tgsp.SigningKey.from_pem((data_dir / DEV_SIGNING_KEY_FILE).read_bytes())
    try:
        yield Registry(
            config=config,
            domain=domain,
            channel=channel,
            audit=audit,
            kek=kek,
            signing_key=signing_key,
            tenant_a=tenant_a,
            tenant_b=tenant_b,
            he_runtime=he_runtime,
            he_runtime_principal=he_principal,
            he_runtime_api_key=boot.service_api_keys["he_runtime"],
            root_api_key=boot.admin_api_key,
            root=root,
            address=f"127.0.0.1:{port}",
            auth_address=auth_address,
        )
    finally:
        kek.close()
        await channel.close()
        await server.stop()
        assert assembly.close is not None
        await assembly.close()
        await verifier.close()
        await auth_channel.close()
        await auth_server.stop()
        await auth_verifier.close()
        await auth_db.dispose()


@pytest.fixture
async def registry(database_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    """Auth and registry on SQLite and on PostgreSQL."""
    async for harness in start_registry(database_url, tmp_path):
        yield harness


@pytest.fixture
async def registry_sqlite(tmp_path: Path) -> AsyncIterator[Registry]:
    """Auth and registry on SQLite only (for tests that do not depend on the back end)."""
    async for harness in start_registry(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", tmp_path):
        yield harness


async def expect_code(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await ``call`` and return its error, which must have ``code``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value


def flip(data: bytes, offset: int) -> bytes:
    """``data`` with one bit of one byte flipped."""
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def names(items: Sequence[Any]) -> list[str]:
    return [item.name for item in items]
