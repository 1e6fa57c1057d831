"""Sessions and CSRF protection of the console, with no state and no secret of its own.

A session is the access token auth issued for the user's API key, kept in an HttpOnly,
SameSite=Strict cookie (Secure when the console is reached over TLS): the console never
sees the API key again, every gRPC call carries the token, and the session ends when the
token expires (auth caps tokens at 15 minutes) or is revoked at sign-out.

CSRF: every form carries a synchronizer token derived from the session,
``HMAC-SHA256(key=access token, "tensafe.console.csrf.v1")``. Computing it takes the
token, which another site cannot read (HttpOnly cookie, same-origin policy), so a forged
form cannot carry it; deriving it keeps the console free of server-side session state
and of a signing secret. The sign-in form has no session yet: it uses a double-submit
nonce (a random value both in a SameSite=Strict cookie and in the form).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

SESSION_COOKIE = "tensafe_console_session"
LOGIN_COOKIE = "tensafe_console_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_CSRF_CONTEXT = b"tensafe.console.csrf.v1"


@dataclass(frozen=True)
class Session:
    """A signed-in user, as their access token says (auth verifies it on every call).

    Attributes:
        token: The access token (JWT).
        tenant_id: The token's tenant (display only; the services enforce it).
        principal_id: The token's principal (display only).
        token_id: The token's ``jti``, revoked at sign-out.
        expires_at: The token's expiry, seconds since the epoch.
    """

    token: str
    tenant_id: str
    principal_id: str
    token_id: str
    expires_at: int

    @property
    def csrf_token(self) -> str:
        """The synchronizer token every form of this session carries."""
        return csrf_token_for(self.token)


def csrf_token_for(token: str) -> str:
    """The CSRF token bound to an access token."""
    digest = hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def tokens_match(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token or nonce; a missing one never matches."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


def new_login_nonce() -> str:
    """A fresh double-submit nonce for the sign-in form."""
    return secrets.token_urlsafe(32)


def session_from_token(token: str) -> Session | None:
    """Read the claims the pages show from an access token, or None if it is not one.

    The signature is not checked here: the console trusts nothing in the token; the
    services verify it on every call and answer UNAUTHENTICATED when it is not valid.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    expires_at = claims.get("exp")
    return Session(
        token=token,
        tenant_id=str(claims.get("tenant", "")),
        principal_id=str(claims.get("principal", "")),
        token_id=str(claims.get("jti", "")),
        expires_at=int(expires_at) if isinstance(expires_at, int | float) else 0,
    )
