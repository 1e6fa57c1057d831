"""The one place where typed domain errors become gRPC statuses, and back.

Servers install :class:`ErrorInterceptor`: a :class:`~tensafe.common.errors.TenSafeError`
raised anywhere below a servicer becomes its status code with ``google.rpc`` details
(``ErrorInfo`` with the reason, ``BadRequest`` naming the field for INVALID_ARGUMENT;
AIP-193) in the ``grpc-status-details-bin`` trailer. Any other exception is logged
with its stack trace under an error id and reaches the client as INTERNAL with that id
only: never a stack trace. Request bytes that do not decode as the method's message get
INVALID_ARGUMENT (field ``request``), not grpc's UNKNOWN, and a decoded request whose
text fields break the one rule for text (:mod:`tensafe.common.text`: no control
characters) gets INVALID_ARGUMENT naming the field, before any servicer runs.

Clients call :func:`from_rpc_error` to get the same typed error back.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import metrics

from tensafe.common import errors
from tensafe.common.text import check_request_text

log = logging.getLogger(__name__)

ERROR_DOMAIN = "tensafe.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_BY_CODE: dict[grpc.StatusCode, type[errors.TenSafeError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
}
_BY_REASON: dict[str, type[errors.TenSafeError]] = {
    errors.BudgetExhausted.default_reason: errors.BudgetExhausted,
    errors.IntegrityError.default_reason: errors.IntegrityError,
}


def status_code(error: errors.TenSafeError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    return grpc.StatusCode[error.code.value]


def to_status_proto(error: errors.TenSafeError) -> status_pb2.Status:
    """A ``google.rpc.Status`` with ErrorInfo (and BadRequest for a bad field)."""
    code = status_code(error)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    status.details.append(info)
    if isinstance(error, errors.InvalidArgument):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.description
                    )
                ]
            )
        )
        status.details.append(bad)
    return status


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], error: errors.TenSafeError
) -> None:
    """Abort the call with ``error``'s status and rich details (raises AbortError)."""
    status = to_status_proto(error)
    await context.abort(
        status_code(error),
        error.message,
        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def from_rpc_error(exc: grpc.RpcError) -> errors.TenSafeError:
    """Turn a failed call back into the typed error the server raised.

    Args:
        exc: The error raised by a stub (sync or aio).

    Returns:
        A :class:`~tensafe.common.errors.TenSafeError` subclass instance carrying the
        server's message, reason and (for INVALID_ARGUMENT) field.
    """
    call = cast(grpc.Call, exc)
    code = call.code()
    message = call.details() or code.name
    reason = ""
    metadata: dict[str, str] = {}
    field = ""
    for key, value in call.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        prefix = f"{field}: "
        description = message[len(prefix) :] if message.startswith(prefix) else message
        return errors.InvalidArgument(field, description, reason=reason or None, metadata=metadata)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, errors.TenSafeError)
    error = cls(message, reason=reason or None, metadata=metadata)
    if cls is errors.TenSafeError:
        known = code.name in errors.ErrorCode.__members__
        error.code = errors.ErrorCode[code.name] if known else errors.ErrorCode.INTERNAL
    return error


Behavior = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any]"]]

if TYPE_CHECKING:
    ServerInterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime class is not subscriptable
    ServerInterceptorBase = grpc.aio.ServerInterceptor


def _internal(method: str, exc: BaseException) -> errors.TenSafeError:
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (error_id=%s)", method, error_id, exc_info=exc)
    return errors.TenSafeError(f"internal error (error_id={error_id})")


class ErrorInterceptor(ServerInterceptorBase):
    """Maps exceptions raised by servicers to statuses, for all four call shapes.

    It also counts the calls refused with RESOURCE_EXHAUSTED (quotas, rate limits) in
    ``tensafe.rpc.refusals`` by method, reason and limit: the status code alone (in
    ``rpc.server.duration``) does not say which limit a tenant hit.
    """

    def __init__(self) -> None:
        self._refusals = metrics.get_meter(__name__).create_counter(
            "tensafe.rpc.refusals",
            unit="{call}",
            description="Calls refused with RESOURCE_EXHAUSTED (quota, rate limit, size), "
            "by method, reason and limit.",
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the method handler's behavior."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        guard = _ErrorGuard(
            handler_call_details.method,
            request_streaming=handler.request_streaming,
            refusals=self._refusals,
        )
        return wrap_handler(
            handler, guard, request_deserializer=_lenient(handler.request_deserializer)
        )


@dataclasses.dataclass(frozen=True)
class _Undecodable:
    """Stands for request bytes that are not a valid message.

    grpc's asyncio server answers a deserializer's exception with UNKNOWN and the
    exception's text; decoding leniently instead lets :class:`_ErrorGuard` answer
    INVALID_ARGUMENT naming the request, like any other bad input.
    """

    reason: str


def _lenient(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(str(error))

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument("request", f"is not a valid message: {request.reason}")
    if isinstance(request, Message):
        check_request_text(request)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


class BehaviorWrapper(abc.ABC):
    """Wraps the behavior of a method handler; one method per response shape."""

    @abc.abstractmethod
    def unary(self, inner: Behavior) -> Behavior:
        """Wrap a behavior that returns one response (a coroutine function)."""

    @abc.abstractmethod
    def streaming(self, inner: Behavior) -> Behavior:
        """Wrap a behavior that yields responses (an async generator function)."""


def _as_error(method: str, exc: Exception) -> errors.TenSafeError:
    """The status an exception escaping a servicer becomes."""
    if isinstance(exc, errors.TenSafeError):
        return exc
    if isinstance(exc, NotImplementedError):
        # What generated base servicers raise for an RPC nobody overrode.
        return errors.Unimplemented(f"{method} is not implemented")
    return _internal(method, exc)


class _ErrorGuard(BehaviorWrapper):
    def __init__(self, method: str, *, request_streaming: bool, refusals: metrics.Counter) -> None:
        self._method = method
        self._request_streaming = request_streaming
        self._refusals = refusals

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
        error = _as_error(self._method, exc)
        if error.code is errors.ErrorCode.RESOURCE_EXHAUSTED:
            self._refusals.add(
                1,
                {
                    "rpc.method": self._method,
                    "reason": error.reason,
                    "limit": error.metadata.get("limit", ""),
                },
            )
        await abort_with(context, error)

    def _checked(self, request: Any) -> Any:
        """The request, or an iterator of requests, with undecodable ones refused."""
        return _decoded_stream(request) if self._request_streaming else _decoded(request)

    def unary(self, inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await _call(inner, self._checked(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the boundary: nothing escapes unmapped
                await self._abort(context, exc)

        return behavior

    def streaming(self, inner: Behavior) -> Behavior:
        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in _iterate(inner, self._checked(request), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the boundary: nothing escapes unmapped
                await self._abort(context, exc)

        return behavior


async def _call(inner: Behavior, request: Any, context: Any) -> Any:
    result = inner(request, context)
    return await result if inspect.isawaitable(result) else result


async def _iterate(inner: Behavior, request: Any, context: Any) -> AsyncIterator[Any]:
    """Run a streaming-response behavior, whether it yields or writes to the context."""
    result = inner(request, context)
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrapper: BehaviorWrapper,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """Return ``handler`` with its behavior wrapped by ``wrapper``.

    Args:
        handler: The method handler.
        wrapper: Wraps its behavior.
        request_deserializer: Replaces the handler's request deserializer, if given.
    """
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrapper.unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrapper.streaming(handler.unary_stream), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrapper.unary(handler.stream_unary), **kwargs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrapper.streaming(handler.stream_stream), **kwargs)
