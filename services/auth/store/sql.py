"""The auth service's SQL store: one transaction object per unit of work.

The domain opens :meth:`AuthStore.transaction` and calls the methods of the
:class:`AuthTransaction` it yields; nothing here decides policy. Table definitions
mirror ``migrations/versions``; times are integer microseconds since the epoch.

Appends to the audit chain are serialised by the ``auth_audit_head`` row: PostgreSQL
locks it with ``SELECT ... FOR UPDATE`` until the transaction ends; SQLite transactions
already hold the database's single write lock from ``BEGIN IMMEDIATE``
(:mod:`tensafe.common.db`). Two appends therefore never read the same head.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.auth.domain import model
from tensafe.auth.domain.audit import entry_hash, epoch_micros, from_epoch_micros
from tensafe.common.auth import AuditRecord, canonical_json
from tensafe.common.db import Database, migrate

SCRIPT_LOCATION = "tensafe.auth.store:migrations"
VERSION_TABLE = "alembic_version_auth"

metadata = sa.MetaData()
_ID = 32
_RATE_LIMIT_PRUNE = 100

tenants = sa.Table(
    "auth_tenants",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("is_platform", sa.Boolean(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True, unique=True),
)
principals = sa.Table(
    "auth_principals",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("tenant_id", sa.String(_ID), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("roles", sa.String(200), nullable=False),
    sa.Column("disabled", sa.Boolean(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
)
api_keys = sa.Table(
    "auth_api_keys",
    metadata,
    sa.Column("id", sa.String(_ID), primary_key=True),
    sa.Column("prefix", sa.String(16), nullable=False, unique=True),
    sa.Column("principal_id", sa.String(_ID), nullable=False),
    sa.Column("tenant_id", sa.String(_ID), nullable=False),
    sa.Column("secret_hash", sa.String(256), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("expire_time_us", sa.BigInteger(), nullable=True),
    sa.Column("revoke_time_us", sa.BigInteger(), nullable=True),
    sa.Column("request_id", sa.String(128), nullable=True),
)
signing_keys = sa.Table(
    "auth_signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.LargeBinary(), nullable=False),
    sa.Column("encrypted_private_key", sa.LargeBinary(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("retire_time_us", sa.BigInteger(), nullable=True),
    sa.Column("verify_until_us", sa.BigInteger(), nullable=True),
)
tokens = sa.Table(
    "auth_tokens",
    metadata,
    sa.Column("token_id", sa.String(_ID), primary_key=True),
    sa.Column("tenant_id", sa.String(_ID), nullable=False),
    sa.Column("principal_id", sa.String(_ID), nullable=False),
    sa.Column("api_key_id", sa.String(_ID), nullable=False),
    sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
    sa.Column("revoke_time_us", sa.BigInteger(), nullable=True),
)
audit_events = sa.Table(
    "auth_audit_events",
    metadata,
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("time_us", sa.BigInteger(), nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("tenant_id", sa.String(_ID), nullable=False),
    sa.Column("principal_id", sa.String(_ID), nullable=False),
    sa.Column("payload_json", sa.Text(), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
rate_limits = sa.Table(
    "auth_rate_limits",
    metadata,
    sa.Column("bucket", sa.String(64), primary_key=True),
    sa.Column("tat_us", sa.BigInteger(), nullable=False),
    sa.Index("ix_auth_rate_limits_tat", "tat_us"),
)
audit_head = sa.Table(
    "auth_audit_head",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger(), nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)


def _us(moment: datetime | None) -> int | None:
    return None if moment is None else epoch_micros(moment)


def _dt(micros: int | None) -> datetime | None:
    return None if micros is None else from_epoch_micros(micros)


def _tenant(row: Any) -> model.Tenant:
    return model.Tenant(
        id=row.id,
        display_name=row.display_name,
        state=model.TenantState(row.state),
        is_platform=bool(row.is_platform),
        create_time=from_epoch_micros(row.create_time_us),
    )


def _principal(row: Any) -> model.Principal:
    return model.Principal(
        id=row.id,
        tenant_id=row.tenant_id,
        kind=model.PrincipalKind(row.kind),
        name=row.name,
        roles=tuple(model.Role(r) for r in row.roles.split(",") if r),
        disabled=bool(row.disabled),
        create_time=from_epoch_micros(row.create_time_us),
    )


def _api_key(row: Any) -> model.StoredApiKey:
    return model.StoredApiKey(
        key=model.ApiKey(
            id=row.id,
            prefix=row.prefix,
            principal_id=row.principal_id,
            tenant_id=row.tenant_id,
            description=row.description,
            create_time=from_epoch_micros(row.create_time_us),
            expire_time=_dt(row.expire_time_us),
            revoke_time=_dt(row.revoke_time_us),
        ),
        secret_hash=row.secret_hash,
    )


def _signing_key(row: Any) -> model.SigningKey:
    return model.SigningKey(
        kid=row.kid,
        public_key=bytes(row.public_key),
        encrypted_private_key=bytes(row.encrypted_private_key),
        create_time=from_epoch_micros(row.create_time_us),
        retire_time=_dt(row.retire_time_us),
        verify_until=_dt(row.verify_until_us),
    )


def _audit_event(row: Any) -> model.AuditEvent:
    return model.AuditEvent(
        seq=int(row.seq),
        event_id=row.event_id,
        time=from_epoch_micros(row.time_us),
        service=row.service,
        kind=row.kind,
        tenant_id=row.tenant_id,
        principal_id=row.principal_id,
        payload_json=row.payload_json,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class AuthTransaction:
    """Reads and writes of one database transaction.

    Args:
        session: The session bound to the open transaction.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def _one(self, statement: Any) -> Any:
        return (await self._session.execute(statement)).first()

    async def _all(self, statement: Any) -> Sequence[Any]:
        return (await self._session.execute(statement)).all()

    # Tenants.

    async def get_tenant(self, tenant_id: str) -> model.Tenant | None:
        """A tenant by id."""
        row = await self._one(sa.select(tenants).where(tenants.c.id == tenant_id))
        return None if row is None else _tenant(row)

    async def get_tenant_by_request(self, request_id: str) -> model.Tenant | None:
        """The tenant created by an idempotency key."""
        row = await self._one(sa.select(tenants).where(tenants.c.request_id == request_id))
        return None if row is None else _tenant(row)

    async def get_tenant_by_name(self, display_name: str) -> model.Tenant | None:
        """A tenant by display name."""
        row = await self._one(sa.select(tenants).where(tenants.c.display_name == display_name))
        return None if row is None else _tenant(row)

    async def insert_tenant(self, tenant: model.Tenant, *, request_id: str | None) -> None:
        """Store a new tenant."""
        await self._session.execute(
            tenants.insert().values(
                id=tenant.id,
                display_name=tenant.display_name,
                state=tenant.state.value,
                is_platform=tenant.is_platform,
                create_time_us=epoch_micros(tenant.create_time),
                request_id=request_id,
            )
        )

    async def set_tenant_state(self, tenant_id: str, state: model.TenantState) -> None:
        """Change a tenant's state."""
        await self._session.execute(
            tenants.update().where(tenants.c.id == tenant_id).values(state=state.value)
        )

    async def list_tenants(self, *, after_id: str, limit: int) -> list[model.Tenant]:
        """Tenants ordered by id, after ``after_id``."""
        rows = await self._all(
            sa.select(tenants).where(tenants.c.id > after_id).order_by(tenants.c.id).limit(limit)
        )
        return [_tenant(r) for r in rows]

    async def platform_admin_exists(self) -> bool:
        """Whether any principal of a platform tenant holds the admin role."""
        row = await self._one(
            sa.select(principals.c.id)
            .join(tenants, tenants.c.id == principals.c.tenant_id)
            .where(tenants.c.is_platform.is_(True))
            .where(principals.c.roles.contains(model.Role.ADMIN.value))
            .limit(1)
        )
        return row is not None

    # Principals.

    async def get_principal(self, principal_id: str) -> model.Principal | None:
        """A principal by id."""
        row = await self._one(sa.select(principals).where(principals.c.id == principal_id))
        return None if row is None else _principal(row)

    async def get_principal_by_request(
        self, tenant_id: str, request_id: str
    ) -> model.Principal | None:
        """The principal created by an idempotency key in a tenant."""
        row = await self._one(
            sa.select(principals).where(
                principals.c.tenant_id == tenant_id, principals.c.request_id == request_id
            )
        )
        return None if row is None else _principal(row)

    async def get_principal_by_name(self, tenant_id: str, name: str) -> model.Principal | None:
        """A principal by name within a tenant."""
        row = await self._one(
            sa.select(principals).where(
                principals.c.tenant_id == tenant_id, principals.c.name == name
            )
        )
        return None if row is None else _principal(row)

    async def insert_principal(self, principal: model.Principal, *, request_id: str | None) -> None:
        """Store a new principal."""
        await self._session.execute(
            principals.insert().values(
                id=principal.id,
                tenant_id=principal.tenant_id,
                kind=principal.kind.value,
                name=principal.name,
                roles=",".join(r.value for r in principal.roles),
                disabled=principal.disabled,
                create_time_us=epoch_micros(principal.create_time),
                request_id=request_id,
            )
        )

    async def set_principal_disabled(self, principal_id: str) -> None:
        """Disable a principal."""
        await self._session.execute(
            principals.update().where(principals.c.id == principal_id).values(disabled=True)
        )

    async def list_principals(
        self, tenant_id: str, *, after_id: str, limit: int
    ) -> list[model.Principal]:
        """A tenant's principals ordered by id."""
        rows = await self._all(
            sa.select(principals)
            .where(principals.c.tenant_id == tenant_id, principals.c.id > after_id)
            .order_by(principals.c.id)
            .limit(limit)
        )
        return [_principal(r) for r in rows]

    # API keys.

    async def get_api_key(self, api_key_id: str) -> model.StoredApiKey | None:
        """An API key by id."""
        row = await self._one(sa.select(api_keys).where(api_keys.c.id == api_key_id))
        return None if row is None else _api_key(row)

    async def get_api_key_by_prefix(self, prefix: str) -> model.StoredApiKey | None:
        """An API key by its public prefix."""
        row = await self._one(sa.select(api_keys).where(api_keys.c.prefix == prefix))
        return None if row is None else _api_key(row)

    async def get_api_key_by_request(
        self, principal_id: str, request_id: str
    ) -> model.StoredApiKey | None:
        """The API key created by an idempotency key for a principal."""
        row = await self._one(
            sa.select(api_keys).where(
                api_keys.c.principal_id == principal_id, api_keys.c.request_id == request_id
            )
        )
        return None if row is None else _api_key(row)

    async def insert_api_key(self, stored: model.StoredApiKey, *, request_id: str | None) -> None:
        """Store a new API key (hash only)."""
        key = stored.key
        await self._session.execute(
            api_keys.insert().values(
                id=key.id,
                prefix=key.prefix,
                principal_id=key.principal_id,
                tenant_id=key.tenant_id,
                secret_hash=stored.secret_hash,
                description=key.description,
                create_time_us=epoch_micros(key.create_time),
                expire_time_us=_us(key.expire_time),
                revoke_time_us=None,
                request_id=request_id,
            )
        )

    async def revoke_api_key(self, api_key_id: str, when: datetime) -> None:
        """Mark an API key revoked (first revocation time wins)."""
        await self._session.execute(
            api_keys.update()
            .where(api_keys.c.id == api_key_id, api_keys.c.revoke_time_us.is_(None))
            .values(revoke_time_us=epoch_micros(when))
        )

    async def list_api_keys(
        self, tenant_id: str, *, principal_id: str, after_id: str, limit: int
    ) -> list[model.ApiKey]:
        """A tenant's API keys (optionally of one principal) ordered by id."""
        statement = sa.select(api_keys).where(
            api_keys.c.tenant_id == tenant_id, api_keys.c.id > after_id
        )
        if principal_id:
            statement = statement.where(api_keys.c.principal_id == principal_id)
        rows = await self._all(statement.order_by(api_keys.c.id).limit(limit))
        return [_api_key(r).key for r in rows]

    # Signing keys.

    async def active_signing_key(self) -> model.SigningKey | None:
        """The newest key that has not been retired."""
        row = await self._one(
            sa.select(signing_keys)
            .where(signing_keys.c.retire_time_us.is_(None))
            .order_by(signing_keys.c.create_time_us.desc())
            .limit(1)
        )
        return None if row is None else _signing_key(row)

    async def verifying_keys(self, now: datetime) -> list[model.SigningKey]:
        """Keys whose public half still verifies tokens at ``now``."""
        rows = await self._all(
            sa.select(signing_keys)
            .where(
                sa.or_(
                    signing_keys.c.verify_until_us.is_(None),
                    signing_keys.c.verify_until_us > epoch_micros(now),
                )
            )
            .order_by(signing_keys.c.create_time_us)
        )
        return [_signing_key(r) for r in rows]

    async def insert_signing_key(self, key: model.SigningKey) -> None:
        """Store a new signing key."""
        await self._session.execute(
            signing_keys.insert().values(
                kid=key.kid,
                public_key=key.public_key,
                encrypted_private_key=key.encrypted_private_key,
                create_time_us=epoch_micros(key.create_time),
                retire_time_us=None,
                verify_until_us=None,
            )
        )

    async def retire_signing_keys(self, *, when: datetime, verify_until: datetime) -> None:
        """Stop signing with every active key; keep verifying until ``verify_until``."""
        await self._session.execute(
            signing_keys.update()
            .where(signing_keys.c.retire_time_us.is_(None))
            .values(retire_time_us=epoch_micros(when), verify_until_us=epoch_micros(verify_until))
        )

    async def lock_signing_keys(self) -> None:
        """Serialise key creation and rotation (the audit head row is the lock)."""
        await self._session.execute(
            sa.select(audit_head.c.id).where(audit_head.c.id == 1).with_for_update()
        )

    # Tokens.

    async def insert_token(self, token: model.IssuedToken) -> None:
        """Record an issued token."""
        await self._session.execute(
            tokens.insert().values(
                token_id=token.token_id,
                tenant_id=token.tenant_id,
                principal_id=token.principal_id,
                api_key_id=token.api_key_id,
                expire_time_us=epoch_micros(token.expire_time),
                revoke_time_us=None,
            )
        )

    async def get_token(self, token_id: str) -> model.IssuedToken | None:
        """An issued token by id."""
        row = await self._one(sa.select(tokens).where(tokens.c.token_id == token_id))
        if row is None:
            return None
        return model.IssuedToken(
            token_id=row.token_id,
            tenant_id=row.tenant_id,
            principal_id=row.principal_id,
            api_key_id=row.api_key_id,
            expire_time=from_epoch_micros(row.expire_time_us),
        )

    async def revoke_token(self, token_id: str, when: datetime) -> None:
        """Mark a token revoked."""
        await self._session.execute(
            tokens.update()
            .where(tokens.c.token_id == token_id, tokens.c.revoke_time_us.is_(None))
            .values(revoke_time_us=epoch_micros(when))
        )

    async def revoke_tokens_of_api_key(self, api_key_id: str, when: datetime) -> int:
        """Revoke every unexpired token exchanged from an API key; returns how many."""
        result = await self._session.execute(
            tokens.update()
            .where(
                tokens.c.api_key_id == api_key_id,
                tokens.c.revoke_time_us.is_(None),
                tokens.c.expire_time_us > epoch_micros(when),
            )
            .values(revoke_time_us=epoch_micros(when))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def prune_tokens(self, now: datetime) -> int:
        """Forget tokens that have expired (their revocation no longer matters)."""
        result = await self._session.execute(
            tokens.delete().where(tokens.c.expire_time_us <= epoch_micros(now))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    # Rate limits.

    async def lock_rate_limit(self, bucket: str, now_us: int) -> int:
        """Lock a rate-limit row until the transaction ends; return its theoretical
        arrival time (microseconds since the epoch; ``now_us`` for a key without state).

        Up to 100 rows whose time has passed are pruned first (they carry no state);
        rows another transaction holds are skipped (``FOR UPDATE SKIP LOCKED``), so two
        pruning replicas never wait for, or deadlock on, each other. The row is then
        inserted if missing (``ON CONFLICT DO NOTHING``, so two replicas racing on a new
        key do not abort) and locked with ``SELECT ... FOR UPDATE``; on SQLite the
        transaction holds the write lock already.
        """
        stale = (
            sa.select(rate_limits.c.bucket)
            .where(rate_limits.c.tat_us < now_us)
            .limit(_RATE_LIMIT_PRUNE)
            .with_for_update(skip_locked=True)
        )
        await self._session.execute(rate_limits.delete().where(rate_limits.c.bucket.in_(stale)))
        dialect = self._session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        await self._session.execute(
            insert(rate_limits)
            .values(bucket=bucket, tat_us=now_us)
            .on_conflict_do_nothing(index_elements=["bucket"])
        )
        row = await self._one(
            sa.select(rate_limits.c.tat_us).where(rate_limits.c.bucket == bucket).with_for_update()
        )
        return int(row.tat_us)

    async def set_rate_limit(self, bucket: str, tat_us: int) -> None:
        """Store a rate-limit row's new theoretical arrival time."""
        await self._session.execute(
            rate_limits.update().where(rate_limits.c.bucket == bucket).values(tat_us=tat_us)
        )

    async def revoked_token_ids(self, now: datetime) -> list[str]:
        """Revoked tokens that have not expired at ``now``."""
        rows = await self._all(
            sa.select(tokens.c.token_id).where(
                tokens.c.revoke_time_us.is_not(None),
                tokens.c.expire_time_us > epoch_micros(now),
            )
        )
        return [r.token_id for r in rows]

    async def disabled_subjects(self) -> list[str]:
        """Ids of disabled principals and tenants."""
        disabled_principals = await self._all(
            sa.select(principals.c.id).where(principals.c.disabled.is_(True))
        )
        disabled_tenants = await self._all(
            sa.select(tenants.c.id).where(tenants.c.state == model.TenantState.DISABLED.value)
        )
        return [r.id for r in disabled_principals] + [r.id for r in disabled_tenants]

    # Audit chain.

    async def append_audit(self, records: Sequence[AuditRecord]) -> list[model.AuditEvent]:
        """Append events to the chain, skipping event ids already present.

        Returns:
            The entries appended (without the skipped duplicates).
        """
        head = await self._one(
            sa.select(audit_head.c.last_seq, audit_head.c.last_hash)
            .where(audit_head.c.id == 1)
            .with_for_update()
        )
        seq, prev_hash = int(head.last_seq), str(head.last_hash)
        appended: list[model.AuditEvent] = []
        seen: set[str] = set()
        for record in records:
            if record.event_id in seen:
                continue
            seen.add(record.event_id)
            exists = await self._one(
                sa.select(audit_events.c.seq).where(audit_events.c.event_id == record.event_id)
            )
            if exists is not None:
                continue
            seq += 1
            time = from_epoch_micros(round(record.time * 1_000_000))
            payload_json = canonical_json(dict(record.payload))
            fields: dict[str, Any] = {
                "seq": seq,
                "event_id": record.event_id,
                "time": time,
                "service": record.service,
                "kind": record.kind,
                "tenant_id": record.tenant_id,
                "principal_id": record.principal_id,
                "payload_json": payload_json,
                "prev_hash": prev_hash,
            }
            digest = entry_hash(**fields)
            event = model.AuditEvent(**fields, hash=digest)
            appended.append(event)
            prev_hash = digest
        if appended:
            await self._session.execute(
                audit_events.insert(),
                [
                    {
                        "seq": e.seq,
                        "event_id": e.event_id,
                        "time_us": epoch_micros(e.time),
                        "service": e.service,
                        "kind": e.kind,
                        "tenant_id": e.tenant_id,
                        "principal_id": e.principal_id,
                        "payload_json": e.payload_json,
                        "prev_hash": e.prev_hash,
                        "hash": e.hash,
                    }
                    for e in appended
                ],
            )
            await self._session.execute(
                audit_head.update()
                .where(audit_head.c.id == 1)
                .values(last_seq=seq, last_hash=prev_hash)
            )
        return appended

    async def audit_head(self) -> tuple[int, str]:
        """The recorded (last seq, last hash) of the chain."""
        row = await self._one(
            sa.select(audit_head.c.last_seq, audit_head.c.last_hash).where(audit_head.c.id == 1)
        )
        return int(row.last_seq), str(row.last_hash)

    async def list_audit(
        self, *, tenant_id: str | None, after_seq: int, limit: int
    ) -> list[model.AuditEvent]:
        """Entries in seq order after ``after_seq`` (of one tenant, or all)."""
        statement = sa.select(audit_events).where(audit_events.c.seq > after_seq)
        if tenant_id is not None:
            statement = statement.where(audit_events.c.tenant_id == tenant_id)
        rows = await self._all(statement.order_by(audit_events.c.seq).limit(limit))
        return [_audit_event(r) for r in rows]


class AuthStore:
    """The auth service's database.

    Args:
        database: The service's database (:mod:`tensafe.common.db`).
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        await migrate(self.database, script_location=SCRIPT_LOCATION, version_table=VERSION_TABLE)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[AuthTransaction]:
        """A unit of work: commits if the block succeeds, rolls back if it raises."""
        async with self.database.transaction(read_only=read_only) as session:
            yield AuthTransaction(session)


def payload_of(event: model.AuditEvent) -> dict[str, Any]:
    """The decoded payload of an audit entry."""
    value = json.loads(event.payload_json)
    return value if isinstance(value, dict) else {"value": value}
