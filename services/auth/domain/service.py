"""The auth domain: every operation of the auth service, with its authorisation.

Plain Python: callers pass the caller's :class:`~tensafe.common.auth.Identity`
explicitly; nothing here knows gRPC. Each state change and its audit event are written
in the same database transaction, so the log never misses (or invents) a change.

Authorisation (scopes from :mod:`tensafe.common.auth`):

==============================  =========================================================
operation                       needs
==============================  =========================================================
tenants: create, list, disable  ``platform_admin``
tenant: get                     own tenant (any scope), or ``platform_admin``
principals, keys: create, etc.  ``admin`` in the caller's tenant (``platform_admin``: any)
principals: get, list           ``read`` in the caller's tenant
tokens: revoke                  the token's own principal, or ``admin`` of its tenant
revocations                     a principal of the platform tenant (service accounts)
signing keys: rotate            ``platform_admin``
audit: list                     ``admin`` (own tenant's events; ``platform_admin``: all)
audit: verify                   ``platform_admin``
==============================  =========================================================

Objects of another tenant are reported as NOT_FOUND, never as "forbidden".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tensafe.auth.domain import model
from tensafe.auth.domain.audit import ChainVerdict, ChainVerifier
from tensafe.auth.domain.crypto import (
    ApiKeyHasher,
    SigningKeyCipher,
    api_key_prefix,
    generate_api_key,
    public_bytes,
)
from tensafe.auth.domain.ratelimit import RateLimit, admit
from tensafe.auth.store.sql import AuthStore, AuthTransaction
from tensafe.common.auth import (
    SCOPE_ADMIN,
    SCOPE_PLATFORM_ADMIN,
    SCOPE_READ,
    TOKEN_ALGORITHM,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    AuditRecord,
    Identity,
    JsonWebKey,
    Revocations,
    b64url_decode,
    b64url_encode,
    jwk_from_public_key,
)
from tensafe.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tensafe.common.quotas import rate_limited

log = logging.getLogger(__name__)

SERVICE_NAME = "auth"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_MAX_NAME = 200
_MAX_DESCRIPTION = 1000
_MAX_REQUEST_ID = 128
_VERIFY_PAGE = 500


@dataclasses.dataclass(frozen=True, kw_only=True)
class AccessToken:
    """An issued access token and what it grants."""

    token: str
    token_id: str
    kid: str
    tenant_id: str
    principal_id: str
    scopes: tuple[str, ...]
    expire_time: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class BootstrapResult:
    """What ``bootstrap`` created; the secrets are shown once."""

    tenant: model.Tenant
    admin: model.Principal
    admin_api_key: str
    service_api_keys: dict[str, str]
    """Service-account name → API key."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


def _page(page_size: int, page_token: str) -> tuple[int, str]:
    if page_size < 0:
        raise InvalidArgument("page_size", "must be >= 0")
    limit = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if not page_token:
        return limit, ""
    try:
        return limit, b64url_decode(page_token).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "not a token from a previous response") from None


def _next_token(items: list[Any], limit: int, last: Callable[[Any], str]) -> tuple[list[Any], str]:
    if len(items) <= limit:
        return items, ""
    items = items[:limit]
    return items, b64url_encode(last(items[-1]).encode("utf-8"))


def _require(caller: Identity, scope: str) -> None:
    if scope not in caller.scopes:
        raise PermissionDenied(
            f"missing scope {scope}", reason="MISSING_SCOPE", metadata={"scopes": scope}
        )


def _visible(caller: Identity, tenant_id: str) -> bool:
    return caller.is_platform_admin or caller.tenant_id == tenant_id


def _check_request_id(request_id: str) -> str | None:
    if len(request_id) > _MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {_MAX_REQUEST_ID} characters")
    return request_id or None


def _check_name(field: str, value: str, limit: int = _MAX_NAME) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"at most {limit} characters")
    return value


