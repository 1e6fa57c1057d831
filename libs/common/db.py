"""Async SQLAlchemy 2.0 database access and Alembic migrations for every service.

Two back ends, one code path:

* **SQLite** through ``aiosqlite`` for the single-machine stack. Each connection turns
  on write-ahead logging (readers do not block the writer), foreign keys, a busy
  timeout, and ``synchronous=FULL`` so that a committed transaction survives a power
  loss before JetStream is acked. Transactions start with ``BEGIN IMMEDIATE``: SQLite
  then takes its single write lock at the start, so two read-check-write transactions
  (a budget check and its reservation, a step-number check and its write) queue behind
  each other instead of failing with "database is locked" half-way (SQLite cannot
  upgrade a read lock to a write lock while another writer is active). Read-only
  transactions (``read_only=True``) use a plain ``BEGIN`` and never wait for the
  writer. Within one process, write transactions also queue on an asyncio lock before
  they take SQLite's: SQLite's busy handler waits by sleeping and retrying (1, 2, 5, 10,
  ... up to 100 ms), so several transactions of one process contending for the lock
  (a worker with several jobs in flight) each slept far longer than the transaction
  ahead of it held it; queued in the process, the next one starts as soon as the last
  commits. Other processes still meet the busy handler.
* **Relaxed commits** (``durable=False``) are for writes whose loss is harmless — a
  lease, a RUNNING mark — on the path of every job, where an fsync per commit is most
  of a small job's overhead. Such a commit survives a crash of the process but may be
  lost with the machine (power loss, kernel crash): SQLite commits it without fsync
  (``synchronous=NORMAL`` in WAL mode), PostgreSQL with ``synchronous_commit = off``
  (PostgreSQL manual, "Asynchronous Commit"). Relaxed transactions run on connections of
  their own, set that way when they open, so that no transaction pays a round trip to
  switch the setting and a durable one can never run relaxed. Both logs
  are sequential, so the next durable commit makes every earlier relaxed one durable
  too, and a relaxed commit can never survive while an earlier durable one is lost.
* **PostgreSQL** through ``asyncpg`` in production, with pre-ping so a restarted server
  costs one reconnect, not an error.

Errors: failing to connect, a connection lost mid-transaction, or a locked/busy
database become :class:`~tensafe.common.errors.Unavailable` (retryable); PostgreSQL
serialization failures and deadlocks become :class:`~tensafe.common.errors.Aborted`.
Anything else (constraint violations, SQL errors) propagates unchanged: it is a bug or a
case the domain handles.

Migrations: each service ships an Alembic script directory inside its package (e.g.
``tensafe/trainer/store/migrations/versions/0001_initial.py``, with ``__init__.py`` files
so the wheel carries them) and calls :func:`migrate` at start-up. No ``env.py`` is needed:
:func:`migrate` drives Alembic through the async engine with ``run_sync`` (Alembic's
asyncio recipe), so no synchronous driver is installed. Every service has its own
version table (``<service>_alembic_version``) and prefixes its tables with its name
(``trainer_futures``), so the services can share one PostgreSQL database without
touching each other's tables; a PostgreSQL advisory lock per version table keeps two
replicas that start together from migrating at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from tensafe.common.errors import Aborted, ConfigError, TenSafeError, Unavailable

_SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")
_READ_ONLY_OPTION = "tensafe_read_only"
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

# SQLSTATE classes/codes (PostgreSQL manual, Appendix A "Error Codes").
_PG_RETRYABLE_CONFLICT = frozenset({"40001", "40P01"})  # serialization_failure, deadlock
_PG_UNAVAILABLE_CODES = frozenset({"57P01", "57P02", "57P03", "53300"})
_PG_CONNECTION_CLASS = "08"


def _sqlite_file(url: sa.URL) -> Path:
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(url.query):
        raise ConfigError(
            "database_url",
            "in-memory SQLite loses all state when the process exits; use a file path",
        )
    return Path(database)


def _translate(error: BaseException) -> TenSafeError | None:
    """Map a driver error to a retryable typed error, or None if it is not one."""
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    if error.connection_invalidated:
        return Unavailable("database connection lost")
    original = error.orig
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate in _PG_RETRYABLE_CONFLICT:
            return Aborted("database transaction conflict; retry")
        if sqlstate in _PG_UNAVAILABLE_CODES or sqlstate.startswith(_PG_CONNECTION_CLASS):
            return Unavailable("database unavailable")
    if isinstance(original, sqlite3.OperationalError):
        text = str(original).lower()
        if "locked" in text or "busy" in text:
            return Unavailable("database is busy (lock wait exceeded the busy timeout)")
    return None


class Database:
    """An async engine plus session factory with transaction helpers.

    Build it with :meth:`from_url`; :meth:`dispose` closes the pool.

    Args:
        engine: An async engine created by :meth:`from_url` (the SQLite connection
            settings are installed there).
        relaxed_engine: The engine of relaxed commits, on the same database; ``None``
            runs them as durable ones.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        relaxed_engine: AsyncEngine | None = None,
        *,
        busy_timeout: float = 30.0,
    ) -> None:
        self._engine = engine
        self._busy_timeout = busy_timeout
        # SQLite only: this process's write transactions queue here (module docstring).
        # One lock per event loop: an asyncio.Lock belongs to the loop that first waits.
        self._writers: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._relaxed_engine = relaxed_engine
        # Same pool, marked so the SQLite "begin" hook starts a deferred transaction.
        self._read_only_engine = engine.execution_options(**{_READ_ONLY_OPTION: True})
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._read_only_sessions = async_sessionmaker(
            self._read_only_engine, expire_on_commit=False
        )
        self._relaxed_sessions = async_sessionmaker(
            relaxed_engine if relaxed_engine is not None else engine, expire_on_commit=False
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        busy_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        pool_size: int = 5,
        application_name: str = "tensafe",
        echo: bool = False,
    ) -> Database:
        """Create a database from an SQLAlchemy async URL.

        Args:
            url: ``sqlite+aiosqlite:///path/state.db`` or
                ``postgresql+asyncpg://user@host:5432/db``.
            busy_timeout: Seconds a SQLite transaction waits for the write lock.
            connect_timeout: Seconds to wait for a PostgreSQL connection.
            pool_size: Connections kept open per process.
            application_name: Shown in PostgreSQL's ``pg_stat_activity``.
            echo: Log every SQL statement (debugging only).

        Returns:
            The database; no connection is made until first use.

        Raises:
            ConfigError: For an unsupported driver or an in-memory SQLite URL.
        """
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError as error:
            raise ConfigError("database_url", f"not a database URL: {error}") from error
        driver = parsed.drivername
        if driver not in _SUPPORTED_DRIVERS:
            raise ConfigError(
                "database_url",
                f"driver {driver!r} is not supported; use one of {', '.join(_SUPPORTED_DRIVERS)}",
            )
        if driver == "sqlite+aiosqlite":
            path = _sqlite_file(parsed)
            path.parent.mkdir(parents=True, exist_ok=True)
            engines = []
            for synchronous in ("FULL", "NORMAL"):
                engine = create_async_engine(parsed, echo=echo, pool_size=pool_size)
                _install_sqlite_settings(engine, busy_timeout=busy_timeout, synchronous=synchronous)
                engines.append(engine)
            return cls(engines[0], relaxed_engine=engines[1], busy_timeout=busy_timeout)
        else:
            engines = [
                create_async_engine(
                    parsed,
                    echo=echo,
                    pool_size=pool_size,
                    pool_pre_ping=True,
                    connect_args={
                        "timeout": connect_timeout,
                        "server_settings": {
                            "application_name": application_name,
                            "synchronous_commit": synchronous_commit,
                        },
                    },
                )
                for synchronous_commit in ("on", "off")
            ]
        return cls(engines[0], relaxed_engine=engines[1])

    @property
    def engine(self) -> AsyncEngine:
        """The underlying async engine."""
        return self._engine

    @property
    def dialect_name(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

    @asynccontextmanager
    async def transaction(
        self, *, read_only: bool = False, durable: bool = True
    ) -> AsyncIterator[AsyncSession]:
        """Run a unit of work: commit if the block succeeds, roll back if it raises.

        The connection is acquired (and on SQLite the write lock taken) before the
        block runs, so an unreachable database fails fast with :class:`Unavailable`.

        Args:
            read_only: The block only reads; on SQLite it then does not wait for (or
                block) writers.
            durable: ``False`` commits without waiting for the disk (a relaxed commit,
                see the module docstring): only for writes whose loss with the machine
                is harmless, never for an effect a message is acked after.

        Yields:
            A session bound to the open transaction.

        Raises:
            Unavailable: If the database cannot be reached or stays locked.
            Aborted: On a PostgreSQL serialization failure or deadlock.
        """
        if read_only:
            factory = self._read_only_sessions
        else:
            factory = self._sessions if durable else self._relaxed_sessions
        async with self._writer_turn(read_only), self._session_transaction(factory) as session:
            yield session

    @asynccontextmanager
    async def _writer_turn(self, read_only: bool) -> AsyncIterator[None]:
        """On SQLite, wait for this process's previous write transactions to end."""
        if read_only or self._engine.dialect.name != "sqlite":
            yield
            return
        loop = asyncio.get_running_loop()
        if self._writers is None or self._writers[0] is not loop:
            self._writers = (loop, asyncio.Lock())
        lock = self._writers[1]
        try:
            async with asyncio.timeout(self._busy_timeout):
                await lock.acquire()
        except TimeoutError as error:
            raise Unavailable("database is busy (lock wait exceeded the busy timeout)") from error
        try:
            yield
        finally:
            lock.release()

    @asynccontextmanager
    async def _session_transaction(
        self, factory: async_sessionmaker[AsyncSession]
    ) -> AsyncIterator[AsyncSession]:
        session = factory()
        try:
            try:
                await session.connection()
            except (OSError, TimeoutError, sa_exc.DBAPIError) as error:
                raise Unavailable(f"cannot open a database transaction: {error}") from error
            try:
                yield session
                await session.commit()
            except BaseException:
                # If the connection is gone the server rolls back on its own.
                with contextlib.suppress(sa_exc.DBAPIError):
                    await session.rollback()
                raise
        except sa_exc.DBAPIError as error:
            translated = _translate(error)
            if translated is not None:
                raise translated from error
            raise
        finally:
            await session.close()

    @asynccontextmanager
    async def connection(self, *, read_only: bool = False) -> AsyncIterator[AsyncConnection]:
        """Open a Core-level connection in a transaction (DDL, migrations, bulk SQL).

        Args:
            read_only: As for :meth:`transaction`.

        Yields:
            An async connection; the transaction commits when the block succeeds and
            rolls back when it raises.

        Raises:
            Unavailable: If the database cannot be reached or stays locked.
            Aborted: On a PostgreSQL serialization failure or deadlock.
        """
        async with (
            self._writer_turn(read_only),
            self._connection_transaction(read_only) as connection,
        ):
            yield connection

    @asynccontextmanager
    async def _connection_transaction(self, read_only: bool) -> AsyncIterator[AsyncConnection]:
        engine = self._read_only_engine if read_only else self._engine
        try:
            connection = await engine.connect()
        except (OSError, TimeoutError, sa_exc.DBAPIError) as error:
            raise Unavailable(f"cannot connect to the database: {error}") from error
        try:
            try:
                await connection.begin()
            except sa_exc.DBAPIError as error:
                raise Unavailable(f"cannot open a database transaction: {error}") from error
            try:
                yield connection
                await connection.commit()
            except BaseException:
                with contextlib.suppress(sa_exc.DBAPIError):
                    await connection.rollback()
                raise
        except sa_exc.DBAPIError as error:
            translated = _translate(error)
            if translated is not None:
                raise translated from error
            raise
        finally:
            await connection.close()

    async def ping(self) -> None:
        """Check the database answers (for readiness probes).

        Raises:
            Unavailable: If it does not.
        """
        async with self.transaction(read_only=True) as session:
            await session.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()
        if self._relaxed_engine is not None:
            await self._relaxed_engine.dispose()


def _install_sqlite_settings(engine: AsyncEngine, *, busy_timeout: float, synchronous: str) -> None:
    """Install the per-connection pragmas and BEGIN handling described in the module
    (``synchronous``: ``FULL``, or ``NORMAL`` for relaxed commits)."""
    busy_ms = int(busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over BEGIN from the sqlite3 module (SQLAlchemy's documented recipe for
        # aiosqlite), so that _on_begin decides the transaction mode.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            _enable_wal(cursor, deadline=time.monotonic() + busy_timeout)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(_READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: Any, *, deadline: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds a lock.

    SQLite answers the switch with "database is locked" at once, without its busy
    handler, while another connection writes to a file still in rollback-journal mode
    or switches it itself: two services (the trainer API and its worker) opening a new
    database file at the same start-up raced there (``tensafe up`` failed with it once
    in a load sweep). The switch is retried until ``deadline`` (the busy timeout).
    """
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)  # (a connection thread of aiosqlite, not the event loop)


def resolve_script_location(script_location: str) -> Path:
    """Resolve ``"package.name:folder"`` to the folder inside the installed package.

    Args:
        script_location: A package resource path such as
            ``"tensafe.trainer.store:migrations"``.

    Returns:
        The directory on disk.

    Raises:
        ConfigError: If the package cannot be imported or the folder does not exist.
    """
    package, separator, folder = script_location.partition(":")
    if not separator or not package or not folder:
        raise ConfigError("script_location", f"{script_location!r} is not 'package:folder'")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as error:
        raise ConfigError("script_location", f"package {package!r} not found") from error
    location = root.joinpath(folder)
    # Wheels are installed unpacked, so resources are real files; a zipped package
    # would need extraction, which Alembic does not support.
    if not isinstance(location, Path) or not location.is_dir():
        raise ConfigError("script_location", f"{script_location!r} is not a directory")
    return location


def _check_version_table(version_table: str) -> None:
    if not _IDENTIFIER.match(version_table):
        raise ConfigError("version_table", f"{version_table!r} must be a lower-case SQL identifier")


def _advisory_lock_key(version_table: str) -> int:
    """A stable signed 64-bit key per version table for pg_advisory_xact_lock."""
    digest = hashlib.sha256(version_table.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _upgrade_to_head(connection: sa.Connection, directory: Path, version_table: str) -> str | None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(directory))
    script = ScriptDirectory(str(directory))

    def upgrade_steps(revision: Any, _context: MigrationContext) -> Any:
        # What alembic.command.upgrade passes as ``fn`` (pinned alembic 1.20.1).
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(config, script, fn=upgrade_steps, destination_rev="head") as env:
        env.configure(connection=connection, version_table=version_table)
        with env.begin_transaction():
            env.run_migrations()
        current = env.get_context().get_current_revision()
    return None if current is None else str(current)


def _current_revision(connection: sa.Connection, version_table: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    current = context.get_current_revision()
    return None if current is None else str(current)


async def migrate(
    database: Database | str,
    *,
    script_location: str,
    version_table: str,
) -> str | None:
    """Upgrade a service's schema to the newest revision (``alembic upgrade head``).

    Runs in one transaction; a second call finds the schema at head and does nothing.

    Args:
        database: The service's database, or its URL (a temporary engine is created and
            disposed).
        script_location: The migrations folder as ``"package:folder"``, e.g.
            ``"tensafe.trainer.store:migrations"``; it holds ``versions/*.py``.
        version_table: The service's own Alembic version table, e.g.
            ``"trainer_alembic_version"``.

    Returns:
        The revision the schema is at afterwards (``None`` if there are no migrations).

    Raises:
        ConfigError: If the migrations folder or version table name is invalid.
        Unavailable: If the database cannot be reached.
    """
    directory = resolve_script_location(script_location)
    _check_version_table(version_table)
    owned = isinstance(database, str)
    db = Database.from_url(database) if isinstance(database, str) else database
    try:
        async with db.connection() as connection:
            if db.dialect_name == "postgresql":
                await connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": _advisory_lock_key(version_table)},
                )
            return await connection.run_sync(_upgrade_to_head, directory, version_table)
    finally:
        if owned:
            await db.dispose()


async def current_revision(database: Database, *, version_table: str) -> str | None:
    """Read the revision a service's schema is at.

    Args:
        database: The service's database.
        version_table: The service's Alembic version table.

    Returns:
        The current revision, or ``None`` if the service was never migrated.

    Raises:
        Unavailable: If the database cannot be reached.
    """
    _check_version_table(version_table)
    async with database.connection(read_only=True) as connection:
        return await connection.run_sync(_current_revision, version_table)


def head_revision(script_location: str) -> str | None:
    """The newest revision shipped in a migrations folder.

    Args:
        script_location: The migrations folder as ``"package:folder"``.

    Returns:
        The head revision, or ``None`` if the folder has no migrations.

    Raises:
        ConfigError: If the folder is invalid.
    """
    directory = resolve_script_location(script_location)
    head = ScriptDirectory(str(directory)).get_current_head()
    return None if head is None else str(head)
