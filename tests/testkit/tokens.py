"""Access tokens for tests that run a service behind the real authentication interceptor.

:class:`Tokens` signs EdDSA access tokens exactly as the auth service does;
:class:`StaticKeys` hands its one public key to the real
:class:`~tensafe.common.auth.TokenVerifier` in place of the auth service's JWKS, so the
interceptor under test (:meth:`Tokens.interceptor`) verifies real signatures.
:class:`RecordedAudit` and :class:`NoAudit` are the interceptor's audit sinks;
:class:`StaticToken` gives one token to the SDK's real
:class:`~tensafe.client.auth.BearerInterceptor`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tensafe.common.auth import (
    SCOPE_READ,
    SCOPE_TRAIN,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    AuditRecord,
    AuditSink,
    AuthInterceptor,
    JsonWebKey,
    Revocations,
    TokenVerifier,
    jwk_from_public_key,
)

Metadata = tuple[tuple[str, str], ...]
DEFAULT_SCOPES: tuple[str, ...] = (SCOPE_READ, SCOPE_TRAIN)


class Tokens:
    """Issues EdDSA access tokens exactly as the auth service does, on a fresh key."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex[:8]
        self.jwk = jwk_from_public_key(self.kid, self._key.public_key())

    def token(self, tenant: str, *, scopes: Sequence[str] = DEFAULT_SCOPES) -> str:
        """A signed token of principal ``p-<tenant>`` in ``tenant``, valid for an hour.

        Args:
            tenant: The tenant id the token is for.
            scopes: The scopes it grants.

        Returns:
            The compact JWT.
        """
        now = int(time.time())
        principal = f"p-{tenant}"
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": principal,
            "tenant": tenant,
            "principal": principal,
            "scopes": list(scopes),
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self.kid})

    def metadata(self, tenant: str, *, scopes: Sequence[str] = DEFAULT_SCOPES) -> Metadata:
        """The same token as gRPC call metadata (``authorization: Bearer …``).

        Args:
            tenant: The tenant id the token is for.
            scopes: The scopes it grants.

        Returns:
            Metadata to pass to a stub call.
        """
        return (("authorization", f"Bearer {self.token(tenant, scopes=scopes)}"),)

    def interceptor(self, audit: AuditSink, *, service: str) -> AuthInterceptor:
        """The real authentication interceptor, trusting this issuer's key only.

        Args:
            audit: Where the interceptor records its audit events.
            service: The service name it reports.

        Returns:
            An interceptor to serve the service under test with.
        """
        return AuthInterceptor(TokenVerifier(StaticKeys(self.jwk)), audit, service=service)


class StaticKeys:
    """A key source holding the test's one signing key (the verifier is the real one)."""

    def __init__(self, jwk: JsonWebKey) -> None:
        self._jwk = jwk

    async def jwks(self) -> Sequence[JsonWebKey]:
        """The one public key."""
        return [self._jwk]

    async def revocations(self) -> Revocations:
        """Nothing is revoked."""
        return Revocations()


class RecordedAudit:
    """Keeps the audit events the interceptor emits, for assertions."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def record(self, record: AuditRecord) -> None:
        """Keep ``record``."""
        self.records.append(record)


class NoAudit:
    """Audit sink of the interceptor where the events are not under test."""

    async def record(self, record: AuditRecord) -> None:
        """Drop ``record``."""
        del record


class StaticToken:
    """Supplies one token to the SDK's ``BearerInterceptor`` (a ``TokenProvider``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str:
        """The token."""
        return self._token
