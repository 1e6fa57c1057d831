"""Objects of the auth domain and the fixed role → scope mapping."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Generic, TypeVar

from tensafe.common.auth import SCOPE_ADMIN, SCOPE_PLATFORM_ADMIN, SCOPE_READ, SCOPE_TRAIN

T = TypeVar("T")


class TenantState(enum.Enum):
    """Lifecycle of a tenant (names match the proto enum without prefix)."""

    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"


class PrincipalKind(enum.Enum):
    """A person or a machine identity."""

    USER = "USER"
    SERVICE_ACCOUNT = "SERVICE_ACCOUNT"


class Role(enum.Enum):
    """A role grants a fixed set of scopes (see :data:`ROLE_SCOPES`)."""

    ADMIN = "ADMIN"
    TRAINER = "TRAINER"
    READER = "READER"


ROLE_SCOPES: dict[Role, frozenset[str]] = {
    Role.READER: frozenset({SCOPE_READ}),
    Role.TRAINER: frozenset({SCOPE_READ, SCOPE_TRAIN}),
    Role.ADMIN: frozenset({SCOPE_READ, SCOPE_TRAIN, SCOPE_ADMIN}),
}
"""What each role may do. Admins of the platform tenant also get ``platform_admin``."""


@dataclasses.dataclass(frozen=True)
class Tenant:
    """The unit of isolation."""

    id: str
    display_name: str
    state: TenantState
    is_platform: bool
    """The platform tenant's admins manage tenants and signing keys."""
    create_time: datetime


@dataclasses.dataclass(frozen=True)
class Principal:
    """A user or service account of a tenant."""

    id: str
    tenant_id: str
    kind: PrincipalKind
    name: str
    roles: tuple[Role, ...]
    disabled: bool
    create_time: datetime


def principal_scopes(principal: Principal, tenant: Tenant) -> frozenset[str]:
    """All scopes a principal's roles grant."""
    scopes: set[str] = set()
    for role in principal.roles:
        scopes |= ROLE_SCOPES[role]
    if tenant.is_platform and Role.ADMIN in principal.roles:
        scopes.add(SCOPE_PLATFORM_ADMIN)
    return frozenset(scopes)


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """Metadata of an API key; the secret itself is never stored."""

    id: str
    prefix: str
    principal_id: str
    tenant_id: str
    description: str
    create_time: datetime
    expire_time: datetime | None
    revoke_time: datetime | None


@dataclasses.dataclass(frozen=True)
class StoredApiKey:
    """An API key with its argon2id hash, as the store holds it."""

    key: ApiKey
    secret_hash: str


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """An Ed25519 token-signing key; the private half is encrypted at rest."""

    kid: str
    public_key: bytes
    """Raw 32-byte Ed25519 public key."""
    encrypted_private_key: bytes
    """AES-256-GCM nonce || ciphertext || tag of the raw 32-byte private key."""
    create_time: datetime
    retire_time: datetime | None
    """When it stopped signing (rotation)."""
    verify_until: datetime | None
    """Its public key leaves the JWKS after this (retire time + longest token life)."""


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """An access token the service issued (for revocation by id)."""

    token_id: str
    tenant_id: str
    principal_id: str
    api_key_id: str
    """The API key it was exchanged from."""
    expire_time: datetime


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    """One entry of the hash-chained audit log."""

    seq: int
    event_id: str
    time: datetime
    service: str
    kind: str
    tenant_id: str
    principal_id: str
    payload_json: str
    prev_hash: str
    hash: str


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list (AIP-158)."""

    items: list[T]
    next_page_token: str
