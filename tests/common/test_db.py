"""tensafe.common.db against real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tensafe.common.db import (
    Database,
    current_revision,
    head_revision,
    migrate,
    resolve_script_location,
)
from tensafe.common.errors import ConfigError, Unavailable
from tensafe.common.futures import futures_table

metadata = sa.MetaData()
counters = sa.Table(
    "dbtest_counters",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)
parents = sa.Table("dbtest_parents", metadata, sa.Column("id", sa.Integer, primary_key=True))
children = sa.Table(
    "dbtest_children",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("dbtest_parents.id"), nullable=False),
)


async def _fresh(url: str, **options: float) -> Database:
    db = Database.from_url(url, **options)  # type: ignore[arg-type]
    async with db.connection() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
    return db


async def _counter(db: Database) -> int | None:
    async with db.transaction(read_only=True) as session:
        value = await session.scalar(sa.select(counters.c.value).where(counters.c.name == "jobs"))
    return None if value is None else int(value)


async def test_transaction_commits_on_success_and_rolls_back_on_error(database_url: str) -> None:
    db = await _fresh(database_url)
    try:
        async with db.transaction() as session:
            await session.execute(sa.insert(counters).values(name="jobs", value=1))
        with pytest.raises(RuntimeError, match="after the write"):
            async with db.transaction() as session:
                await session.execute(
                    sa.update(counters).where(counters.c.name == "jobs").values(value=99)
                )
                raise RuntimeError("after the write")
        assert await _counter(db) == 1
    finally:
        await db.dispose()


async def test_foreign_keys_are_enforced(database_url: str) -> None:
    db = await _fresh(database_url)
    try:
        with pytest.raises(sa.exc.IntegrityError):
            async with db.transaction() as session:
                await session.execute(sa.insert(children).values(id=1, parent_id=42))
    finally:
        await db.dispose()


async def test_sqlite_connection_settings(sqlite_url: str) -> None:
    db = Database.from_url(sqlite_url, busy_timeout=7.5)
    try:
        async with db.connection() as connection:
            journal = await connection.scalar(sa.text("PRAGMA journal_mode"))
            foreign_keys = await connection.scalar(sa.text("PRAGMA foreign_keys"))
            busy = await connection.scalar(sa.text("PRAGMA busy_timeout"))
            synchronous = await connection.scalar(sa.text("PRAGMA synchronous"))
        assert (journal, foreign_keys, busy, synchronous) == ("wal", 1, 7500, 2)
    finally:
        await db.dispose()


async def _commit_level(db: Database, *, durable: bool) -> str:
    """The durability level a write transaction commits with, read inside it."""
    async with db.transaction(durable=durable) as session:
        await session.execute(
            sa.update(counters).where(counters.c.name == "jobs").values(value=counters.c.value + 1)
        )
        if db.dialect_name == "sqlite":
            level = {1: "NORMAL", 2: "FULL"}[
                int(await session.scalar(sa.text("PRAGMA synchronous")))
            ]
        else:
            level = {"off": "NORMAL", "on": "FULL"}[
                str(await session.scalar(sa.text("SHOW synchronous_commit")))
            ]
    return level


async def test_relaxed_commits_are_committed_and_do_not_leak_into_durable_ones(
    database_url: str,
) -> None:
    # Alternating, on one pooled connection per kind: each commits at its own level.
    db = await _fresh(database_url, pool_size=1)
    try:
        async with db.transaction() as session:
            await session.execute(sa.insert(counters).values(name="jobs", value=0))
        levels = [
            await _commit_level(db, durable=durable)
            for durable in (False, True, False, False, True)
        ]
        assert levels == ["NORMAL", "FULL", "NORMAL", "NORMAL", "FULL"]
        assert await _counter(db) == 5, "every relaxed write committed"
        with pytest.raises(RuntimeError):
            async with db.transaction(durable=False) as session:
                await session.execute(sa.update(counters).values(value=99))
                raise RuntimeError("rolled back")
        assert await _counter(db) == 5
        assert await _commit_level(db, durable=True) == "FULL"
        async with db.connection() as connection:
            if db.dialect_name == "sqlite":
                assert await connection.scalar(sa.text("PRAGMA synchronous")) == 2
            else:
                assert await connection.scalar(sa.text("SHOW synchronous_commit")) == "on"
    finally:
        await db.dispose()


async def test_sqlite_read_check_write_transactions_serialize(sqlite_url: str) -> None:
    """Deferred SQLite transactions would fail here with 'database is locked'."""
    db = await _fresh(sqlite_url)
    async with db.transaction() as session:
        await session.execute(sa.insert(counters).values(name="jobs", value=0))

    async def increment() -> None:
        async with db.transaction() as session:
            value = await session.scalar(
                sa.select(counters.c.value).where(counters.c.name == "jobs")
            )
            assert value is not None
            await asyncio.sleep(0)  # let the other transactions run their reads now
            await session.execute(
                sa.update(counters).where(counters.c.name == "jobs").values(value=value + 1)
            )

    try:
        await asyncio.gather(*(increment() for _ in range(6)))
        assert await _counter(db) == 6
    finally:
        await db.dispose()


async def test_sqlite_lock_timeout_is_unavailable_but_reads_proceed(sqlite_url: str) -> None:
    writer = await _fresh(sqlite_url)
    other = Database.from_url(sqlite_url, busy_timeout=0.05)
    try:
        async with writer.transaction() as session:
            await session.execute(sa.insert(counters).values(name="jobs", value=5))
        async with writer.transaction() as holding:
            await holding.execute(
                sa.update(counters).where(counters.c.name == "jobs").values(value=6)
            )
            with pytest.raises(Unavailable):
                async with other.transaction():
                    pass
            # WAL: a read-only transaction sees the last committed value meanwhile.
            assert await _counter(other) == 5
        assert await _counter(other) == 6
    finally:
        await writer.dispose()
        await other.dispose()


async def test_sqlite_new_file_opens_while_another_process_writes_it(tmp_path: Path) -> None:
    """A new database file written by another connection (still in rollback-journal
    mode) opens once that writer commits: SQLite refuses the WAL switch at once there,
    without its busy handler, so the settings retry it within the busy timeout."""
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE elsewhere (x INTEGER)")
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, other.execute, "COMMIT")
    db = Database.from_url(f"sqlite+aiosqlite:///{path}", busy_timeout=5.0)
    try:
        async with db.connection() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
            tables = await connection.exec_driver_sql("SELECT name FROM sqlite_master")
            assert mode == "wal" and [row[0] for row in tables] == ["elsewhere"]
    finally:
        await db.dispose()
        other.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_postgres_is_unavailable() -> None:
    db = Database.from_url(
        f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/nothing", connect_timeout=2
    )
    try:
        with pytest.raises(Unavailable):
            async with db.transaction():
                pass
        with pytest.raises(Unavailable):
            await db.ping()
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite://",
        "sqlite+aiosqlite:///:memory:",
        "sqlite:///state.db",
        "postgresql+psycopg2://postgres@localhost/x",
        "not a url",
    ],
)
def test_rejected_urls(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Database.from_url(url)
    assert raised.value.setting == "database_url"


def test_script_location_resolution(sample_migrations: str) -> None:
    resolved = resolve_script_location(sample_migrations)
    assert (resolved / "versions" / "0001_initial.py").is_file()
    assert head_revision(sample_migrations) == "0002"
    for bad in ("no_colon_here", "tensafe_sample_migrations:missing", "no_such_pkg_xyz:m"):
        with pytest.raises(ConfigError):
            resolve_script_location(bad)


async def _table_names(db: Database) -> set[str]:
    async with db.connection(read_only=True) as connection:
        names = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return set(names)


async def test_migrate_is_idempotent_concurrent_safe_and_matches_models(
    database_url: str, sample_migrations: str
) -> None:
    db = Database.from_url(database_url)
    try:
        assert await current_revision(db, version_table="sample_alembic_version") is None
        # Two replicas starting together: the second waits (advisory lock on
        # PostgreSQL, the write lock on SQLite) and then finds nothing to do.
        revisions = await asyncio.gather(
            migrate(db, script_location=sample_migrations, version_table="sample_alembic_version"),
            migrate(
                database_url,
                script_location=sample_migrations,
                version_table="sample_alembic_version",
            ),
        )
        assert list(revisions) == ["0002", "0002"]
        again = await migrate(
            db, script_location=sample_migrations, version_table="sample_alembic_version"
        )
        assert again == "0002"
        assert await current_revision(db, version_table="sample_alembic_version") == "0002"

        tables = await _table_names(db)
        assert {"sample_widgets", "sample_futures", "sample_alembic_version"} <= tables
        assert "alembic_version" not in tables  # per-service version table only
        async with db.transaction(read_only=True) as session:
            rows = (await session.execute(sa.text("SELECT name, colour FROM sample_widgets"))).all()
        assert [tuple(row) for row in rows] == [("seed", None)]

        # The migration helper and the table factory describe the same schema.
        models = sa.MetaData()
        futures_table(models, prefix="sample")

        def diff(sync_connection: sa.Connection) -> list[object]:
            context = MigrationContext.configure(
                sync_connection,
                opts={
                    "include_name": lambda name, kind, _parents: (
                        kind != "table" or name == "sample_futures"
                    )
                },
            )
            return list(compare_metadata(context, models))

        async with db.connection(read_only=True) as connection:
            differences = await connection.run_sync(diff)
        assert differences == []
    finally:
        await db.dispose()


async def test_migrate_rejects_bad_version_table(sample_migrations: str, sqlite_url: str) -> None:
    with pytest.raises(ConfigError):
        await migrate(sqlite_url, script_location=sample_migrations, version_table="Bad-Name")


async def test_migrate_unreachable_database_is_unavailable(sample_migrations: str) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/nothing"
    with pytest.raises(Unavailable):
        await migrate(url, script_location=sample_migrations, version_table="sample_version")


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "state.db"
    Database.from_url(f"sqlite+aiosqlite:///{target}")
    assert target.parent.is_dir()
