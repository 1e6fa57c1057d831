"""Thin gRPC layer of the auth service: validate, call the domain, convert.

Every RPC of the contract is listed here. Those this deployment does not serve yet
raise :class:`~tensafe.common.errors.Unimplemented` (status UNIMPLEMENTED); none
returns a made-up answer.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc.aio

from tensafe.common.errors import Unimplemented
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(method: str) -> NoReturn:
    raise Unimplemented(
        f"tensafe.auth.v1.AuthService/{method} is not served by this deployment yet"
    )


class AuthServiceServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """``tensafe.auth.v1.AuthService``."""

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: Context
    ) -> pb.CreateTenantResponse:
        _unimplemented("CreateTenant")

    async def GetTenant(
        self, request: pb.GetTenantRequest, context: Context
    ) -> pb.GetTenantResponse:
        _unimplemented("GetTenant")

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: Context
    ) -> pb.ListTenantsResponse:
        _unimplemented("ListTenants")

    async def DisableTenant(
        self, request: pb.DisableTenantRequest, context: Context
    ) -> pb.DisableTenantResponse:
        _unimplemented("DisableTenant")

    async def CreatePrincipal(
        self, request: pb.CreatePrincipalRequest, context: Context
    ) -> pb.CreatePrincipalResponse:
        _unimplemented("CreatePrincipal")

    async def GetPrincipal(
        self, request: pb.GetPrincipalRequest, context: Context
    ) -> pb.GetPrincipalResponse:
        _unimplemented("GetPrincipal")

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: Context
    ) -> pb.ListPrincipalsResponse:
        _unimplemented("ListPrincipals")

    async def DisablePrincipal(
        self, request: pb.DisablePrincipalRequest, context: Context
    ) -> pb.DisablePrincipalResponse:
        _unimplemented("DisablePrincipal")

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        _unimplemented("CreateApiKey")

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        _unimplemented("ListApiKeys")

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        _unimplemented("RevokeApiKey")

    async def ExchangeApiKey(
        self, request: pb.ExchangeApiKeyRequest, context: Context
    ) -> pb.ExchangeApiKeyResponse:
        _unimplemented("ExchangeApiKey")

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        _unimplemented("RevokeToken")

    async def ListRevocations(
        self, request: pb.ListRevocationsRequest, context: Context
    ) -> pb.ListRevocationsResponse:
        _unimplemented("ListRevocations")

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: Context
    ) -> pb.RotateSigningKeyResponse:
        _unimplemented("RotateSigningKey")

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        _unimplemented("GetJwks")

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        _unimplemented("ListAuditEvents")

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Context
    ) -> pb.VerifyAuditLogResponse:
        _unimplemented("VerifyAuditLog")
