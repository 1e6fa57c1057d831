"""Wiring of the console: build the HTTP application from config and serve it.

Three middlewares wrap every page, outermost first: errors (a service's error becomes a
page with the matching status; an expired or revoked session goes back to sign-in),
session (every page but sign-in and the static files needs one) and CSRF (every POST
carries the session's token, or the sign-in nonce, else 403). SIGTERM stops accepting
connections and lets in-flight requests finish for ``shutdown_grace_seconds``.
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
from tensafe.common.errors import ConfigError, TenSafeError, Unauthenticated
from tensafe.common.log import configure_logging
from tensafe.console.backend import Backend
from tensafe.console.config import ConsoleConfig
from tensafe.console.routes import SESSION_KEY, ConsoleRoutes, Handler, error_status, redirect
from tensafe.console.session import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    session_from_token,
    tokens_match,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
"""The vendored htmx and uPlot (with their licences), the stylesheet and run.js."""

_PUBLIC = ("/login", "/static/", "/healthz")

_SECURITY_HEADERS = {
    # Scripts and styles only from the console itself; no framing (clickjacking).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def build_app(config: ConsoleConfig, backend: Backend) -> web.Application:
    """The aiohttp application (also what tests serve in-process)."""
    routes = ConsoleRoutes(config, backend)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Unauthenticated:
            if request.path.endswith(".json"):
                response = web.json_response({"error": "signed out"}, status=401)
            else:
                response = redirect("/login")
            response.del_cookie(SESSION_COOKIE, path="/")
        except web.HTTPNotFound:
            response = routes.error_page(
                request, 404, "Not found", "There is no such page in the console."
            )
        except web.HTTPException as http:
            # aiohttp's own answers (405, 413, ...) as plain responses.
            response = web.Response(status=http.status, text=http.text, headers=http.headers)
        except TenSafeError as error:
            status, title = error_status(error)
            if status >= 500:
                log.error("%s %s failed: %s", request.method, request.path, error.message)
            response = routes.error_page(request, status, title, error.message)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = routes.error_page(
                request, 500, "Something went wrong", "See the console's log."
            )
        response.headers.update(_SECURITY_HEADERS)
        return response

    @web.middleware
    async def session(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = request.cookies.get(SESSION_COOKIE, "")
        current = session_from_token(token) if token else None
        if current is not None:
            request[SESSION_KEY] = current
        if request.path.startswith(_PUBLIC):
            return await handler(request)
        if current is None:
            raise Unauthenticated("sign in first")
        return await handler(request)

    @web.middleware
    async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return await handler(request)
        form = await request.post()
        if request.path == "/login":
            expected = request.cookies.get(LOGIN_COOKIE, "")
            given = form.get("login_nonce")
        else:
            current = request[SESSION_KEY]
            expected = current.csrf_token
            given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not expected or not tokens_match(expected, str(given) if given else None):
            return routes.error_page(
                request,
                403,
                "Forbidden",
                "The form's CSRF token is missing or wrong. Reload the page and try again.",
            )
        return await handler(request)

    app = web.Application(middlewares=[errors, session, csrf], client_max_size=64 * 1024)
    app.add_routes(routes.table())
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    return app


def _ssl_context(config: ConsoleConfig) -> ssl.SSLContext | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    return context


async def serve(config: ConsoleConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    backend = Backend(config)
    runner = web.AppRunner(
        build_app(config, backend),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_seconds,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=_ssl_context(config))
        await site.start()
        port = int(runner.addresses[0][1])
        scheme = "https" if config.tls_cert_file else "http"
        log.info(
            "console serving on %s://%s:%d%s",
            scheme,
            config.host,
            port,
            " in dev mode" if config.dev_mode else "",
        )
        if config.ready_file:
            Path(config.ready_file).write_text(json.dumps({"port": port}))
        await stop.wait()
        log.info("console stopping")
    finally:
        await runner.cleanup()
        await backend.close()


def main() -> int:
    """Entry point of ``python -m tensafe.console``."""
    try:
        config = load_config(ConsoleConfig)
    except ConfigError as exc:
        print(f"tensafe-console: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging("console", level=config.log_level, fmt=config.log_format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0
