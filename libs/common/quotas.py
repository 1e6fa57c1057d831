"""Per-tenant quotas and rate limits: the one error shape and the per-tenant lock.

Every service enforces its own limits (docs/operations.md, "Quotas and limits"); they
all refuse the same way: :class:`~tensafe.common.errors.ResourceExhausted` with a
message naming the setting and its value, ``ErrorInfo.reason`` ``QUOTA_EXCEEDED`` (or
``RATE_LIMITED``) and ``ErrorInfo.metadata`` ``{"limit": <setting>, "max": <value>}``,
so a client can tell which limit it hit without parsing the message.

A quota check counts what the tenant holds and creates the new object in ONE
transaction, serialised per tenant by :func:`lock_tenant`, so two concurrent creates
cannot both see room for one more and nothing is left behind when one is refused.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.common.errors import ResourceExhausted

QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
"""``ErrorInfo.reason`` of a refused create: the tenant holds the maximum already."""

RATE_LIMITED = "RATE_LIMITED"
"""``ErrorInfo.reason`` of a call refused by a rate limit; retry after ``retry_after_seconds``."""


def quota_exceeded(limit: str, maximum: int, what: str) -> ResourceExhausted:
    """The error of a create refused by a per-tenant quota.

    Args:
        limit: The setting's field name, e.g. ``max_training_clients_per_tenant``.
        maximum: Its configured value.
        what: What the tenant holds, e.g. ``"32 live training clients"``; the message
            reads ``"<what> ... the limit <limit>=<maximum>"``.

    Returns:
        The error to raise.
    """
    return ResourceExhausted(
        f"the tenant holds {what}, the limit {limit}={maximum}; free some before creating more",
        reason=QUOTA_EXCEEDED,
        metadata={"limit": limit, "max": str(maximum)},
    )


def rate_limited(limit: str, maximum: int, retry_after_seconds: float) -> ResourceExhausted:
    """The error of a call refused by a rate limit.

    Args:
        limit: The setting's field name.
        maximum: Its configured value (calls per minute).
        retry_after_seconds: When the next call would be admitted.

    Returns:
        The error to raise; ``metadata["retry_after_seconds"]`` carries the hint.
    """
    wait = max(retry_after_seconds, 0.001)
    return ResourceExhausted(
        f"too many calls: the limit {limit}={maximum} per minute was reached; retry in "
        f"{wait:.3f} s",
        reason=RATE_LIMITED,
        metadata={"limit": limit, "max": str(maximum), "retry_after_seconds": f"{wait:.3f}"},
    )


def _lock_key(scope: str, tenant: str) -> int:
    digest = hashlib.sha256(f"{scope}\x00{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_tenant(session: AsyncSession, scope: str, tenant: str) -> None:
    """Serialise the quota checks of one tenant until the transaction ends.

    On PostgreSQL this takes the transaction-scoped advisory lock
    ``pg_advisory_xact_lock(hash(scope, tenant))``: no row to lock is needed (a
    tenant's first create has none) and unrelated tenants never wait for each other.
    On SQLite the transaction already holds the database's single write lock
    (``BEGIN IMMEDIATE``, :mod:`tensafe.common.db`), which serialises the same way.

    Args:
        session: The session of the transaction that counts and creates.
        scope: What is being counted, e.g. ``"trainer.clients"``; distinct scopes do not
            block each other.
        tenant: The tenant.
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(scope, tenant)}
        )
