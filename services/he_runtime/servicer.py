"""Thin gRPC layer of the he runtime service: validate, call the domain, convert.

Every RPC of the contract is listed here. Those this deployment does not serve yet
raise :class:`~tensafe.common.errors.Unimplemented` (status UNIMPLEMENTED); none
returns a made-up answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc.aio

from tensafe.common.errors import Unimplemented
from tensafe.proto.he.v1 import he_service_pb2 as pb
from tensafe.proto.he.v1 import he_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(method: str) -> NoReturn:
    raise Unimplemented(
        f"tensafe.he.v1.HeRuntimeService/{method} is not served by this deployment yet"
    )


class HeRuntimeServiceServicer(he_service_pb2_grpc.HeRuntimeServiceServicer):
    """``tensafe.he.v1.HeRuntimeService``."""

    async def CompilePlan(
        self, request: pb.CompilePlanRequest, context: Context
    ) -> pb.CompilePlanResponse:
        _unimplemented("CompilePlan")

    async def CreateSession(
        self, request_iterator: Any, context: Context
    ) -> pb.CreateSessionResponse:
        _unimplemented("CreateSession")

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        _unimplemented("GetSession")

    async def ApplyLora(
        self, request_iterator: Any, context: Context
    ) -> AsyncIterator[pb.ApplyLoraResponse]:
        _unimplemented("ApplyLora")
        yield pb.ApplyLoraResponse()

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Context
    ) -> pb.CloseSessionResponse:
        _unimplemented("CloseSession")
