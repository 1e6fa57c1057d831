"""Thin gRPC layer of the registry service: validate, call the domain, convert.

Every RPC of the contract is listed here. Those this deployment does not serve yet
raise :class:`~tensafe.common.errors.Unimplemented` (status UNIMPLEMENTED); none
returns a made-up answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc.aio

from tensafe.common.errors import Unimplemented
from tensafe.proto.registry.v1 import registry_service_pb2 as pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(method: str) -> NoReturn:
    raise Unimplemented(
        f"tensafe.registry.v1.RegistryService/{method} is not served by this deployment yet"
    )


class RegistryServiceServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """``tensafe.registry.v1.RegistryService``."""

    async def PublishAdapter(
        self, request_iterator: Any, context: Context
    ) -> pb.PublishAdapterResponse:
        _unimplemented("PublishAdapter")

    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: Context
    ) -> pb.GetAdapterResponse:
        _unimplemented("GetAdapter")

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        _unimplemented("ListAdapters")

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        _unimplemented("ListVersions")

    async def DownloadAdapter(
        self, request: pb.DownloadAdapterRequest, context: Context
    ) -> AsyncIterator[pb.DownloadAdapterResponse]:
        _unimplemented("DownloadAdapter")
        yield pb.DownloadAdapterResponse()

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.SetAliasResponse:
        _unimplemented("SetAlias")

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: Context
    ) -> pb.DeleteAdapterResponse:
        _unimplemented("DeleteAdapter")

    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: Context
    ) -> pb.GetSigningKeysResponse:
        _unimplemented("GetSigningKeys")

    async def UnwrapDataKey(
        self, request: pb.UnwrapDataKeyRequest, context: Context
    ) -> pb.UnwrapDataKeyResponse:
        _unimplemented("UnwrapDataKey")
