"""One FutureStore contract, run against SQLite (a tmp file) and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from tensafe.common.db import Database
from tensafe.common.errors import ErrorCode, FailedPrecondition, InvalidArgument, NotFound
from tensafe.common.futures import (
    FutureStatus,
    SqlFutureStore,
    futures_table,
)

TENANT = "tenant-a"
OTHER_TENANT = "tenant-b"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlFutureStore]:
    # A unique prefix per test keeps tests independent inside the session's PostgreSQL db.
    metadata = sa.MetaData()
    table = futures_table(metadata, prefix=f"t{uuid.uuid4().hex[:10]}")
    db = Database.from_url(database_url)
    async with db.connection() as connection:
        await connection.run_sync(metadata.create_all)
    try:
        yield SqlFutureStore(db, table, poll_initial=0.005, poll_max=0.05)
    finally:
        async with db.connection() as connection:
            await connection.run_sync(metadata.drop_all)
        await db.dispose()


class TestFutureStore:
    """The contract every FutureStore implementation must meet."""

    async def test_create_is_idempotent_per_tenant_and_request_id(
        self, store: SqlFutureStore
    ) -> None:
        first = await store.create(TENANT, kind="optim_step", request_id="req-1")
        again = await store.create(TENANT, kind="optim_step", request_id="req-1")
        other_tenant = await store.create(OTHER_TENANT, kind="optim_step", request_id="req-1")
        assert first.created and not again.created and other_tenant.created
        assert again.future == first.future
        assert other_tenant.future.id != first.future.id
        assert first.future.status is FutureStatus.PENDING
        assert first.future.created_at.tzinfo is not None
        assert first.future.started_at is None and first.future.finished_at is None

    async def test_reused_request_id_for_another_request_is_rejected(
        self, store: SqlFutureStore
    ) -> None:
        await store.create(TENANT, kind="sample", request_id="r", request_fingerprint="aa")
        with pytest.raises(InvalidArgument) as other_kind:
            await store.create(TENANT, kind="optim_step", request_id="r")
        with pytest.raises(InvalidArgument):
            await store.create(TENANT, kind="sample", request_id="r", request_fingerprint="bb")
        assert other_kind.value.field == "request_id"
        same = await store.create(TENANT, kind="sample", request_id="r", request_fingerprint="aa")
        assert not same.created

    async def test_concurrent_creates_make_one_future(self, store: SqlFutureStore) -> None:
        results = await asyncio.gather(
            *(store.create(TENANT, kind="k", request_id="same") for _ in range(5))
        )
        assert len({result.future.id for result in results}) == 1
        assert sum(result.created for result in results) == 1

    @pytest.mark.parametrize(
        ("field", "kwargs"),
        [
            ("tenant", {"tenant": "", "kind": "k", "request_id": "r"}),
            ("kind", {"tenant": TENANT, "kind": "", "request_id": "r"}),
            ("request_id", {"tenant": TENANT, "kind": "k", "request_id": "r" * 129}),
            ("resource", {"tenant": TENANT, "kind": "k", "request_id": "r", "resource": ""}),
        ],
    )
    async def test_create_validates_fields(
        self, store: SqlFutureStore, field: str, kwargs: dict[str, str]
    ) -> None:
        options = dict(kwargs)
        tenant = options.pop("tenant")
        with pytest.raises(InvalidArgument) as raised:
            await store.create(tenant, **options)  # type: ignore[arg-type]
        assert raised.value.field == field

    async def test_other_tenants_futures_are_not_found(self, store: SqlFutureStore) -> None:
        future = (await store.create(TENANT, kind="k", request_id="r")).future
        assert (await store.get(TENANT, future.id)).id == future.id
        for operation in (
            store.get(OTHER_TENANT, future.id),
            store.mark_running(OTHER_TENANT, future.id),
            store.succeed(OTHER_TENANT, future.id, result=b"x"),
            store.fail(OTHER_TENANT, future.id, code=ErrorCode.INTERNAL, message="x"),
            store.cancel(OTHER_TENANT, future.id),
            store.get(TENANT, uuid.uuid4().hex),
            store.get(TENANT, "not-an-id"),
        ):
            with pytest.raises(NotFound):
                await operation
        assert (await store.get(TENANT, future.id)).status is FutureStatus.PENDING

    async def test_run_then_succeed(self, store: SqlFutureStore) -> None:
        future = (await store.create(TENANT, kind="k", request_id="r")).future
        running = await store.mark_running(TENANT, future.id)
        rerun = await store.mark_running(TENANT, future.id)  # a redelivered job
        assert running.status is rerun.status is FutureStatus.RUNNING
        assert running.started_at is not None and rerun.started_at == running.started_at
        done = await store.succeed(TENANT, future.id, result=b"\x00result\xff")
        assert done.status is FutureStatus.SUCCEEDED and done.done
        assert done.result == b"\x00result\xff" and done.error is None
        assert done.finished_at is not None and done.finished_at >= running.started_at
        assert await store.get(TENANT, future.id) == done
        with pytest.raises(FailedPrecondition):
            await store.succeed(TENANT, future.id, result=b"second")
        with pytest.raises(FailedPrecondition):
            await store.fail(TENANT, future.id, code=ErrorCode.INTERNAL, message="late")
        with pytest.raises(FailedPrecondition):
            await store.cancel(TENANT, future.id)
        with pytest.raises(FailedPrecondition):
            await store.mark_running(TENANT, future.id)
        assert (await store.get(TENANT, future.id)).result == b"\x00result\xff"

    async def test_fail_records_code_reason_and_message(self, store: SqlFutureStore) -> None:
        first = (await store.create(TENANT, kind="k", request_id="r1")).future
        second = (await store.create(TENANT, kind="k", request_id="r2")).future
        failed = await store.fail(
            TENANT,
            first.id,
            code=ErrorCode.FAILED_PRECONDITION,
            message="epsilon 8.1 > budget 8.0",
            reason="PRIVACY_BUDGET_EXHAUSTED",
        )
        default_reason = await store.fail(
            TENANT, second.id, code=ErrorCode.INVALID_ARGUMENT, message="bad batch"
        )
        assert failed.status is FutureStatus.FAILED and failed.result is None
        assert failed.error is not None and default_reason.error is not None
        assert (failed.error.code, failed.error.reason, failed.error.message) == (
            ErrorCode.FAILED_PRECONDITION,
            "PRIVACY_BUDGET_EXHAUSTED",
            "epsilon 8.1 > budget 8.0",
        )
        assert default_reason.error.reason == "INVALID_ARGUMENT"
        assert (await store.get(TENANT, first.id)).error == failed.error

    async def test_cancel_is_final_and_repeatable(self, store: SqlFutureStore) -> None:
        future = (await store.create(TENANT, kind="k", request_id="r")).future
        await store.mark_running(TENANT, future.id)
        cancelled = await store.cancel(TENANT, future.id)
        again = await store.cancel(TENANT, future.id)
        assert cancelled.status is FutureStatus.CANCELLED
        assert again.finished_at == cancelled.finished_at
        with pytest.raises(FailedPrecondition) as raised:
            await store.succeed(TENANT, future.id, result=b"too late")
        assert raised.value.metadata["status"] == "CANCELLED"
        with pytest.raises(FailedPrecondition):
            await store.mark_running(TENANT, future.id)
        assert (await store.get(TENANT, future.id)).result is None

    async def test_racing_succeed_and_cancel_have_one_winner(self, store: SqlFutureStore) -> None:
        future = (await store.create(TENANT, kind="k", request_id="r")).future
        await store.mark_running(TENANT, future.id)
        outcomes = await asyncio.gather(
            store.succeed(TENANT, future.id, result=b"r"),
            store.cancel(TENANT, future.id),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1 and len(losers) == 1
        assert isinstance(losers[0], FailedPrecondition)
        assert (await store.get(TENANT, future.id)).status is winners[0].status

    async def test_writes_join_the_callers_transaction(self, store: SqlFutureStore) -> None:
        database = store._db
        kept = (await store.create(TENANT, kind="k", request_id="kept")).future
        with pytest.raises(RuntimeError):
            async with database.transaction() as session:
                await store.create(TENANT, kind="k", request_id="rolled-back", session=session)
                await store.succeed(TENANT, kept.id, result=b"r", session=session)
                raise RuntimeError("the job's other effect failed")
        assert (await store.get(TENANT, kept.id)).status is FutureStatus.PENDING
        assert (await store.create(TENANT, kind="k", request_id="rolled-back")).created
        async with database.transaction() as session:
            await store.succeed(TENANT, kept.id, result=b"r", session=session)
        assert (await store.get(TENANT, kept.id)).status is FutureStatus.SUCCEEDED

    async def test_list_pages_newest_first_per_tenant(self, store: SqlFutureStore) -> None:
        ids = [
            (
                await store.create(TENANT, kind="even" if i % 2 == 0 else "odd", request_id=f"r{i}")
            ).future.id
            for i in range(7)
        ]
        await store.create(OTHER_TENANT, kind="even", request_id="r0")
        pages, token = [], ""
        while True:
            page = await store.list(TENANT, page_size=3, page_token=token)
            pages.append([future.id for future in page.futures])
            token = page.next_page_token
            if not token:
                break
        assert [len(page) for page in pages] == [3, 3, 1]
        assert [future_id for page in pages for future_id in page] == ids[::-1]

        evens = await store.list(TENANT, kind="even", page_size=0)
        assert [future.id for future in evens.futures] == ids[::2][::-1]
        assert evens.next_page_token == ""
        running = await store.mark_running(TENANT, ids[3])
        by_status = await store.list(TENANT, status=FutureStatus.RUNNING)
        assert [future.id for future in by_status.futures] == [running.id]

    async def test_list_rejects_bad_paging(self, store: SqlFutureStore) -> None:
        for i in range(3):
            await store.create(TENANT, kind="k", request_id=f"r{i}")
        token = (await store.list(TENANT, page_size=1)).next_page_token
        assert token
        with pytest.raises(InvalidArgument) as other_filters:
            await store.list(TENANT, page_size=1, page_token=token, kind="k")
        assert other_filters.value.field == "page_token"
        with pytest.raises(InvalidArgument):
            await store.list(TENANT, page_token="%%%not-a-token")
        with pytest.raises(InvalidArgument):
            await store.list(TENANT, page_size=-1)

    async def test_wait_returns_when_done_or_at_the_deadline(self, store: SqlFutureStore) -> None:
        future = (await store.create(TENANT, kind="k", request_id="r")).future
        assert (await store.wait(TENANT, future.id, timeout=0)).status is FutureStatus.PENDING
        assert (await store.wait(TENANT, future.id, timeout=0.05)).status is FutureStatus.PENDING

        waiting = asyncio.create_task(store.wait(TENANT, future.id, timeout=30))
        await store.mark_running(TENANT, future.id)
        await store.succeed(TENANT, future.id, result=b"done")
        finished = await asyncio.wait_for(waiting, timeout=10)
        assert finished.status is FutureStatus.SUCCEEDED and finished.result == b"done"

        with pytest.raises(NotFound):
            await store.wait(OTHER_TENANT, future.id, timeout=1)
        with pytest.raises(InvalidArgument):
            await store.wait(TENANT, future.id, timeout=-1)


def test_futures_table_is_per_service() -> None:
    metadata = sa.MetaData()
    trainer = futures_table(metadata, prefix="trainer")
    he_runtime = futures_table(metadata, prefix="he_runtime")
    assert (trainer.name, he_runtime.name) == ("trainer_futures", "he_runtime_futures")
    for bad_prefix in ("Trainer", "has-dash", ""):
        with pytest.raises(InvalidArgument):
            futures_table(sa.MetaData(), prefix=bad_prefix)


async def test_try_transitions_report_instead_of_raising(database_url: str) -> None:
    """The worker's one-statement transitions: applied to an unfinished future, refused
    (False, nothing changed) on a finished one, inside the caller's transaction."""
    metadata = sa.MetaData()
    table = futures_table(metadata, prefix=f"t{uuid.uuid4().hex[:10]}")
    db = Database.from_url(database_url)
    async with db.connection() as connection:
        await connection.run_sync(metadata.create_all)
    try:
        store = SqlFutureStore(db, table)
        running = (await store.create(TENANT, kind="k", request_id="a")).future
        cancelled = (await store.create(TENANT, kind="k", request_id="b")).future
        await store.cancel(TENANT, cancelled.id)
        async with db.transaction() as session:
            assert await store.try_mark_running(session, TENANT, running.id)
            assert not await store.try_mark_running(session, OTHER_TENANT, running.id)
            assert not await store.try_mark_running(session, TENANT, cancelled.id)
        assert (await store.get(TENANT, running.id)).status is FutureStatus.RUNNING
        async with db.transaction() as session:
            assert await store.try_succeed(session, TENANT, running.id, result=b"r")
            assert not await store.try_succeed(session, TENANT, cancelled.id, result=b"x")
        done = await store.get(TENANT, running.id)
        assert (done.status, done.result) == (FutureStatus.SUCCEEDED, b"r")
        assert done.started_at is not None and done.finished_at is not None
        assert (await store.get(TENANT, cancelled.id)).status is FutureStatus.CANCELLED
        async with db.transaction() as session:
            assert not await store.try_succeed(session, TENANT, running.id, result=b"again")
        assert (await store.get(TENANT, running.id)).result == b"r"
    finally:
        async with db.connection() as connection:
            await connection.run_sync(metadata.drop_all)
        await db.dispose()
