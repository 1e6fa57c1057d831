"""Authentication for every TenSafe service: one interceptor, one verifier, one identity.

How a call is authenticated
===========================

A client sends ``authorization: Bearer <JWT>``; the token was issued by the auth
service (``ExchangeApiKey``), signed with EdDSA over Ed25519 (RFC 8032, JOSE
serialisation RFC 8037) and carries ``kid`` (header), ``iss``, ``aud``, ``sub``,
``tenant``, ``principal``, ``scopes``, ``jti``, ``iat`` and ``exp``.

:class:`AuthInterceptor` verifies the token **locally** with :class:`TokenVerifier`:

* the public keys (a JWK set, RFC 7517) are cached; an unknown ``kid`` triggers one
  refresh (rate limited, so random ``kid`` values cannot flood the auth service);
* only ``alg=EdDSA`` is accepted — ``none`` and every other algorithm are rejected
  before any key is looked at;
* a token whose exact bytes verified before is found in a bounded cache of verified
  tokens, so the hot path costs a dictionary lookup plus the expiry and revocation
  checks, not an Ed25519 verification;
* revocations (token ids and disabled principals/tenants) are cached. Revocation is a
  bound, not a hope (DESIGN §8): a list older than ``revocation_bound_seconds`` (5 s by
  default) is refreshed **before** the call is admitted, so a revocation takes effect on
  every service within that bound whether the service was idle or busy. A busy service
  refreshes in the background once the list is ``revocation_ttl_seconds`` old (half the
  bound), so its calls rarely wait. Refreshes are single-flight: however many calls find
  the list stale, one fetch runs and they all await it. If a refresh fails (auth
  unreachable), calls are admitted on the last list until it is
  ``max_revocation_staleness_seconds`` old (30 s by default) and then fail closed with
  UNAVAILABLE; a failed fetch is retried at most once per
  ``revocation_retry_seconds``, so a down auth is not stampeded either.

A missing, malformed, expired, badly signed, wrong-``kid``, ``alg=none`` or revoked
token ends the call with UNAUTHENTICATED and an ``auth.failed`` audit record. A valid
one sets the request's :class:`Identity` in a context variable that servicers read with
:func:`current_identity` and check with :func:`require_scope`; a
:class:`~tensafe.common.errors.PermissionDenied` raised below the interceptor is
recorded as a ``permission.denied`` audit event.

Where keys come from
====================

The verifier asks a :class:`KeySource`. Services other than auth use
:class:`GrpcKeySource`: ``GetJwks`` (no bearer) and ``ListRevocations`` (with the
service's own token, obtained from its service-account API key by
:class:`ServiceCredentials`). The auth service plugs in a source that reads its own
database, so it never calls itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tensafe.common import errors, tls
from tensafe.common.config import ServiceConfig
from tensafe.common.grpc_errors import (
    Behavior,
    BehaviorWrapper,
    ServerInterceptorBase,
    from_rpc_error,
    wrap_handler,
)
from tensafe.common.jetstream import JetStream, JetStreamConfig, Retention
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

log = logging.getLogger(__name__)

SCOPE_READ = "read"
"""Read and download the tenant's objects."""

SCOPE_TRAIN = "train"
"""Train, publish adapters, run HE sessions."""

SCOPE_ADMIN = "admin"
"""Manage the tenant's principals, API keys and audit events."""

SCOPE_PLATFORM_ADMIN = "platform_admin"
"""Manage tenants and signing keys; act across tenants (admins of the platform tenant)."""

ALL_SCOPES = frozenset({SCOPE_READ, SCOPE_TRAIN, SCOPE_ADMIN, SCOPE_PLATFORM_ADMIN})

TOKEN_ALGORITHM = "EdDSA"  # noqa: S105 - a public identifier, not a secret
"""The one JWS algorithm accepted (RFC 8037 §3.1)."""

TOKEN_ISSUER = "tensafe-auth"  # noqa: S105 - a public identifier, not a secret
"""``iss`` of every access token."""

TOKEN_AUDIENCE = "tensafe"  # noqa: S105 - a public identifier, not a secret
"""``aud`` of every access token."""

AUTHORIZATION_HEADER = "authorization"

