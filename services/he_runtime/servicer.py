"""Thin gRPC layer of the HE runtime: identify the caller, reassemble streams, convert.

The domain (:mod:`tensafe.he_runtime.domain.sessions`) does the work and raises typed
errors, which the shared interceptor maps to status codes. The caller's tenant comes
from :func:`caller_tenant`, the one place that reads the identity. Streams are bounded
here: Galois keys by the header's declared size (itself bounded by the session key
limit), ciphertexts by ``max_apply_bytes``; results go back in chunks of at most
:data:`RESPONSE_CHUNK_BYTES`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from tensafe.common.auth import SCOPE_READ, SCOPE_TRAIN, require_scope
from tensafe.common.errors import InvalidArgument, ResourceExhausted
from tensafe.he_runtime import serde
from tensafe.he_runtime.domain.plans import compile_for
from tensafe.he_runtime.domain.sessions import HeSessions, Session
from tensafe.proto.he.v1 import he_service_pb2 as pb
from tensafe.proto.he.v1 import he_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

RESPONSE_CHUNK_BYTES = 1024 * 1024
"""Largest ciphertext chunk sent back (1 MiB), well under any message limit."""

_INLINE_RESPONSE_MARGIN = 64 * 1024
"""Bytes of an ApplyLoraInline response kept for its framing and summary."""


def caller_tenant(*scopes: str) -> str:
    """The tenant of the authenticated caller, checked for ``scopes``.

    Raises:
        Unauthenticated: No identity (the auth interceptor is not installed).
        PermissionDenied: A scope is missing.
    """
    return require_scope(*scopes).tenant_id


class HeRuntimeServiceServicer(he_service_pb2_grpc.HeRuntimeServiceServicer):
    """``tensafe.he.v1.HeRuntimeService``.

    Args:
        sessions: The HE sessions domain.
        max_message_bytes: The server's message size limit (an ApplyLoraInline
            response must fit it).
    """

    def __init__(self, sessions: HeSessions, *, max_message_bytes: int) -> None:
        self._sessions = sessions
        self._max_message_bytes = max_message_bytes

    async def CompilePlan(
        self, request: pb.CompilePlanRequest, context: Context
    ) -> pb.CompilePlanResponse:
        """Compile a plan for a spec, without a session."""
        caller_tenant(SCOPE_READ)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        plan, reason = compile_for(serde.spec_from_proto(request.spec, field="spec"))
        return pb.CompilePlanResponse(plan=serde.plan_to_proto(plan, reason))

    async def CreateSession(
        self, request_iterator: AsyncIterator[pb.CreateSessionRequest], context: Context
    ) -> pb.CreateSessionResponse:
        """Open a session: a header, then the Galois keys in chunks."""
        tenant = caller_tenant(SCOPE_TRAIN)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header")
        header = serde.header_from_proto(first.header)

        async def key_chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("part") != "galois_keys_chunk":
                    raise InvalidArgument("header", "only the first message may be a header")
                yield message.galois_keys_chunk

        session = await self._sessions.create(tenant, header, key_chunks())
        return pb.CreateSessionResponse(
            session=serde.session_to_proto(session, expire_time=self._sessions.expire_time(session))
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        """Return one of the caller's sessions (and keep it alive)."""
        session = await self._sessions.get(caller_tenant(SCOPE_READ), request.session_id)
        return pb.GetSessionResponse(
            session=serde.session_to_proto(session, expire_time=self._sessions.expire_time(session))
        )

    async def ApplyLora(
        self, request_iterator: AsyncIterator[pb.ApplyLoraRequest], context: Context
    ) -> AsyncIterator[pb.ApplyLoraResponse]:
        """Receive a batch of ciphertexts, apply the layer's delta (and those of
        ``header.more_layers``, on the same ciphertexts), stream the results."""
        tenant = caller_tenant(SCOPE_TRAIN)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header")
        session = await self._session_for(tenant, first.header)
        layers = _header_layers(session, first.header)
        ciphertexts = await _assemble(
            messages,
            count=int(first.header.ciphertexts),
            max_bytes=self._sessions.limits.max_apply_bytes,
        )
        result = await self._sessions.evaluate_layers(session, layers, ciphertexts)
        for index, blob in enumerate(result.ciphertexts):
            for start in range(0, len(blob), RESPONSE_CHUNK_BYTES):
                end = start + RESPONSE_CHUNK_BYTES
                yield pb.ApplyLoraResponse(
                    chunk=pb.CiphertextChunk(
                        index=index, data=blob[start:end], last=end >= len(blob)
                    )
                )
        yield pb.ApplyLoraResponse(
            summary=pb.ApplyLoraSummary(
                counts=serde.counts_to_proto(result.counts), server_ms=result.server_ms
            )
        )

    async def ApplyLoraInline(
        self, request: pb.ApplyLoraInlineRequest, context: Context
    ) -> pb.ApplyLoraInlineResponse:
        """ApplyLora with the ciphertexts and results in one message each."""
        tenant = caller_tenant(SCOPE_TRAIN)
        if not request.HasField("header"):
            raise InvalidArgument("header", "is required")
        session = await self._session_for(tenant, request.header)
        layers = _header_layers(session, request.header)
        ciphertexts = list(request.ciphertexts)
        if len(ciphertexts) != request.header.ciphertexts:
            raise InvalidArgument(
                "ciphertexts",
                f"got {len(ciphertexts)}, header.ciphertexts={request.header.ciphertexts}",
            )
        limit = self._sessions.limits.max_apply_bytes
        if sum(len(blob) for blob in ciphertexts) > limit:
            raise _over_apply_bytes(limit)
        result = await self._sessions.evaluate_layers(session, layers, ciphertexts)
        size = sum(len(blob) for blob in result.ciphertexts)
        if size > self._max_message_bytes - _INLINE_RESPONSE_MARGIN:
            raise ResourceExhausted(
                f"the results ({size} bytes) do not fit one message (max_message_bytes="
                f"{self._max_message_bytes}); use ApplyLora, which streams them",
                metadata={"limit": "max_message_bytes"},
            )
        return pb.ApplyLoraInlineResponse(
            ciphertexts=result.ciphertexts,
            summary=pb.ApplyLoraSummary(
                counts=serde.counts_to_proto(result.counts), server_ms=result.server_ms
            ),
        )

    async def _session_for(self, tenant: str, header: pb.ApplyLoraHeader) -> Session:
        """Check an ApplyLora header and find its session and layer.

        Fails fast on an unknown or expired session or layer before the payload is
        read; the session found here is the one evaluated (one lookup per call).
        """
        if not header.session_id:
            raise InvalidArgument("header.session_id", "is required")
        if not header.layer:
            raise InvalidArgument("header.layer", "is required")
        if header.ciphertexts < 1:
            raise InvalidArgument("header.ciphertexts", "must be at least 1")
        session = await self._sessions.get(tenant, header.session_id)
        session.check_layer(header.layer)
        return session

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Context
    ) -> pb.CloseSessionResponse:
        """Close one of the caller's sessions and delete its keys."""
        await self._sessions.close(caller_tenant(SCOPE_TRAIN), request.session_id)
        return pb.CloseSessionResponse()


