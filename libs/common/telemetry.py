"""OpenTelemetry wiring: a tracer provider per process, and W3C trace-context
propagation through gRPC metadata (and, in :mod:`tensafe.common.jetstream`, through
NATS message headers), so one trace follows a call across services and workers.

Exporting is off by default; ``console`` prints spans, ``otlp`` sends them to a
collector over OTLP/gRPC. :func:`setup_metrics` does the same for metrics; the server
interceptor records ``rpc.server.duration`` per method (OpenTelemetry RPC semantic
conventions), which for the HE runtime's methods is the HE latency.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from tensafe.common.grpc_errors import (
    Behavior,
    BehaviorWrapper,
    ServerInterceptorBase,
    wrap_handler,
)
from tensafe.common.metrics import MetricsEndpoint, prometheus_reader


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


def setup_metrics(
    service: str,
    *,
    exporter: str = "none",
    endpoint: str = "",
    extra_readers: Iterable[MetricReader] = (),
) -> MeterProvider:
    """Create the process's meter provider and install it as the global one.

    Like the tracer provider, OpenTelemetry's API looks the meter provider up globally;
    the instruments of :class:`TracingInterceptor` and of the JetStream consumer record
    into it (and into a no-op provider until this is called).

    Args:
        service: ``service.name`` resource attribute.
        exporter: ``none``, ``console`` or ``otlp`` (the same setting as traces).
        endpoint: OTLP collector endpoint when ``exporter`` is ``otlp``.
        extra_readers: More metric readers (tests pass an in-memory reader).

    Returns:
        The provider; call ``shutdown()`` on it at exit to flush.
    """
    readers: list[MetricReader] = list(extra_readers)
    if exporter == "console":
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({"service.name": service})
    )
    metrics.set_meter_provider(provider)
    return provider


def inject_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs (``traceparent``...)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class TracingInterceptor(ServerInterceptorBase):
    """Opens a SERVER span per RPC, child of the caller's ``traceparent`` if any, and
    records the call's duration in the ``rpc.server.duration`` histogram (ms)."""

    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter | None = None) -> None:
        self._tracer = tracer
        self._duration = (meter or metrics.get_meter("tensafe")).create_histogram(
            "rpc.server.duration", unit="ms", description="Duration of inbound RPCs."
        )

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
            handler,
            _SpanWrapper(self._tracer, self._duration, handler_call_details.method, carrier),
        )


class _SpanWrapper(BehaviorWrapper):
    def __init__(
        self,
        tracer: trace.Tracer,
        duration: metrics.Histogram,
        method: str,
        carrier: dict[str, str],
    ) -> None:
        self._tracer = tracer
        self._duration = duration
        self._method = method
        self._carrier = carrier
        service, _, name = method.lstrip("/").partition("/")
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def _span(self) -> trace.Span:
        return self._tracer.start_span(
            self._method.lstrip("/"),
            context=propagate.extract(self._carrier),
            kind=trace.SpanKind.SERVER,
            attributes=self._attributes,
        )

    def _record(
        self, started: float, context: grpc.aio.ServicerContext[Any, Any], *, failed: bool
    ) -> None:
        # The status the call ends with: the code set by abort()/set_code() (the error
        # interceptor aborts with the typed error's code), else OK or, for an exception
        # no interceptor mapped, UNKNOWN (what grpc sends for it).
        code = context.code()
        unset = "UNKNOWN" if failed else "OK"
        status = code.name if isinstance(code, grpc.StatusCode) else unset
        self._duration.record(
            (time.perf_counter() - started) * 1000.0,
            {**self._attributes, "rpc.grpc.status": status},
        )

    def unary(self, inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            span = self._span()
            started = time.perf_counter()
            with trace.use_span(span, end_on_exit=True, record_exception=False):
                try:
                    result = inner(request, context)
                    value = await result if inspect.isawaitable(result) else result
                except BaseException:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                    self._record(started, context, failed=True)
                    raise
                self._record(started, context, failed=False)
                return value

        return behavior

    def streaming(self, inner: Behavior) -> Behavior:
        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            span = self._span()
            started = time.perf_counter()
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
                    self._record(started, context, failed=True)
                    raise
                self._record(started, context, failed=False)

        return behavior


class Telemetry:
    """The process's telemetry: call it to flush and shut everything down.

    Attributes:
        metrics_port: The port ``/metrics`` is served on, or ``None`` when off.
    """

    def __init__(self, shutdown: Callable[[], None], metrics_port: int | None) -> None:
        self._shutdown = shutdown
        self.metrics_port = metrics_port

    def __call__(self) -> None:
        """Flush and shut down (at exit)."""
        self._shutdown()


def setup_telemetry(
    service: str,
    *,
    exporter: str,
    endpoint: str,
    metrics_port: int = -1,
    metrics_host: str = "127.0.0.1",
) -> Telemetry:
    """Set up the process's traces and metrics in one call (services and workers).

    Args:
        service: ``service.name`` resource attribute.
        exporter: ``none``, ``console`` or ``otlp``.
        endpoint: OTLP collector endpoint when ``exporter`` is ``otlp``.
        metrics_port: ``>= 0`` serves Prometheus ``/metrics`` on this port (0: a free
            one) of ``metrics_host``; ``-1`` serves none
            (:mod:`tensafe.common.metrics`).
        metrics_host: Interface of the metrics listener.

    Returns:
        Call it at exit to flush and shut both providers (and ``/metrics``) down.

    Raises:
        OSError: The metrics port cannot be bound.
    """
    tracer_provider = setup_tracing(service, exporter=exporter, endpoint=endpoint)
    readers: list[MetricReader] = []
    endpoint_server: MetricsEndpoint | None = None
    if metrics_port >= 0:
        reader, registry = prometheus_reader()
        readers.append(reader)
        endpoint_server = MetricsEndpoint.start(registry, host=metrics_host, port=metrics_port)
    meter_provider = setup_metrics(
        service, exporter=exporter, endpoint=endpoint, extra_readers=readers
    )

    def shutdown() -> None:
        if endpoint_server is not None:
            endpoint_server.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return Telemetry(shutdown, endpoint_server.port if endpoint_server else None)
