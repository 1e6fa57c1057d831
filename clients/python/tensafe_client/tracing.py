"""Client side of distributed tracing: every SDK call runs in a CLIENT span whose W3C
``traceparent`` (and ``tracestate``) goes out in the call's metadata, so the service's
SERVER span — and, through the JetStream message headers, the trainer worker's
CONSUMER span — join the caller's trace (W3C Trace Context, OpenTelemetry RPC semantic
conventions).

Spans are recorded only when the application installed an OpenTelemetry SDK tracer
provider; otherwise the API's no-op tracer is used and only an already active context
is propagated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from opentelemetry import propagate, trace

_TRACER_NAME = "tensafe.client"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


if TYPE_CHECKING:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:  # grpc's runtime classes are not subscriptable
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class TraceContextInterceptor(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Opens a CLIENT span per call and injects its context into the call's metadata.

    The span ends when the call completes (``add_done_callback``), so it covers the
    whole RPC for blocking and for ``.future()`` calls alike; a non-OK status marks it
    as an error with the gRPC code.
    """

    def _start(self, details: Any) -> tuple[trace.Span, _CallDetails]:
        method = str(details.method).lstrip("/")
        service, _, name = method.partition("/")
        span = trace.get_tracer(_TRACER_NAME).start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [(key, value) for key, value in (details.metadata or ()) if key not in carrier]
        metadata.extend(carrier.items())
        return span, _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    @staticmethod
    def _end_when_done(span: trace.Span, call: Any) -> Any:
        def done(finished: Any) -> None:
            code = finished.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()

        call.add_done_callback(done)
        return call

    def _intercept(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        span, traced = self._start(details)
        try:
            call = continuation(traced, request)
        except BaseException:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
            span.end()
            raise
        return self._end_when_done(span, call)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call."""
        return self._intercept(continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call."""
        return self._intercept(continuation, details, request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        """Client-streaming call."""
        return self._intercept(continuation, details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        """Bidirectional call."""
        return self._intercept(continuation, details, request_iterator)


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with trace-context propagation on every call."""
    return grpc.intercept_channel(channel, TraceContextInterceptor())