ALWAYS_PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services reachable without a token (probes and tooling need them)."""

AUTH_PUBLIC_METHODS = frozenset(
    {
        "/tensafe.auth.v1.AuthService/ExchangeApiKey",
        "/tensafe.auth.v1.AuthService/GetJwks",
    }
)
"""The auth RPCs that need no bearer (the contract says so)."""

_REQUIRED_CLAIMS = ("exp", "iat", "jti", "iss", "aud", "sub", "tenant", "principal", "scopes")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who is calling: set by the interceptor for the duration of one RPC.

    Attributes:
        tenant_id: The caller's tenant.
        principal_id: The calling principal.
        scopes: Scopes granted to this token.
        token_id: The token's ``jti``.
        expire_time: The token's expiry, seconds since the epoch.
    """

    tenant_id: str
    principal_id: str
    scopes: frozenset[str]
    token_id: str
    expire_time: float

    @property
    def is_platform_admin(self) -> bool:
        """Whether the caller may act across tenants."""
        return SCOPE_PLATFORM_ADMIN in self.scopes

    def has_scope(self, scope: str) -> bool:
        """Whether the token carries ``scope``."""
        return scope in self.scopes


_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "tensafe_identity", default=None
)


def current_identity() -> Identity:
    """The identity of the RPC being served.

    Returns:
        The caller's identity.

    Raises:
        Unauthenticated: The call was not authenticated (a public method, or code
            running outside an RPC).
    """
    identity = _IDENTITY.get()
    if identity is None:
        raise errors.Unauthenticated("this call requires a bearer access token")
    return identity


def require_scope(*scopes: str) -> Identity:
    """Check that the caller holds every scope in ``scopes``.

    Args:
        *scopes: The scopes the RPC needs.

    Returns:
        The caller's identity.

    Raises:
        Unauthenticated: No identity is set.
        PermissionDenied: A scope is missing; the message names it.
    """
    identity = current_identity()
    missing = sorted(s for s in scopes if s not in identity.scopes)
    if missing:
        raise errors.PermissionDenied(
            f"missing scope {', '.join(missing)}",
            reason="MISSING_SCOPE",
            metadata={"scopes": ",".join(missing)},
        )
    return identity


