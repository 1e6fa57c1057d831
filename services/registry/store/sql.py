"""The registry's SQL metadata store: one transaction object per unit of work.

The domain opens :meth:`RegistryStore.transaction` and calls the methods of the
:class:`RegistryTransaction` it yields; nothing here decides policy. Table definitions
mirror ``migrations/versions``; times are integer microseconds since the epoch.

Serialisation: SQLite transactions hold the database's single write lock from
``BEGIN IMMEDIATE`` (:mod:`tensafe.common.db`). On PostgreSQL an adapter's row is
locked ``FOR UPDATE`` before its version counter moves, and every change that may add
or drop the last reference to a stored object takes a transaction-scoped advisory lock
on the object's digest (:meth:`RegistryTransaction.lock_object`), so a publish that
reuses an object and a delete that removes it never interleave.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.common.db import Database, migrate
from tensafe.common.quotas import lock_tenant
from tensafe.registry.domain.model import AdapterRecord, VersionRecord

SCRIPT_LOCATION = "tensafe.registry.store:migrations"
VERSION_TABLE = "alembic_version_registry"

metadata = sa.MetaData()

adapters = sa.Table(
    "registry_adapters",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("next_version", sa.BigInteger(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="uq_registry_adapters_name"),
)
versions = sa.Table(
    "registry_versions",
    metadata,
    sa.Column("adapter_id", sa.String(32), primary_key=True),
    sa.Column("version", sa.BigInteger(), primary_key=True),
    sa.Column("tenant_id", sa.String(128), nullable=False),
    sa.Column("package_sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("manifest_json", sa.Text(), nullable=False),
    sa.Column("signer_key_id", sa.String(64), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
)
kek_rotations = sa.Table(
    "registry_kek_rotations",
    metadata,
    sa.Column("tenant_id", sa.String(128), primary_key=True),
    sa.Column("kek_id", sa.String(2048), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("rewrapped", sa.BigInteger(), nullable=False),
    sa.Column("pinned", sa.BigInteger(), nullable=False),
    sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    sa.Column("finish_time_us", sa.BigInteger(), nullable=True),
)
aliases = sa.Table(
    "registry_aliases",
    metadata,
    sa.Column("adapter_id", sa.String(32), primary_key=True),
    sa.Column("alias", sa.String(32), primary_key=True),
    sa.Column("version", sa.BigInteger(), nullable=False),
)


def epoch_micros(moment: datetime) -> int:
    """Integer microseconds since the epoch of an aware datetime."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_micros(micros: int) -> datetime:
    """Inverse of :func:`epoch_micros`."""
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def _advisory_key(digest: str) -> int:
    return int.from_bytes(
        hashlib.sha256(b"registry-object:" + digest.encode()).digest()[:8], "big", signed=True
    )


