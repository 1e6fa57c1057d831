"""JetStream helpers against a real nats-server (free port, tmp store) and a real SQLite db.

The handlers here follow the production pattern: the effect and its idempotency key are
written in one transaction, and the consumer acks only after the handler returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tensafe.common.db import Database
from tensafe.common.errors import ConfigError, InvalidArgument, Unavailable
from tensafe.common.jetstream import (
    Consumer,
    Delivery,
    JetStream,
    JetStreamConfig,
    PermanentJobError,
    Retention,
    RetryLater,
)
from tensafe.common.nats_server import NatsServer, NatsServerConfig, NatsServerError

DEADLINE = 15.0  # seconds any single wait in these tests may take before it fails

effects_metadata = sa.MetaData()
jobs_done = sa.Table(
    "jobs_done", effects_metadata, sa.Column("job_id", sa.String(64), primary_key=True)
)
effects = sa.Table(
    "effects",
    effects_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
)


class EffectStore:
    """A job's effect and its idempotency key, written in one transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def apply_once(self, job_id: str) -> bool:
        """Apply the job's effect unless its key is done; True if applied now."""
        async with self.database.transaction() as session:
            done = await session.scalar(
                sa.select(jobs_done.c.job_id).where(jobs_done.c.job_id == job_id)
            )
            if done is not None:
                return False
            await session.execute(sa.insert(effects).values(job_id=job_id))
            await session.execute(sa.insert(jobs_done).values(job_id=job_id))
            return True

    async def count(self, job_id: str) -> int:
        async with self.database.transaction(read_only=True) as session:
            value = await session.scalar(
                sa.select(sa.func.count()).select_from(effects).where(effects.c.job_id == job_id)
            )
        return int(value or 0)


@pytest.fixture
async def effect_store(tmp_path: Path) -> AsyncIterator[EffectStore]:
    database = Database.from_url(f"sqlite+aiosqlite:///{tmp_path / 'effects.db'}")
    async with database.connection() as connection:
        await connection.run_sync(effects_metadata.create_all)
    yield EffectStore(database)
    await database.dispose()


def job_config(url: str, **overrides: Any) -> JetStreamConfig:
    values: dict[str, Any] = {
        "url": url,
        "stream": "TEST_JOBS",
        "subjects": ("test.jobs.>",),
        "durable": "workers",
        "ack_wait": 1.0,
        "max_deliver": 5,
        "nak_initial_delay": 0.05,
        "nak_max_delay": 0.2,
        "fetch_wait": 0.2,
        "connect_timeout": 5.0,
    }
    values.update(overrides)
    return JetStreamConfig(**values)


async def connect(config: JetStreamConfig, **kwargs: Any) -> JetStream:
    jetstream = await JetStream.connect(config, client_name="tensafe-tests", **kwargs)
    await jetstream.ensure_stream()
    return jetstream


