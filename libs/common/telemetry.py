"""OpenTelemetry wiring: a tracer provider per process, and W3C trace-context
propagation through gRPC metadata (and, in :mod:`tensafe.common.jetstream`, through
NATS message headers), so one trace follows a call across services and workers.

Exporting is off by default; ``console`` prints spans, ``otlp`` sends them to a
collector over OTLP/gRPC.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from tensafe.common.grpc_errors import (
    Behavior,
    BehaviorWrapper,
    ServerInterceptorBase,
    wrap_handler,
)


def setup_tracing(
    service: str,
    *,
    exporter: str = "none",
    endpoint: str = "",
    extra_processors: Iterable[SpanProcessor] = (),
) -> TracerProvider:
    """Create the process's tracer provider and install it as the global one.

    OpenTelemetry's API looks the provider up globally (instrumented libraries and the
    propagators do), so this is the one global the process sets, once, in its wiring.

    Args:
        service: ``service.name`` resource attribute.
        exporter: ``none``, ``console`` or ``otlp``.
        endpoint: OTLP collector endpoint when ``exporter`` is ``otlp``.
        extra_processors: More span processors (tests pass an in-memory exporter).

    Returns:
        The provider; call ``shutdown()`` on it at exit to flush.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def inject_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs (``traceparent``...)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class TracingInterceptor(ServerInterceptorBase):
    """Opens a SERVER span per RPC, child of the caller's ``traceparent`` if any."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the handler so it runs inside a span."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        carrier = {
            k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)
        }
        return wrap_handler(
            handler, _SpanWrapper(self._tracer, handler_call_details.method, carrier)
        )


class _SpanWrapper(BehaviorWrapper):
    def __init__(self, tracer: trace.Tracer, method: str, carrier: dict[str, str]) -> None:
        self._tracer = tracer
        self._method = method
        self._carrier = carrier

    def _span(self) -> trace.Span:
        service, _, name = self._method.lstrip("/").partition("/")
        return self._tracer.start_span(
            self._method.lstrip("/"),
            context=propagate.extract(self._carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def unary(self, inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            span = self._span()
            with trace.use_span(span, end_on_exit=True, record_exception=False):
                try:
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
                except BaseException:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                    raise

        return behavior

    def streaming(self, inner: Behavior) -> Behavior:
        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            span = self._span()
            with trace.use_span(span, end_on_exit=True, record_exception=False):
                try:
                    result = inner(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):
                        await result
                except BaseException:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                    raise

        return behavior
