"""Wiring of the Tinker API: build the HTTP application from config and serve it.

SIGTERM stops accepting connections, lets in-flight requests finish for
``shutdown_grace_seconds`` (a retrieve_future in progress is answered), then closes the
gRPC channels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError, TenSafeError
from tensafe.common.log import configure_logging
from tensafe.tinker_api import errors
from tensafe.tinker_api.backend import Backend
from tensafe.tinker_api.config import TinkerApiConfig
from tensafe.tinker_api.hub import HubRoutes
from tensafe.tinker_api.routes import Handler, TinkerRoutes

log = logging.getLogger(__name__)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and TenSafe errors in the SDK's error shape; nothing else escapes
    as a stack trace."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return errors.not_served(request.method, request.path)
    except web.HTTPRequestEntityTooLarge as error:
        return web.Response(
            status=413,
            text=json.dumps(
                errors.error_body(
                    error.text or "request too large",
                    code="INVALID_ARGUMENT",
                    reason="BODY_TOO_LARGE",
                )
            ),
            content_type="application/json",
        )
    except TenSafeError as error:
        if error.code.value in ("INTERNAL", "UNKNOWN"):
            log.error("%s %s failed: %s", request.method, request.path, error.message)
        return errors.http_error(error)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return errors.http_error(TenSafeError("internal error; see the Tinker API's log"))


def build_app(config: TinkerApiConfig, backend: Backend) -> web.Application:
    """The aiohttp application (also what tests serve in-process)."""
    app = web.Application(middlewares=[_errors], client_max_size=config.tinker_max_request_bytes)
    app.add_routes(TinkerRoutes(config, backend).table())
    app.add_routes(HubRoutes(backend).table())
    return app


def _ssl_context(config: TinkerApiConfig) -> ssl.SSLContext | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


async def serve(config: TinkerApiConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    backend = Backend(config)
    runner = web.AppRunner(
        build_app(config, backend),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_seconds,
        # Request bodies are decompressed by the routes (zstd, bounded by the size limit).
        auto_decompress=False,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=_ssl_context(config))
        await site.start()
        port = int(runner.addresses[0][1])
        scheme = "https" if config.tls_cert_file else "http"
        log.info(
            "tinker api serving on %s://%s:%d (trainer %s)%s",
            scheme,
            config.host,
            port,
            config.trainer_url,
            " in dev mode" if config.dev_mode else "",
        )
        if config.ready_file:
            Path(config.ready_file).write_text(json.dumps({"port": port}))
        await stop.wait()
        log.info("tinker api stopping")
    finally:
        await runner.cleanup()
        await backend.close()


def main() -> int:
    """Entry point of ``python -m tensafe.tinker_api``."""
    try:
        config = load_config(TinkerApiConfig)
    except ConfigError as exc:
        print(f"tensafe-tinker_api: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging("tinker_api", level=config.log_level, fmt=config.log_format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0