@contextlib.asynccontextmanager
async def running(
    consumer: Consumer,
    handler: Callable[[Delivery], Awaitable[None]],
    key: Callable[[Delivery], str | None] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run the consumer; on exit set its stop event and wait for the drain."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handler, stop=stop, key=key))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


async def stream_messages(jetstream: JetStream) -> int:
    info = await jetstream.jetstream_context.stream_info(jetstream.config.stream)
    return int(info.state.messages)


async def test_failed_handler_is_redelivered_then_succeeds(
    nats_server: NatsServer, effect_store: EffectStore
) -> None:
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            raise RuntimeError("transient: database restarting")
        assert delivery.msg_id is not None
        await effect_store.apply_once(delivery.msg_id)
        done.set()

    # ack_wait is long: only a NAK brings the message back before the deadline.
    async with await connect(job_config(nats_server.url, ack_wait=60.0)) as jetstream:
        consumer = Consumer(jetstream)
        await jetstream.publish("test.jobs.train", b"step 1", msg_id="job-1")
        async with running(consumer, handler):
            await asyncio.wait_for(done.wait(), DEADLINE)
        state = await consumer.state()
        assert attempts == [1, 2]
        assert await effect_store.count("job-1") == 1
        assert (state.num_pending, state.num_ack_pending) == (0, 0)
        assert await stream_messages(jetstream) == 0  # work queue: acked means removed


async def test_retry_later_and_handler_timeout_redeliver(nats_server: NatsServer) -> None:
    seen: list[tuple[str | None, int]] = []
    finished: set[str] = set()
    both_done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.msg_id, delivery.num_delivered))
        if delivery.num_delivered == 1 and delivery.msg_id == "waits":
            raise RetryLater(0.05, "previous step not committed yet")
        if delivery.num_delivered == 1 and delivery.msg_id == "hangs":
            await asyncio.Event().wait()  # hangs until handler_timeout cancels it
        assert delivery.msg_id is not None
        finished.add(delivery.msg_id)
        if finished == {"waits", "hangs"}:
            both_done.set()

    config = job_config(nats_server.url, handler_timeout=0.3, ack_wait=60.0)
    async with await connect(config) as jetstream:
        await jetstream.publish("test.jobs.a", b"", msg_id="waits")
        await jetstream.publish("test.jobs.b", b"", msg_id="hangs")
        async with running(Consumer(jetstream), handler):
            await asyncio.wait_for(both_done.wait(), DEADLINE)
    assert sorted(seen) == [("hangs", 1), ("hangs", 2), ("waits", 1), ("waits", 2)]


async def test_duplicate_publish_is_stored_and_processed_once(
    nats_server: NatsServer, effect_store: EffectStore
) -> None:
    calls: dict[str, int] = {}
    sentinel_seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        assert delivery.msg_id is not None
        calls[delivery.msg_id] = calls.get(delivery.msg_id, 0) + 1
        await effect_store.apply_once(delivery.msg_id)
        if delivery.msg_id == "sentinel":
            sentinel_seen.set()

    async with await connect(job_config(nats_server.url)) as jetstream:
        first = await jetstream.publish("test.jobs.train", b"step", msg_id="job-2")
        retry = await jetstream.publish("test.jobs.train", b"step", msg_id="job-2")
        await jetstream.publish("test.jobs.train", b"", msg_id="sentinel")
        assert (first.duplicate, retry.duplicate) == (False, True)
        assert retry.sequence == first.sequence
        # The stream is ordered and one consumer handles one message at a time, so once
        # the sentinel is seen every earlier message has been handled.
        async with running(Consumer(jetstream), handler):
            await asyncio.wait_for(sentinel_seen.wait(), DEADLINE)
    assert calls == {"job-2": 1, "sentinel": 1}
    assert await effect_store.count("job-2") == 1


async def test_crash_after_commit_before_ack_is_redelivered_and_only_acked(
    nats_server: NatsServer, effect_store: EffectStore
) -> None:
    """The worker commits, then its connection dies before the ack (a process crash)."""
    config = job_config(nats_server.url)
    committed = asyncio.Event()

    async def crashing_handler(delivery: Delivery) -> None:
        assert delivery.msg_id is not None
        assert await effect_store.apply_once(delivery.msg_id)
        committed.set()
        await asyncio.Event().wait()  # the process dies here, before returning

    worker = await connect(config)
    crashed = asyncio.create_task(Consumer(worker).run(crashing_handler, stop=asyncio.Event()))
    await worker.publish("test.jobs.train", b"step 3", msg_id="job-3")
    await asyncio.wait_for(committed.wait(), DEADLINE)
    await worker.close()
    crashed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await crashed

    redelivered: list[tuple[int, bool]] = []
    acked = asyncio.Event()

    async def idempotent_handler(delivery: Delivery) -> None:
        assert delivery.msg_id is not None
        redelivered.append((delivery.num_delivered, await effect_store.apply_once(delivery.msg_id)))
        acked.set()

    async with await connect(config) as jetstream:
        consumer = Consumer(jetstream)
        async with running(consumer, idempotent_handler):
            await asyncio.wait_for(acked.wait(), DEADLINE)
        state = await consumer.state()
        assert await stream_messages(jetstream) == 0
    assert redelivered == [(2, False)]  # redelivered after ack_wait, found done
    assert await effect_store.count("job-3") == 1
    assert state.num_ack_pending == 0


