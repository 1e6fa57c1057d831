"""Prometheus metrics: ``/metrics`` on a port of its own, off unless configured.

Every instrument in TenSafe is an OpenTelemetry instrument (recorded into the process's
meter provider, :func:`tensafe.common.telemetry.setup_metrics`). With
``TENSAFE_METRICS_PORT`` set (``>= 0``), the provider also gets OpenTelemetry's
Prometheus reader, and :class:`MetricsEndpoint` serves that reader's registry in the
Prometheus text format on ``http://<TENSAFE_HOST>:<port>/metrics`` — a separate
listener from gRPC, so scraping never competes with RPCs for the gRPC server's
concurrency and a NetworkPolicy can open it to the monitoring namespace only. The
registry is the process's own (not ``prometheus_client``'s global one) and also carries
the standard ``process_*`` (RSS, open fds, CPU) and ``python_gc_*`` collectors.

What is exported, per process, is listed in docs/operations.md ("Metrics"). Gauges
whose value lives in the database (steps and ε per training client, queued jobs, the
audit chain's length) are read by a :class:`DbGauges` sampler every
``TENSAFE_METRICS_SAMPLE_SECONDS``: a scrape never waits for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

import prometheus_client
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

Attributes = Mapping[str, str]
Sample = dict[str, list[tuple[Attributes, float]]]
"""Gauge name → (attributes, value) of each series, as one sampling produced them."""


def prometheus_reader() -> tuple[PrometheusMetricReader, prometheus_client.CollectorRegistry]:
    """An OpenTelemetry metric reader and the fresh registry it exports into.

    Returns:
        The reader (give it to the meter provider) and its registry (serve it with
        :class:`MetricsEndpoint`), which also has the process and GC collectors.
    """
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return PrometheusMetricReader(registry=registry), registry


class MetricsEndpoint:
    """The HTTP listener of ``/metrics`` (a daemon thread; stdlib WSGI server).

    Args:
        server: The running server.
        thread: Its serving thread.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(
        cls, registry: prometheus_client.CollectorRegistry, *, host: str, port: int
    ) -> MetricsEndpoint:
        """Serve ``registry`` on ``host:port`` (0 picks a free port).

        Raises:
            OSError: The port cannot be bound.
        """
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        log.info("metrics served", extra={"address": f"{host}:{server.server_port}"})
        return cls(server, thread)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclasses.dataclass(frozen=True)
class GaugeSpec:
    """One gauge whose value a :class:`DbGauges` sampler reads.

    Attributes:
        name: OpenTelemetry instrument name (Prometheus: dots become underscores, the
            unit is appended).
        description: Help text.
        unit: UCUM unit, e.g. ``{step}``; empty for a plain number (``1`` would make
            the Prometheus name end in ``_ratio``).
    """

    name: str
    description: str
    unit: str = ""


class DbGauges:
    """Observable gauges fed by a periodic asynchronous sampler.

    OpenTelemetry calls an observable gauge's callback synchronously at collection
    time; the values of these gauges live in the database, read asynchronously. So a
    task samples every ``interval`` seconds and the callbacks return the latest sample
    (a series that disappeared from the database disappears from the next scrape).

    Args:
        specs: The gauges.
        sample: Reads the current values; must return only names from ``specs``.
        interval: Seconds between samples.
        meter: Where the gauges are created (the process's meter by default).
    """

    def __init__(
        self,
        specs: Sequence[GaugeSpec],
        sample: Callable[[], Awaitable[Sample]],
        *,
        interval: float,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._sample = sample
        self._interval = interval
        self._latest: Sample = {}
        self._task: asyncio.Task[None] | None = None
        meter = meter or metrics.get_meter("tensafe")
        for spec in specs:
            meter.create_observable_gauge(
                spec.name,
                callbacks=[self._callback(spec.name)],
                unit=spec.unit,
                description=spec.description,
            )

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attrs)) for attrs, value in self._latest.get(name, [])]

        return observe

    async def sample_once(self) -> None:
        """Read the values now (the task does this every interval)."""
        self._latest = await self._sample()

    def start(self) -> None:
        """Start sampling in the background."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception:  # a failed sample keeps the last values; the next retries
                log.exception("metrics sample failed")
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
