"""Database operations of the trainer, shared by the API and the workers.

Every tenant-scoped read filters by tenant: another tenant's object is ``NotFound``,
indistinguishable from a missing one (DESIGN §3). Methods take the caller's session so
that one job's effects commit in one transaction.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from tensafe.common.errors import InvalidArgument, NotFound
from tensafe.common.futures import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, FutureStatus
from tensafe.trainer.store.models import (
    FUTURES,
    BudgetReservationRow,
    CheckpointRow,
    JobRow,
    LedgerRow,
    StepRow,
    TrainingClientRow,
)

RowT = TypeVar("RowT")

Session = AsyncSession
"""The session of an open store transaction, for callers that pass one along (the
worker's commits) without speaking SQL themselves."""

CLIENT_ACTIVE = "ACTIVE"
CLIENT_DELETED = "DELETED"
JOB_QUEUED = "QUEUED"
JOB_DONE = "DONE"
RESERVED = "RESERVED"
CONSUMED = "CONSUMED"
RELEASED = "RELEASED"


def utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything is stored in UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


async def lock_client(session: AsyncSession, tenant: str, client_id: str) -> TrainingClientRow:
    """Read an active client of ``tenant`` and lock its row until the transaction ends.

    On PostgreSQL this is ``SELECT ... FOR UPDATE``; on SQLite the whole database is
    already write-locked by ``BEGIN IMMEDIATE``, which serialises the same way.

    Raises:
        NotFound: No such active client for this tenant.
    """
    row = (
        await session.execute(
            sa.select(TrainingClientRow)
            .where(
                TrainingClientRow.id == client_id,
                TrainingClientRow.tenant == tenant,
                TrainingClientRow.state == CLIENT_ACTIVE,
            )
            .with_for_update()
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"training client {client_id!r} not found")
    return row


class LostClient(Exception):
    """The client moved on or this worker lost its lease: roll back and retry later."""


async def fence_client(
    session: AsyncSession, client_id: str, *, seq: int, owner: str
) -> TrainingClientRow:
    """Lock the client row for the commit of job ``seq`` by the lease holder ``owner``.

    The fence every worker commit goes through: the row must still expect ``seq`` next
    and still be leased to ``owner``; otherwise another worker has moved on.

    Raises:
        LostClient: The client applied another job or the lease was lost.
    """
    row = await session.get(
        TrainingClientRow, client_id, with_for_update=True, populate_existing=True
    )
    if row is None or row.applied_seq != seq - 1 or row.lease_owner != owner:
        raise LostClient(f"client {client_id} moved on or its lease was lost")
    return row


async def get_client(session: AsyncSession, tenant: str, client_id: str) -> TrainingClientRow:
    """Read an active client of ``tenant``.

    Raises:
        NotFound: No such active client for this tenant.
    """
    row = (
        await session.execute(
            sa.select(TrainingClientRow).where(
                TrainingClientRow.id == client_id,
                TrainingClientRow.tenant == tenant,
                TrainingClientRow.state == CLIENT_ACTIVE,
            )
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"training client {client_id!r} not found")
    return row


async def client_by_request(
    session: AsyncSession, tenant: str, request_id: str
) -> TrainingClientRow | None:
    """The client a CreateTrainingClient with this request id made, if any."""
    return (
        await session.execute(
            sa.select(TrainingClientRow).where(
                TrainingClientRow.tenant == tenant, TrainingClientRow.request_id == request_id
            )
        )
    ).scalar_one_or_none()


async def count_live_clients(session: AsyncSession, tenant: str) -> int:
    """How many active (not deleted) training clients ``tenant`` holds."""
    query = sa.select(sa.func.count()).where(
        TrainingClientRow.tenant == tenant, TrainingClientRow.state == CLIENT_ACTIVE
    )
    return int((await session.execute(query)).scalar_one())


async def count_unfinished_jobs(session: AsyncSession, tenant: str) -> int:
    """How many of ``tenant``'s futures are still PENDING or RUNNING (its queued and
    running jobs; every trainer future is a job)."""
    unfinished = [FutureStatus.PENDING.value, FutureStatus.RUNNING.value]
    query = sa.select(sa.func.count()).where(
        FUTURES.c.tenant == tenant, FUTURES.c.status.in_(unfinished)
    )
    return int((await session.execute(query)).scalar_one())


@dataclass(frozen=True)
class ClientPage:
    """One page of training clients, newest first."""

    clients: list[TrainingClientRow]
    next_page_token: str


async def list_clients(
    session: AsyncSession, tenant: str, *, page_size: int, page_token: str
) -> ClientPage:
    """A page of a tenant's active clients, newest first (AIP-158)."""
    size = _page_size(page_size)
    query = sa.select(TrainingClientRow).where(
        TrainingClientRow.tenant == tenant, TrainingClientRow.state == CLIENT_ACTIVE
    )
    if page_token:
        after_created, after_id = decode_page_token(page_token)
        query = query.where(
            sa.or_(
                TrainingClientRow.created_at < after_created,
                sa.and_(
                    TrainingClientRow.created_at == after_created,
                    TrainingClientRow.id < after_id,
                ),
            )
        )
    query = query.order_by(TrainingClientRow.created_at.desc(), TrainingClientRow.id.desc())
    rows = list((await session.execute(query.limit(size + 1))).scalars())
    token = ""
    if len(rows) > size:
        last = rows[size - 1]
        created = utc(last.created_at)
        assert created is not None
        token = encode_page_token(created, last.id)
    return ClientPage(rows[:size], token)


def encode_page_token(created: datetime, row_id: str) -> str:
    """The page token after a row of a list ordered by (creation time, id)."""
    payload = json.dumps({"c": created.isoformat(), "i": row_id})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    """The (creation time, id) a page token continues after.

    Raises:
        InvalidArgument: ``page_token`` is malformed.
    """
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return datetime.fromisoformat(payload["c"]), str(payload["i"])
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise InvalidArgument("page_token", "is malformed") from error


async def open_reservations(session: AsyncSession, client_id: str) -> list[BudgetReservationRow]:
    """Admitted DP steps whose jobs have not committed yet, in sequence order."""
    return list(
        (
            await session.execute(
                sa.select(BudgetReservationRow)
                .where(
                    BudgetReservationRow.client_id == client_id,
                    BudgetReservationRow.status == RESERVED,
                )
                .order_by(BudgetReservationRow.seq)
            )
        ).scalars()
    )


async def ledger_rows(
    session: AsyncSession, client_id: str, *, after: int, upto: int
) -> list[LedgerRow]:
    """A client's ledger rows ``after < dp_step <= upto``, in step order."""
    return list(
        (
            await session.execute(
                sa.select(LedgerRow)
                .where(
                    LedgerRow.client_id == client_id,
                    LedgerRow.dp_step > after,
                    LedgerRow.dp_step <= upto,
                )
                .order_by(LedgerRow.dp_step)
            )
        ).scalars()
    )


async def dataset_ledger(session: AsyncSession, dataset_id: str) -> list[LedgerRow]:
    """Every committed DP step of any client that sampled a dataset."""
    return list(
        (
            await session.execute(
                sa.select(LedgerRow)
                .where(LedgerRow.dataset_id == dataset_id)
                .order_by(LedgerRow.id)
            )
        ).scalars()
    )


async def dataset_reservations(
    session: AsyncSession, dataset_id: str
) -> list[BudgetReservationRow]:
    """Steps still reserved on a dataset by admitted runs."""
    return list(
        (
            await session.execute(
                sa.select(BudgetReservationRow).where(
                    BudgetReservationRow.dataset_id == dataset_id,
                    BudgetReservationRow.status == RESERVED,
                )
            )
        ).scalars()
    )


async def get_job(session: AsyncSession, future_id: str) -> JobRow | None:
    """A job by its future id."""
    return await session.get(JobRow, future_id)


async def queued_job_at(session: AsyncSession, client_id: str, seq: int) -> JobRow | None:
    """The client's job ``seq`` if it is admitted, not committed yet and its future not
    finished (not cancelled): one read by the unique ``(client_id, seq)`` key."""
    unfinished = [FutureStatus.PENDING.value, FutureStatus.RUNNING.value]
    return (
        await session.execute(
            sa.select(JobRow)
            .join(FUTURES, FUTURES.c.id == JobRow.future_id)
            .where(
                JobRow.client_id == client_id,
                JobRow.seq == seq,
                JobRow.status == JOB_QUEUED,
                FUTURES.c.status.in_(unfinished),
            )
        )
    ).scalar_one_or_none()


async def queued_jobs(session: AsyncSession, *, older_than: datetime, limit: int) -> list[JobRow]:
    """Jobs accepted before ``older_than`` and not yet committed by a worker."""
    return list(
        (
            await session.execute(
                sa.select(JobRow)
                .where(JobRow.status == JOB_QUEUED, JobRow.created_at < older_than)
                .order_by(JobRow.created_at)
                .limit(limit)
            )
        ).scalars()
    )


def _lease_free(owner: str, moment: datetime) -> sa.ColumnElement[bool]:
    """The client's lease is free for ``owner``: unheld, its own, or expired."""
    return sa.or_(
        TrainingClientRow.lease_owner.is_(None),
        TrainingClientRow.lease_owner == owner,
        TrainingClientRow.lease_expires_at < moment,
    )


async def take_lease(
    session: AsyncSession, client_id: str, *, owner: str, lease_seconds: float
) -> datetime | None:
    """Take or renew the lease on a client; returns None if another worker holds it.

    A conditional UPDATE, so of two workers racing for an expired lease exactly one
    wins.
    """
    moment = now()
    statement = (
        sa.update(TrainingClientRow)
        .where(TrainingClientRow.id == client_id, _lease_free(owner, moment))
        .values(lease_owner=owner, lease_expires_at=moment + timedelta(seconds=lease_seconds))
        # Plain SQL semantics: objects loaded in the session are not re-evaluated in
        # Python (SQLite hands back naive datetimes that cannot be compared there).
        .execution_options(synchronize_session=False)
    )
    result = cast("sa.CursorResult[Any]", await session.execute(statement))
    if result.rowcount == 1:
        return moment
    return None


async def claim_client(
    session: AsyncSession, client_id: str, *, seq: int, owner: str, lease_seconds: float
) -> TrainingClientRow | None:
    """Claim an active client for its next job ``seq``: the order check and the lease in
    one conditional ``UPDATE ... RETURNING`` (one round trip, where reading the row,
    checking it and taking the lease were three).

    Returns:
        The client's row after the update, or None (nothing changed) when the client is
        missing or deleted, expects another job next, or is leased to another worker;
        the caller reads the row to tell which.
    """
    moment = now()
    statement = (
        sa.update(TrainingClientRow)
        .where(
            TrainingClientRow.id == client_id,
            TrainingClientRow.state == CLIENT_ACTIVE,
            TrainingClientRow.applied_seq == seq - 1,
            _lease_free(owner, moment),
        )
        .values(lease_owner=owner, lease_expires_at=moment + timedelta(seconds=lease_seconds))
        .returning(TrainingClientRow)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def advance_client(
    session: AsyncSession,
    client_id: str,
    *,
    seq: int,
    owner: str,
    state: tuple[str, str] | None,
    step: int,
    loss_sum: float = 0.0,
    tokens: float = 0.0,
) -> bool:
    """Commit job ``seq`` of a client, fenced, in one statement: the fence of
    :func:`fence_client` (still expecting ``seq``, still leased to ``owner``) and the
    client's new ``applied_seq``, state reference and step, and the loss accumulated
    for its next optimizer step. For jobs that touch nothing else of the client (no
    ledger, no checkpoint); the others lock the row with :func:`fence_client`.

    Args:
        session: The job's commit transaction.
        client_id: The client.
        seq: The job's sequence number.
        owner: This worker's lease id.
        state: The new state object (path, sha256), or None when the job kept the state.
        step: The client's optimizer step (set with a new state).
        loss_sum: Added to the loss accumulated since the last optimizer step.
        tokens: Added to the tokens accumulated since the last optimizer step.

    Returns:
        False, changing nothing, when the client moved on or the lease was lost.
    """
    values: dict[str, Any] = {"applied_seq": seq}
    if state is not None:
        values.update(state_path=state[0], state_sha256=state[1], step=step)
    if loss_sum or tokens:
        values.update(
            pending_loss_sum=TrainingClientRow.pending_loss_sum + loss_sum,
            pending_tokens=TrainingClientRow.pending_tokens + tokens,
        )
    statement = (
        sa.update(TrainingClientRow)
        .where(
            TrainingClientRow.id == client_id,
            TrainingClientRow.applied_seq == seq - 1,
            TrainingClientRow.lease_owner == owner,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    result = cast("sa.CursorResult[Any]", await session.execute(statement))
    return bool(result.rowcount == 1)


async def release_lease(session: AsyncSession, client_id: str, *, owner: str) -> None:
    """Give a lease back (on shutdown), if still held."""
    await session.execute(
        sa.update(TrainingClientRow)
        .where(TrainingClientRow.id == client_id, TrainingClientRow.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


async def finish_job(session: AsyncSession, future_id: str) -> None:
    """Mark a job committed (it leaves the outbox)."""
    await session.execute(
        sa.update(JobRow).where(JobRow.future_id == future_id).values(status=JOB_DONE)
    )


async def finish_jobs(session: AsyncSession, future_ids: Sequence[str]) -> None:
    """Mark several jobs committed in one statement."""
    await session.execute(
        sa.update(JobRow).where(JobRow.future_id.in_(future_ids)).values(status=JOB_DONE)
    )


async def settle_reservation(session: AsyncSession, future_id: str, *, status: str) -> None:
    """Consume or release the reservation of an OptimStep job (no-op without one)."""
    await session.execute(
        sa.update(BudgetReservationRow)
        .where(BudgetReservationRow.future_id == future_id, BudgetReservationRow.status == RESERVED)
        .values(status=status)
    )


async def get_checkpoint(
    session: AsyncSession, tenant: str, client_id: str, kind: str, name: str
) -> CheckpointRow:
    """A checkpoint of an active client of ``tenant``.

    Raises:
        NotFound: No such checkpoint for this tenant.
    """
    row = (
        await session.execute(
            sa.select(CheckpointRow)
            .join(TrainingClientRow, TrainingClientRow.id == CheckpointRow.client_id)
            .where(
                CheckpointRow.tenant == tenant,
                CheckpointRow.client_id == client_id,
                CheckpointRow.kind == kind,
                CheckpointRow.name == name,
                TrainingClientRow.state == CLIENT_ACTIVE,
            )
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{kind} {name!r} of training client {client_id!r} not found")
    return row


async def replace_checkpoint(session: AsyncSession, row: CheckpointRow) -> CheckpointRow | None:
    """Insert a checkpoint, replacing one of the same name; returns the replaced row."""
    old = (
        await session.execute(
            sa.select(CheckpointRow).where(
                CheckpointRow.client_id == row.client_id,
                CheckpointRow.kind == row.kind,
                CheckpointRow.name == row.name,
            )
        )
    ).scalar_one_or_none()
    if old is not None:
        await session.delete(old)
        await session.flush()
    session.add(row)
    return old


async def checkpoints_of(session: AsyncSession, client_id: str) -> Sequence[CheckpointRow]:
    """Every checkpoint of a client."""
    return list(
        (
            await session.execute(
                sa.select(CheckpointRow).where(CheckpointRow.client_id == client_id)
            )
        ).scalars()
    )


def record_step(
    session: AsyncSession,
    row: TrainingClientRow,
    *,
    seq: int,
    future_id: str,
    loss: float | None,
    dp_step: int | None,
) -> None:
    """Add a committed optimizer step to the client's history (``row`` is after it).

    Args:
        session: The step's transaction.
        row: The locked client, its step and epsilon already updated.
        seq: The job's sequence number.
        future_id: The job's future.
        loss: Mean loss per token of the step's batch; None if unknown.
        dp_step: The privacy ledger's step; None for a step without DP.
    """
    session.add(
        StepRow(
            tenant=row.tenant,
            client_id=row.id,
            seq=seq,
            future_id=future_id,
            step=int(row.step),
            dp_step=dp_step,
            epsilon_after=float(row.epsilon_spent) if dp_step is not None else None,
            loss=loss,
            created_at=now(),
        )
    )


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)


# The largest key a page token may name: the key columns are 64-bit signed integers,
# and a larger bound parameter fails inside the database driver (INTERNAL, found by
# the fuzz suite with 2**63).
_MAX_PAGE_KEY = 2**63 - 1


def _after_key(page_token: str) -> int:
    # Step and checkpoint pages are ordered by an integer key; the token is the last one.
    if not page_token:
        return -1
    try:
        value = int(page_token)
    except ValueError as error:
        raise InvalidArgument("page_token", "is malformed") from error
    if not 0 <= value <= _MAX_PAGE_KEY:
        raise InvalidArgument("page_token", "is malformed")
    return value


async def _page_by_key(
    session: AsyncSession,
    row_type: type[RowT],
    key: Any,
    where: Any,
    *,
    page_size: int,
    page_token: str,
) -> tuple[list[RowT], str]:
    """A page of the ``where`` rows in ascending ``key`` order, and the next token."""
    size = _page_size(page_size)
    rows = list(
        (
            await session.execute(
                sa.select(row_type)
                .where(where, key > _after_key(page_token))
                .order_by(key)
                .limit(size + 1)
            )
        ).scalars()
    )
    token = str(getattr(rows[size - 1], key.key)) if len(rows) > size else ""
    return rows[:size], token


@dataclass(frozen=True)
class StepPage:
    """One page of a client's optimizer steps, oldest first."""

    steps: list[StepRow]
    next_page_token: str


async def list_steps(
    session: AsyncSession, client_id: str, *, page_size: int, page_token: str
) -> StepPage:
    """A page of a client's committed optimizer steps in commit order (AIP-158).

    The caller has checked that the client belongs to the tenant.
    """
    rows, token = await _page_by_key(
        session,
        StepRow,
        StepRow.id,
        StepRow.client_id == client_id,
        page_size=page_size,
        page_token=page_token,
    )
    return StepPage(rows, token)


@dataclass(frozen=True)
class CheckpointPage:
    """One page of a client's checkpoints, oldest first."""

    checkpoints: list[CheckpointRow]
    next_page_token: str


async def list_checkpoints(
    session: AsyncSession, client_id: str, *, page_size: int, page_token: str
) -> CheckpointPage:
    """A page of a client's checkpoints in the order their jobs ran (AIP-158).

    Each job saves at most one checkpoint, so the job's sequence number orders them.
    The caller has checked that the client belongs to the tenant.
    """
    rows, token = await _page_by_key(
        session,
        CheckpointRow,
        CheckpointRow.seq,
        CheckpointRow.client_id == client_id,
        page_size=page_size,
        page_token=page_token,
    )
    return CheckpointPage(rows, token)


@dataclass(frozen=True)
class ClientProgress:
    """What ``/metrics`` shows of one active training client."""

    client_id: str
    tenant: str
    step: int
    dp_steps: int
    epsilon_spent: float


async def client_progress(session: AsyncSession, *, limit: int) -> list[ClientProgress]:
    """Progress of the ``limit`` newest active clients (bounded metric cardinality)."""
    query = (
        sa.select(
            TrainingClientRow.id,
            TrainingClientRow.tenant,
            TrainingClientRow.step,
            TrainingClientRow.dp_steps,
            TrainingClientRow.epsilon_spent,
        )
        .where(TrainingClientRow.state == CLIENT_ACTIVE)
        .order_by(TrainingClientRow.created_at.desc(), TrainingClientRow.id.desc())
        .limit(limit)
    )
    return [ClientProgress(*row) for row in (await session.execute(query)).all()]


async def count_queued_jobs(session: AsyncSession) -> int:
    """Jobs accepted and not yet committed by a worker (the work queue's depth)."""
    query = sa.select(sa.func.count()).select_from(JobRow).where(JobRow.status == JOB_QUEUED)
    return int((await session.execute(query)).scalar_one())