async def test_handler_error_after_commit_does_not_repeat_the_effect(
    nats_server: NatsServer, effect_store: EffectStore
) -> None:
    outcomes: list[tuple[int, bool]] = []
    second = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        assert delivery.msg_id is not None
        outcomes.append((delivery.num_delivered, await effect_store.apply_once(delivery.msg_id)))
        if delivery.num_delivered == 1:
            raise RuntimeError("failed after the commit, before returning")
        second.set()

    async with await connect(job_config(nats_server.url, ack_wait=60.0)) as jetstream:
        await jetstream.publish("test.jobs.train", b"", msg_id="job-4")
        async with running(Consumer(jetstream), handler):
            await asyncio.wait_for(second.wait(), DEADLINE)
    assert outcomes == [(1, True), (2, False)]
    assert await effect_store.count("job-4") == 1


async def test_permanent_error_terminates_and_dead_letters(nats_server: NatsServer) -> None:
    calls: list[str | None] = []
    dead: list[tuple[str | None, int, str]] = []
    sentinel_seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.msg_id)
        if delivery.msg_id == "malformed":
            raise PermanentJobError("payload is not a TrainJob", reason="BAD_PAYLOAD")
        sentinel_seen.set()

    async def on_dead_letter(delivery: Delivery, error: BaseException) -> None:
        assert isinstance(error, PermanentJobError)
        dead.append((delivery.msg_id, delivery.num_delivered, error.reason))

    async with await connect(job_config(nats_server.url)) as jetstream:
        consumer = Consumer(jetstream, on_dead_letter=on_dead_letter)
        await jetstream.publish("test.jobs.train", b"\xff", msg_id="malformed")
        await jetstream.publish("test.jobs.train", b"", msg_id="sentinel")
        async with running(consumer, handler):
            await asyncio.wait_for(sentinel_seen.wait(), DEADLINE)
        state = await consumer.state()
        remaining = await stream_messages(jetstream)
    assert calls == ["malformed", "sentinel"]
    assert dead == [("malformed", 1, "BAD_PAYLOAD")]
    assert (state.num_pending, state.num_ack_pending, remaining) == (0, 0, 0)


async def test_delivery_limit_dead_letters_on_the_final_attempt(nats_server: NatsServer) -> None:
    attempts: list[tuple[int, bool]] = []
    dead_lettered = asyncio.Event()
    dead: list[tuple[int, str]] = []

    async def always_failing(delivery: Delivery) -> None:
        attempts.append((delivery.num_delivered, delivery.is_final_attempt))
        raise RuntimeError(f"attempt {delivery.num_delivered} failed")

    async def on_dead_letter(delivery: Delivery, error: BaseException) -> None:
        dead.append((delivery.num_delivered, str(error)))
        dead_lettered.set()

    config = job_config(nats_server.url, max_deliver=3, ack_wait=60.0)
    async with await connect(config) as jetstream:
        consumer = Consumer(jetstream, on_dead_letter=on_dead_letter)
        await jetstream.publish("test.jobs.train", b"", msg_id="poison")
        async with running(consumer, always_failing):
            await asyncio.wait_for(dead_lettered.wait(), DEADLINE)
        state = await consumer.state()
    assert attempts == [(1, False), (2, False), (3, True)]
    assert dead == [(3, "attempt 3 failed")]
    assert state.num_ack_pending == 0


async def test_failing_dead_letter_hook_keeps_the_message(nats_server: NatsServer) -> None:
    hook_calls: list[int] = []
    recorded = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        raise PermanentJobError("bad")

    async def flaky_hook(delivery: Delivery, error: BaseException) -> None:
        hook_calls.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            raise RuntimeError("database down while recording the failure")
        recorded.set()

    async with await connect(job_config(nats_server.url, ack_wait=60.0)) as jetstream:
        await jetstream.publish("test.jobs.train", b"", msg_id="bad")
        async with running(Consumer(jetstream, on_dead_letter=flaky_hook), handler):
            await asyncio.wait_for(recorded.wait(), DEADLINE)
    assert hook_calls == [1, 2]


