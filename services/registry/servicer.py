"""Thin gRPC layer of the registry service: authorise, call the domain, convert.

Errors are raised as typed domain errors; the shared error interceptor maps them to
status codes (IntegrityError → FAILED_PRECONDITION naming the failed check).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from tensafe.common.auth import current_identity
from tensafe.common.errors import InvalidArgument, PermissionDenied
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry import serde
from tensafe.registry.domain.access import (
    ACTING_TENANT_HEADER,
    TENANT_ID,
    AccessPolicy,
    Action,
    Caller,
)
from tensafe.registry.domain.model import VersionRecord
from tensafe.registry.domain.rotation import KekRotations
from tensafe.registry.domain.service import PublishRequest, RegistryDomain

Context = grpc.aio.ServicerContext[Any, Any]


def _acting_tenant(context: Context) -> str:
    values = [
        str(value)
        for key, value in (context.invocation_metadata() or ())
        if key == ACTING_TENANT_HEADER
    ]
    if len(values) > 1:
        raise InvalidArgument(ACTING_TENANT_HEADER, "must appear at most once")
    return values[0] if values else ""


class RegistryServiceServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """``tensafe.registry.v1.RegistryService``.

    Args:
        domain: The registry's use cases.
        policy: Who may act for other tenants.
        rotations: KEK rotation of tenants.
    """

    def __init__(
        self, domain: RegistryDomain, policy: AccessPolicy, rotations: KekRotations
    ) -> None:
        self._domain = domain
        self._policy = policy
        self._rotations = rotations

    def _caller(self, context: Context, action: Action) -> Caller:
        return self._policy.authorize(current_identity(), action, _acting_tenant(context))

    async def PublishAdapter(
        self, request_iterator: Any, context: Context
    ) -> pb.PublishAdapterResponse:
        """Receive a header and chunks; verify; store; return the new version."""
        caller = self._caller(context, Action.PUBLISH)
        stream: AsyncIterator[pb.PublishAdapterRequest] = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InvalidArgument("header", "the stream is empty") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header")
        header = PublishRequest(
            adapter_name=first.header.adapter_name,
            size_bytes=first.header.size_bytes,
            request_id=first.header.request_id,
        )
        self._domain.check_publish_request(header)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in stream:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header", "only the first message may be a header")
                yield message.chunk

        record = await self._domain.publish(caller, header, chunks())
        return pb.PublishAdapterResponse(version=serde.version_to_proto(record))

    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: Context
    ) -> pb.GetAdapterResponse:
        """An adapter and its latest version number."""
        caller = self._caller(context, Action.READ)
        record = await self._domain.get_adapter(caller, request.adapter_name)
        return pb.GetAdapterResponse(adapter=serde.adapter_to_proto(record))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        """The caller's adapters, paged by name."""
        caller = self._caller(context, Action.READ)
        page = await self._domain.list_adapters(
            caller, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListAdaptersResponse(
            adapters=[serde.adapter_to_proto(a) for a in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        """An adapter's versions, newest first, paged."""
        caller = self._caller(context, Action.READ)
        page = await self._domain.list_versions(
            caller,
            request.adapter_name,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListVersionsResponse(
            versions=[serde.version_to_proto(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def DownloadAdapter(
        self, request: pb.DownloadAdapterRequest, context: Context
    ) -> AsyncIterator[pb.DownloadAdapterResponse]:
        """The version record, then the verified package in chunks."""
        caller = self._caller(context, Action.READ)
        selector = request.WhichOneof("selector")
        parts = self._domain.download(
            caller,
            request.adapter_name,
            version=request.version if selector == "version" else 0,
            alias=request.alias if selector == "alias" else "",
        )
        if selector == "alias" and not request.alias:
            raise InvalidArgument("alias", "must not be empty")
        async for part in parts:
            if isinstance(part, VersionRecord):
                yield pb.DownloadAdapterResponse(version=serde.version_to_proto(part))
            else:
                yield pb.DownloadAdapterResponse(chunk=part)

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.SetAliasResponse:
        """Point an alias at a version."""
        caller = self._caller(context, Action.MANAGE)
        record = await self._domain.set_alias(
            caller, request.adapter_name, request.alias, request.version
        )
        return pb.SetAliasResponse(adapter=serde.adapter_to_proto(record))

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: Context
    ) -> pb.DeleteAdapterResponse:
        """Delete one version, or the adapter (version 0)."""
        caller = self._caller(context, Action.MANAGE)
        await self._domain.delete(caller, request.adapter_name, request.version)
        return pb.DeleteAdapterResponse()

    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: Context
    ) -> pb.GetSigningKeysResponse:
        """The public keys whose package signatures this registry accepts."""
        current_identity()
        return pb.GetSigningKeysResponse(
            keys=[serde.signing_key_to_proto(k) for k in self._domain.signing_keys.trusted]
        )

    async def UnwrapDataKey(
        self, request: pb.UnwrapDataKeyRequest, context: Context
    ) -> pb.UnwrapDataKeyResponse:
        """A package's data key, for its tenant; every unwrap is audited."""
        caller = self._caller(context, Action.UNWRAP)
        key = await self._domain.unwrap_data_key(caller, request.adapter_name, request.version)
        return pb.UnwrapDataKeyResponse(data_key=key)

    async def RotateTenantKek(
        self, request: pb.RotateTenantKekRequest, context: Context
    ) -> pb.RotateTenantKekResponse:
        """Rotate (or resume rotating) a tenant's KEK; platform admins only."""
        identity = current_identity()
        if not identity.is_platform_admin:
            raise PermissionDenied(
                "rotating a tenant's KEK needs the platform_admin scope",
                reason="MISSING_SCOPE",
                metadata={"scopes": "platform_admin"},
            )
        if not TENANT_ID.fullmatch(request.tenant_id):
            raise InvalidArgument("tenant_id", "is not a tenant id")
        report = await self._rotations.rotate(request.tenant_id)
        return pb.RotateTenantKekResponse(
            tenant_id=report.tenant_id,
            kek_id=report.kek_id,
            resumed=report.resumed,
            rewrapped=report.rewrapped,
            pinned_versions=list(report.pinned),
            kek_ids=list(report.kek_ids),
        )