async def _assemble(
    messages: AsyncIterator[pb.ApplyLoraRequest], *, count: int, max_bytes: int
) -> list[bytes]:
    """Reassemble ``count`` ciphertexts sent in order, each as chunks ending ``last``."""
    blobs: list[bytes] = []
    current = bytearray()
    total = 0
    async for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("header", "only the first message may be a header")
        chunk = message.chunk
        if chunk.index != len(blobs) or len(blobs) >= count:
            raise InvalidArgument(
                "chunk.index",
                f"got {chunk.index}, expected {len(blobs)} (ciphertexts are sent in order, "
                f"{count} of them)",
            )
        total += len(chunk.data)
        if total > max_bytes:
            raise _over_apply_bytes(max_bytes)
        current += chunk.data
        if chunk.last:
            blobs.append(bytes(current))
            current = bytearray()
    if current or len(blobs) != count:
        raise InvalidArgument(
            "chunk",
            f"received {len(blobs)} complete ciphertexts, header.ciphertexts={count}",
        )
    return blobs


def _over_apply_bytes(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the request carries more than max_apply_bytes={limit} ciphertext bytes; split the batch",
        metadata={"limit": "max_apply_bytes"},
    )


def _header_layers(session: Session, header: pb.ApplyLoraHeader) -> list[str]:
    """header.layer then ``more_layers``: each adapted, none repeated, all of one input size.

    Layers evaluated on one set of ciphertexts must read the same input; a layer of
    another input size would need other ciphertexts (its plan's input layout differs).
    """
    layers = [header.layer]
    input_size = session.adapter.shape(header.layer).input_size
    for index, layer in enumerate(header.more_layers):
        field = f"header.more_layers[{index}]"
        session.check_layer(layer, field)
        if layer in layers:
            raise InvalidArgument(field, f"{layer!r} is already in the request")
        size = session.adapter.shape(layer).input_size
        if size != input_size:
            raise InvalidArgument(
                field,
                f"{layer!r} takes inputs of size {size}, header.layer {header.layer!r} of "
                f"size {input_size}: only layers that read the same input can share ciphertexts",
            )
        layers.append(layer)
    return layers