async def test_trace_context_crosses_the_message(nats_server: NatsServer) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handled: list[trace.SpanContext] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        assert "traceparent" in delivery.headers
        handled.append(trace.get_current_span().get_span_context())
        done.set()

    config = job_config(nats_server.url)
    async with await connect(config, tracer_provider=provider) as jetstream:
        with provider.get_tracer("test").start_as_current_span("CreateJob") as rpc_span:
            await jetstream.publish("test.jobs.train", b"", msg_id="traced")
        async with running(Consumer(jetstream), handler):
            await asyncio.wait_for(done.wait(), DEADLINE)
    spans = exporter.get_finished_spans()
    producer = next(span for span in spans if span.kind is SpanKind.PRODUCER)
    consumer = next(span for span in spans if span.kind is SpanKind.CONSUMER)
    trace_id = rpc_span.get_span_context().trace_id
    assert handled[0].trace_id == trace_id
    assert handled[0].span_id == consumer.context.span_id
    assert consumer.context.trace_id == trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert (
        producer.parent is not None
        and producer.parent.span_id == rpc_span.get_span_context().span_id
    )
    assert consumer.attributes is not None and consumer.attributes["tensafe.job.outcome"] == "ack"


async def test_stop_drains_the_current_message_and_releases_the_rest(
    nats_server: NatsServer,
) -> None:
    # ack_wait is long: a message that was not NAKed on stop would only come back after
    # 60 s, and the second run below would miss its deadline.
    config = job_config(nats_server.url, fetch_batch=3, ack_wait=60.0)
    started = asyncio.Event()
    release = asyncio.Event()
    first_run: list[str | None] = []

    async def slow_handler(delivery: Delivery) -> None:
        first_run.append(delivery.msg_id)
        started.set()
        await release.wait()

    async with await connect(config) as jetstream:
        for index in range(3):
            await jetstream.publish("test.jobs.train", b"", msg_id=f"job-{index}")
        consumer = Consumer(jetstream)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(slow_handler, stop=stop))
        await asyncio.wait_for(started.wait(), DEADLINE)
        stop.set()
        release.set()
        await asyncio.wait_for(task, DEADLINE)
        assert first_run == ["job-0"]

        second_run: list[tuple[str | None, int]] = []
        both = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            second_run.append((delivery.msg_id, delivery.num_delivered))
            if len(second_run) == 2:
                both.set()

        async with running(consumer, handler):
            await asyncio.wait_for(both.wait(), DEADLINE)
        assert await stream_messages(jetstream) == 0
    assert sorted(second_run) == [("job-1", 2), ("job-2", 2)]


def _lane(delivery: Delivery) -> str:
    return delivery.subject.rsplit(".", 1)[1]


async def test_deliveries_of_different_lanes_overlap(nats_server: NatsServer) -> None:
    """One lane's handler waits for another lane's delivery to be handled completely:
    a consumer that handled one delivery at a time would never get there."""
    config = job_config(nats_server.url, max_in_flight=2, ack_wait=60.0)
    b_handled = asyncio.Event()
    a_finished = asyncio.Event()
    order: list[str] = []

    async def handler(delivery: Delivery) -> None:
        if _lane(delivery) == "a":
            order.append("a started")
            await b_handled.wait()
            order.append("a finished")
            a_finished.set()
        else:
            order.append("b handled")
            b_handled.set()

    async with await connect(config) as jetstream:
        await jetstream.publish("test.jobs.a", b"", msg_id="a-1")
        await jetstream.publish("test.jobs.b", b"", msg_id="b-1")
        consumer = Consumer(jetstream)
        async with running(consumer, handler):
            await asyncio.wait_for(a_finished.wait(), DEADLINE)
        assert order == ["a started", "b handled", "a finished"]
        assert await stream_messages(jetstream) == 0


