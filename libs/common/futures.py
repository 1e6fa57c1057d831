"""Long-running operations ("futures") stored in the service's database.

A service that trains, compiles or encrypts a lot answers at once with a future
(DESIGN §3, AIP-151) and lets a worker finish it. This module holds the store:

* :class:`FutureStore` — the interface (create idempotently by ``(tenant,
  request_id)``, get, state transitions, list with paging, deadline-bounded wait);
* :class:`SqlFutureStore` — its one implementation on SQLAlchemy, for SQLite and
  PostgreSQL alike;
* :func:`futures_table` — builds the table in the *service's* ``MetaData`` under the
  service's prefix (``trainer_futures``), so each service owns its futures table and
  creates it in its own migrations with :func:`create_futures_table_v1`.

Statuses and transitions (anything else is ``FailedPrecondition``)::

    PENDING ──► RUNNING ──► SUCCEEDED | FAILED
       │           │
       └───────────┴──────► CANCELLED

``mark_running`` on a RUNNING future and ``cancel`` on a CANCELLED one are no-ops, so a
redelivered job or a repeated cancel is harmless. Cancellation is cooperative: a worker
that finishes a cancelled future gets ``FailedPrecondition`` from :meth:`succeed` and
rolls its transaction back, so the result of a cancelled job is never recorded.

Every read and write is scoped by tenant: another tenant's future is ``NotFound``,
never a distinguishable "forbidden" (DESIGN §3).

Workers record a result in the *same* transaction as the rest of the job's effect
(weights, ledger entry, step number) by passing ``session=`` to the SQL store's methods;
see DESIGN §8 "Exactly-once with small state".
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import enum
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.common.db import Database
from tensafe.common.errors import ErrorCode, FailedPrecondition, InvalidArgument, NotFound
from tensafe.common.wakeups import FutureWakeups

DEFAULT_PAGE_SIZE = 50
"""Page size used when a list request asks for 0 (AIP-158)."""

MAX_PAGE_SIZE = 1000
"""Larger page sizes are coerced down to this (AIP-158)."""

_MAX_TENANT = 128
_MAX_KIND = 64
_MAX_REQUEST_ID = 128
_MAX_FINGERPRINT = 128
_MAX_RESOURCE = 256
_MAX_ERROR_REASON = 128
_ID_LENGTH = 32  # uuid4 hex
_SWEEP_CHUNK = 500  # ids per query of the re-read sweep (SQLite's old limit is 999)

_log = logging.getLogger(__name__)


class FutureStatus(enum.Enum):
    """Lifecycle state of a future (names match the proto enum without prefix)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """Whether no further transition (other than a repeated cancel) is possible."""
        return self in _TERMINAL


_TERMINAL = frozenset({FutureStatus.SUCCEEDED, FutureStatus.FAILED, FutureStatus.CANCELLED})


@dataclass(frozen=True)
class FutureError:
    """Why a future failed; sent to the client as a status with ``ErrorInfo``."""

    code: ErrorCode
    """The status code, e.g. ``FAILED_PRECONDITION``."""

    reason: str
    """Machine-readable reason, e.g. ``PRIVACY_BUDGET_EXHAUSTED`` (AIP-193)."""

    message: str
    """Human-readable, safe to show to the caller."""


@dataclass(frozen=True)
class Future:
    """A snapshot of one long-running operation."""

    id: str
    """Server-assigned id (32 hex characters)."""

    tenant: str
    """Owning tenant."""

    kind: str
    """What the operation does, e.g. ``forward_backward``."""

    request_id: str
    """The client's idempotency key."""

    request_fingerprint: str | None
    """Digest of the request, to detect a request id reused for another request."""

    resource: str | None
    """Name of the resource the operation acts on, e.g. ``training_clients/abc``."""

    status: FutureStatus
    """Current state."""

    result: bytes | None
    """Serialized result once SUCCEEDED."""

    error: FutureError | None
    """The failure once FAILED."""

    created_at: datetime
    """When the future was created (UTC)."""

    started_at: datetime | None
    """When a worker first started it (UTC)."""

    finished_at: datetime | None
    """When it reached a terminal state (UTC)."""

    @property
    def done(self) -> bool:
        """Whether the future is SUCCEEDED, FAILED or CANCELLED."""
        return self.status.is_terminal


