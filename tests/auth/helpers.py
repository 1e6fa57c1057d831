"""Shared steps of the auth tests."""

from __future__ import annotations

import dataclasses

import grpc
import grpc.aio
import pytest

from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def exchange(
    stub: auth_service_pb2_grpc.AuthServiceStub, api_key: str
) -> pb.ExchangeApiKeyResponse:
    return await stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=api_key))


@dataclasses.dataclass
class TenantUsers:
    tenant_id: str
    admin_id: str
    admin_key: str
    admin: Metadata
    reader_id: str
    reader_key: str
    reader: Metadata
    admin_key_id: str


async def make_tenant(
    stub: auth_service_pb2_grpc.AuthServiceStub, root: Metadata, name: str
) -> TenantUsers:
    """A tenant with an admin and a reader, each with an API key and a token."""
    tenant = (
        await stub.CreateTenant(pb.CreateTenantRequest(display_name=name), metadata=root)
    ).tenant
    ids: dict[str, str] = {}
    keys: dict[str, pb.CreateApiKeyResponse] = {}
    for user, role in (("admin", pb.ROLE_ADMIN), ("reader", pb.ROLE_READER)):
        principal = (
            await stub.CreatePrincipal(
                pb.CreatePrincipalRequest(
                    kind=pb.PRINCIPAL_KIND_USER, name=user, roles=[role], tenant_id=tenant.id
                ),
                metadata=root,
            )
        ).principal
        ids[user] = principal.id
        keys[user] = await stub.CreateApiKey(
            pb.CreateApiKeyRequest(principal_id=principal.id), metadata=root
        )
    admin_token = await exchange(stub, keys["admin"].secret)
    reader_token = await exchange(stub, keys["reader"].secret)
    return TenantUsers(
        tenant_id=tenant.id,
        admin_id=ids["admin"],
        admin_key=keys["admin"].secret,
        admin=bearer(admin_token.access_token),
        reader_id=ids["reader"],
        reader_key=keys["reader"].secret,
        reader=bearer(reader_token.access_token),
        admin_key_id=keys["admin"].api_key.id,
    )


async def expect_code(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value
