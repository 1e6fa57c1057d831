"""Future waiters are woken over NATS by the process that finished the future: they
read the database once more instead of polling it (issue 15 item 5)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import sqlalchemy as sa

from tensafe.common.db import Database
from tensafe.common.errors import ErrorCode
from tensafe.common.futures import FutureStatus, SqlFutureStore, futures_table
from tensafe.common.nats_server import NatsServer
from tensafe.common.wakeups import FutureWakeups

TENANT = "tenant-a"
PREFIX = "test.jobs-done"


class CountingStore(SqlFutureStore):
    """Counts the reads of :meth:`get` (the waiters' database round trips) and of
    :meth:`done_among` (the re-read sweep's)."""

    reads = 0
    sweeps = 0

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return await super().get(*args, **kwargs)

    async def done_among(self, *args: Any, **kwargs: Any) -> Any:
        self.sweeps += 1
        return await super().done_among(*args, **kwargs)


@contextlib.asynccontextmanager
async def _stores(
    sqlite_url: str, nats_server: NatsServer, *, reread: float
) -> AsyncIterator[tuple[CountingStore, SqlFutureStore, FutureWakeups]]:
    """The API's store (re-reading waited futures every ``reread`` seconds in case a
    wake-up was lost), a worker's, and the worker's wake-ups."""
    metadata = sa.MetaData()
    table = futures_table(metadata, prefix=f"t{uuid.uuid4().hex[:10]}")
    database = Database.from_url(sqlite_url)
    async with database.connection() as connection:
        await connection.run_sync(metadata.create_all)
    api_nats = await nats.connect(nats_server.url)
    worker_nats = await nats.connect(nats_server.url)
    api_wakeups = await FutureWakeups.start(api_nats, PREFIX)
    worker_wakeups = FutureWakeups(worker_nats, PREFIX)
    try:
        yield (
            CountingStore(
                database, table, poll_initial=reread, poll_max=reread, wakeups=api_wakeups
            ),
            SqlFutureStore(database, table),
            worker_wakeups,
        )
    finally:
        await api_wakeups.close()
        await api_nats.close()
        await worker_nats.close()
        await database.dispose()


@pytest.fixture
async def stores(
    sqlite_url: str, nats_server: NatsServer
) -> AsyncIterator[tuple[CountingStore, SqlFutureStore, FutureWakeups]]:
    """The stores of :func:`_stores`, the API's re-reading only every 60 s."""
    async with _stores(sqlite_url, nats_server, reread=60.0) as made:
        yield made


async def test_a_wait_returns_on_the_wake_up_not_on_a_poll(
    stores: tuple[CountingStore, SqlFutureStore, FutureWakeups],
) -> None:
    api, worker, wakeups = stores
    created = (await api.create(TENANT, kind="optim_step", request_id="r")).future
    waiting = asyncio.create_task(api.wait(TENANT, created.id, timeout=50.0))
    while api.reads == 0:  # the waiter has registered and read once
        await asyncio.sleep(0.001)
    await worker.succeed(TENANT, created.id, result=b"done")
    await wakeups.notify(created.id)
    # A poll would come only after 60 s; the test's 50 s wait would time out first.
    future = await asyncio.wait_for(waiting, timeout=30.0)
    assert future.status is FutureStatus.SUCCEEDED and future.result == b"done"
    assert api.reads == 2


async def test_a_wake_up_for_another_future_only_costs_a_read(
    stores: tuple[CountingStore, SqlFutureStore, FutureWakeups],
) -> None:
    api, worker, wakeups = stores
    watched = (await api.create(TENANT, kind="k", request_id="a")).future
    other = (await api.create(TENANT, kind="k", request_id="b")).future
    waiting = asyncio.create_task(api.wait(TENANT, watched.id, timeout=50.0))
    while api.reads == 0:
        await asyncio.sleep(0.001)
    await worker.succeed(TENANT, other.id, result=b"")
    await wakeups.notify(other.id)
    await worker.fail(TENANT, watched.id, code=ErrorCode.INTERNAL, message="boom")
    await wakeups.notify(watched.id)
    future = await asyncio.wait_for(waiting, timeout=30.0)
    assert future.status is FutureStatus.FAILED
    assert api.reads == 2  # the other future's wake-up woke nobody here


async def test_lost_wake_ups_cost_one_read_per_sweep_not_one_per_waiter(
    sqlite_url: str, nats_server: NatsServer
) -> None:
    """Five waiters whose futures finish without a wake-up (as in a NATS outage): the
    store's sweep, one query for all of them every ``poll_max``, finds them done and
    wakes them; a waiter reads its future only when it starts and once when woken (it
    used to read it again every ``poll_max`` itself, five reads where one query does)."""
    async with _stores(sqlite_url, nats_server, reread=0.05) as (api, worker, _):
        futures = [
            (await api.create(TENANT, kind="k", request_id=f"r{index}")).future
            for index in range(5)
        ]
        waiting = [
            asyncio.create_task(api.wait(TENANT, future.id, timeout=50.0)) for future in futures
        ]
        async with asyncio.timeout(30):
            while api.reads < 5:  # every waiter registered and read once
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # six sweep intervals
        assert api.reads == 5 and api.sweeps >= 2
        for future in futures:
            await worker.succeed(TENANT, future.id, result=b"done")  # and no notify
        done = await asyncio.wait_for(asyncio.gather(*waiting), timeout=30.0)
        assert [f.status for f in done] == [FutureStatus.SUCCEEDED] * 5
        assert api.reads == 10
        # Nobody waits any more: the sweep ends.
        sweeps = api.sweeps
        await asyncio.sleep(0.2)
        assert api.sweeps <= sweeps + 1


def test_future_ids_must_be_subject_tokens() -> None:
    wakeups = FutureWakeups(connection=None, subject_prefix=PREFIX)
    with pytest.raises(Exception, match="future_id"):
        asyncio.run(wakeups.notify("a.b"))