class CreateResult(NamedTuple):
    """The future for a request and whether this call created it."""

    future: Future
    """The new or existing future."""

    created: bool
    """False when the ``(tenant, request_id)`` pair had a future already."""


@dataclass(frozen=True)
class FuturePage:
    """One page of futures, newest first."""

    futures: tuple[Future, ...]
    """The futures on this page."""

    next_page_token: str
    """Token for the next page; empty on the last page (AIP-158)."""


class FutureStore(abc.ABC):
    """Where futures live; every method is scoped to a tenant.

    Args:
        poll_initial: First pause of :meth:`wait` between reads, in seconds.
        poll_max: Longest pause of :meth:`wait` between reads, in seconds. With
            ``wakeups`` it is the interval of the re-read sweep that bounds the cost of
            a lost wake-up (one :meth:`done_among` for all of the process's waiters).
        wakeups: Wake-ups from the processes that finish futures; ``None``: waiters
            poll.
    """

    def __init__(
        self,
        *,
        poll_initial: float = 0.01,
        poll_max: float = 0.25,
        wakeups: FutureWakeups | None = None,
    ) -> None:
        if poll_initial <= 0 or poll_max < poll_initial:
            raise InvalidArgument("poll_max", "need 0 < poll_initial <= poll_max")
        self._poll_initial = poll_initial
        self._poll_max = poll_max
        self._wakeups = wakeups
        # The task that re-reads the futures this process's waiters watch (with
        # wake-ups) for all of them at once (_sweep).
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def wakeups(self) -> FutureWakeups | None:
        """The wake-ups this store's waiters listen to."""
        return self._wakeups

    @abc.abstractmethod
    async def create(
        self,
        tenant: str,
        *,
        kind: str,
        request_id: str,
        resource: str | None = None,
        request_fingerprint: str | None = None,
    ) -> CreateResult:
        """Create a PENDING future, or return the one already made for this request.

        Args:
            tenant: Owning tenant.
            kind: Operation kind.
            request_id: The client's idempotency key, unique per tenant.
            resource: The resource the operation acts on.
            request_fingerprint: Digest of the request; a later call with the same
                request id and another fingerprint is rejected.

        Returns:
            The future and whether it was created by this call.

        Raises:
            InvalidArgument: For empty or oversized fields, or a request id reused for
                a different kind or request.
        """

    @abc.abstractmethod
    async def get(self, tenant: str, future_id: str) -> Future:
        """Read a future.

        Args:
            tenant: The caller's tenant.
            future_id: The future's id.

        Returns:
            The current snapshot.

        Raises:
            NotFound: If there is no such future for this tenant.
        """

    @abc.abstractmethod
    async def mark_running(self, tenant: str, future_id: str) -> Future:
        """Record that a worker started (or restarted) the operation.

        Args:
            tenant: Owning tenant.
            future_id: The future's id.

        Returns:
            The updated future; ``started_at`` keeps the first start time.

        Raises:
            NotFound: If there is no such future for this tenant.
            FailedPrecondition: If the future is already done.
        """

    @abc.abstractmethod
    async def succeed(self, tenant: str, future_id: str, *, result: bytes) -> Future:
        """Record the result of a PENDING or RUNNING future.

        Args:
            tenant: Owning tenant.
            future_id: The future's id.
            result: The serialized result.

        Returns:
            The SUCCEEDED future.

        Raises:
            NotFound: If there is no such future for this tenant.
            FailedPrecondition: If the future is already done (e.g. cancelled).
        """

    @abc.abstractmethod
    async def fail(
        self,
        tenant: str,
        future_id: str,
        *,
        code: ErrorCode,
        message: str,
        reason: str | None = None,
    ) -> Future:
        """Record the failure of a PENDING or RUNNING future.

        Args:
            tenant: Owning tenant.
            future_id: The future's id.
            code: The status code the client sees.
            message: Human-readable, safe to show to the caller.
            reason: Machine-readable reason; defaults to the code's name.

        Returns:
            The FAILED future.

        Raises:
            NotFound: If there is no such future for this tenant.
            FailedPrecondition: If the future is already done.
        """

    @abc.abstractmethod
    async def cancel(self, tenant: str, future_id: str) -> Future:
        """Cancel a PENDING or RUNNING future; repeating it is a no-op.

        Args:
            tenant: Owning tenant.
            future_id: The future's id.

        Returns:
            The CANCELLED future.

        Raises:
            NotFound: If there is no such future for this tenant.
            FailedPrecondition: If the future already SUCCEEDED or FAILED.
        """

    @abc.abstractmethod
    async def list(
        self,
        tenant: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        kind: str | None = None,
        resource: str | None = None,
        status: FutureStatus | None = None,
    ) -> FuturePage:
        """List a tenant's futures, newest first.

        Args:
            tenant: The caller's tenant.
            page_size: At most this many; 0 means :data:`DEFAULT_PAGE_SIZE`, larger than
                :data:`MAX_PAGE_SIZE` is coerced down.
            page_token: ``next_page_token`` of the previous page, or empty.
            kind: Only futures of this kind.
            resource: Only futures on this resource.
            status: Only futures in this state.

        Returns:
            One page.

        Raises:
            InvalidArgument: For a negative page size, or a token that is malformed or
                was issued for other filters.
        """

    async def wait(self, tenant: str, future_id: str, *, timeout: float) -> Future:
        """Wait until the future is done or ``timeout`` seconds pass (AIP-151 Wait).

        With wake-ups the future is read again when the process that finished it says
        so, or when the sweep that re-reads every waited future of this process each
        ``poll_max`` seconds, in one query, finds it done (a wake-up was lost); without,
        reads back off exponentially from ``poll_initial`` to ``poll_max``.

        Args:
            tenant: The caller's tenant.
            future_id: The future's id.
            timeout: Seconds to wait at most (the caller bounds it by its RPC deadline).

        Returns:
            The future when done, or its latest snapshot when the time is up.

        Raises:
            InvalidArgument: If ``timeout`` is negative.
            NotFound: If there is no such future for this tenant.
        """
        if timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._wakeups is not None:
            with self._wakeups.watch(future_id) as woken:
                self._start_sweep()
                while True:
                    future = await self.get(tenant, future_id)
                    remaining = deadline - loop.time()
                    if future.done or remaining <= 0:
                        return future
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), remaining)
                    woken.clear()
        pause = self._poll_initial
        while True:
            future = await self.get(tenant, future_id)
            remaining = deadline - loop.time()
            if future.done or remaining <= 0:
                return future
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, self._poll_max)

    @abc.abstractmethod
    async def done_among(self, future_ids: Sequence[str]) -> set[str]:
        """Which of ``future_ids`` are done, whatever their tenants (the re-read sweep
        of :meth:`wait`: it only wakes this process's waiters, who read their own).

        Args:
            future_ids: Future ids (unknown ones are simply not done).

        Returns:
            The ids of those that are SUCCEEDED, FAILED or CANCELLED.
        """

    def _start_sweep(self) -> None:
        """Run the re-read sweep unless it runs already (a waiter is watching)."""
        sweeper = self._sweeper
        loop = asyncio.get_running_loop()
        if sweeper is None or sweeper.done() or sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Every ``poll_max`` seconds, wake the waiters of the watched futures that are
        done (their wake-up was lost, in a NATS outage say), with one read for all of
        them instead of one per waiter; ends when nobody waits."""
        wakeups = self._wakeups
        assert wakeups is not None
        while True:
            await asyncio.sleep(self._poll_max)
            watched = wakeups.watched()
            if not watched:
                return
            try:
                done = await self.done_among(watched)
            except Exception as error:  # the next sweep tries again
                _log.warning("re-reading %d waited futures failed: %s", len(watched), error)
                continue
            for future_id in done:
                wakeups.wake_local(future_id)


def _futures_v1_schema(table_name: str) -> list[sa.schema.SchemaItem]:
    """Columns and constraints of the version-1 futures table.

    Shared by :func:`futures_table` and :func:`create_futures_table_v1` while the schema
    is at version 1. A later change adds a ``..._v2`` migration helper and changes the
    table factory; this function then stays as it is, because applied migrations must
    not change.
    """
    statuses = ", ".join(f"'{status.value}'" for status in FutureStatus)
    return [
        sa.Column("id", sa.String(_ID_LENGTH), primary_key=True),
        sa.Column("tenant", sa.String(_MAX_TENANT), nullable=False),
        sa.Column("kind", sa.String(_MAX_KIND), nullable=False),
        sa.Column("request_id", sa.String(_MAX_REQUEST_ID), nullable=False),
        sa.Column("request_fingerprint", sa.String(_MAX_FINGERPRINT), nullable=True),
        sa.Column("resource", sa.String(_MAX_RESOURCE), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("error_reason", sa.String(_MAX_ERROR_REASON), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("tenant", "request_id", name=f"uq_{table_name}_tenant_request"),
        sa.CheckConstraint(f"status IN ({statuses})", name=f"ck_{table_name}_status"),
    ]


def _futures_v1_indexes(table_name: str) -> list[tuple[str, list[str]]]:
    return [(f"ix_{table_name}_tenant_created", ["tenant", "created_at", "id"])]


def futures_table_name(prefix: str) -> str:
    """The futures table name for a service prefix, e.g. ``trainer_futures``.

    Args:
        prefix: The service's table prefix (a lower-case identifier).

    Returns:
        The table name.

    Raises:
        InvalidArgument: If the prefix is not a lower-case identifier.
    """
    if not prefix.isidentifier() or prefix.lower() != prefix or len(prefix) > 40:
        raise InvalidArgument("prefix", f"{prefix!r} must be a short lower-case identifier")
    return f"{prefix}_futures"


def futures_table(metadata: sa.MetaData, *, prefix: str) -> sa.Table:
    """Define the futures table in a service's metadata.

    Args:
        metadata: The service's ``MetaData``.
        prefix: The service's table prefix, e.g. ``"trainer"``.

    Returns:
        The table ``<prefix>_futures``.
    """
    name = futures_table_name(prefix)
    table = sa.Table(name, metadata, *_futures_v1_schema(name))
    for index_name, columns in _futures_v1_indexes(name):
        sa.Index(index_name, *(table.c[column] for column in columns))
    return table


def create_futures_table_v1(op: Any, *, prefix: str) -> None:
    """Create the version-1 futures table from a service's Alembic migration.

    Call it from ``upgrade()``: ``create_futures_table_v1(op, prefix="trainer")``.

    Args:
        op: ``alembic.op``.
        prefix: The service's table prefix.
    """
    name = futures_table_name(prefix)
    op.create_table(name, *_futures_v1_schema(name))
    for index_name, columns in _futures_v1_indexes(name):
        op.create_index(index_name, name, columns)


def drop_futures_table_v1(op: Any, *, prefix: str) -> None:
    """Drop the version-1 futures table from a service's Alembic ``downgrade()``.

    Args:
        op: ``alembic.op``.
        prefix: The service's table prefix.
    """
    name = futures_table_name(prefix)
    for index_name, _columns in _futures_v1_indexes(name):
        op.drop_index(index_name, table_name=name)
    op.drop_table(name)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _check_text(field: str, value: str, limit: int) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters")


def _check_id(future_id: str) -> None:
    # Ids are ours (uuid4 hex); anything else cannot exist, and is NOT_FOUND.
    if len(future_id) != _ID_LENGTH:
        raise NotFound(f"future {future_id!r} not found")


class SqlFutureStore(FutureStore):
    """:class:`FutureStore` on a SQLAlchemy table made by :func:`futures_table`.

    Every method takes an optional ``session``: inside a caller's transaction the change
    commits (or rolls back) with the caller's other writes; without one the method runs
    its own transaction.

    Args:
        database: The service's database.
        table: The service's futures table.
        poll_initial: See :class:`FutureStore`.
        poll_max: See :class:`FutureStore`.
        wakeups: See :class:`FutureStore`.
    """

    def __init__(
        self,
        database: Database,
        table: sa.Table,
        *,
        poll_initial: float = 0.01,
        poll_max: float = 0.25,
        wakeups: FutureWakeups | None = None,
    ) -> None:
        super().__init__(poll_initial=poll_initial, poll_max=poll_max, wakeups=wakeups)
        self._db = database
        self._table = table

    @property
    def table(self) -> sa.Table:
        """The futures table."""
        return self._table

    @asynccontextmanager
    async def _scope(
        self, session: AsyncSession | None, *, read_only: bool = False
    ) -> AsyncIterator[AsyncSession]:
        if session is not None:
            yield session
            return
        async with self._db.transaction(read_only=read_only) as own:
            yield own

    def _to_future(self, row: sa.Row[Any]) -> Future:
        mapping = row._mapping
        error: FutureError | None = None
        if mapping["error_code"] is not None:
            error = FutureError(
                code=ErrorCode(mapping["error_code"]),
                reason=str(mapping["error_reason"] or mapping["error_code"]),
                message=str(mapping["error_message"] or ""),
            )
        created_at = _utc(mapping["created_at"])
        assert created_at is not None  # NOT NULL column
        return Future(
            id=mapping["id"],
            tenant=mapping["tenant"],
            kind=mapping["kind"],
            request_id=mapping["request_id"],
            request_fingerprint=mapping["request_fingerprint"],
            resource=mapping["resource"],
            status=FutureStatus(mapping["status"]),
            result=None if mapping["result"] is None else bytes(mapping["result"]),
            error=error,
            created_at=created_at,
            started_at=_utc(mapping["started_at"]),
            finished_at=_utc(mapping["finished_at"]),
        )

    async def _load(self, session: AsyncSession, tenant: str, future_id: str) -> Future:
        table = self._table
        row = (
            await session.execute(
                sa.select(table).where(table.c.id == future_id, table.c.tenant == tenant)
            )
        ).one_or_none()
        if row is None:
            raise NotFound(f"future {future_id!r} not found")
        return self._to_future(row)

    async def create(
        self,
        tenant: str,
        *,
        kind: str,
        request_id: str,
        resource: str | None = None,
        request_fingerprint: str | None = None,
        session: AsyncSession | None = None,
    ) -> CreateResult:
        """See :meth:`FutureStore.create`; ``session`` joins a caller's transaction."""
        _check_text("tenant", tenant, _MAX_TENANT)
        _check_text("kind", kind, _MAX_KIND)
        _check_text("request_id", request_id, _MAX_REQUEST_ID)
        if resource is not None:
            _check_text("resource", resource, _MAX_RESOURCE)
        if request_fingerprint is not None:
            _check_text("request_fingerprint", request_fingerprint, _MAX_FINGERPRINT)
        table = self._table
        new_id = uuid.uuid4().hex
        values = {
            "id": new_id,
            "tenant": tenant,
            "kind": kind,
            "request_id": request_id,
            "request_fingerprint": request_fingerprint,
            "resource": resource,
            "status": FutureStatus.PENDING.value,
            "created_at": datetime.now(UTC),
        }
        # INSERT .. ON CONFLICT DO NOTHING keeps a concurrent duplicate from aborting the
        # (possibly caller-owned) transaction, which a caught IntegrityError would do on
        # PostgreSQL.
        insert_factory = (
            pg_dialect.insert if self._db.dialect_name == "postgresql" else sqlite_dialect.insert
        )
        statement = (
            insert_factory(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["tenant", "request_id"])
        )
        async with self._scope(session) as active:
            await active.execute(statement)
            row = (
                await active.execute(
                    sa.select(table).where(
                        table.c.tenant == tenant, table.c.request_id == request_id
                    )
                )
            ).one()
            future = self._to_future(row)
        created = future.id == new_id
        if not created and (
            future.kind != kind
            or (
                request_fingerprint is not None
                and future.request_fingerprint is not None
                and future.request_fingerprint != request_fingerprint
            )
        ):
            raise InvalidArgument(
                "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
            )
        return CreateResult(future=future, created=created)

    async def get(
        self, tenant: str, future_id: str, *, session: AsyncSession | None = None
    ) -> Future:
        """See :meth:`FutureStore.get`; ``session`` joins a caller's transaction."""
        _check_id(future_id)
        async with self._scope(session, read_only=True) as active:
            return await self._load(active, tenant, future_id)

    async def done_among(self, future_ids: Sequence[str]) -> set[str]:
        """See :meth:`FutureStore.done_among`: one read-only transaction, one query per
        500 ids."""
        table = self._table
        terminal = [status.value for status in _TERMINAL]
        done: set[str] = set()
        async with self._db.transaction(read_only=True) as session:
            for start in range(0, len(future_ids), _SWEEP_CHUNK):
                chunk = list(future_ids[start : start + _SWEEP_CHUNK])
                query = sa.select(table.c.id).where(
                    table.c.id.in_(chunk), table.c.status.in_(terminal)
                )
                done.update((await session.execute(query)).scalars())
        return done

    async def _transition(
        self,
        session: AsyncSession | None,
        tenant: str,
        future_id: str,
        *,
        verb: str,
        allowed_from: Sequence[FutureStatus],
        values: dict[str, Any],
    ) -> Future:
        _check_id(future_id)
        async with self._scope(session) as active:
            applied = await self._apply(active, tenant, future_id, allowed_from, values)
            future = await self._load(active, tenant, future_id)
        if not applied:
            raise FailedPrecondition(
                f"future {future_id} is {future.status.value}; cannot {verb} it",
                reason="FUTURE_STATE",
                metadata={"status": future.status.value},
            )
        return future

    async def _apply(
        self,
        session: AsyncSession,
        tenant: str,
        future_id: str,
        allowed_from: Sequence[FutureStatus],
        values: dict[str, Any],
    ) -> bool:
        """One conditional UPDATE; whether the future was in ``allowed_from``."""
        table = self._table
        statement = (
            sa.update(table)
            .where(
                table.c.id == future_id,
                table.c.tenant == tenant,
                table.c.status.in_([status.value for status in allowed_from]),
            )
            .values(**values)
        )
        # A conditional UPDATE is atomic: of two racing transitions exactly one matches
        # the status it expects.
        result = cast("sa.CursorResult[Any]", await session.execute(statement))
        return bool(result.rowcount == 1)

    def _running_values(self) -> dict[str, Any]:
        return {
            "status": FutureStatus.RUNNING.value,
            "started_at": sa.func.coalesce(self._table.c.started_at, datetime.now(UTC)),
        }

    def _succeeded_values(self, result: bytes) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "status": FutureStatus.SUCCEEDED.value,
            "result": bytes(result),
            "started_at": sa.func.coalesce(self._table.c.started_at, now),
            "finished_at": now,
        }

    async def mark_running(
        self, tenant: str, future_id: str, *, session: AsyncSession | None = None
    ) -> Future:
        """See :meth:`FutureStore.mark_running`; ``session`` joins a caller's transaction."""
        return await self._transition(
            session,
            tenant,
            future_id,
            verb="start",
            allowed_from=(FutureStatus.PENDING, FutureStatus.RUNNING),
            values=self._running_values(),
        )

    async def try_mark_running(self, session: AsyncSession, tenant: str, future_id: str) -> bool:
        """:meth:`mark_running` in one statement of the caller's transaction, without
        reading the future back (a worker's per-job path).

        Returns:
            False, changing nothing, when the future is done already (e.g. cancelled)
            or does not exist.
        """
        return await self._try_unfinished(session, tenant, future_id, self._running_values())

    async def try_succeed(
        self, session: AsyncSession, tenant: str, future_id: str, *, result: bytes
    ) -> bool:
        """:meth:`succeed` in one statement of the caller's transaction, without reading
        the future back (a worker's per-job path).

        Returns:
            False, changing nothing, when the future is done already (e.g. cancelled)
            or does not exist.
        """
        return await self._try_unfinished(
            session, tenant, future_id, self._succeeded_values(result)
        )

    async def _try_unfinished(
        self, session: AsyncSession, tenant: str, future_id: str, values: dict[str, Any]
    ) -> bool:
        _check_id(future_id)
        return await self._apply(
            session, tenant, future_id, (FutureStatus.PENDING, FutureStatus.RUNNING), values
        )

    async def succeed(
        self,
        tenant: str,
        future_id: str,
        *,
        result: bytes,
        session: AsyncSession | None = None,
    ) -> Future:
        """See :meth:`FutureStore.succeed`; ``session`` joins a caller's transaction."""
        return await self._transition(
            session,
            tenant,
            future_id,
            verb="complete",
            allowed_from=(FutureStatus.PENDING, FutureStatus.RUNNING),
            values=self._succeeded_values(result),
        )

    async def fail(
        self,
        tenant: str,
        future_id: str,
        *,
        code: ErrorCode,
        message: str,
        reason: str | None = None,
        session: AsyncSession | None = None,
    ) -> Future:
        """See :meth:`FutureStore.fail`; ``session`` joins a caller's transaction."""
        effective_reason = reason or code.value
        _check_text("reason", effective_reason, _MAX_ERROR_REASON)
        return await self._transition(
            session,
            tenant,
            future_id,
            verb="fail",
            allowed_from=(FutureStatus.PENDING, FutureStatus.RUNNING),
            values={
                "status": FutureStatus.FAILED.value,
                "error_code": code.value,
                "error_reason": effective_reason,
                "error_message": message,
                "finished_at": datetime.now(UTC),
            },
        )

    async def cancel(
        self, tenant: str, future_id: str, *, session: AsyncSession | None = None
    ) -> Future:
        """See :meth:`FutureStore.cancel`; ``session`` joins a caller's transaction."""
        table = self._table
        return await self._transition(
            session,
            tenant,
            future_id,
            verb="cancel",
            allowed_from=(FutureStatus.PENDING, FutureStatus.RUNNING, FutureStatus.CANCELLED),
            values={
                "status": FutureStatus.CANCELLED.value,
                "finished_at": sa.func.coalesce(table.c.finished_at, datetime.now(UTC)),
            },
        )

    async def list(
        self,
        tenant: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        kind: str | None = None,
        resource: str | None = None,
        status: FutureStatus | None = None,
        session: AsyncSession | None = None,
    ) -> FuturePage:
        """See :meth:`FutureStore.list`; ``session`` joins a caller's transaction."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        filters_digest = _filters_digest(kind, resource, status)
        table = self._table
        query = sa.select(table).where(table.c.tenant == tenant)
        if kind is not None:
            query = query.where(table.c.kind == kind)
        if resource is not None:
            query = query.where(table.c.resource == resource)
        if status is not None:
            query = query.where(table.c.status == status.value)
        if page_token:
            after_created, after_id = _decode_page_token(page_token, filters_digest)
            query = query.where(
                sa.or_(
                    table.c.created_at < after_created,
                    sa.and_(table.c.created_at == after_created, table.c.id < after_id),
                )
            )
        query = query.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(size + 1)
        async with self._scope(session, read_only=True) as active:
            rows = (await active.execute(query)).all()
        futures = tuple(self._to_future(row) for row in rows[:size])
        next_token = ""
        if len(rows) > size:
            last = futures[-1]
            next_token = _encode_page_token(last.created_at, last.id, filters_digest)
        return FuturePage(futures=futures, next_page_token=next_token)


def _filters_digest(kind: str | None, resource: str | None, status: FutureStatus | None) -> str:
    # A token is only valid with the filters it was issued for (AIP-158).
    material = json.dumps([kind, resource, None if status is None else status.value])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _encode_page_token(created_at: datetime, future_id: str, filters_digest: str) -> str:
    payload = json.dumps({"c": created_at.isoformat(), "i": future_id, "f": filters_digest})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_page_token(token: str, filters_digest: str) -> tuple[datetime, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at = datetime.fromisoformat(payload["c"])
        future_id = str(payload["i"])
        token_filters = str(payload["f"])
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise InvalidArgument("page_token", "is malformed") from error
    if token_filters != filters_digest:
        raise InvalidArgument("page_token", "was issued for different filters")
    return created_at, future_id