class RegistryTransaction:
    """Reads and writes of one transaction.

    Args:
        session: The open session.
        dialect: ``sqlite`` or ``postgresql``.
    """

    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._dialect = dialect

    async def lock_object(self, digest: str) -> None:
        """Serialise changes to the references of one object (PostgreSQL advisory lock;
        SQLite transactions are serial already)."""
        if self._dialect == "postgresql":
            await self._session.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(digest)}
            )

    async def lock_tenant_storage(self, tenant_id: str) -> None:
        """Serialise the storage-quota checks of one tenant until the transaction ends."""
        await lock_tenant(self._session, "registry.storage", tenant_id)

    async def stored_bytes(self, tenant_id: str) -> int:
        """Package bytes of every version ``tenant_id`` holds (identical packages of
        different versions each count: the quota is per version, not per object)."""
        total = (
            await self._session.execute(
                sa.select(sa.func.coalesce(sa.func.sum(versions.c.size_bytes), 0)).where(
                    versions.c.tenant_id == tenant_id
                )
            )
        ).scalar_one()
        return int(total)

    async def find_adapter(
        self, tenant_id: str, name: str, *, lock: bool = False
    ) -> AdapterRow | None:
        """The adapter's row, or ``None``; ``lock`` locks it until the transaction ends."""
        query = sa.select(adapters).where(
            adapters.c.tenant_id == tenant_id, adapters.c.name == name
        )
        if lock:
            query = query.with_for_update()
        row = (await self._session.execute(query)).first()
        return None if row is None else _adapter_row(row)

    async def create_adapter(self, tenant_id: str, name: str, now: datetime) -> None:
        """Insert the adapter unless it exists (a concurrent creator wins quietly)."""
        values = {
            "id": uuid.uuid4().hex,
            "tenant_id": tenant_id,
            "name": name,
            "next_version": 1,
            "create_time_us": epoch_micros(now),
        }
        insert = (
            postgresql.insert(adapters)
            if self._dialect == "postgresql"
            else sqlite.insert(adapters)
        )
        await self._session.execute(
            insert.values(**values).on_conflict_do_nothing(index_elements=["tenant_id", "name"])
        )

    async def set_next_version(self, adapter_id: str, next_version: int) -> None:
        """Move the adapter's version counter."""
        await self._session.execute(
            sa.update(adapters).where(adapters.c.id == adapter_id).values(next_version=next_version)
        )

    async def adapter_record(
        self, adapter_id: str, name: str, create_time_us: int
    ) -> AdapterRecord:
        """The adapter with its latest version and aliases."""
        latest = (
            await self._session.execute(
                sa.select(sa.func.max(versions.c.version)).where(
                    versions.c.adapter_id == adapter_id
                )
            )
        ).scalar_one()
        rows = await self._session.execute(
            sa.select(aliases.c.alias, aliases.c.version).where(aliases.c.adapter_id == adapter_id)
        )
        return AdapterRecord(
            name=name,
            latest_version=int(latest or 0),
            aliases={str(alias): int(version) for alias, version in rows},
            create_time=from_epoch_micros(create_time_us),
        )

    async def list_adapters(
        self, tenant_id: str, *, after_name: str, limit: int
    ) -> list[AdapterRow]:
        """Up to ``limit`` adapters named after ``after_name``, by name."""
        rows = await self._session.execute(
            sa.select(adapters)
            .where(adapters.c.tenant_id == tenant_id, adapters.c.name > after_name)
            .order_by(adapters.c.name)
            .limit(limit)
        )
        return [_adapter_row(row) for row in rows]

    async def version_by_request(
        self, tenant_id: str, request_id: str
    ) -> tuple[str, VersionRecord] | None:
        """The version a request id created, with its adapter id."""
        row = (
            await self._session.execute(
                sa.select(versions, adapters.c.name)
                .join(adapters, adapters.c.id == versions.c.adapter_id)
                .where(versions.c.tenant_id == tenant_id, versions.c.request_id == request_id)
            )
        ).first()
        if row is None:
            return None
        return str(row.adapter_id), _version(row, str(row.name))

    async def insert_version(
        self, *, adapter_id: str, tenant_id: str, record: VersionRecord, request_id: str | None
    ) -> None:
        """Record a published version."""
        await self._session.execute(
            sa.insert(versions).values(
                adapter_id=adapter_id,
                version=record.version,
                tenant_id=tenant_id,
                package_sha256=record.package_sha256,
                size_bytes=record.size_bytes,
                manifest_json=record.manifest_json,
                signer_key_id=record.signer_key_id,
                create_time_us=epoch_micros(record.create_time),
                request_id=request_id,
            )
        )

    async def get_version(self, adapter_id: str, name: str, version: int) -> VersionRecord | None:
        """One version, or ``None``."""
        row = (
            await self._session.execute(
                sa.select(versions).where(
                    versions.c.adapter_id == adapter_id, versions.c.version == version
                )
            )
        ).first()
        return None if row is None else _version(row, name)

    async def list_versions(
        self, adapter_id: str, name: str, *, before_version: int | None, limit: int
    ) -> list[VersionRecord]:
        """Up to ``limit`` versions below ``before_version``, newest first."""
        query = sa.select(versions).where(versions.c.adapter_id == adapter_id)
        if before_version is not None:
            query = query.where(versions.c.version < before_version)
        rows = await self._session.execute(query.order_by(versions.c.version.desc()).limit(limit))
        return [_version(row, name) for row in rows]

    async def alias_version(self, adapter_id: str, alias: str) -> int | None:
        """The version an alias points to, or ``None``."""
        value = (
            await self._session.execute(
                sa.select(aliases.c.version).where(
                    aliases.c.adapter_id == adapter_id, aliases.c.alias == alias
                )
            )
        ).scalar_one_or_none()
        return None if value is None else int(value)

    async def set_alias(self, adapter_id: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version`` (replacing where it pointed)."""
        await self._session.execute(
            sa.delete(aliases).where(aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)
        )
        await self._session.execute(
            sa.insert(aliases).values(adapter_id=adapter_id, alias=alias, version=version)
        )

    async def delete_versions(self, adapter_id: str, version: int | None) -> list[str]:
        """Delete one version (or all when ``None``) and the aliases pointing there.

        Returns:
            The digests of the deleted versions' packages (candidates for removal).
        """
        condition = versions.c.adapter_id == adapter_id
        alias_condition = aliases.c.adapter_id == adapter_id
        if version is not None:
            condition = sa.and_(condition, versions.c.version == version)
            alias_condition = sa.and_(alias_condition, aliases.c.version == version)
        digests = (
            await self._session.execute(sa.select(versions.c.package_sha256).where(condition))
        ).scalars()
        found = sorted({str(d) for d in digests})
        await self._session.execute(sa.delete(aliases).where(alias_condition))
        await self._session.execute(sa.delete(versions).where(condition))
        return found

    async def delete_adapter(self, adapter_id: str) -> None:
        """Delete the adapter row (its versions and aliases must be gone)."""
        await self._session.execute(sa.delete(adapters).where(adapters.c.id == adapter_id))

    async def tenant_objects(self, tenant_id: str) -> list[tuple[str, list[str]]]:
        """Each distinct package object of the tenant's versions, with the versions
        (``name@version``) that reference it, in a stable order."""
        rows = await self._session.execute(
            sa.select(versions.c.package_sha256, adapters.c.name, versions.c.version)
            .join(adapters, adapters.c.id == versions.c.adapter_id)
            .where(versions.c.tenant_id == tenant_id)
            .order_by(versions.c.package_sha256, adapters.c.name, versions.c.version)
        )
        found: dict[str, list[str]] = {}
        for digest, name, version in rows:
            found.setdefault(str(digest), []).append(f"{name}@{int(version)}")
        return list(found.items())

    async def replace_object(self, tenant_id: str, old: str, new: str, size_bytes: int) -> int:
        """Point the tenant's versions that reference object ``old`` at ``new``.

        Returns:
            How many versions moved.
        """
        result = await self._session.execute(
            sa.update(versions)
            .where(versions.c.tenant_id == tenant_id, versions.c.package_sha256 == old)
            .values(package_sha256=new, size_bytes=size_bytes)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def running_rotation(self, tenant_id: str) -> RotationRow | None:
        """The tenant's unfinished KEK rotation, if any."""
        row = (
            await self._session.execute(
                sa.select(kek_rotations).where(
                    kek_rotations.c.tenant_id == tenant_id, kek_rotations.c.state == "running"
                )
            )
        ).first()
        return None if row is None else _rotation_row(row)

    async def insert_rotation(self, tenant_id: str, kek_id: str, now: datetime) -> None:
        """Record a new rotation to ``kek_id`` as running."""
        await self._session.execute(
            sa.insert(kek_rotations).values(
                tenant_id=tenant_id,
                kek_id=kek_id,
                state="running",
                rewrapped=0,
                pinned=0,
                create_time_us=epoch_micros(now),
            )
        )

    async def count_rewrapped(self, tenant_id: str, kek_id: str) -> None:
        """Count one more re-wrapped package object."""
        await self._session.execute(
            sa.update(kek_rotations)
            .where(kek_rotations.c.tenant_id == tenant_id, kek_rotations.c.kek_id == kek_id)
            .values(rewrapped=kek_rotations.c.rewrapped + 1)
        )

    async def finish_rotation(
        self, tenant_id: str, kek_id: str, *, pinned: int, now: datetime
    ) -> None:
        """Mark the rotation done."""
        await self._session.execute(
            sa.update(kek_rotations)
            .where(kek_rotations.c.tenant_id == tenant_id, kek_rotations.c.kek_id == kek_id)
            .values(state="done", pinned=pinned, finish_time_us=epoch_micros(now))
        )

    async def object_referenced(self, digest: str) -> bool:
        """Whether any version of any tenant references the object."""
        row = (
            await self._session.execute(
                sa.select(versions.c.version).where(versions.c.package_sha256 == digest).limit(1)
            )
        ).first()
        return row is not None


@dataclasses.dataclass(frozen=True)
class AdapterRow:
    """An adapter's row.

    Attributes:
        id: Internal id.
        name: The adapter's name.
        next_version: The number the next published version gets.
        create_time_us: Creation time, microseconds since the epoch.
    """

    id: str
    name: str
    next_version: int
    create_time_us: int


@dataclasses.dataclass(frozen=True)
class RotationRow:
    """A KEK rotation's row.

    Attributes:
        tenant_id: The tenant.
        kek_id: The KEK version packages are re-wrapped under.
        state: ``running`` or ``done``.
        rewrapped: Package objects re-wrapped so far.
    """

    tenant_id: str
    kek_id: str
    state: str
    rewrapped: int


def _rotation_row(row: sa.Row[Any]) -> RotationRow:
    mapping = row._mapping
    return RotationRow(
        tenant_id=str(mapping["tenant_id"]),
        kek_id=str(mapping["kek_id"]),
        state=str(mapping["state"]),
        rewrapped=int(mapping["rewrapped"]),
    )


def _adapter_row(row: sa.Row[Any]) -> AdapterRow:
    mapping = row._mapping
    return AdapterRow(
        id=str(mapping["id"]),
        name=str(mapping["name"]),
        next_version=int(mapping["next_version"]),
        create_time_us=int(mapping["create_time_us"]),
    )


def _version(row: sa.Row[Any], name: str) -> VersionRecord:
    mapping = row._mapping
    return VersionRecord(
        adapter_name=name,
        version=int(mapping["version"]),
        package_sha256=str(mapping["package_sha256"]),
        size_bytes=int(mapping["size_bytes"]),
        manifest_json=str(mapping["manifest_json"]),
        signer_key_id=str(mapping["signer_key_id"]),
        create_time=from_epoch_micros(int(mapping["create_time_us"])),
    )


class RegistryStore:
    """The registry's database.

    Args:
        database: The service's database.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision."""
        await migrate(self.database, script_location=SCRIPT_LOCATION, version_table=VERSION_TABLE)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[RegistryTransaction]:
        """A unit of work; commits when the block succeeds.

        Args:
            read_only: The block only reads.
        """
        async with self.database.transaction(read_only=read_only) as session:
            yield RegistryTransaction(session, self.database.dialect_name)
