"""A tenant with a trainer principal and its API key, made in one go by an admin.

What a first user needs before training: not the platform admin's key (which
``tensafe up`` puts into the connection file) but a tenant of their own and a key that
can train in it. ``tensafe admin create-tenant NAME --trainer USER`` and
``tensafe demo`` both use :func:`create_tenant_with_trainer`.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import grpc

from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb


@dataclasses.dataclass(frozen=True)
class TenantCredentials:
    """A tenant made for a user.

    Attributes:
        tenant_id: The tenant.
        principal_id: Its trainer principal.
        api_key: The principal's API key (secret).
    """

    tenant_id: str
    principal_id: str
    api_key: str


def create_tenant_with_trainer(
    stub: Any,
    name: str,
    *,
    trainer_name: str,
    request_id: str = "",
    description: str = "",
) -> TenantCredentials:
    """Create a tenant, a user principal with the trainer role in it and an API key.

    Args:
        stub: An ``AuthServiceStub`` on a channel authenticated as a platform admin.
        name: The tenant's display name (unique).
        trainer_name: The trainer principal's name.
        request_id: Idempotency key of the tenant's creation (default: a fresh one).
        description: The API key's description.

    Returns:
        The ids and the key's secret (shown once by the auth service).

    Raises:
        TenSafeError: The auth service refused a call.
    """
    try:
        tenant = stub.CreateTenant(
            auth_pb.CreateTenantRequest(
                display_name=name, request_id=request_id or uuid.uuid4().hex
            )
        ).tenant
        principal = stub.CreatePrincipal(
            auth_pb.CreatePrincipalRequest(
                kind=auth_pb.PRINCIPAL_KIND_USER,
                name=trainer_name,
                roles=[auth_pb.ROLE_TRAINER],
                tenant_id=tenant.id,
                request_id=uuid.uuid4().hex,
            )
        ).principal
        key = stub.CreateApiKey(
            auth_pb.CreateApiKeyRequest(
                principal_id=principal.id, description=description or f"{trainer_name} (trainer)"
            )
        )
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    return TenantCredentials(tenant_id=tenant.id, principal_id=principal.id, api_key=key.secret)
