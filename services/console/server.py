"""Wiring of the console: build the HTTP application from config and serve it.

Three middlewares wrap every page, outermost first: errors (a service's error becomes a
page with the matching status; an expired or revoked session goes back to sign-in),
session (every page but sign-in and the static files needs one) and CSRF (every POST
carries the session's token, or the sign-in nonce, else 403). SIGTERM stops accepting
connections and lets in-flight requests finish for ``shutdown_grace_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from tensafe.common.errors import TenSafeError, Unauthenticated
from tensafe.common.http_front import run_main, serve_app
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


async def serve(config: ConsoleConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    backend = Backend(config)
    await serve_app(build_app(config, backend), config, stop, name="console", close=backend.close)


def main() -> int:
    """Entry point of ``python -m tensafe.console``."""
    return run_main(ConsoleConfig, "console", serve)
