"""The HE runtime's session store: one row per open session, one transaction per unit.

The domain (:mod:`tensafe.he_runtime.domain.sessions`) opens
:meth:`SessionStore.transaction` and calls the methods of the
:class:`SessionTransaction` it yields; nothing here decides policy. The table mirrors
``migrations/versions``; times are integer microseconds since the epoch. A row holds
everything needed to rebuild the session's executor except the Galois keys, which are
in the key file of the same id (:mod:`tensafe.he_runtime.store.keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.common.db import Database, migrate
from tensafe.common.quotas import lock_tenant

SCRIPT_LOCATION = "tensafe.he_runtime.store:migrations"
VERSION_TABLE = "alembic_version_he_runtime"
QUOTA_SCOPE = "he_runtime.sessions"

metadata = sa.MetaData()

sessions = sa.Table(
    "he_sessions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("adapter_name", sa.String(128), nullable=False),
    sa.Column("adapter_version", sa.BigInteger(), nullable=False),
    sa.Column("adapter_digest", sa.String(64), nullable=False),
    sa.Column("spec_json", sa.Text(), nullable=False),
    sa.Column("seal_parameters", sa.LargeBinary(), nullable=False),
    sa.Column("key_bytes", sa.BigInteger(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("last_used_time_us", sa.BigInteger(), nullable=False),
    sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
)


def micros(seconds: float) -> int:
    """Clock seconds as integer microseconds."""
    return round(seconds * 1_000_000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """The durable part of one session.

    Attributes:
        id: Session id (32 hex digits).
        tenant_id: Owning tenant.
        request_id: The idempotency key ("" for none).
        adapter_name: The adapter applied.
        adapter_version: Its resolved version (never 0 unless the source has none).
        adapter_digest: SHA-256 of its weights; a rebuild must load the same bytes.
        spec_json: The checked plan spec as JSON (see the domain's ``spec_to_json``).
        seal_parameters: The framed CKKS parameter blob the client sent.
        key_bytes: Galois-key bytes (the size of the key file).
        create_time_us: Creation time.
        last_used_time_us: Last use, as last written (see the domain's write interval).
        expire_time_us: When it expires unless used again.
    """

    id: str
    tenant_id: str
    request_id: str
    adapter_name: str
    adapter_version: int
    adapter_digest: str
    spec_json: str
    seal_parameters: bytes
    key_bytes: int
    create_time_us: int
    last_used_time_us: int
    expire_time_us: int


def _record(row: sa.Row[tuple[object, ...]]) -> SessionRecord:
    values = row._mapping
    return SessionRecord(
        id=str(values["id"]),
        tenant_id=str(values["tenant_id"]),
        request_id=str(values["request_id"] or ""),
        adapter_name=str(values["adapter_name"]),
        adapter_version=int(values["adapter_version"]),
        adapter_digest=str(values["adapter_digest"]),
        spec_json=str(values["spec_json"]),
        seal_parameters=bytes(values["seal_parameters"]),
        key_bytes=int(values["key_bytes"]),
        create_time_us=int(values["create_time_us"]),
        last_used_time_us=int(values["last_used_time_us"]),
        expire_time_us=int(values["expire_time_us"]),
    )


class SessionTransaction:
    """Reads and writes of one transaction.

    Args:
        session: The open session.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def lock_tenant(self, tenant_id: str) -> None:
        """Serialise the session-quota checks of one tenant until the transaction ends."""
        await lock_tenant(self._session, QUOTA_SCOPE, tenant_id)

    async def usage(self, tenant_id: str, *, now_us: int) -> tuple[int, int]:
        """Return (sessions, key bytes) of ``tenant_id``'s unexpired rows."""
        row = (
            await self._session.execute(
                sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(sessions.c.key_bytes), 0)
                ).where(sessions.c.tenant_id == tenant_id, sessions.c.expire_time_us > now_us)
            )
        ).one()
        return int(row[0]), int(row[1])

    async def get(self, tenant_id: str, session_id: str) -> SessionRecord | None:
        """The tenant's session row (expired or not), or None."""
        row = (
            await self._session.execute(
                sa.select(sessions).where(
                    sessions.c.id == session_id, sessions.c.tenant_id == tenant_id
                )
            )
        ).first()
        return None if row is None else _record(row)

    async def by_request(self, tenant_id: str, request_id: str) -> SessionRecord | None:
        """The tenant's session created with ``request_id``, or None."""
        row = (
            await self._session.execute(
                sa.select(sessions).where(
                    sessions.c.tenant_id == tenant_id, sessions.c.request_id == request_id
                )
            )
        ).first()
        return None if row is None else _record(row)

    async def insert(self, record: SessionRecord) -> None:
        """Add a session row."""
        values = dataclasses.asdict(record)
        values["request_id"] = record.request_id or None
        await self._session.execute(sa.insert(sessions).values(**values))

    async def touch(self, session_id: str, *, last_used_us: int, expire_us: int) -> None:
        """Record a use (only ever moves the times forward)."""
        await self._session.execute(
            sa.update(sessions)
            .where(sessions.c.id == session_id, sessions.c.expire_time_us < expire_us)
            .values(last_used_time_us=last_used_us, expire_time_us=expire_us)
        )

    async def delete(self, session_id: str) -> bool:
        """Delete a row; return whether it existed."""
        result = await self._session.execute(sa.delete(sessions).where(sessions.c.id == session_id))
        return bool(getattr(result, "rowcount", 0))

    async def expired(self, *, now_us: int) -> list[str]:
        """Ids of the rows expired at ``now_us``."""
        rows = await self._session.execute(
            sa.select(sessions.c.id).where(sessions.c.expire_time_us <= now_us)
        )
        return [str(row[0]) for row in rows]

    async def ids(self) -> set[str]:
        """Every session id (for the start-up sweep of orphan key files)."""
        return {str(row[0]) for row in await self._session.execute(sa.select(sessions.c.id))}


class SessionStore:
    """The HE runtime's database.

    Args:
        database: The service's database.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision."""
        await migrate(self.database, script_location=SCRIPT_LOCATION, version_table=VERSION_TABLE)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[SessionTransaction]:
        """A unit of work; commits when the block succeeds.

        Args:
            read_only: The block only reads.
        """
        async with self.database.transaction(read_only=read_only) as session:
            yield SessionTransaction(session)
