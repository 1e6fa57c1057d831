"""Thin gRPC layer of the auth service: read the caller, call the domain, convert.

Authentication happens in :class:`~tensafe.common.auth.AuthInterceptor` before any
method here runs (except ``ExchangeApiKey`` and ``GetJwks``, which the contract leaves
public); authorisation is decided by :class:`~tensafe.auth.domain.service.AuthDomain`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio

from tensafe.auth import serde
from tensafe.auth.domain.service import AuthDomain
from tensafe.common.auth import current_identity
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AuthServiceServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """``tensafe.auth.v1.AuthService``.

    Args:
        domain: The auth domain.
        on_revocation: Called after a token, principal or tenant was revoked or
            disabled, so this process's own verifier sees it at once.
    """

    def __init__(self, domain: AuthDomain, *, on_revocation: Callable[[], Awaitable[None]]) -> None:
        self._domain = domain
        self._on_revocation = on_revocation

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: Context
    ) -> pb.CreateTenantResponse:
        tenant = await self._domain.create_tenant(
            current_identity(), display_name=request.display_name, request_id=request.request_id
        )
        return pb.CreateTenantResponse(tenant=serde.tenant(tenant))

    async def GetTenant(
        self, request: pb.GetTenantRequest, context: Context
    ) -> pb.GetTenantResponse:
        tenant = await self._domain.get_tenant(current_identity(), request.tenant_id)
        return pb.GetTenantResponse(tenant=serde.tenant(tenant))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: Context
    ) -> pb.ListTenantsResponse:
        page = await self._domain.list_tenants(
            current_identity(), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListTenantsResponse(
            tenants=[serde.tenant(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def DisableTenant(
        self, request: pb.DisableTenantRequest, context: Context
    ) -> pb.DisableTenantResponse:
        tenant = await self._domain.disable_tenant(current_identity(), request.tenant_id)
        await self._on_revocation()
        return pb.DisableTenantResponse(tenant=serde.tenant(tenant))

    async def CreatePrincipal(
        self, request: pb.CreatePrincipalRequest, context: Context
    ) -> pb.CreatePrincipalResponse:
        principal = await self._domain.create_principal(
            current_identity(),
            kind=serde.kind(request.kind),
            name=request.name,
            roles=[serde.role(r) for r in request.roles],
            request_id=request.request_id,
            tenant_id=request.tenant_id,
        )
        return pb.CreatePrincipalResponse(principal=serde.principal(principal))

    async def GetPrincipal(
        self, request: pb.GetPrincipalRequest, context: Context
    ) -> pb.GetPrincipalResponse:
        principal = await self._domain.get_principal(current_identity(), request.principal_id)
        return pb.GetPrincipalResponse(principal=serde.principal(principal))

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: Context
    ) -> pb.ListPrincipalsResponse:
        page = await self._domain.list_principals(
            current_identity(), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListPrincipalsResponse(
            principals=[serde.principal(p) for p in page.items],
            next_page_token=page.next_page_token,
        )

    async def DisablePrincipal(
        self, request: pb.DisablePrincipalRequest, context: Context
    ) -> pb.DisablePrincipalResponse:
        principal = await self._domain.disable_principal(current_identity(), request.principal_id)
        await self._on_revocation()
        return pb.DisablePrincipalResponse(principal=serde.principal(principal))

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        key, secret = await self._domain.create_api_key(
            current_identity(),
            principal_id=request.principal_id,
            description=request.description,
            ttl=serde.duration("ttl", request.ttl, request.HasField("ttl")),
            request_id=request.request_id,
        )
        return pb.CreateApiKeyResponse(api_key=serde.api_key(key), secret=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        page = await self._domain.list_api_keys(
            current_identity(),
            principal_id=request.principal_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListApiKeysResponse(
            api_keys=[serde.api_key(k) for k in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        key = await self._domain.revoke_api_key(current_identity(), request.api_key_id)
        await self._on_revocation()
        return pb.RevokeApiKeyResponse(api_key=serde.api_key(key))

    async def ExchangeApiKey(
        self, request: pb.ExchangeApiKeyRequest, context: Context
    ) -> pb.ExchangeApiKeyResponse:
        token = await self._domain.exchange_api_key(
            request.api_key,
            scopes=list(request.scopes),
            ttl=serde.duration("ttl", request.ttl, request.HasField("ttl")),
        )
        return pb.ExchangeApiKeyResponse(
            access_token=token.token,
            expire_time=serde.timestamp(token.expire_time),
            tenant_id=token.tenant_id,
            principal_id=token.principal_id,
            scopes=list(token.scopes),
        )

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        await self._domain.revoke_token(current_identity(), request.token_id)
        await self._on_revocation()
        return pb.RevokeTokenResponse()

    async def ListRevocations(
        self, request: pb.ListRevocationsRequest, context: Context
    ) -> pb.ListRevocationsResponse:
        revocations = await self._domain.list_revocations(current_identity())
        return pb.ListRevocationsResponse(
            token_ids=sorted(revocations.token_ids),
            disabled_subjects=sorted(revocations.disabled_subjects),
        )

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: Context
    ) -> pb.RotateSigningKeyResponse:
        kid = await self._domain.rotate_signing_key(current_identity())
        return pb.RotateSigningKeyResponse(kid=kid)

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(keys=[serde.jwk(k) for k in await self._domain.jwks()])

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        page = await self._domain.list_audit_events(
            current_identity(), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAuditEventsResponse(
            events=[serde.audit_event(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Context
    ) -> pb.VerifyAuditLogResponse:
        verdict = await self._domain.verify_audit_log(current_identity())
        return pb.VerifyAuditLogResponse(
            ok=verdict.ok,
            entries_checked=verdict.entries_checked,
            first_bad_seq=verdict.first_bad_seq,
            reason=verdict.reason,
        )
