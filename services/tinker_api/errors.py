"""One place where TenSafe errors become HTTP answers the ``tinker`` SDK understands.

The status of a gRPC code is the google.rpc mapping (``google/rpc/code.proto``), with two
choices made for the SDK: 402 is never sent (the SDK reads it as a billing pause and
waits for up to an hour), and a failed *future* is not an HTTP error at all but a
``200 {"error", "category"}`` body, which the SDK raises as ``RequestFailedError``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tensafe.common import errors

HTTP_STATUS: dict[errors.ErrorCode, int] = {
    errors.ErrorCode.INVALID_ARGUMENT: 400,
    errors.ErrorCode.FAILED_PRECONDITION: 400,
    errors.ErrorCode.UNAUTHENTICATED: 401,
    errors.ErrorCode.PERMISSION_DENIED: 403,
    errors.ErrorCode.NOT_FOUND: 404,
    errors.ErrorCode.ALREADY_EXISTS: 409,
    errors.ErrorCode.ABORTED: 409,
    errors.ErrorCode.RESOURCE_EXHAUSTED: 429,
    errors.ErrorCode.CANCELLED: 499,
    errors.ErrorCode.INTERNAL: 500,
    errors.ErrorCode.UNIMPLEMENTED: 501,
    errors.ErrorCode.UNAVAILABLE: 503,
    errors.ErrorCode.DEADLINE_EXCEEDED: 504,
}

SERVER_SIDE = frozenset(
    {
        errors.ErrorCode.INTERNAL,
        errors.ErrorCode.UNAVAILABLE,
        errors.ErrorCode.DEADLINE_EXCEEDED,
    }
)
"""Codes whose failed futures the SDK is told are the server's fault (category server)."""


def error_body(message: str, *, code: str, reason: str) -> dict[str, Any]:
    """The body of every refused request: FastAPI's ``detail`` plus the gRPC status."""
    return {"detail": message, "code": code, "reason": reason}


def http_error(error: errors.TenSafeError) -> web.Response:
    """The HTTP answer of a TenSafe error."""
    status = HTTP_STATUS.get(error.code, 500)
    headers = {}
    if status == 401:
        # RFC 6750: the SDK's JWT provider fetches a fresh token once on this header.
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return web.Response(
        status=status,
        text=json.dumps(error_body(error.message, code=error.code.value, reason=error.reason)),
        content_type="application/json",
        headers=headers,
    )


def not_served(method: str, path: str) -> web.Response:
    """The answer to a route this service does not serve."""
    message = (
        f"{method} {path} is not served by TenSafe's Tinker API; see docs/tinker.md for "
        "the routes it serves"
    )
    return web.Response(
        status=404,
        text=json.dumps(error_body(message, code="NOT_FOUND", reason="ROUTE_NOT_SERVED")),
        content_type="application/json",
    )


def failed_future_body(code: errors.ErrorCode, message: str) -> dict[str, str]:
    """What ``retrieve_future`` answers for a failed or cancelled future."""
    return {"error": message, "category": "server" if code in SERVER_SIDE else "user"}