async def test_deliveries_of_one_lane_run_one_at_a_time_in_order(
    nats_server: NatsServer,
) -> None:
    config = job_config(nats_server.url, max_in_flight=4, fetch_batch=8, ack_wait=60.0)
    active: dict[str, int] = {}
    overlaps: list[str] = []
    handled: list[str | None] = []
    others = asyncio.Event()
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        lane = _lane(delivery)
        active[lane] = active.get(lane, 0) + 1
        if active[lane] > 1:
            overlaps.append(lane)
        if lane == "x":
            # Held until the other lane has run: the x deliveries pile up behind it.
            await others.wait()
        else:
            others.set()
        await asyncio.sleep(0)  # a chance for another delivery of the lane to start
        active[lane] -= 1
        handled.append(delivery.msg_id)
        if len(handled) == 5:
            done.set()

    async with await connect(config) as jetstream:
        # x-0 runs, the other x wait (leaving room: up to 4 x max_in_flight may wait).
        for index in range(4):
            await jetstream.publish("test.jobs.x", b"", msg_id=f"x-{index}")
        await jetstream.publish("test.jobs.y", b"", msg_id="y-0")
        consumer = Consumer(jetstream)
        async with running(consumer, handler, key=_lane):
            await asyncio.wait_for(done.wait(), DEADLINE)
        assert await stream_messages(jetstream) == 0
    assert overlaps == []
    assert [m for m in handled if m is not None and m.startswith("x")] == [
        f"x-{index}" for index in range(4)
    ]
    # y ran while x-0 was held, though four x deliveries were queued before it.
    assert handled.index("y-0") < handled.index("x-0")


async def test_on_queued_is_told_of_deliveries_that_wait_for_their_lane(
    nats_server: NatsServer,
) -> None:
    """While x-0 is handled, x-1 waits in its lane and ``on_queued`` hears of it then
    (before x-0 ends); y-0, which never waits, is not reported. Both are still handled."""
    config = job_config(nats_server.url, max_in_flight=2, fetch_batch=4, ack_wait=60.0)
    queued: list[str | None] = []
    heard = asyncio.Event()
    handled: list[str | None] = []
    done = asyncio.Event()

    def on_queued(delivery: Delivery) -> None:
        queued.append(delivery.msg_id)
        heard.set()

    async def handler(delivery: Delivery) -> None:
        if delivery.msg_id == "x-0":
            await heard.wait()  # x-1 is reported while x-0 still runs
            handled.append(f"x-0 after {queued}")
        else:
            handled.append(delivery.msg_id)
        if len(handled) == 3:
            done.set()

    async with await connect(config) as jetstream:
        await jetstream.publish("test.jobs.x", b"", msg_id="x-0")
        await jetstream.publish("test.jobs.x", b"", msg_id="x-1")
        await jetstream.publish("test.jobs.y", b"", msg_id="y-0")
        consumer = Consumer(jetstream)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(handler, stop=stop, key=_lane, on_queued=on_queued))
        try:
            await asyncio.wait_for(done.wait(), DEADLINE)
        finally:
            stop.set()
            await asyncio.wait_for(task, DEADLINE)
        assert await stream_messages(jetstream) == 0
    assert queued == ["x-1"]
    assert sorted(h for h in handled if h is not None) == ["x-0 after ['x-1']", "x-1", "y-0"]
    assert handled.index("x-1") > handled.index("x-0 after ['x-1']")


async def test_stop_releases_deliveries_waiting_for_their_lane(nats_server: NatsServer) -> None:
    config = job_config(nats_server.url, max_in_flight=2, fetch_batch=2, ack_wait=60.0)
    started = asyncio.Event()
    release = asyncio.Event()
    first_run: list[str | None] = []

    async def slow_handler(delivery: Delivery) -> None:
        first_run.append(delivery.msg_id)
        started.set()
        await release.wait()

    async with await connect(config) as jetstream:
        for index in range(2):
            await jetstream.publish("test.jobs.x", b"", msg_id=f"x-{index}")
        consumer = Consumer(jetstream)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(slow_handler, stop=stop, key=_lane))
        await asyncio.wait_for(started.wait(), DEADLINE)
        # x-1 is fetched with x-0 and waits in its lane.
        while (await consumer.state()).num_ack_pending < 2:
            await asyncio.sleep(0.01)
        stop.set()
        release.set()
        await asyncio.wait_for(task, DEADLINE)
        assert first_run == ["x-0"]
        second_run: list[tuple[str | None, int]] = []
        got = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            second_run.append((delivery.msg_id, delivery.num_delivered))
            got.set()

        async with running(consumer, handler):
            await asyncio.wait_for(got.wait(), DEADLINE)
    # NAKed at stop without delay: redelivered at once, not after ack_wait (60 s). (It
    # may have come back once more to a fetch still open at the stop, and been NAKed
    # again, hence >= 2.)
    assert [msg_id for msg_id, _ in second_run] == ["x-1"]
    assert second_run[0][1] >= 2


