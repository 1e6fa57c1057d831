"""Serving an HTTP front door (the Tinker API, the console): one lifecycle for both.

The front doors are aiohttp applications that call the gRPC services as clients. They
start, announce and stop the same way, which this module holds once: bind (HTTPS when a
certificate and key are set), log the address, write ``{"port": N}`` to the ready file
(how ``tensafe up`` learns a free port), wait for SIGTERM/SIGINT, then let in-flight
requests finish for the grace period and close the backend's channels.

Needs aiohttp (the ``tinker-api`` or ``console`` extra).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from aiohttp import web

from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError
from tensafe.common.log import configure_logging

log = logging.getLogger(__name__)


class FrontDoorConfig(Protocol):
    """The settings every front door has (fields of its config dataclass)."""

    @property
    def host(self) -> str: ...  # noqa: D102
    @property
    def port(self) -> int: ...  # noqa: D102
    @property
    def dev_mode(self) -> bool: ...  # noqa: D102
    @property
    def log_level(self) -> str: ...  # noqa: D102
    @property
    def log_format(self) -> str: ...  # noqa: D102
    @property
    def ready_file(self) -> str: ...  # noqa: D102
    @property
    def shutdown_grace_seconds(self) -> float: ...  # noqa: D102
    @property
    def tls_cert_file(self) -> Path | None: ...  # noqa: D102
    @property
    def tls_key_file(self) -> Path | None: ...  # noqa: D102


C = TypeVar("C", bound=FrontDoorConfig)


def server_ssl_context(config: FrontDoorConfig) -> ssl.SSLContext | None:
    """The listener's TLS context, or ``None`` for plain HTTP (no certificate set)."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


async def serve_app(
    app: web.Application,
    config: FrontDoorConfig,
    stop: asyncio.Event,
    *,
    name: str,
    close: Callable[[], Awaitable[None]],
    detail: str = "",
    auto_decompress: bool = True,
) -> None:
    """Serve ``app`` until ``stop`` is set, then drain and call ``close``.

    Args:
        app: The application.
        config: Where and how to listen.
        stop: Set by a signal (or a test) to stop.
        name: Logged ("<name> serving on https://host:port").
        close: Releases the backend (gRPC channels) after the last request.
        detail: Appended to the serving line (e.g. which trainer it talks to).
        auto_decompress: aiohttp's request body decompression (off where the routes
            decompress themselves, bounded by a size limit).
    """
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_seconds,
        auto_decompress=auto_decompress,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=server_ssl_context(config))
        await site.start()
        port = int(runner.addresses[0][1])
        scheme = "https" if config.tls_cert_file else "http"
        log.info(
            "%s serving on %s://%s:%d%s%s",
            name,
            scheme,
            config.host,
            port,
            f" ({detail})" if detail else "",
            " in dev mode" if config.dev_mode else "",
        )
        if config.ready_file:
            Path(config.ready_file).write_text(json.dumps({"port": port}))
        await stop.wait()
        log.info("%s stopping", name)
    finally:
        await runner.cleanup()
        await close()


def run_main(
    config_type: type[C], service: str, serve: Callable[[C, asyncio.Event], Awaitable[None]]
) -> int:
    """The body of a front door's ``python -m`` entry point.

    Loads the config (a bad setting: one line on stderr, exit 2), configures logging and
    serves until SIGTERM or SIGINT.

    Args:
        config_type: The front door's config dataclass.
        service: Its name in logs and in the configuration error.
        serve: Serves until the event is set.

    Returns:
        The process exit code.
    """
    try:
        config = load_config(config_type)
    except ConfigError as exc:
        print(f"tensafe-{service}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(service, level=config.log_level, fmt=config.log_format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0