class AuthDomain:
    """Tenants, principals, API keys, tokens, signing keys and the audit chain.

    Args:
        store: The service's database.
        cipher: Encrypts signing keys at rest.
        hasher: Hashes API keys.
        max_token_ttl: Longest (and default) access-token lifetime.
        exchange_rate: The ExchangeApiKey rate limit per API key.
        rate_clock: Wall-clock seconds of the rate limit (its own, so that tests can
            age tokens with ``clock`` without moving the limit's time).
        clock: Current UTC time (injectable so tests can age tokens and keys).
    """

    def __init__(
        self,
        store: AuthStore,
        *,
        cipher: SigningKeyCipher,
        hasher: ApiKeyHasher,
        max_token_ttl: timedelta,
        exchange_rate: RateLimit,
        rate_clock: Callable[[], float] = time.time,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._store = store
        self._cipher = cipher
        self._hasher = hasher
        self._max_token_ttl = max_token_ttl
        self._exchange_rate = exchange_rate
        self._rate_clock = rate_clock
        self._clock = clock
        self._private_keys: dict[str, Ed25519PrivateKey] = {}

    # Audit.

    def _audit(
        self,
        kind: str,
        *,
        tenant_id: str = "",
        principal_id: str = "",
        **payload: Any,
    ) -> AuditRecord:
        return AuditRecord(
            kind=kind,
            service=SERVICE_NAME,
            tenant_id=tenant_id,
            principal_id=principal_id,
            payload=payload,
            time=self._clock().timestamp(),
        )

    async def record(self, record: AuditRecord) -> None:
        """Append one event to the chain (the :class:`AuditSink` of this service)."""
        async with self._store.transaction() as tx:
            await tx.append_audit([record])

    async def record_many(self, records: Sequence[AuditRecord]) -> int:
        """Append events, skipping event ids already in the chain; returns how many new."""
        async with self._store.transaction() as tx:
            return len(await tx.append_audit(records))

    async def list_audit_events(
        self, caller: Identity, *, page_size: int, page_token: str
    ) -> model.Page[model.AuditEvent]:
        """The caller's tenant's audit events in chain order (platform admin: all)."""
        _require(caller, SCOPE_ADMIN)
        limit, after = _page(page_size, page_token)
        try:
            after_seq = int(after or "0")
        except ValueError:
            raise InvalidArgument("page_token", "not a token from a previous response") from None
        tenant = None if caller.is_platform_admin else caller.tenant_id
        async with self._store.transaction(read_only=True) as tx:
            events = await tx.list_audit(tenant_id=tenant, after_seq=after_seq, limit=limit + 1)
        items, token = _next_token(events, limit, lambda e: str(e.seq))
        return model.Page(items, token)

    async def verify_audit_log(self, caller: Identity) -> ChainVerdict:
        """Walk the whole chain and name the first bad entry."""
        _require(caller, SCOPE_PLATFORM_ADMIN)
        return await self.verify_chain()

    async def audit_chain_length(self) -> int:
        """Entries in the audit chain (its recorded head), for ``/metrics``."""
        async with self._store.transaction(read_only=True) as tx:
            head_seq, _ = await tx.audit_head()
        return head_seq

    async def verify_chain(self) -> ChainVerdict:
        """Verify the chain without an authorisation check (``tensafe audit verify``)."""
        verifier = ChainVerifier()
        async with self._store.transaction(read_only=True) as tx:
            head_seq, head_hash = await tx.audit_head()
            after = 0
            while True:
                events = await tx.list_audit(tenant_id=None, after_seq=after, limit=_VERIFY_PAGE)
                if not events or not verifier.feed(events):
                    break
                after = events[-1].seq
        return verifier.finish(head_seq=head_seq, head_hash=head_hash)

    # Tenants.

    async def create_tenant(
        self, caller: Identity, *, display_name: str, request_id: str
    ) -> model.Tenant:
        """Create a tenant (idempotent by ``request_id``)."""
        _require(caller, SCOPE_PLATFORM_ADMIN)
        name = _check_name("display_name", display_name)
        request = _check_request_id(request_id)
        async with self._store.transaction() as tx:
            if request is not None:
                existing = await tx.get_tenant_by_request(request)
                if existing is not None:
                    return existing
            if await tx.get_tenant_by_name(name) is not None:
                raise AlreadyExists(f"a tenant named {name!r} exists")
            tenant = model.Tenant(
                id=_new_id(),
                display_name=name,
                state=model.TenantState.ACTIVE,
                is_platform=False,
                create_time=self._clock(),
            )
            await tx.insert_tenant(tenant, request_id=request)
            await tx.append_audit(
                [
                    self._audit(
                        "tenant.created",
                        tenant_id=tenant.id,
                        principal_id=caller.principal_id,
                        display_name=name,
                    )
                ]
            )
        return tenant

    async def get_tenant(self, caller: Identity, tenant_id: str) -> model.Tenant:
        """A tenant the caller may see."""
        async with self._store.transaction(read_only=True) as tx:
            tenant = await tx.get_tenant(tenant_id)
        if tenant is None or not _visible(caller, tenant.id):
            raise NotFound(f"tenant {tenant_id} not found")
        return tenant

    async def list_tenants(
        self, caller: Identity, *, page_size: int, page_token: str
    ) -> model.Page[model.Tenant]:
        """All tenants, by id."""
        _require(caller, SCOPE_PLATFORM_ADMIN)
        limit, after = _page(page_size, page_token)
        async with self._store.transaction(read_only=True) as tx:
            items = await tx.list_tenants(after_id=after, limit=limit + 1)
        page, token = _next_token(items, limit, lambda t: t.id)
        return model.Page(page, token)

    async def disable_tenant(self, caller: Identity, tenant_id: str) -> model.Tenant:
        """Disable a tenant: its keys and tokens stop working."""
        _require(caller, SCOPE_PLATFORM_ADMIN)
        async with self._store.transaction() as tx:
            tenant = await tx.get_tenant(tenant_id)
            if tenant is None:
                raise NotFound(f"tenant {tenant_id} not found")
            if tenant.is_platform:
                raise FailedPrecondition("the platform tenant cannot be disabled")
            if tenant.state is not model.TenantState.DISABLED:
                await tx.set_tenant_state(tenant_id, model.TenantState.DISABLED)
                await tx.append_audit(
                    [
                        self._audit(
                            "tenant.disabled", tenant_id=tenant_id, principal_id=caller.principal_id
                        )
                    ]
                )
        return dataclasses.replace(tenant, state=model.TenantState.DISABLED)

    # Principals.

    async def create_principal(
        self,
        caller: Identity,
        *,
        kind: model.PrincipalKind,
        name: str,
        roles: Sequence[model.Role],
        request_id: str,
        tenant_id: str,
    ) -> model.Principal:
        """Create a principal in the caller's tenant (platform admin: any tenant)."""
        _require(caller, SCOPE_ADMIN)
        target = tenant_id or caller.tenant_id
        name = _check_name("name", name)
        if not roles:
            raise InvalidArgument("roles", "at least one role is required")
        request = _check_request_id(request_id)
        async with self._store.transaction() as tx:
            tenant = await tx.get_tenant(target)
            if tenant is None or not _visible(caller, target):
                raise NotFound(f"tenant {target} not found")
            if tenant.state is not model.TenantState.ACTIVE:
                raise FailedPrecondition(f"tenant {target} is disabled")
            if request is not None:
                existing = await tx.get_principal_by_request(target, request)
                if existing is not None:
                    return existing
            if await tx.get_principal_by_name(target, name) is not None:
                raise AlreadyExists(f"a principal named {name!r} exists in this tenant")
            principal = model.Principal(
                id=_new_id(),
                tenant_id=target,
                kind=kind,
                name=name,
                roles=tuple(dict.fromkeys(roles)),
                disabled=False,
                create_time=self._clock(),
            )
            await tx.insert_principal(principal, request_id=request)
            await tx.append_audit(
                [
                    self._audit(
                        "principal.created",
                        tenant_id=target,
                        principal_id=caller.principal_id,
                        created_principal_id=principal.id,
                        principal_kind=kind.value,
                        roles=[r.value for r in principal.roles],
                    )
                ]
            )
        return principal

    async def _visible_principal(
        self, tx: AuthTransaction, caller: Identity, principal_id: str
    ) -> model.Principal:
        principal = await tx.get_principal(principal_id)
        if principal is None or not _visible(caller, principal.tenant_id):
            raise NotFound(f"principal {principal_id} not found")
        return principal

    async def get_principal(self, caller: Identity, principal_id: str) -> model.Principal:
        """A principal of the caller's tenant."""
        _require(caller, SCOPE_READ)
        async with self._store.transaction(read_only=True) as tx:
            return await self._visible_principal(tx, caller, principal_id)

    async def list_principals(
        self, caller: Identity, *, page_size: int, page_token: str
    ) -> model.Page[model.Principal]:
        """The caller's tenant's principals, by id."""
        _require(caller, SCOPE_READ)
        limit, after = _page(page_size, page_token)
        async with self._store.transaction(read_only=True) as tx:
            items = await tx.list_principals(caller.tenant_id, after_id=after, limit=limit + 1)
        page, token = _next_token(items, limit, lambda p: p.id)
        return model.Page(page, token)

    async def disable_principal(self, caller: Identity, principal_id: str) -> model.Principal:
        """Disable a principal: its keys and tokens stop working."""
        _require(caller, SCOPE_ADMIN)
        async with self._store.transaction() as tx:
            principal = await self._visible_principal(tx, caller, principal_id)
            if not principal.disabled:
                await tx.set_principal_disabled(principal_id)
                await tx.append_audit(
                    [
                        self._audit(
                            "principal.disabled",
                            tenant_id=principal.tenant_id,
                            principal_id=caller.principal_id,
                            disabled_principal_id=principal_id,
                        )
                    ]
                )
        return dataclasses.replace(principal, disabled=True)

    # API keys.

    async def create_api_key(
        self,
        caller: Identity,
        *,
        principal_id: str,
        description: str,
        ttl: timedelta | None,
        request_id: str,
    ) -> tuple[model.ApiKey, str]:
        """Create an API key; returns its metadata and the secret (shown once)."""
        _require(caller, SCOPE_ADMIN)
        if len(description) > _MAX_DESCRIPTION:
            raise InvalidArgument("description", f"at most {_MAX_DESCRIPTION} characters")
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument("ttl", "must be positive")
        request = _check_request_id(request_id)
        new_key = generate_api_key()
        secret_hash = await asyncio.to_thread(self._hasher.hash, new_key.secret)
        async with self._store.transaction() as tx:
            principal = await self._visible_principal(tx, caller, principal_id)
            if principal.disabled:
                raise FailedPrecondition(f"principal {principal_id} is disabled")
            if request is not None:
                existing = await tx.get_api_key_by_request(principal_id, request)
                if existing is not None:
                    raise AlreadyExists(
                        f"API key {existing.key.id} was already created for this request id; "
                        "its secret was shown once (revoke it and create a new one if lost)"
                    )
            now = self._clock()
            key = model.ApiKey(
                id=_new_id(),
                prefix=new_key.prefix,
                principal_id=principal_id,
                tenant_id=principal.tenant_id,
                description=description,
                create_time=now,
                expire_time=None if ttl is None else now + ttl,
                revoke_time=None,
            )
            await tx.insert_api_key(
                model.StoredApiKey(key=key, secret_hash=secret_hash), request_id=request
            )
            await tx.append_audit(
                [
                    self._audit(
                        "api_key.created",
                        tenant_id=principal.tenant_id,
                        principal_id=caller.principal_id,
                        api_key_id=key.id,
                        prefix=key.prefix,
                        for_principal_id=principal_id,
                    )
                ]
            )
        return key, new_key.secret

    async def list_api_keys(
        self, caller: Identity, *, principal_id: str, page_size: int, page_token: str
    ) -> model.Page[model.ApiKey]:
        """The caller's tenant's API keys (metadata only)."""
        _require(caller, SCOPE_ADMIN)
        limit, after = _page(page_size, page_token)
        async with self._store.transaction(read_only=True) as tx:
            if principal_id:
                await self._visible_principal(tx, caller, principal_id)
            items = await tx.list_api_keys(
                caller.tenant_id, principal_id=principal_id, after_id=after, limit=limit + 1
            )
        page, token = _next_token(items, limit, lambda k: k.id)
        return model.Page(page, token)

    async def revoke_api_key(self, caller: Identity, api_key_id: str) -> model.ApiKey:
        """Revoke an API key at once, and every unexpired token exchanged from it."""
        _require(caller, SCOPE_ADMIN)
        async with self._store.transaction() as tx:
            stored = await tx.get_api_key(api_key_id)
            if stored is None or not _visible(caller, stored.key.tenant_id):
                raise NotFound(f"API key {api_key_id} not found")
            key = stored.key
            if key.revoke_time is None:
                key = dataclasses.replace(key, revoke_time=self._clock())
                assert key.revoke_time is not None
                await tx.revoke_api_key(api_key_id, key.revoke_time)
                voided = await tx.revoke_tokens_of_api_key(api_key_id, key.revoke_time)
                await tx.append_audit(
                    [
                        self._audit(
                            "api_key.revoked",
                            tenant_id=key.tenant_id,
                            principal_id=caller.principal_id,
                            api_key_id=key.id,
                            prefix=key.prefix,
                            tokens_revoked=voided,
                        )
                    ]
                )
        return key

    # Tokens.

    async def exchange_api_key(
        self, secret: str, *, scopes: Sequence[str], ttl: timedelta | None
    ) -> AccessToken:
        """Exchange an API key for a signed access token.

        Raises:
            Unauthenticated: Unknown, wrong, revoked or expired key, or a disabled
                principal or tenant (one message for all, so nothing leaks).
            PermissionDenied: ``scopes`` asks for more than the principal has.
            ResourceExhausted: The key's prefix passed the rate limit (reason
                ``RATE_LIMITED``, ``metadata["retry_after_seconds"]``).
        """
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument("ttl", "must be positive")
        lifetime = self._max_token_ttl if ttl is None else min(ttl, self._max_token_ttl)
        prefix = api_key_prefix(secret)
        await self._limit_exchange(prefix)
        stored = principal = tenant = None
        if prefix is not None:
            async with self._store.transaction(read_only=True) as tx:
                stored = await tx.get_api_key_by_prefix(prefix)
                if stored is not None:
                    principal = await tx.get_principal(stored.key.principal_id)
                    tenant = await tx.get_tenant(stored.key.tenant_id)
        matches = await asyncio.to_thread(
            self._hasher.verify, None if stored is None else stored.secret_hash, secret
        )
        now = self._clock()
        failure = ""
        if stored is None or not matches:
            failure = "unknown or wrong API key"
        elif stored.key.revoke_time is not None:
            failure = "API key revoked"
        elif stored.key.expire_time is not None and stored.key.expire_time <= now:
            failure = "API key expired"
        elif principal is None or principal.disabled:
            failure = "principal disabled"
        elif tenant is None or tenant.state is not model.TenantState.ACTIVE:
            failure = "tenant disabled"
        if failure:
            await self.record(
                self._audit(
                    "auth.failed",
                    tenant_id="" if stored is None or not matches else stored.key.tenant_id,
                    method="ExchangeApiKey",
                    prefix=prefix or "",
                    reason=failure,
                )
            )
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        assert stored is not None and principal is not None and tenant is not None
        granted = model.principal_scopes(principal, tenant)
        wanted = frozenset(scopes) or granted
        if not wanted <= granted:
            extra = ", ".join(sorted(wanted - granted))
            await self.record(
                self._audit(
                    "permission.denied",
                    tenant_id=tenant.id,
                    principal_id=principal.id,
                    method="ExchangeApiKey",
                    reason=f"scopes not granted: {extra}",
                )
            )
            raise PermissionDenied(f"scopes not granted to this principal: {extra}")
        token_id = _new_id()
        expire_time = now + lifetime
        async with self._store.transaction() as tx:
            signing_key = await tx.active_signing_key()
            if signing_key is None:
                raise FailedPrecondition("no signing key; the service did not initialise")
            await tx.insert_token(
                model.IssuedToken(
                    token_id=token_id,
                    tenant_id=tenant.id,
                    principal_id=principal.id,
                    api_key_id=stored.key.id,
                    expire_time=expire_time,
                )
            )
            await tx.append_audit(
                [
                    self._audit(
                        "token.issued",
                        tenant_id=tenant.id,
                        principal_id=principal.id,
                        token_id=token_id,
                        kid=signing_key.kid,
                        api_key_id=stored.key.id,
                        scopes=sorted(wanted),
                        expire_time=expire_time.isoformat(),
                    )
                ]
            )
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": principal.id,
            "tenant": tenant.id,
            "principal": principal.id,
            "scopes": sorted(wanted),
            "jti": token_id,
            "iat": int(now.timestamp()),
            "exp": int(expire_time.timestamp()),
        }
        token = jwt.encode(
            claims,
            self._private_key(signing_key),
            algorithm=TOKEN_ALGORITHM,
            headers={"kid": signing_key.kid},
        )
        return AccessToken(
            token=token,
            token_id=token_id,
            kid=signing_key.kid,
            tenant_id=tenant.id,
            principal_id=principal.id,
            scopes=tuple(sorted(wanted)),
            expire_time=datetime.fromtimestamp(int(expire_time.timestamp()), UTC),
        )

    async def _limit_exchange(self, prefix: str | None) -> None:
        """Charge one ExchangeApiKey call to the presented key's rate limit.

        The bucket is the key's public prefix, taken from the presented string before
        any lookup, and every call is charged whether the key exists, matches or not:
        the limit behaves identically for real and made-up keys (it reveals nothing
        about existence) and caps guesses at a known prefix (brute force). Strings not
        shaped like a key share one bucket; they can never succeed anyway. Checked
        before the argon2 verification, so a flood costs no hashing either.

        Raises:
            ResourceExhausted: The bucket is empty (reason ``RATE_LIMITED``).
        """
        bucket = f"exchange:{prefix}" if prefix is not None else "exchange:(malformed)"
        now_us = int(self._rate_clock() * 1_000_000)
        async with self._store.transaction() as tx:
            tat_us = await tx.lock_rate_limit(bucket, now_us)
            decision = admit(self._exchange_rate, tat_us=tat_us, now_us=now_us)
            if decision.admitted:
                await tx.set_rate_limit(bucket, decision.tat_us)
        if not decision.admitted:
            raise rate_limited(
                "exchange_api_key_rate_per_minute",
                self._exchange_rate.per_minute,
                decision.retry_after_us / 1_000_000,
            )

    def _private_key(self, key: model.SigningKey) -> Ed25519PrivateKey:
        private = self._private_keys.get(key.kid)
        if private is None:
            private = self._cipher.decrypt(key.kid, key.encrypted_private_key)
            self._private_keys[key.kid] = private
        return private

    async def revoke_token(self, caller: Identity, token_id: str) -> None:
        """Revoke an access token: its own principal, or an admin of its tenant."""
        async with self._store.transaction() as tx:
            token = await tx.get_token(token_id)
            if token is None or not _visible(caller, token.tenant_id):
                raise NotFound(f"token {token_id} not found")
            if token.principal_id != caller.principal_id:
                _require(caller, SCOPE_ADMIN)
            await tx.revoke_token(token_id, self._clock())
            await tx.append_audit(
                [
                    self._audit(
                        "token.revoked",
                        tenant_id=token.tenant_id,
                        principal_id=caller.principal_id,
                        token_id=token_id,
                    )
                ]
            )

    async def list_revocations(self, caller: Identity) -> Revocations:
        """The revocation list, for principals of the platform tenant (the services'
        accounts and platform admins): it names ids across tenants."""
        async with self._store.transaction(read_only=True) as tx:
            tenant = await tx.get_tenant(caller.tenant_id)
        if tenant is None or not tenant.is_platform:
            raise PermissionDenied(
                "only principals of the platform tenant read the revocation list",
                reason="PLATFORM_PRINCIPAL_REQUIRED",
            )
        return await self.revocations()

    async def revocations(self) -> Revocations:
        """Revoked unexpired token ids and disabled principals/tenants."""
        async with self._store.transaction(read_only=True) as tx:
            token_ids = await tx.revoked_token_ids(self._clock())
            subjects = await tx.disabled_subjects()
        return Revocations(token_ids=frozenset(token_ids), disabled_subjects=frozenset(subjects))

    # Signing keys.

    async def ensure_signing_key(self) -> str:
        """Create the first signing key if there is none; returns the active kid.

        Also checks that the active key decrypts under the configured KEK, so a wrong
        ``TENSAFE_SIGNING_KEY_ENCRYPTION_KEY`` fails at start-up, not at first login, and
        forgets issued-token records that have expired.

        Raises:
            IntegrityError: The active key does not decrypt.
        """
        async with self._store.transaction() as tx:
            await tx.lock_signing_keys()
            key = await tx.active_signing_key()
            if key is None:
                key = await self._new_signing_key(tx)
            await tx.prune_tokens(self._clock())
        self._private_key(key)
        return key.kid

    async def _new_signing_key(self, tx: AuthTransaction) -> model.SigningKey:
        private = Ed25519PrivateKey.generate()
        kid = _new_id()
        key = model.SigningKey(
            kid=kid,
            public_key=public_bytes(private.public_key()),
            encrypted_private_key=self._cipher.encrypt(kid, private),
            create_time=self._clock(),
            retire_time=None,
            verify_until=None,
        )
        await tx.insert_signing_key(key)
        await tx.append_audit([self._audit("signing_key.created", kid=kid)])
        self._private_keys[kid] = private
        return key

    async def rotate_signing_key(self, caller: Identity) -> str:
        """Start signing with a new key; old keys verify until their tokens expire."""
        _require(caller, SCOPE_PLATFORM_ADMIN)
        now = self._clock()
        async with self._store.transaction() as tx:
            await tx.lock_signing_keys()
            await tx.retire_signing_keys(when=now, verify_until=now + self._max_token_ttl)
            await tx.prune_tokens(now)
            key = await self._new_signing_key(tx)
            await tx.append_audit(
                [self._audit("signing_key.rotated", principal_id=caller.principal_id, kid=key.kid)]
            )
        return key.kid

    async def jwks(self) -> list[JsonWebKey]:
        """Public keys that verify tokens now (active and recently retired)."""
        async with self._store.transaction(read_only=True) as tx:
            keys = await tx.verifying_keys(self._clock())
        return [
            jwk_from_public_key(k.kid, Ed25519PublicKey.from_public_bytes(k.public_key))
            for k in keys
        ]

    # Bootstrap.

    async def bootstrap(
        self,
        *,
        tenant_name: str,
        admin_name: str,
        service_accounts: Sequence[str] = (),
    ) -> BootstrapResult:
        """Create the platform tenant, its first admin and API keys, once.

        Args:
            tenant_name: Display name of the platform tenant.
            admin_name: Name of the first admin user.
            service_accounts: Names of service accounts (reader role) to create in the
                platform tenant, e.g. the other services' identities.

        Raises:
            FailedPrecondition: A platform admin exists already.
        """
        tenant_name = _check_name("tenant_name", tenant_name)
        admin_name = _check_name("admin_name", admin_name)
        names = [_check_name("service_accounts", n) for n in service_accounts]
        if len(set(names)) != len(names) or admin_name in names:
            raise InvalidArgument("service_accounts", "names must be distinct")
        keys = {name: generate_api_key() for name in [admin_name, *names]}
        hashes = {
            name: await asyncio.to_thread(self._hasher.hash, key.secret)
            for name, key in keys.items()
        }
        now = self._clock()
        async with self._store.transaction() as tx:
            await tx.lock_signing_keys()
            if await tx.platform_admin_exists():
                raise FailedPrecondition(
                    "this deployment is already bootstrapped (a platform admin exists)"
                )
            if await tx.active_signing_key() is None:
                await self._new_signing_key(tx)
            tenant = model.Tenant(
                id=_new_id(),
                display_name=tenant_name,
                state=model.TenantState.ACTIVE,
                is_platform=True,
                create_time=now,
            )
            await tx.insert_tenant(tenant, request_id=None)
            created: dict[str, model.Principal] = {}
            for name in keys:
                is_admin = name == admin_name
                principal = model.Principal(
                    id=_new_id(),
                    tenant_id=tenant.id,
                    kind=(
                        model.PrincipalKind.USER
                        if is_admin
                        else model.PrincipalKind.SERVICE_ACCOUNT
                    ),
                    name=name,
                    roles=(model.Role.ADMIN,) if is_admin else (model.Role.READER,),
                    disabled=False,
                    create_time=now,
                )
                await tx.insert_principal(principal, request_id=None)
                api_key = model.ApiKey(
                    id=_new_id(),
                    prefix=keys[name].prefix,
                    principal_id=principal.id,
                    tenant_id=tenant.id,
                    description="bootstrap",
                    create_time=now,
                    expire_time=None,
                    revoke_time=None,
                )
                await tx.insert_api_key(
                    model.StoredApiKey(key=api_key, secret_hash=hashes[name]), request_id=None
                )
                created[name] = principal
            await tx.append_audit(
                [
                    self._audit(
                        "tenant.bootstrapped",
                        tenant_id=tenant.id,
                        principal_id=created[admin_name].id,
                        display_name=tenant_name,
                        service_accounts=names,
                    )
                ]
            )
        return BootstrapResult(
            tenant=tenant,
            admin=created[admin_name],
            admin_api_key=keys[admin_name].secret,
            service_api_keys={name: keys[name].secret for name in names},
        )