async def test_unacked_messages_survive_a_server_restart(tmp_path: Path) -> None:
    server_config = NatsServerConfig(data_dir=tmp_path / "durable-nats")
    got_first = asyncio.Event()

    async def dies_on_first(delivery: Delivery) -> None:
        got_first.set()
        await asyncio.Event().wait()

    with NatsServer.start(server_config) as server:
        worker = await connect(job_config(server.url))
        await worker.publish("test.jobs.train", b"a", msg_id="job-a")
        await worker.publish("test.jobs.train", b"b", msg_id="job-b")
        crashed = asyncio.create_task(Consumer(worker).run(dies_on_first, stop=asyncio.Event()))
        await asyncio.wait_for(got_first.wait(), DEADLINE)
        await worker.close()
        crashed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await crashed

    seen: dict[str, tuple[bytes, int]] = {}
    both = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        assert delivery.msg_id is not None
        seen[delivery.msg_id] = (delivery.data, delivery.num_delivered)
        if len(seen) == 2:
            both.set()

    with NatsServer.start(server_config) as restarted:
        async with await connect(job_config(restarted.url)) as jetstream:
            assert await stream_messages(jetstream) == 2
            # The durable consumer's state survived too: one delivered-unacked, one new.
            before = await Consumer(jetstream).state()
            assert (before.num_ack_pending, before.num_pending) == (1, 1)
            async with running(Consumer(jetstream), handler):
                await asyncio.wait_for(both.wait(), DEADLINE)
            assert await stream_messages(jetstream) == 0
    assert seen["job-a"] == (b"a", 2)  # the unacked one, delivered again
    assert seen["job-b"] == (b"b", 1)


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll an async condition until it holds or DEADLINE passes."""
    async with asyncio.timeout(DEADLINE):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_consumer_survives_a_server_restart(tmp_path: Path) -> None:
    """A NATS pod restart: the worker's connection reconnects and consuming goes on."""
    data_dir = tmp_path / "restarting-nats"
    first = NatsServer.start(NatsServerConfig(data_dir=data_dir))
    port = int(first.url.rsplit(":", 1)[1])
    handled: list[str | None] = []
    seen = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.msg_id)
        seen.set()

    worker = await connect(job_config(first.url))
    consumer = Consumer(worker)
    try:
        async with running(consumer, handler):
            await worker.publish("test.jobs.train", b"", msg_id="before")
            await asyncio.wait_for(seen.wait(), DEADLINE)

            async def acked() -> bool:
                return (await consumer.state()).num_ack_pending == 0

            await wait_until(acked)
            seen.clear()
            first.stop()
            with NatsServer.start(NatsServerConfig(data_dir=data_dir, port=port)) as second:
                async with await connect(job_config(second.url)) as publisher:
                    await publisher.publish("test.jobs.train", b"", msg_id="after")
                    await asyncio.wait_for(seen.wait(), DEADLINE)
                    assert worker.is_connected
    finally:
        await worker.close()
        first.stop()
    assert handled == ["before", "after"]