@dataclasses.dataclass(frozen=True)
class JsonWebKey:
    """One Ed25519 public key in JWK form (RFC 7517, RFC 8037 §2).

    Attributes:
        kid: Key id, matched against the token header's ``kid``.
        x: Base64url (no padding) of the 32-byte public key.
        kty: Key type, always ``OKP``.
        crv: Curve, always ``Ed25519``.
        alg: Algorithm, always ``EdDSA``.
        use: Public key use, always ``sig``.
    """

    kid: str
    x: str
    kty: str = "OKP"
    crv: str = "Ed25519"
    alg: str = TOKEN_ALGORITHM
    use: str = "sig"


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode`.

    Raises:
        ValueError: ``text`` is not base64url.
    """
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not base64url: {error}") from error


def jwk_from_public_key(kid: str, public_key: Ed25519PublicKey) -> JsonWebKey:
    """The JWK of an Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return JsonWebKey(kid=kid, x=b64url_encode(raw))


def public_key_from_jwk(jwk: JsonWebKey) -> Ed25519PublicKey:
    """Parse a JWK into an Ed25519 public key.

    Raises:
        IntegrityError: The JWK is not an Ed25519 signature key.
    """
    if (jwk.kty, jwk.crv, jwk.alg) != ("OKP", "Ed25519", TOKEN_ALGORITHM) or not jwk.kid:
        raise errors.IntegrityError(
            f"JWK {jwk.kid!r} is not an Ed25519 EdDSA key ({jwk.kty}/{jwk.crv}/{jwk.alg})"
        )
    try:
        raw = b64url_decode(jwk.x)
    except ValueError as error:
        raise errors.IntegrityError(f"JWK {jwk.kid!r}: {error}") from error
    if len(raw) != 32:
        raise errors.IntegrityError(f"JWK {jwk.kid!r}: public key is {len(raw)} bytes, not 32")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclasses.dataclass(frozen=True)
class Revocations:
    """What makes an otherwise valid token void.

    Attributes:
        token_ids: Revoked, not yet expired token ids (``jti``).
        disabled_subjects: Ids of disabled principals and tenants.
    """

    token_ids: frozenset[str] = frozenset()
    disabled_subjects: frozenset[str] = frozenset()


class KeySource(Protocol):
    """Where a :class:`TokenVerifier` gets public keys and revocations."""

    async def jwks(self) -> Sequence[JsonWebKey]:
        """The current verification keys."""
        ...

    async def revocations(self) -> Revocations:
        """The current revocations."""
        ...


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """A security event, before it is placed in the hash chain.

    Attributes:
        kind: What happened, e.g. ``auth.failed``, ``permission.denied``.
        service: The emitting service.
        tenant_id: Tenant concerned ("" if none).
        principal_id: Acting principal ("" if none).
        payload: Details; JSON-serialisable, never a secret.
        event_id: Globally unique id (the de-duplication key).
        time: When it happened, seconds since the epoch.
    """

    kind: str
    service: str
    tenant_id: str = ""
    principal_id: str = ""
    payload: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    event_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    time: float = dataclasses.field(default_factory=time.time)


class AuditSink(Protocol):
    """Where security events go (the auth service's chain, directly or via JetStream)."""

    async def record(self, record: AuditRecord) -> None:
        """Store or forward one event durably."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifierOptions:
    """Caching policy of a :class:`TokenVerifier`."""

    revocation_ttl_seconds: float = 2.5
    """Age after which the revocation list is refreshed in the background (a busy
    service keeps its list fresh without any call waiting); 0 fetches it on every call
    (no caching)."""

    revocation_bound_seconds: float = 5.0
    """Age past which the list is refreshed before the call is admitted: a revocation
    takes effect within this many seconds (plus one fetch) on an idle or a busy service."""

    max_revocation_staleness_seconds: float = 30.0
    """When refreshing fails, calls are still admitted on the last list until it is this
    old; past it they fail UNAVAILABLE (fail closed)."""

    revocation_retry_seconds: float = 1.0
    """After a failed refresh, calls within this interval do not fetch again (they use
    the stale list, or fail UNAVAILABLE past the staleness bound)."""

    min_jwks_refresh_interval_seconds: float = 1.0
    """Shortest interval between two JWKS fetches caused by unknown ``kid`` values; a
    call that needs a fetch sooner waits for the interval to pass."""

    verified_token_cache_size: int = 4096
    """Tokens whose signature verified, kept to skip re-verification."""

    clock_skew_seconds: float = 30.0
    """Leeway for ``iat``/``exp`` between the issuer's and this host's clocks (RFC 7519
    §4.1.4 allows "a small leeway, usually no more than a few minutes")."""

    def __post_init__(self) -> None:
        if self.revocation_ttl_seconds < 0:
            raise errors.ConfigError("revocation_ttl_seconds", "must be >= 0")
        if self.revocation_bound_seconds < self.revocation_ttl_seconds:
            raise errors.ConfigError(
                "revocation_bound_seconds", "must be >= revocation_ttl_seconds"
            )
        if self.max_revocation_staleness_seconds < self.revocation_bound_seconds:
            raise errors.ConfigError(
                "max_revocation_staleness_seconds", "must be >= revocation_bound_seconds"
            )
        if self.revocation_retry_seconds < 0:
            raise errors.ConfigError("revocation_retry_seconds", "must be >= 0")
        if not 0 <= self.clock_skew_seconds <= 300:
            raise errors.ConfigError("clock_skew_seconds", "must be in 0..300")
        if self.verified_token_cache_size < 0:
            raise errors.ConfigError("verified_token_cache_size", "must be >= 0")

    @classmethod
    def from_config(cls, config: ServiceConfig) -> VerifierOptions:
        """The policy a service's settings ask for (``revocation_bound_seconds`` and
        ``revocation_outage_seconds``; the background refresh starts at half the bound)."""
        return cls(
            revocation_ttl_seconds=config.revocation_bound_seconds / 2,
            revocation_bound_seconds=config.revocation_bound_seconds,
            max_revocation_staleness_seconds=config.revocation_outage_seconds,
            revocation_retry_seconds=min(1.0, config.revocation_bound_seconds),
        )


def _unauthenticated(message: str, reason: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(message, reason=reason)


class TokenVerifier:
    """Verifies access tokens locally against cached keys and revocations.

    Args:
        source: Where keys and revocations come from.
        options: Caching policy.
        clock: Seconds since the epoch (injectable for tests of expiry).
        monotonic: Monotonic seconds, for the age of the revocation list (injectable
            for tests of the bounds).
    """

    def __init__(
        self,
        source: KeySource,
        *,
        options: VerifierOptions | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._options = options or VerifierOptions()
        self._clock = clock
        self._monotonic = monotonic
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._keys_fetched_at = -float("inf")
        self._keys_lock = asyncio.Lock()
        self._revocations: Revocations | None = None
        self._revocations_fetched_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_started = -float("inf")
        self._refresh_failed_at = -float("inf")
        self._refresh_error: errors.TenSafeError | None = None
        self._verified: OrderedDict[str, Identity] = OrderedDict()

    async def verify(self, token: str) -> Identity:
        """Verify a bearer token and return the identity it carries.

        Args:
            token: The compact JWS.

        Returns:
            The caller's identity.

        Raises:
            Unauthenticated: Malformed, wrong algorithm, unknown key, bad signature,
                expired or revoked.
            Unavailable: Keys or revocations cannot be fetched and the cache is too old.
        """
        identity = self._verified.get(token)
        if identity is None:
            identity = await self._verify_signature(token)
            if self._options.verified_token_cache_size:
                self._verified[token] = identity
                if len(self._verified) > self._options.verified_token_cache_size:
                    self._verified.popitem(last=False)
        if identity.expire_time + self._options.clock_skew_seconds <= self._clock():
            raise _unauthenticated("access token expired", "TOKEN_EXPIRED")
        revocations = await self._current_revocations()
        if identity.token_id in revocations.token_ids:
            raise _unauthenticated("access token revoked", "TOKEN_REVOKED")
        disabled = revocations.disabled_subjects
        if identity.principal_id in disabled or identity.tenant_id in disabled:
            raise _unauthenticated("principal or tenant disabled", "SUBJECT_DISABLED")
        return identity

    async def refresh_revocations(self) -> None:
        """Fetch the revocation list now (after a local revocation, or at start-up).

        A fetch already in flight may have started before the revocation, so this one
        always starts a new fetch.

        Raises:
            Unavailable: The source cannot be reached.
        """
        await self._refresh_revocations(join=False)

    async def close(self) -> None:
        """Stop a refresh that is still running."""
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.TenSafeError):
                await self._refresh

    async def _verify_signature(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated("malformed access token", "TOKEN_MALFORMED") from None
        if header.get("alg") != TOKEN_ALGORITHM:
            raise _unauthenticated(
                f"token algorithm {header.get('alg')!r} is not accepted", "TOKEN_BAD_ALGORITHM"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _unauthenticated("token has no key id", "TOKEN_MALFORMED")
        key = self._keys.get(kid) or await self._refresh_keys_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                leeway=self._options.clock_skew_seconds,
                options={"require": list(_REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("access token expired", "TOKEN_EXPIRED") from None
        except (jwt.PyJWTError, InvalidSignature):
            raise _unauthenticated("access token does not verify", "TOKEN_INVALID") from None
        return _identity_from_claims(claims)

    async def _refresh_keys_for(self, kid: str) -> Ed25519PublicKey:
        async with self._keys_lock:
            key = self._keys.get(kid)
            if key is not None:
                return key
            # At most one fetch per interval: callers with unknown kids queue on the lock
            # (a fresh rotation still verifies; random kids cannot flood the source).
            wait = self._options.min_jwks_refresh_interval_seconds - (
                time.monotonic() - self._keys_fetched_at
            )
            if wait > 0:
                await asyncio.sleep(wait)
            jwks = await self._source.jwks()
            self._keys = {jwk.kid: public_key_from_jwk(jwk) for jwk in jwks}
            self._keys_fetched_at = time.monotonic()
            key = self._keys.get(kid)
        if key is None:
            raise _unauthenticated(f"unknown signing key {kid!r}", "TOKEN_UNKNOWN_KEY")
        return key

    async def _current_revocations(self) -> Revocations:
        options = self._options
        age = self._monotonic() - self._revocations_fetched_at
        if (
            self._revocations is None
            or options.revocation_ttl_seconds == 0
            or age > options.revocation_bound_seconds
        ):
            # Past the bound: the call waits for a fresh list (DESIGN §8).
            try:
                await self._refresh_revocations(join=options.revocation_ttl_seconds != 0)
            except errors.TenSafeError as error:
                age = self._monotonic() - self._revocations_fetched_at
                if self._revocations is None or age > options.max_revocation_staleness_seconds:
                    raise errors.Unavailable(
                        f"cannot check token revocation: the revocation list is "
                        f"{'missing' if self._revocations is None else f'{age:.0f} s old'} "
                        f"and cannot be refreshed ({error.message})",
                        reason="REVOCATIONS_UNAVAILABLE",
                    ) from None
        elif age > options.revocation_ttl_seconds and (
            self._refresh is None or self._refresh.done()
        ):
            self._start_refresh()
        assert self._revocations is not None  # set by a fetch or earlier
        return self._revocations

    def _start_refresh(self) -> asyncio.Task[None]:
        """Start one fetch; its outcome is kept for every caller that joins it."""
        task = asyncio.create_task(self._fetch_revocations())
        task.add_done_callback(_consume_task_error)
        self._refresh, self._refresh_started = task, self._monotonic()
        return task

    async def _refresh_revocations(self, *, join: bool) -> None:
        """Single-flight refresh: join the fetch in flight (if ``join``) or start one.

        Raises:
            TenSafeError: The fetch failed, or failed less than
                ``revocation_retry_seconds`` ago (no new fetch is tried then).
        """
        task = self._refresh
        # A fetch that started more than the bound ago cannot vouch for the bound.
        stale = self._monotonic() - self._refresh_started > self._options.revocation_bound_seconds
        if not join or task is None or task.done() or stale:
            since_failure = self._monotonic() - self._refresh_failed_at
            retry = self._options.revocation_retry_seconds
            if join and self._refresh_error is not None and since_failure < retry:
                raise self._refresh_error
            task = self._start_refresh()
        # Shielded: a caller whose RPC is cancelled does not cancel the others' fetch.
        await asyncio.shield(task)

    async def _fetch_revocations(self) -> None:
        # The list is as old as the moment the fetch started: a revocation committed
        # while the fetch was in flight may be missing from it.
        started = self._monotonic()
        try:
            revocations = await self._source.revocations()
        except Exception as error:
            typed = (
                error
                if isinstance(error, errors.TenSafeError)
                else errors.Unavailable(f"revocation source failed: {type(error).__name__}")
            )
            self._refresh_failed_at, self._refresh_error = self._monotonic(), typed
            log.warning("revocation list refresh failed: %s", error)
            raise typed from None
        self._revocations = revocations
        self._revocations_fetched_at = max(self._revocations_fetched_at, started)
        self._refresh_error = None


def _consume_task_error(task: asyncio.Task[None]) -> None:
    """Mark a background refresh's exception as seen (its callers handle it)."""
    if not task.cancelled():
        task.exception()


def _identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    tenant, principal, scopes = claims["tenant"], claims["principal"], claims["scopes"]
    token_id, expire_time = claims["jti"], claims["exp"]
    if (
        not isinstance(tenant, str)
        or not isinstance(principal, str)
        or not isinstance(token_id, str)
        or not isinstance(scopes, list)
        or not all(isinstance(s, str) for s in scopes)
        or not isinstance(expire_time, int | float)
        or claims["sub"] != principal
    ):
        raise _unauthenticated("access token claims are malformed", "TOKEN_MALFORMED")
    return Identity(
        tenant_id=tenant,
        principal_id=principal,
        scopes=frozenset(scopes),
        token_id=token_id,
        expire_time=float(expire_time),
    )


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Extract the bearer token from call metadata.

    Raises:
        Unauthenticated: There is no ``authorization: Bearer`` header.
    """
    for key, value in metadata or ():
        if key != AUTHORIZATION_HEADER:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise _unauthenticated("authorization header is not a bearer token", "TOKEN_MISSING")
    raise _unauthenticated("this call requires a bearer access token", "TOKEN_MISSING")


class AuthInterceptor(ServerInterceptorBase):
    """The one server interceptor that authenticates every TenSafe RPC.

    Install it through ``Assembly(interceptors=[...])``; it runs inside the error
    mapping, so the typed errors it raises reach clients as statuses.

    Args:
        verifier: Verifies tokens.
        audit: Receives ``auth.failed`` and ``permission.denied`` events.
        service: Name of the service, recorded in audit events.
        public_methods: Full method names (``/pkg.Service/Method``) served without a
            token, in addition to health and reflection.
        max_failure_events_per_second: ``auth.failed`` events recorded per second; the
            rest are counted and recorded as one ``auth.failed.suppressed`` event, so a
            flood of bad tokens cannot flood the audit chain.
        clock: Monotonic seconds (for the failure budget).
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        audit: AuditSink,
        *,
        service: str,
        public_methods: Iterable[str] = (),
        max_failure_events_per_second: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier
        self._audit = audit
        self._service = service
        self._public_methods = frozenset(public_methods)
        self._failure_budget = _EventBudget(max_failure_events_per_second, clock)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap every non-public method with authentication."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._public_methods:
            return handler
        if method.split("/")[1] in ALWAYS_PUBLIC_SERVICES:  # "/pkg.Service/Method"
            return handler
        return wrap_handler(handler, _AuthGuard(self, method))

    async def authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Identity:
        """Verify the call's bearer token; record a failure in the audit log.

        Raises:
            Unauthenticated: The token is missing or invalid.
        """
        try:
            return await self.verifier.verify(bearer_token(context.invocation_metadata()))
        except errors.Unauthenticated as error:
            admitted, suppressed = self._failure_budget.admit()
            if suppressed:
                await self._record(
                    AuditRecord(
                        kind="auth.failed.suppressed",
                        service=self._service,
                        payload={"count": suppressed},
                    )
                )
            if admitted:
                await self._record(
                    AuditRecord(
                        kind="auth.failed",
                        service=self._service,
                        payload={
                            "method": method,
                            "reason": error.reason,
                            "peer": context.peer(),
                        },
                    )
                )
            raise

    async def record_denied(
        self, identity: Identity, method: str, error: errors.PermissionDenied
    ) -> None:
        """Record a ``permission.denied`` event for an authorised-but-refused call."""
        await self._record(
            AuditRecord(
                kind="permission.denied",
                service=self._service,
                tenant_id=identity.tenant_id,
                principal_id=identity.principal_id,
                payload={"method": method, "reason": error.reason, "message": error.message},
            )
        )

    async def _record(self, record: AuditRecord) -> None:
        try:
            await self._audit.record(record)
        except Exception:  # an audit outage must not turn a refusal into a success
            log.exception("could not record audit event %s (%s)", record.event_id, record.kind)


class _EventBudget:
    """At most ``per_second`` events per one-second window; counts the rest."""

    def __init__(self, per_second: int, clock: Callable[[], float]) -> None:
        if per_second < 1:
            raise errors.ConfigError("max_failure_events_per_second", "must be >= 1")
        self._per_second = per_second
        self._clock = clock
        self._window_start = -float("inf")
        self._admitted = 0
        self._suppressed = 0

    def admit(self) -> tuple[bool, int]:
        """Whether to record this event, and how many were suppressed in the last
        window (reported once, when the next window opens)."""
        now = self._clock()
        flushed = 0
        if now - self._window_start >= 1.0:
            flushed, self._suppressed = self._suppressed, 0
            self._window_start, self._admitted = now, 0
        if self._admitted < self._per_second:
            self._admitted += 1
            return True, flushed
        self._suppressed += 1
        return False, flushed


class _AuthGuard(BehaviorWrapper):
    def __init__(self, interceptor: AuthInterceptor, method: str) -> None:
        self._interceptor = interceptor
        self._method = method

    def unary(self, inner: Behavior) -> Behavior:
        interceptor, method = self._interceptor, self._method

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identity = await interceptor.authenticate(context, method)
            reset = _IDENTITY.set(identity)
            try:
                result = inner(request, context)
                return await result if asyncio.iscoroutine(result) else result
            except errors.PermissionDenied as error:
                await interceptor.record_denied(identity, method, error)
                raise
            finally:
                _IDENTITY.reset(reset)

        return behavior

    def streaming(self, inner: Behavior) -> Behavior:
        interceptor, method = self._interceptor, self._method

        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            identity = await interceptor.authenticate(context, method)
            reset = _IDENTITY.set(identity)
            try:
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif asyncio.iscoroutine(result):
                    await result
            except errors.PermissionDenied as error:
                await interceptor.record_denied(identity, method, error)
                raise
            finally:
                _IDENTITY.reset(reset)

        return behavior


class ServiceCredentials:
    """A service's own access token, from its service-account API key.

    The token is exchanged on first use and again ``refresh_margin_seconds`` before it
    expires, so a caller always gets a token that is valid for a while.

    Args:
        channel: A channel to the auth service.
        api_key: The service account's API key.
        refresh_margin_seconds: Renew this long before expiry.
        clock: Seconds since the epoch.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        api_key: str,
        *,
        refresh_margin_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key:
            raise errors.ConfigError("TENSAFE_SERVICE_API_KEY", "must not be empty")
        self._stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        self._api_key = api_key
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._token = ""
        self._expire_time = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid access token.

        Raises:
            TenSafeError: The exchange failed (e.g. ``Unauthenticated`` for a revoked key,
                ``Unavailable`` when auth is down).
        """
        if self._token and self._expire_time - self._margin > self._clock():
            return self._token
        async with self._lock:
            if self._token and self._expire_time - self._margin > self._clock():
                return self._token
            try:
                response = await self._stub.ExchangeApiKey(
                    pb.ExchangeApiKeyRequest(api_key=self._api_key)
                )
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
            self._token = response.access_token
            self._expire_time = response.expire_time.ToSeconds()
            return self._token

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token."""
        return ((AUTHORIZATION_HEADER, f"Bearer {await self.token()}"),)


class GrpcKeySource:
    """Keys and revocations fetched from the auth service over gRPC.

    Args:
        channel: A channel to the auth service.
        credentials: The service's own credentials (``ListRevocations`` needs a bearer).
        timeout_seconds: Deadline of each fetch.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        credentials: ServiceCredentials,
        *,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        self._credentials = credentials
        self._timeout = timeout_seconds

    async def jwks(self) -> Sequence[JsonWebKey]:
        """``GetJwks``.

        Raises:
            Unavailable: Auth cannot be reached.
        """
        try:
            response = await self._stub.GetJwks(pb.GetJwksRequest(), timeout=self._timeout)
        except grpc.RpcError as error:
            raise _as_unavailable(error) from None
        return [
            JsonWebKey(kid=k.kid, x=k.x, kty=k.kty, crv=k.crv, alg=k.alg, use=k.use)
            for k in response.keys
        ]

    async def revocations(self) -> Revocations:
        """``ListRevocations`` with the service's token.

        Raises:
            Unavailable: Auth cannot be reached or refuses the service's credentials.
        """
        try:
            metadata = await self._credentials.metadata()
            response = await self._stub.ListRevocations(
                pb.ListRevocationsRequest(), metadata=metadata, timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise _as_unavailable(error) from None
        except errors.TenSafeError as error:
            raise errors.Unavailable(f"cannot authenticate to the auth service: {error}") from None
        return Revocations(
            token_ids=frozenset(response.token_ids),
            disabled_subjects=frozenset(response.disabled_subjects),
        )


def _as_unavailable(error: grpc.RpcError) -> errors.TenSafeError:
    typed = from_rpc_error(error)
    if isinstance(typed, errors.Unavailable):
        return typed
    # Whatever auth answered, this service cannot verify tokens right now.
    return errors.Unavailable(f"auth service: {typed.message}", reason="AUTH_UNAVAILABLE")


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 (the JCS idea, RFC 8785).

    Used wherever bytes are hashed or signed, so that every reader recomputes the same
    digest. Floats are rejected: their text form is not portable across encoders.

    Raises:
        InvalidArgument: ``value`` holds a float or a non-JSON type.
    """

    def check(item: Any) -> None:
        if isinstance(item, float):
            raise errors.InvalidArgument("payload", "floats are not allowed in canonical JSON")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise errors.InvalidArgument("payload", "object keys must be strings")
                check(sub)
        elif isinstance(item, list | tuple):
            for sub in item:
                check(sub)
        elif item is not None and not isinstance(item, str | int | bool):
            raise errors.InvalidArgument("payload", f"{type(item).__name__} is not JSON")

    check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


AUDIT_STREAM = "TENSAFE_AUDIT"
"""JetStream stream that carries audit events from every service to auth."""

AUDIT_SUBJECT_PREFIX = "tensafe.audit"
"""Services publish on ``tensafe.audit.<service>``."""

AUDIT_DURABLE = "auth-audit"
"""The auth service's durable consumer of :data:`AUDIT_STREAM`."""


def audit_stream_config(nats_url: str, *, durable: str | None = None) -> JetStreamConfig:
    """The JetStream settings of the audit stream (publishers and the auth consumer).

    Work-queue retention: an event leaves the stream once auth has appended it to the
    chain (and acked); until then it waits, so no event is lost while auth is down.
    Deliveries are never dead-lettered (``max_deliver=-1``): an audit event is retried
    until it is stored.

    Args:
        nats_url: NATS server URL(s).
        durable: The consumer name (auth only).
    """
    return JetStreamConfig(
        url=nats_url,
        stream=AUDIT_STREAM,
        subjects=(f"{AUDIT_SUBJECT_PREFIX}.>",),
        durable=durable,
        retention=Retention.WORK_QUEUE,
        max_deliver=-1,
        fetch_batch=64,
    )


def audit_record_to_json(record: AuditRecord) -> bytes:
    """Wire form of an audit event on the audit stream."""
    return canonical_json(
        {
            "event_id": record.event_id,
            "kind": record.kind,
            "service": record.service,
            "tenant_id": record.tenant_id,
            "principal_id": record.principal_id,
            "payload": dict(record.payload),
            "time_us": round(record.time * 1_000_000),
        }
    ).encode("utf-8")


def audit_record_from_json(data: bytes) -> AuditRecord:
    """Parse :func:`audit_record_to_json` output.

    Raises:
        InvalidArgument: Malformed event.
    """
    try:
        value = json.loads(data)
        record = AuditRecord(
            kind=str(value["kind"]),
            service=str(value["service"]),
            tenant_id=str(value["tenant_id"]),
            principal_id=str(value["principal_id"]),
            payload=dict(value["payload"]),
            event_id=str(value["event_id"]),
            time=int(value["time_us"]) / 1_000_000,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise errors.InvalidArgument("audit_event", f"malformed: {error}") from None
    if not record.event_id or not record.kind or not record.service:
        raise errors.InvalidArgument("audit_event", "event_id, kind and service are required")
    return record


class JetStreamAuditSink:
    """Publishes audit events to the audit stream, de-duplicated by event id.

    Args:
        jetstream: A connected helper configured with :func:`audit_stream_config`.
    """

    def __init__(self, jetstream: JetStream) -> None:
        self._jetstream = jetstream

    async def record(self, record: AuditRecord) -> None:
        """Publish one event (durable once this returns).

        Raises:
            Unavailable: NATS does not answer.
        """
        await self._jetstream.publish(
            f"{AUDIT_SUBJECT_PREFIX}.{record.service}",
            audit_record_to_json(record),
            msg_id=record.event_id,
        )


@dataclasses.dataclass(frozen=True)
class RemoteAuthentication:
    """What a service other than auth installs: the interceptor and its resources.

    Attributes:
        interceptor: Goes into ``Assembly(interceptors=[...])``.
        audit: Publishes the service's own security events (e.g. a key unwrap).
        close: Releases the channel to auth and the NATS connection.
    """

    interceptor: AuthInterceptor
    audit: AuditSink
    close: Callable[[], Awaitable[None]]


async def connect_authentication(
    config: ServiceConfig,
    *,
    service: str,
    options: VerifierOptions | None = None,
) -> RemoteAuthentication:
    """Build the authentication of a service other than auth from its config.

    Args:
        config: The service's :class:`~tensafe.common.config.ServiceConfig`
            (``auth_url``, ``service_api_key`` and ``nats_url`` are required).
        service: The service's name (audit events and NATS client name).
        options: Verifier caching policy; by default the one the config's
            ``revocation_bound_seconds`` and ``revocation_outage_seconds`` ask for.

    Returns:
        The interceptor, the audit sink and a close function.

    Raises:
        ConfigError: A required setting is missing.
        Unavailable: NATS cannot be reached.
    """
    for setting_name in ("auth_url", "service_api_key", "nats_url"):
        if not getattr(config, setting_name):
            raise errors.ConfigError(
                f"TENSAFE_{setting_name.upper()}",
                f"required: {service} verifies tokens with the auth service and sends it "
                "audit events",
            )
    jetstream = await JetStream.connect(
        audit_stream_config(config.nats_url),
        client_name=f"tensafe-{service}-audit",
        tls=tls.nats_client_context(config),
    )
    try:
        await jetstream.ensure_stream()
    except BaseException:
        await jetstream.close()
        raise
    channel = tls.service_channel(config.auth_url, config)
    credentials = ServiceCredentials(channel, config.service_api_key)
    verifier = TokenVerifier(
        # A fetch that blocks calls must give up well within the revocation bound.
        GrpcKeySource(channel, credentials, timeout_seconds=2.0),
        options=options or VerifierOptions.from_config(config),
    )
    sink = JetStreamAuditSink(jetstream)

    async def close() -> None:
        await verifier.close()
        await jetstream.close()
        await channel.close(None)

    return RemoteAuthentication(
        interceptor=AuthInterceptor(verifier, sink, service=service), audit=sink, close=close
    )
