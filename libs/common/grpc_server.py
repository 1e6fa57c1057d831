"""The asyncio gRPC server every TenSafe service runs on.

One bootstrap for all four services: explicit message-size limits, health checking
(``grpc.health.v1``) and server reflection on every server, the tracing and
error-mapping interceptors, TLS or mutual TLS when certificates are configured
(:mod:`tensafe.common.tls`), and a graceful SIGTERM drain — health flips to
NOT_SERVING first, in-flight RPCs get ``shutdown_grace_seconds`` to finish, then the
service's resources are closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from tensafe.common import tls
from tensafe.common.config import ServiceConfig, load_config
from tensafe.common.errors import ConfigError
from tensafe.common.grpc_errors import ErrorInterceptor, ServerInterceptorBase
from tensafe.common.log import configure_logging
from tensafe.common.telemetry import TracingInterceptor, setup_telemetry

log = logging.getLogger(__name__)

C = TypeVar("C", bound=ServiceConfig)


@dataclasses.dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve.

    Attributes:
        full_name: Fully qualified proto service name, e.g. ``tensafe.auth.v1.AuthService``.
        add: The generated ``add_XxxServicer_to_server`` function.
        servicer: The servicer instance.
    """

    full_name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


@dataclasses.dataclass
class Assembly:
    """What a service's ``build`` returns: its gRPC services and how to close it.

    Attributes:
        services: The gRPC services to serve.
        interceptors: Service-specific interceptors, run inside tracing and error mapping.
        close: Releases the service's resources (DB engines, NATS connections) at exit.
    """

    services: Sequence[ServiceRegistration]
    interceptors: Sequence[ServerInterceptorBase] = ()
    close: Callable[[], Awaitable[None]] | None = None


class GrpcServer:
    """An asyncio gRPC server with health, reflection and the shared interceptors."""

    def __init__(
        self,
        *,
        config: ServiceConfig,
        services: Sequence[ServiceRegistration],
        interceptors: Sequence[ServerInterceptorBase] = (),
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._config = config
        self._services = services
        self._health = HealthServicer()
        limit = config.max_message_bytes
        self._server = grpc.aio.server(
            interceptors=[
                TracingInterceptor(tracer or trace.get_tracer("tensafe")),
                ErrorInterceptor(),
                *interceptors,
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.port = 0

    async def start(self) -> int:
        """Bind, start serving and report SERVING. Returns the bound port."""
        for registration in self._services:
            registration.add(registration.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [s.full_name for s in self._services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        address = f"{self._config.host}:{self._config.port}"
        credentials = tls.server_credentials(self._config)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise ConfigError("TENSAFE_PORT", f"cannot bind {address}")
        await self._server.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Report NOT_SERVING, then drain in-flight RPCs for the grace period."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._config.shutdown_grace_seconds)


def run_service(
    name: str,
    config_cls: type[C],
    build: Callable[[C], Awaitable[Assembly]],
    environ: dict[str, str] | None = None,
) -> int:
    """Run a service process until SIGTERM/SIGINT; the body of each ``__main__``.

    A configuration error ends start-up with one line naming the setting and exit
    code 2; nothing is served with a half-valid configuration.

    Args:
        name: Service name for logs and traces.
        config_cls: The service's config dataclass.
        build: Builds the service's object graph from its config.
        environ: The environment; ``os.environ`` when omitted.

    Returns:
        The process exit code.
    """
    try:
        config = load_config(config_cls, environ)
    except ConfigError as exc:
        print(f"tensafe-{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(name, level=config.log_level, fmt=config.log_format)
    shutdown_telemetry = setup_telemetry(
        f"tensafe-{name}",
        exporter=config.otel_exporter,
        endpoint=config.otel_endpoint,
        metrics_port=config.metrics_port,
        metrics_host=config.host,
    )
    # Everything imported so far (torch, transformers, SEAL bindings, ...) lives as long
    # as the process: freezing it keeps the collector, and the interpreter's final
    # collection at exit, from walking millions of objects again (measured: a trainer
    # worker's exit after SIGTERM fell from 2-3 s to under 1 s on a loaded machine).
    gc.freeze()
    try:
        asyncio.run(
            _serve(
                name,
                config,
                build,
                trace.get_tracer("tensafe"),
                metrics_port=shutdown_telemetry.metrics_port,
            )
        )
    except ConfigError as exc:
        print(f"tensafe-{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_telemetry()
    return 0


async def _serve(
    name: str,
    config: C,
    build: Callable[[C], Awaitable[Assembly]],
    tracer: trace.Tracer,
    *,
    metrics_port: int | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assembly = await build(config)
    server = GrpcServer(
        config=config,
        services=assembly.services,
        interceptors=assembly.interceptors,
        tracer=tracer,
    )
    try:
        port = await server.start()
        if config.dev_mode:
            log.warning("DEV MODE: %s runs without production secrets", name)
        security = (
            "plaintext"
            if config.tls_cert_file is None
            else "mutual TLS"
            if config.tls_client_ca_file is not None
            else "TLS"
        )
        log.info("serving", extra={"address": f"{config.host}:{port}", "security": security})
        if config.ready_file:
            fields = {"port": port, "pid": os.getpid()}
            if metrics_port is not None:
                fields["metrics_port"] = metrics_port
            ready = json.dumps(fields)
            _write_atomically(Path(config.ready_file), ready)
        await stop.wait()
        log.info("SIGTERM: draining")
        await server.stop()
    finally:
        if assembly.close is not None:
            await assembly.close()
    log.info("stopped")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