async def test_ensure_stream_is_idempotent_and_refuses_incompatible_changes(
    nats_server: NatsServer,
) -> None:
    config = job_config(nats_server.url)
    async with await connect(config) as jetstream:
        await jetstream.ensure_stream()
        info = await jetstream.jetstream_context.stream_info("TEST_JOBS")
        assert getattr(info.config.retention, "value", info.config.retention) == "workqueue"
        assert getattr(info.config.storage, "value", info.config.storage) == "file"
        assert info.config.duplicate_window == config.duplicate_window

    widened = dataclasses.replace(config, subjects=("test.jobs.>", "test.more.>"))
    async with await connect(widened) as jetstream:
        info = await jetstream.jetstream_context.stream_info("TEST_JOBS")
        assert sorted(info.config.subjects) == ["test.jobs.>", "test.more.>"]

    as_limits = dataclasses.replace(config, retention=Retention.LIMITS)
    async with await JetStream.connect(as_limits, client_name="t") as jetstream:
        with pytest.raises(ConfigError) as retention_error:
            await jetstream.ensure_stream()
        overlapping = dataclasses.replace(config, stream="OTHER", subjects=("test.jobs.x",))
        async with JetStream(jetstream._nc, overlapping) as other:
            with pytest.raises(ConfigError):
                await other.ensure_stream()
    assert retention_error.value.setting == "retention"


async def test_publish_validates_and_carries_headers(nats_server: NatsServer) -> None:
    received: list[Delivery] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.append(delivery)
        done.set()

    async with await connect(job_config(nats_server.url)) as jetstream:
        with pytest.raises(InvalidArgument):
            await jetstream.publish("test.jobs.x", b"", msg_id="")
        with pytest.raises(InvalidArgument) as reserved:
            await jetstream.publish("test.jobs.x", b"", msg_id="m", headers={"Nats-Msg-Id": "x"})
        assert reserved.value.field == "headers.Nats-Msg-Id"
        with pytest.raises(Unavailable):
            await jetstream.publish("not.captured", b"", msg_id="m")
        await jetstream.publish(
            "test.jobs.x", b"payload", msg_id="m", headers={"tensafe-tenant": "t1"}
        )
        async with running(Consumer(jetstream), handler):
            await asyncio.wait_for(done.wait(), DEADLINE)
    delivery = received[0]
    assert (delivery.subject, delivery.data, delivery.msg_id) == ("test.jobs.x", b"payload", "m")
    assert delivery.headers["tensafe-tenant"] == "t1"
    assert (delivery.num_delivered, delivery.is_redelivery, delivery.stream_sequence) == (
        1,
        False,
        1,
    )


async def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    server = NatsServer.start(NatsServerConfig(data_dir=tmp_path / "gone"))
    url = server.url
    server.stop()
    with pytest.raises(Unavailable):
        await JetStream.connect(job_config(url, connect_timeout=1.0), client_name="t")


@pytest.mark.parametrize(
    ("setting", "overrides"),
    [
        ("stream", {"stream": "has.dot"}),
        ("subjects", {"subjects": ()}),
        ("durable", {"durable": "a b"}),
        ("ack_wait", {"ack_wait": 0}),
        ("max_deliver", {"max_deliver": 0}),
        ("duplicate_window", {"max_age": 10.0, "duplicate_window": 60.0}),
        ("nak_max_delay", {"nak_initial_delay": 2.0, "nak_max_delay": 1.0}),
        ("fetch_batch", {"fetch_batch": 0}),
        ("max_in_flight", {"max_in_flight": 0}),
    ],
)
def test_config_validation_names_the_setting(setting: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as raised:
        job_config("nats://127.0.0.1:4222", **overrides)
    assert raised.value.setting == setting


async def test_consumer_requires_a_durable_name(nats_server: NatsServer) -> None:
    async with await connect(job_config(nats_server.url, durable=None)) as jetstream:
        with pytest.raises(ConfigError):
            Consumer(jetstream)


def test_nats_server_lifecycle(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="not an executable"):
        NatsServer.start(NatsServerConfig(data_dir=tmp_path / "x", binary=tmp_path / "missing"))

    server = NatsServer.start(NatsServerConfig(data_dir=tmp_path / "first"))
    port = int(server.url.rsplit(":", 1)[1])
    assert server.store_dir == tmp_path / "first" / "jetstream"
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    with pytest.raises(NatsServerError):
        _ = server.url

    # An explicit port is honoured (the one just freed).
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "second", port=port)) as again:
        assert again.url == f"nats://127.0.0.1:{port}"
        assert again.running
    assert not again.running
