"""Wiring of the Tinker API: build the HTTP application from config and serve it.

SIGTERM stops accepting connections, lets in-flight requests finish for
``shutdown_grace_seconds`` (a retrieve_future in progress is answered), then closes the
gRPC channels.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from tensafe.common.errors import TenSafeError
from tensafe.common.http_front import run_main, serve_app
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


async def serve(config: TinkerApiConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    backend = Backend(config)
    await serve_app(
        build_app(config, backend),
        config,
        stop,
        name="tinker api",
        close=backend.close,
        detail=f"trainer {config.trainer_url}",
        # Request bodies are decompressed by the routes (zstd, bounded by the size limit).
        auto_decompress=False,
    )


def main() -> int:
    """Entry point of ``python -m tensafe.tinker_api``."""
    return run_main(TinkerApiConfig, "tinker_api", serve)
