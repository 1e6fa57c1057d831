"""The worker's exactly-once effects: redelivery, failures, the outbox, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import load as load_safetensors

from tensafe.common.db import Database
from tensafe.common.futures import SqlFutureStore
from tensafe.common.jetstream import Delivery, RetryLater
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.domain.engine.base import BaseModelPool
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.domain.jobs import JobMessage
from tensafe.trainer.domain.ledger import PrivacyLedger
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.store import repository as repo
from tensafe.trainer.store.models import (
    FUTURES,
    BudgetReservationRow,
    JobRow,
    LedgerRow,
    StepRow,
    TrainingClientRow,
)
from tensafe.trainer.worker import TrainerWorker

from .conftest import BASE_MODEL, Stack
from .helpers import (
    corpus_sequences,
    create_client,
    datum,
    dp_config,
    expect_code,
    forward_backward,
    optim_step,
    wait,
)
from .test_training import reference_epsilon


async def _rows(url: str, model: Any, client_id: str) -> list[Any]:
    database = Database.from_url(url)
    try:
        async with database.transaction(read_only=True) as session:
            return list(
                (
                    await session.execute(sa.select(model).where(model.client_id == client_id))
                ).scalars()
            )
    finally:
        await database.dispose()


async def _client_row(url: str, client_id: str) -> TrainingClientRow:
    database = Database.from_url(url)
    try:
        async with database.transaction(read_only=True) as session:
            row = await session.get(TrainingClientRow, client_id)
            assert row is not None
            return row
    finally:
        await database.dispose()


async def test_redelivered_jobs_apply_once(
    make_stack: Any, base_models_dir: Path, database_url: str
) -> None:
    stack = await make_stack(database_url)
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    await forward_backward(stack, client.id, batch)
    await optim_step(stack, client.id, learning_rate=1e-2)
    url = stack.config.database_url
    before = await _client_row(url, client.id)
    jobs = sorted(await _rows(url, JobRow, client.id), key=lambda job: job.seq)
    assert [job.seq for job in jobs] == [1, 2]

    # A second worker receives both messages again (as after a lost ack).
    database = Database.from_url(url)
    worker = TrainerWorker(
        database=database,
        futures=SqlFutureStore(database, FUTURES),
        objects=ObjectFolder(stack.config.data_dir / "trainer"),
        base_models=BaseModelRegistry(base_models_dir),
        owner="second-worker",
        lease_seconds=2.0,
        retry_delay=0.01,
        bases=BaseModelPool(),
        resident_bytes=1,
        ledger=PrivacyLedger(),
    )
    try:
        for job in jobs:
            await _deliver(worker, job, num_delivered=2)
    finally:
        worker.close()
        await database.dispose()
    after = await _client_row(url, client.id)
    assert (after.step, after.dp_steps, after.applied_seq) == (1, 1, 2)
    assert after.state_sha256 == before.state_sha256
    assert after.epsilon_spent == before.epsilon_spent
    assert len(await _rows(url, LedgerRow, client.id)) == 1


async def test_a_step_that_cannot_run_fails_alone_and_releases_its_budget(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    response = await stack.trainer.OptimStep(
        pb.OptimStepRequest(
            training_client_id=client.id, adam_params=pb.AdamParams(learning_rate=1e-2)
        ),
        metadata=stack.auth,
    )
    failed = await wait(stack, response.future)
    assert failed.status == common_pb2.FUTURE_STATUS_FAILED
    assert failed.error.code == 9  # FAILED_PRECONDITION: no data accumulated
    reservations = await _rows(stack.config.database_url, BudgetReservationRow, client.id)
    assert [r.status for r in reservations] == ["RELEASED"]
    # The client is not stuck behind the failed job.
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    await forward_backward(stack, client.id, batch)
    result = await optim_step(stack, client.id, learning_rate=1e-2)
    assert result.step == 1 and result.privacy_spent.steps == 1


@pytest.mark.slow
async def test_outbox_publishes_a_job_accepted_while_nats_was_down(
    make_stack: Any, base_models_dir: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=None)
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    port = int(nats_server.url.rsplit(":", 1)[1])
    nats_server.stop()
    # Accepted and committed; the publish fails and only the outbox can deliver it.
    response = await stack.trainer.ForwardBackward(
        pb.ForwardBackwardRequest(
            training_client_id=client.id,
            data=[datum(s) for s in batch],
            loss_fn="cross_entropy",
        ),
        metadata=stack.auth,
    )
    assert response.future.status == common_pb2.FUTURE_STATUS_PENDING
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats", port=port)):
        stack.start_worker()
        done = await wait(stack, response.future)
        assert done.status == common_pb2.FUTURE_STATUS_SUCCEEDED
        await stack.stop_worker()


def _worker_process(stack: Stack, log_file: Path, **settings: str) -> subprocess.Popen[bytes]:
    config = stack.config
    env = {
        **os.environ,
        "TENSAFE_DATABASE_URL": config.database_url,
        "TENSAFE_DATA_DIR": str(config.data_dir),
        "TENSAFE_NATS_URL": config.nats_url,
        "TENSAFE_BASE_MODELS_DIR": str(config.base_models_path),
        "TENSAFE_DATASET_KEK_FILE": str(config.dataset_kek_file),
        "TENSAFE_JOB_ACK_WAIT_SECONDS": str(config.job_ack_wait_seconds),
        "TENSAFE_LEASE_SECONDS": str(config.lease_seconds),
        "TENSAFE_RETRY_DELAY_SECONDS": "0.02",
        "TENSAFE_TORCH_THREADS": "1",
        "TENSAFE_LOG_FORMAT": "text",
        **settings,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tensafe.trainer.worker"],
        env=env,
        stdout=log_file.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_killed_worker_loses_nothing_committed_and_nothing_runs_twice(
    make_stack: Any, base_models_dir: Path, tmp_path: Path
) -> None:
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.1))
    batches = [corpus_sequences(base_models_dir / BASE_MODEL, 48, offset=k * 48) for k in range(3)]
    futures: list[common_pb2.Future] = []
    for batch in batches:
        # Two steps of three ForwardBackward calls each... kept small: FB, FB, step.
        for part in (batch[:24], batch[24:]):
            futures.append(
                (
                    await stack.trainer.ForwardBackward(
                        pb.ForwardBackwardRequest(
                            training_client_id=client.id,
                            data=[datum(s) for s in part],
                            loss_fn="cross_entropy",
                        ),
                        metadata=stack.auth,
                    )
                ).future
            )
        futures.append(
            (
                await stack.trainer.OptimStep(
                    pb.OptimStepRequest(
                        training_client_id=client.id,
                        adam_params=pb.AdamParams(learning_rate=1e-2),
                    ),
                    metadata=stack.auth,
                )
            ).future
        )
    log_file = tmp_path / "worker.log"
    first = _worker_process(stack, log_file)
    victim = futures[4]  # the second step's second ForwardBackward
    try:
        while True:
            state = (
                await stack.futures.GetFuture(
                    common_pb2.GetFutureRequest(future_id=victim.id), metadata=stack.auth
                )
            ).future.status
            assert state in (common_pb2.FUTURE_STATUS_PENDING, common_pb2.FUTURE_STATUS_RUNNING), (
                "the job finished before the worker could be killed; see " + str(log_file)
            )
            if state == common_pb2.FUTURE_STATUS_RUNNING:
                os.kill(first.pid, signal.SIGKILL)
                break
            assert first.poll() is None, log_file.read_text()
            await asyncio.sleep(0.002)
        first.wait()
        killed = await _client_row(stack.config.database_url, client.id)
        assert killed.applied_seq == 4  # everything before the victim, nothing after
        second = _worker_process(stack, log_file)
        try:
            try:
                results = [await wait(stack, future, timeout=120) for future in futures]
            except AssertionError as error:
                raise AssertionError(f"{error}; worker log:\n{log_file.read_text()}") from None
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert all(r.status == common_pb2.FUTURE_STATUS_SUCCEEDED for r in results), (
        log_file.read_text()
    )
    steps = []
    for index in (2, 5, 8):
        message = pb.OptimStepResult()
        assert results[index].result.Unpack(message)
        steps.append(message)
    # Each step saw exactly its two ForwardBackward calls (48 examples), even the one
    # whose second call ran twice; steps and epsilon are those of an undisturbed run.
    assert [s.step for s in steps] == [1, 2, 3]
    assert [s.metrics["examples"] for s in steps] == [48.0, 48.0, 48.0]
    final = await _client_row(stack.config.database_url, client.id)
    assert (final.step, final.dp_steps, final.applied_seq) == (3, 3, 9)
    expected = reference_epsilon("rdp", 1.1, 3, 1e-5)
    assert final.epsilon_spent == pytest.approx(expected, rel=1e-6)
    ledger = await _rows(stack.config.database_url, LedgerRow, client.id)
    assert sorted(row.dp_step for row in ledger) == [1, 2, 3]
    # Each step's history row once, with the loss of its ForwardBackward calls (the
    # calls before a step chain with it when queued: their loss commits with the step).
    history = await _rows(stack.config.database_url, StepRow, client.id)
    assert sorted((h.seq, h.step, h.dp_step) for h in history) == [(3, 1, 1), (6, 2, 2), (9, 3, 3)]
    assert all(h.loss is not None and h.loss > 0 for h in history)


async def _submit_fb(stack: Stack, client_id: str, sequences: list[list[int]]) -> Any:
    return (
        await stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client_id,
                data=[datum(s) for s in sequences],
                loss_fn="cross_entropy",
            ),
            metadata=stack.auth,
        )
    ).future


async def _submit_step(stack: Stack, client_id: str) -> Any:
    return (
        await stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client_id, adam_params=pb.AdamParams(learning_rate=1e-2)
            ),
            metadata=stack.auth,
        )
    ).future


async def test_a_cancelled_step_is_skipped_and_its_budget_released(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    first = await _submit_fb(stack, client.id, batch)
    cancelled = await _submit_step(stack, client.id)
    response = await stack.futures.CancelFuture(
        common_pb2.CancelFutureRequest(future_id=cancelled.id), metadata=stack.auth
    )
    assert response.future.status == common_pb2.FUTURE_STATUS_CANCELLED
    stack.start_worker()
    assert (await wait(stack, first)).status == common_pb2.FUTURE_STATUS_SUCCEEDED
    result = await optim_step(stack, client.id, learning_rate=1e-2)
    # The cancelled step never ran: this is step 1 over the first batch alone.
    assert result.step == 1 and result.metrics["examples"] == 4.0
    assert result.privacy_spent.steps == 1
    reservations = await _rows(stack.config.database_url, BudgetReservationRow, client.id)
    assert sorted(r.status for r in reservations) == ["CONSUMED", "RELEASED"]


async def test_deleting_a_client_removes_checkpoints_and_keeps_the_ledger(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    await forward_backward(stack, client.id, corpus_sequences(base_models_dir / BASE_MODEL, 4))
    await optim_step(stack, client.id, learning_rate=1e-2)
    saved = await wait(
        stack,
        (
            await stack.trainer.SaveState(
                pb.SaveStateRequest(training_client_id=client.id, name="c1"), metadata=stack.auth
            )
        ).future,
    )
    assert saved.status == common_pb2.FUTURE_STATUS_SUCCEEDED
    objects = stack.config.data_dir / "trainer" / "checkpoints" / client.id
    assert len(list(objects.rglob("*.safetensors"))) == 1
    await stack.trainer.DeleteTrainingClient(
        pb.DeleteTrainingClientRequest(training_client_id=client.id), metadata=stack.auth
    )
    await expect_code(
        stack.trainer.GetTrainingClient(
            pb.GetTrainingClientRequest(training_client_id=client.id), metadata=stack.auth
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # The API had the client in memory for validation: a deleted one is still refused.
    await expect_code(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id,
                data=[datum(s) for s in corpus_sequences(base_models_dir / BASE_MODEL, 2)],
                loss_fn="cross_entropy",
            ),
            metadata=stack.auth,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert list(objects.rglob("*.safetensors")) == []
    assert len(await _rows(stack.config.database_url, LedgerRow, client.id)) == 1


async def test_two_workers_apply_each_clients_jobs_in_order(
    make_stack: Any, base_models_dir: Path, database_url: str
) -> None:
    stack = await make_stack(database_url)
    stack.start_worker()  # a second worker on the same durable consumer
    sequences = corpus_sequences(base_models_dir / BASE_MODEL, 8)
    plans: list[tuple[str, list[Any]]] = []
    for seed in (1, 2):
        client = await create_client(stack, dp=dp_config(noise_multiplier=1.0), seed=seed)
        futures = []
        for _ in range(2):
            futures.append(await _submit_fb(stack, client.id, sequences[:3]))
            futures.append(await _submit_fb(stack, client.id, sequences[3:8]))
            futures.append(await _submit_step(stack, client.id))
        plans.append((client.id, futures))
    for _, futures in plans:
        done = [await wait(stack, future) for future in futures]
        assert all(f.status == common_pb2.FUTURE_STATUS_SUCCEEDED for f in done)
        for index, expected_step in ((2, 1), (5, 2)):
            message = pb.OptimStepResult()
            assert done[index].result.Unpack(message)
            # Each step saw exactly its own two ForwardBackward calls (3 + 5 examples).
            assert message.step == expected_step
            assert message.metrics["examples"] == 8.0


async def _submit(stack: Stack, kind: str, client_id: str, batch: list[list[int]]) -> str:
    """Queue a ForwardBackward, Forward or OptimStep job; returns its future id."""
    if kind == "optim":
        response: Any = await stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client_id, adam_params=pb.AdamParams(learning_rate=5e-2)
            ),
            metadata=stack.auth,
        )
    else:
        call = stack.trainer.ForwardBackward if kind == "fb" else stack.trainer.Forward
        request_type = pb.ForwardBackwardRequest if kind == "fb" else pb.ForwardRequest
        response = await call(
            request_type(
                training_client_id=client_id,
                data=[datum(s) for s in batch],
                loss_fn="cross_entropy",
            ),
            metadata=stack.auth,
        )
    return str(response.future.id)


async def _deliver(worker: TrainerWorker, job: JobRow, *, num_delivered: int) -> None:
    """Hand a job's message to ``worker`` as JetStream would deliver it."""
    message = JobMessage(job.future_id, job.client_id, job.seq)
    await worker.handle(
        Delivery(
            subject="x",
            data=message.encode(),
            headers={},
            msg_id=job.future_id,
            num_delivered=num_delivered,
            max_deliver=-1,
            stream_sequence=job.seq,
        )
    )


async def _deliver_queued_together(worker: TrainerWorker, jobs: list[JobRow]) -> None:
    """Deliver ForwardBackward ``jobs`` while the test holds the engine, so that every
    one claims and queues its call before any runs (one joint pass)."""
    async with worker._engine_lock:
        tasks = [asyncio.create_task(_deliver(worker, job, num_delivered=1)) for job in jobs]
        async with asyncio.timeout(30):
            while len(worker._joint_queue) < len(jobs):
                await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)


class _RecordingObjects(ObjectFolder):
    """The worker's object folder, recording the paths it writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[str] = []

    def write(self, relative: str, data: bytes) -> str:
        self.written.append(relative)
        return super().write(relative, data)


def _in_process_worker(
    stack: Stack,
    database: Database,
    base_models_dir: Path,
    owner: str,
    *,
    worker_class: type[TrainerWorker] = TrainerWorker,
    lease_seconds: float = 30.0,
    chain_optim_steps: bool = True,
    joint_rows: int = 0,
) -> tuple[TrainerWorker, _RecordingObjects]:
    objects = _RecordingObjects(stack.config.data_dir / "trainer")
    worker = worker_class(
        database=database,
        futures=SqlFutureStore(database, FUTURES),
        objects=objects,
        base_models=BaseModelRegistry(base_models_dir),
        owner=owner,
        lease_seconds=lease_seconds,
        retry_delay=0.01,
        bases=BaseModelPool(),
        resident_bytes=1 << 30,
        ledger=PrivacyLedger(),
        chain_optim_steps=chain_optim_steps,
        joint_rows=joint_rows,
    )
    return worker, objects


async def _results(stack: Stack, future_ids: list[str]) -> list[common_pb2.Future]:
    return [await wait(stack, common_pb2.Future(id=future_id)) for future_id in future_ids]


def _unpack(future: common_pb2.Future, message: Any) -> Any:
    assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
    assert future.result.Unpack(message)
    return message


class _NeverSolo(TrainerWorker):
    """Chains an OptimStep only after its ForwardBackward left the engine (the path taken
    when other clients' jobs wait for the engine or share a joint pass)."""

    def _runs_solo(self) -> bool:
        return False


@pytest.mark.parametrize("worker_class", [TrainerWorker, _NeverSolo], ids=["solo", "after"])
async def test_a_chained_optim_step_ends_where_the_jobs_one_by_one_end(
    make_stack: Any, base_models_dir: Path, worker_class: type[TrainerWorker]
) -> None:
    """ForwardBackward + OptimStep pairs queued before the worker runs them: chained (the
    step runs right after its ForwardBackward, one commit, one state object per pair)
    they end bit for bit where the same jobs committed one by one end — state, results,
    the steps' losses — and redelivering every chained job changes nothing."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    # Non-private, so that the two runs compare bit for bit (DP noise is fresh per step).
    chained = await create_client(stack, dp=None, seed=3)
    alone = await create_client(stack, dp=None, seed=3)
    batches = [corpus_sequences(base_models_dir / BASE_MODEL, 3, offset=3 * i) for i in range(2)]
    submitted: dict[str, list[str]] = {chained.id: [], alone.id: []}
    for batch in batches:
        for client in (chained, alone):
            submitted[client.id].append((await _submit_fb(stack, client.id, batch)).id)
            submitted[client.id].append((await _submit_step(stack, client.id)).id)

    database = Database.from_url(url)
    chaining, chaining_objects = _in_process_worker(
        stack, database, base_models_dir, "chaining", worker_class=worker_class
    )
    one_by_one, one_by_one_objects = _in_process_worker(
        stack, database, base_models_dir, "one-by-one", chain_optim_steps=False
    )
    try:
        for worker, client in ((chaining, chained), (one_by_one, alone)):
            jobs = sorted(await _rows(url, JobRow, client.id), key=lambda job: job.seq)
            for job in jobs:
                await _deliver(worker, job, num_delivered=1)
    finally:
        chaining.close()
        one_by_one.close()
    # One state object per pair, the step's; one by one, one per job.
    assert [Path(p).name for p in chaining_objects.written] == [
        f"{seq:012d}.safetensors" for seq in (2, 4)
    ]
    assert [Path(p).name for p in one_by_one_objects.written] == [
        f"{seq:012d}.safetensors" for seq in (1, 2, 3, 4)
    ]
    got = await _results(stack, submitted[chained.id])
    want = await _results(stack, submitted[alone.id])
    for index in (0, 2):
        ours = _unpack(got[index], pb.ForwardBackwardResult())
        theirs = _unpack(want[index], pb.ForwardBackwardResult())
        assert ours.metrics == theirs.metrics
        assert [o.outputs["logprobs"] for o in ours.loss_fn_outputs] == [
            o.outputs["logprobs"] for o in theirs.loss_fn_outputs
        ]
    for index in (1, 3):
        assert _unpack(got[index], pb.OptimStepResult()) == _unpack(
            want[index], pb.OptimStepResult()
        )
    rows = [await _client_row(url, client.id) for client in (chained, alone)]
    assert [(r.step, r.applied_seq, r.pending_tokens) for r in rows] == [(2, 4, 0.0)] * 2
    assert rows[0].state_sha256 == rows[1].state_sha256
    steps = [
        sorted((s.seq, s.step, s.loss) for s in await _rows(url, StepRow, client.id))
        for client in (chained, alone)
    ]
    assert steps[0] == steps[1] and [s[:2] for s in steps[0]] == [(2, 1), (4, 2)]
    assert all(s[2] is not None and s[2] > 0 for s in steps[0])

    # Redelivered (as after lost acks), the chained jobs are only acked.
    again, again_objects = _in_process_worker(stack, database, base_models_dir, "again")
    try:
        for job in sorted(await _rows(url, JobRow, chained.id), key=lambda job: job.seq):
            await _deliver(again, job, num_delivered=2)
    finally:
        again.close()
        await database.dispose()
    assert again_objects.written == []
    after = await _client_row(url, chained.id)
    assert (after.step, after.applied_seq, after.state_sha256) == (
        2,
        4,
        rows[0].state_sha256,
    )
    assert len(await _rows(url, StepRow, chained.id)) == 2


class _Crash(Exception):
    """Stands for the process dying: raised inside the joint commit's transaction."""


class _DiesInTheJointCommit(TrainerWorker):
    async def _record_optim_step(self, *args: Any, **kwargs: Any) -> None:
        # After the ForwardBackward's future and job were updated in the transaction.
        raise _Crash


class _DiesInTheJointCommitAfter(_DiesInTheJointCommit, _NeverSolo):
    pass


@pytest.mark.parametrize(
    "worker_class", [_DiesInTheJointCommit, _DiesInTheJointCommitAfter], ids=["solo", "after"]
)
async def test_a_worker_dying_in_a_chained_commit_loses_it_whole_and_applies_it_once(
    make_stack: Any, base_models_dir: Path, worker_class: type[TrainerWorker]
) -> None:
    """A DP ForwardBackward + OptimStep pair; the worker dies inside the transaction
    that would commit both (the ForwardBackward's future already marked in it): nothing
    of either is committed. A second worker, once the lease expired, runs the pair from
    the last committed state: the step saw the batch once, the ForwardBackward's loss
    is in the step's history once, one ledger row, one step's epsilon; redelivered
    again, nothing changes."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    fb = await _submit_fb(stack, client.id, batch)
    step = await _submit_step(stack, client.id)
    jobs = sorted(await _rows(url, JobRow, client.id), key=lambda job: job.seq)
    database = Database.from_url(url)
    try:
        dying, dying_objects = _in_process_worker(
            stack,
            database,
            base_models_dir,
            "dying",
            worker_class=worker_class,
            lease_seconds=0.3,
        )
        try:
            with pytest.raises(_Crash):
                await _deliver(dying, jobs[0], num_delivered=1)
        finally:
            dying.close()
        # It got as far as the step's state object (the joint commit's first act).
        assert [Path(p).name for p in dying_objects.written] == ["000000000002.safetensors"]
        row = await _client_row(url, client.id)
        assert (row.applied_seq, row.step, row.dp_steps, row.state_path) == (0, 0, 0, None)
        assert row.pending_tokens == 0.0
        assert await _rows(url, LedgerRow, client.id) == []
        assert await _rows(url, StepRow, client.id) == []
        reservations = await _rows(url, BudgetReservationRow, client.id)
        assert [r.status for r in reservations] == ["RESERVED"]
        async with database.transaction(read_only=True) as session:
            statuses = [
                (await repo.get_job(session, job.future_id)).status  # type: ignore[union-attr]
                for job in jobs
            ]
        assert statuses == [repo.JOB_QUEUED] * 2

        await asyncio.sleep(0.4)  # the dead worker's lease expires
        second, _ = _in_process_worker(stack, database, base_models_dir, "second")
        try:
            await _deliver(second, jobs[0], num_delivered=2)
            await _deliver(second, jobs[1], num_delivered=2)
        finally:
            second.close()
        fb_result, step_result = await _results(stack, [fb.id, step.id])
        loss = _unpack(fb_result, pb.ForwardBackwardResult()).metrics
        stepped = _unpack(step_result, pb.OptimStepResult())
        assert stepped.step == 1 and stepped.metrics["examples"] == 4.0
        assert stepped.privacy_spent.steps == 1
        after = await _client_row(url, client.id)
        assert (after.applied_seq, after.step, after.dp_steps) == (2, 1, 1)
        assert after.epsilon_spent == pytest.approx(
            reference_epsilon("rdp", 1.0, 1, 1e-5), rel=1e-6
        )
        assert len(await _rows(url, LedgerRow, client.id)) == 1
        history = await _rows(url, StepRow, client.id)
        assert [(h.seq, h.step, h.dp_step) for h in history] == [(2, 1, 1)]
        assert history[0].loss == pytest.approx(loss["loss:sum"] / loss["tokens:sum"], rel=1e-6)
        reservations = await _rows(url, BudgetReservationRow, client.id)
        assert [r.status for r in reservations] == ["CONSUMED"]

        third, third_objects = _in_process_worker(stack, database, base_models_dir, "third")
        try:
            for job in jobs:
                await _deliver(third, job, num_delivered=3)
        finally:
            third.close()
        assert third_objects.written == []
        final = await _client_row(url, client.id)
        assert (final.applied_seq, final.step, final.dp_steps, final.state_sha256) == (
            2,
            1,
            1,
            after.state_sha256,
        )
        assert len(await _rows(url, LedgerRow, client.id)) == 1
        assert len(await _rows(url, StepRow, client.id)) == 1
    finally:
        await database.dispose()


class _StepFailsOnceChained(TrainerWorker):
    """Its first OptimStep fails with an unexpected error (a fault of the step alone)."""

    failed = False

    def _execute(self, engine: Any, kind: Any, request: Any, extra: bytes | None) -> Any:
        if kind.name == "OPTIM_STEP" and not self.failed:
            self.failed = True
            raise RuntimeError("the step's fault")
        return super()._execute(engine, kind, request, extra)


async def test_a_chained_step_failing_unexpectedly_reruns_the_pair_one_by_one(
    make_stack: Any, base_models_dir: Path
) -> None:
    """The OptimStep chained after a ForwardBackward (whose state was not exported yet)
    fails unexpectedly: nothing commits and the ForwardBackward is delivered again
    (RetryLater, not counted against it); it then commits alone and the step runs on its
    own: the step saw the batch once, one ledger row."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    fb = await _submit_fb(stack, client.id, corpus_sequences(base_models_dir / BASE_MODEL, 4))
    step = await _submit_step(stack, client.id)
    jobs = sorted(await _rows(url, JobRow, client.id), key=lambda job: job.seq)
    database = Database.from_url(url)
    worker, objects = _in_process_worker(
        stack, database, base_models_dir, "flaky", worker_class=_StepFailsOnceChained
    )
    try:
        with pytest.raises(RetryLater):
            await _deliver(worker, jobs[0], num_delivered=1)
        row = await _client_row(url, client.id)
        assert (row.applied_seq, row.step) == (0, 0)
        assert objects.written == []
        await _deliver(worker, jobs[0], num_delivered=2)
        assert (await _client_row(url, client.id)).applied_seq == 1
        await _deliver(worker, jobs[1], num_delivered=1)
    finally:
        worker.close()
        await database.dispose()
    assert [Path(p).name for p in objects.written] == [
        "000000000001.safetensors",
        "000000000002.safetensors",
    ]
    fb_result, step_result = await _results(stack, [fb.id, step.id])
    _unpack(fb_result, pb.ForwardBackwardResult())
    stepped = _unpack(step_result, pb.OptimStepResult())
    assert stepped.step == 1 and stepped.metrics["examples"] == 4.0
    after = await _client_row(url, client.id)
    assert (after.applied_seq, after.step, after.dp_steps) == (2, 1, 1)
    assert len(await _rows(url, LedgerRow, client.id)) == 1
    assert len(await _rows(url, StepRow, client.id)) == 1


async def test_clients_share_one_base_and_evicted_clients_continue_exactly(
    make_stack: Any, base_models_dir: Path
) -> None:
    """Three clients on one worker whose byte budget holds one client's state: the base
    is loaded once; a client evicted after every job (reloaded from its committed state)
    ends exactly where the same training without eviction ends."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    # Non-private, so that the two runs compare bit for bit (DP noise is fresh per step).
    evicted = await create_client(stack, dp=None, seed=3)
    kept = await create_client(stack, dp=None, seed=3)
    other = await create_client(stack, dp=None, seed=5)
    batches = [corpus_sequences(base_models_dir / BASE_MODEL, 3, offset=3 * i) for i in range(4)]
    probe = corpus_sequences(base_models_dir / BASE_MODEL, 2, offset=30)

    interleaved: list[tuple[str, str]] = []  # (client id, future id)
    alone: list[tuple[str, str]] = []
    for step in range(2):
        for kind, batch in (
            ("fb", batches[2 * step]),
            ("fb", batches[2 * step + 1]),
            ("optim", []),
        ):
            interleaved.append((evicted.id, await _submit(stack, kind, evicted.id, batch)))
            interleaved.append((other.id, await _submit(stack, kind, other.id, batch[::-1])))
            alone.append((kept.id, await _submit(stack, kind, kept.id, batch)))
    interleaved.append((evicted.id, await _submit(stack, "forward", evicted.id, probe)))
    alone.append((kept.id, await _submit(stack, "forward", kept.id, probe)))

    database = Database.from_url(url)
    pool = BaseModelPool()
    worker = TrainerWorker(
        database=database,
        futures=SqlFutureStore(database, FUTURES),
        objects=ObjectFolder(stack.config.data_dir / "trainer"),
        base_models=BaseModelRegistry(base_models_dir),
        owner="budget-worker",
        lease_seconds=30.0,
        retry_delay=0.01,
        bases=pool,
        resident_bytes=1,  # less than one client: only the last one used stays
        ledger=PrivacyLedger(),
        # Every job on its own, so that each delivery switches clients (a chained
        # OptimStep would commit with its ForwardBackward, before its own delivery).
        chain_optim_steps=False,
    )
    try:
        jobs = {
            job.future_id: job
            for client in (evicted, kept, other)
            for job in await _rows(url, JobRow, client.id)
        }
        for client_id, future_id in interleaved:
            await _deliver(worker, jobs[future_id], num_delivered=1)
            assert worker.resident_client_ids == [client_id]
        for _, future_id in alone:
            await _deliver(worker, jobs[future_id], num_delivered=1)
        assert pool.loads == 1
        assert pool.get(base_models_dir / BASE_MODEL).adapters == 1
    finally:
        worker.close()
        await database.dispose()

    results = []
    for _, future_id in (interleaved[-1], alone[-1]):
        future = await wait(stack, common_pb2.Future(id=future_id))
        result = pb.ForwardBackwardResult()
        assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
        assert future.result.Unpack(result)
        results.append(result)
    evicted_row = await _client_row(url, evicted.id)
    kept_row = await _client_row(url, kept.id)
    assert (evicted_row.step, kept_row.step) == (2, 2)
    assert results[0].metrics["loss:sum"] == results[1].metrics["loss:sum"]
    assert [o.outputs["logprobs"] for o in results[0].loss_fn_outputs] == [
        o.outputs["logprobs"] for o in results[1].loss_fn_outputs
    ]
    assert evicted_row.state_sha256 == kept_row.state_sha256


# How long an instrumented step below waits for the other client before it fails the
# test (a worker that handles one job at a time never gets there).
_OVERLAP_TIMEOUT = 30.0


async def test_one_clients_commit_overlaps_another_clients_engine_step(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client A's job sits in the engine (holding the shared base) until client B's job
    has committed and its future SUCCEEDED: B's state write and commit transaction run
    while A's engine step runs. A worker handling one job at a time fails this (B waits
    for A's job, which waits for B)."""
    stack = await make_stack(worker=False)
    a = await create_client(stack, dp=None, seed=1)
    b = await create_client(stack, dp=None, seed=2)
    b_computed, a_in_engine, b_succeeded = (threading.Event() for _ in range(3))
    order: list[str] = []
    run_forward_backward = TrainerWorker._forward_backward
    write = ObjectFolder.write

    # Every ForwardBackward on the engine (alone, solo or in a joint pass of one) runs
    # TrainerWorker._forward_backward in the engine's thread.
    def instrumented_forward_backward(
        self: TrainerWorker, engine: Any, request: Any, **options: Any
    ) -> Any:
        if request.training_client_id == a.id:
            order.append("A in the engine")
            a_in_engine.set()
            assert b_succeeded.wait(_OVERLAP_TIMEOUT), "B never committed during A's step"
            order.append("A leaves the engine")
        outcome = run_forward_backward(self, engine, request, **options)
        if request.training_client_id == b.id:
            order.append("B computed")
            b_computed.set()
        return outcome

    def instrumented_write(self: ObjectFolder, relative: str, data: bytes) -> str:
        if relative.startswith(f"states/{b.id}/"):
            # B's state write and commit start only once A holds the engine.
            assert a_in_engine.wait(_OVERLAP_TIMEOUT), "A never started during B's job"
        return write(self, relative, data)

    monkeypatch.setattr(TrainerWorker, "_forward_backward", instrumented_forward_backward)
    monkeypatch.setattr(ObjectFolder, "write", instrumented_write)
    stack.start_worker()
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    b_job = await _submit_fb(stack, b.id, batch)
    assert await asyncio.to_thread(b_computed.wait, _OVERLAP_TIMEOUT)
    a_job = await _submit_fb(stack, a.id, batch)
    b_done = await wait(stack, b_job, timeout=_OVERLAP_TIMEOUT)
    order.append("B succeeded")
    b_succeeded.set()
    a_done = await wait(stack, a_job, timeout=_OVERLAP_TIMEOUT)
    assert (b_done.status, a_done.status) == (common_pb2.FUTURE_STATUS_SUCCEEDED,) * 2
    assert order == ["B computed", "A in the engine", "B succeeded", "A leaves the engine"]


async def test_a_clients_jobs_run_in_order_one_at_a_time_among_others(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many queued jobs of three clients on a worker with several jobs in flight: each
    client's jobs are handled one after another in sequence order, each delivered once
    (a later job waits in the worker for the earlier one instead of being refused and
    redelivered), and every step sees exactly its own ForwardBackward calls."""
    stack = await make_stack(worker=False, jobs_in_flight=4)
    handled: list[tuple[str, int, int]] = []  # (client, seq, delivery) in start order
    running: dict[str, int] = {}
    overlaps: list[str] = []
    handle = TrainerWorker.handle

    async def instrumented_handle(self: TrainerWorker, delivery: Delivery) -> None:
        message = JobMessage.decode(delivery.data)
        running[message.client_id] = running.get(message.client_id, 0) + 1
        if running[message.client_id] > 1:
            overlaps.append(message.client_id)
        handled.append((message.client_id, message.seq, delivery.num_delivered))
        try:
            await handle(self, delivery)
        finally:
            running[message.client_id] -= 1

    monkeypatch.setattr(TrainerWorker, "handle", instrumented_handle)
    sequences = corpus_sequences(base_models_dir / BASE_MODEL, 8)
    plans: list[tuple[str, list[Any]]] = []
    for seed in (1, 2, 3):
        client = await create_client(stack, dp=dp_config(noise_multiplier=1.0), seed=seed)
        futures = []
        for _ in range(2):
            futures.append(await _submit_fb(stack, client.id, sequences[:3]))
            futures.append(await _submit_fb(stack, client.id, sequences[3:8]))
            futures.append(await _submit_step(stack, client.id))
        plans.append((client.id, futures))
    stack.start_worker()
    for client_id, futures in plans:
        done = [await wait(stack, future) for future in futures]
        assert all(f.status == common_pb2.FUTURE_STATUS_SUCCEEDED for f in done)
        for index, expected_step in ((2, 1), (5, 2)):
            message = pb.OptimStepResult()
            assert done[index].result.Unpack(message)
            assert message.step == expected_step
            assert message.metrics["examples"] == 8.0
        mine = [(seq, delivery) for client, seq, delivery in handled if client == client_id]
        assert mine == [(seq, 1) for seq in range(1, 7)]
    assert overlaps == []
    # The clients' jobs did interleave in the worker (else this shows nothing).
    assert [client for client, _, _ in handled[:6]] != [plans[0][0]] * 6


async def test_dp_clients_forward_backward_together_as_each_would_alone(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three DP clients' ForwardBackward jobs waiting for the engine at once run in ONE
    forward/backward pass on the shared base, and each client ends with exactly the
    outputs and the clipped-gradient sum its twin (same seed, same batch) got running
    alone: no row of one client reaches another's sum. Each job still commits on its
    own (its future, its client's seq)."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    dp = dp_config(noise_multiplier=1.0)
    together = [await create_client(stack, dp=dp, seed=seed) for seed in (1, 2, 3)]
    alone = [await create_client(stack, dp=dp, seed=seed) for seed in (1, 2, 3)]
    batches = [
        corpus_sequences(base_models_dir / BASE_MODEL, size, offset=5 * index)
        for index, size in enumerate((2, 3, 4))
    ]
    together_futures = [
        await _submit(stack, "fb", c.id, batch) for c, batch in zip(together, batches, strict=True)
    ]
    alone_futures = [
        await _submit(stack, "fb", c.id, batch) for c, batch in zip(alone, batches, strict=True)
    ]
    passes: list[int] = []
    execute_jointly = TrainerWorker._execute_jointly

    def recording(self: TrainerWorker, calls: list[Any]) -> Any:
        passes.append(len(calls))
        return execute_jointly(self, calls)

    monkeypatch.setattr(TrainerWorker, "_execute_jointly", recording)
    database = Database.from_url(url)
    objects = ObjectFolder(stack.config.data_dir / "trainer")
    worker = TrainerWorker(
        database=database,
        futures=SqlFutureStore(database, FUTURES),
        objects=objects,
        base_models=BaseModelRegistry(base_models_dir),
        owner="joint-worker",
        lease_seconds=30.0,
        retry_delay=0.01,
        bases=BaseModelPool(),
        resident_bytes=1 << 30,
        ledger=PrivacyLedger(),
        joint_rows=256,
    )
    try:
        jobs = {
            job.future_id: job
            for client in together + alone
            for job in await _rows(url, JobRow, client.id)
        }
        for future_id in alone_futures:
            await _deliver(worker, jobs[future_id], num_delivered=1)
        assert passes == []  # one job at a time never shares a pass
        await _deliver_queued_together(worker, [jobs[f] for f in together_futures])
        assert passes == [3]
    finally:
        worker.close()
        await database.dispose()

    sums = []
    for twin, single, t_future, a_future in zip(
        together, alone, together_futures, alone_futures, strict=True
    ):
        results = []
        for future_id in (t_future, a_future):
            future = await wait(stack, common_pb2.Future(id=future_id))
            assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
            result = pb.ForwardBackwardResult()
            assert future.result.Unpack(result)
            results.append(result)
        for joint_output, alone_output in zip(
            results[0].loss_fn_outputs, results[1].loss_fn_outputs, strict=True
        ):
            assert list(joint_output.outputs["logprobs"].float_data) == pytest.approx(
                list(alone_output.outputs["logprobs"].float_data), rel=1e-5, abs=1e-6
            )
        states = []
        for client in (twin, single):
            row = await _client_row(url, client.id)
            assert row.applied_seq == 1
            assert row.state_path is not None and row.state_sha256 is not None
            states.append(load_safetensors(objects.read(row.state_path, sha256=row.state_sha256)))
        assert states[0].keys() == states[1].keys()
        for name in states[0]:
            torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-7)
        sums.append(
            torch.cat(
                [t.flatten() for n, t in sorted(states[0].items()) if n.startswith("accumulator/")]
            )
        )
    # The clipped sums are real and each client's own.
    assert all(s.abs().sum() > 0 for s in sums)
    assert not torch.allclose(sums[0], sums[1]) and not torch.allclose(sums[1], sums[2])


async def test_every_engine_call_runs_on_the_workers_one_engine_thread(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building engines, solo and joint passes, chained and separate steps and state
    exports all run on one thread of the worker's own, never on the event loop's thread
    and never spread over asyncio's default executor (whose threads would each keep a
    pass's worth of freed memory). The default executor is given idle threads first, so
    that work sent there would land on several of them."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    dp = dp_config(noise_multiplier=1.0)
    clients = [await create_client(stack, dp=dp, seed=seed) for seed in (1, 2, 3)]
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    futures = [await _submit(stack, kind, clients[0].id, batch) for kind in ("fb", "optim")]
    joint = [await _submit(stack, "fb", client.id, batch) for client in clients[1:]]
    steps = [await _submit(stack, "optim", client.id, batch) for client in clients[1:]]

    threads: list[tuple[str, int]] = []

    def recording(name: str, method: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            threads.append((name, threading.get_ident()))
            return method(*args, **kwargs)

        return record

    for cls, names in (
        (LoraTrainingEngine, ("__init__", "forward_backward", "optim_step", "state_dict")),
        (TrainerWorker, ("_execute_jointly",)),
    ):
        for name in names:
            monkeypatch.setattr(cls, name, recording(name, getattr(cls, name)))
    await asyncio.gather(*(asyncio.to_thread(threading.Event().wait, 0.05) for _ in range(4)))
    database = Database.from_url(url)
    worker, _ = _in_process_worker(stack, database, base_models_dir, "one-thread", joint_rows=256)
    try:
        jobs = {
            job.future_id: job for client in clients for job in await _rows(url, JobRow, client.id)
        }
        for future_id in futures:  # a solo pass with its chained step
            await _deliver(worker, jobs[future_id], num_delivered=1)
        await _deliver_queued_together(worker, [jobs[f] for f in joint])
        for future_id in steps:  # committed with the joint pass, or run now
            await _deliver(worker, jobs[future_id], num_delivered=1)
    finally:
        worker.close()
        await database.dispose()
    for future in await _results(stack, futures + joint + steps):
        assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
    called = {name for name, _ in threads}
    assert called == {
        "__init__",
        "forward_backward",
        "optim_step",
        "state_dict",
        "_execute_jointly",
    }
    assert len({ident for _, ident in threads}) == 1, threads
    assert threads[0][1] != threading.get_ident()


async def test_a_joint_pass_steps_each_group_before_running_the_next(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four DP clients' ForwardBackward + OptimStep pairs; the ForwardBackwards wait for
    the engine together and run as one pass in two groups of two clients. Each group's
    clients are stepped as soon as the group leaves the engine, so their pairs commit
    while the next group computes: here the second group's compute waits until both
    pairs of the first group have committed (had the steps waited for the whole pass, it
    would wait in vain). Every pair commits once, as a pair: one state object, the step's,
    one step and one ledger row; the OptimSteps' own deliveries are only acked."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    clients = [
        await create_client(stack, dp=dp_config(noise_multiplier=1.0), seed=seed)
        for seed in (1, 2, 3, 4)
    ]
    fb_futures: list[str] = []
    step_futures: list[str] = []
    for index, client in enumerate(clients):
        batch = corpus_sequences(base_models_dir / BASE_MODEL, 2, offset=2 * index)
        fb_futures.append((await _submit_fb(stack, client.id, batch)).id)
        step_futures.append((await _submit_step(stack, client.id)).id)

    groups: list[list[str]] = []
    passes_done: list[int] = []
    commits: list[tuple[str, int]] = []  # (client, groups done when its pair committed)
    first_group_committed = threading.Event()
    execute_jointly = TrainerWorker._execute_jointly
    commit_pair = TrainerWorker._commit_pair

    def gated(self: TrainerWorker, calls: list[Any]) -> Any:
        groups.append([call.client.id for call in calls])
        if len(groups) == 2:
            first_group_committed.wait(timeout=10)
        outcomes = execute_jointly(self, calls)
        passes_done.append(len(groups))
        return outcomes

    async def recorded(
        self: TrainerWorker, job: Any, following: Any, client: Any, *rest: Any
    ) -> None:
        await commit_pair(self, job, following, client, *rest)
        commits.append((client.id, len(passes_done)))
        if {c for c, _ in commits} >= set(groups[0]):
            first_group_committed.set()

    monkeypatch.setattr(TrainerWorker, "_execute_jointly", gated)
    monkeypatch.setattr(TrainerWorker, "_commit_pair", recorded)
    database = Database.from_url(url)
    worker, objects = _in_process_worker(
        stack, database, base_models_dir, "joint-chaining", joint_rows=4
    )
    try:
        jobs = {
            job.future_id: job for client in clients for job in await _rows(url, JobRow, client.id)
        }
        await _deliver_queued_together(worker, [jobs[f] for f in fb_futures])
        for future_id in step_futures:
            await _deliver(worker, jobs[future_id], num_delivered=1)
    finally:
        worker.close()
        await database.dispose()

    assert [len(group) for group in groups] == [2, 2]
    assert sorted(commits) == sorted(
        [(client_id, 1) for client_id in groups[0]] + [(client_id, 2) for client_id in groups[1]]
    )
    assert sorted(objects.written) == sorted(
        f"states/{client.id}/{2:012d}.safetensors" for client in clients
    )
    for client, future_id in zip(clients, step_futures, strict=True):
        assert (
            _unpack(await wait(stack, common_pb2.Future(id=future_id)), pb.OptimStepResult()).step
            == 1
        )
        row = await _client_row(url, client.id)
        assert (row.step, row.dp_steps, row.applied_seq) == (1, 1, 2)
        assert [s.seq for s in await _rows(url, StepRow, client.id)] == [2]
        assert [r.dp_step for r in await _rows(url, LedgerRow, client.id)] == [1]


async def test_a_joint_pass_cancelled_in_its_thread_leaves_no_engine_reusable(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two DP clients' ForwardBackward jobs share a pass; their handlers are cancelled
    (the worker abandons its jobs) while the pass's thread still runs. Neither client's
    resident engine may be reused: the thread changes them after the cancellation, and
    their jobs come back to run from the committed state, closing the stale engine only
    once the pass has ended."""
    stack = await make_stack(worker=False)
    url = stack.config.database_url
    clients = [
        await create_client(stack, dp=dp_config(noise_multiplier=1.0), seed=seed) for seed in (1, 2)
    ]
    futures = [
        (await _submit_fb(stack, c.id, corpus_sequences(base_models_dir / BASE_MODEL, 2))).id
        for c in clients
    ]
    entered, release = threading.Event(), threading.Event()
    execute_jointly = TrainerWorker._execute_jointly

    def held(self: TrainerWorker, calls: list[Any]) -> Any:
        entered.set()
        release.wait(timeout=30)
        return execute_jointly(self, calls)

    monkeypatch.setattr(TrainerWorker, "_execute_jointly", held)
    closed_while_held: list[bool] = []
    close = LoraTrainingEngine.close

    def recording_close(engine: LoraTrainingEngine) -> None:
        closed_while_held.append(not release.is_set())
        close(engine)

    monkeypatch.setattr(LoraTrainingEngine, "close", recording_close)
    database = Database.from_url(url)
    worker, _ = _in_process_worker(stack, database, base_models_dir, "cancelled", joint_rows=4)
    try:
        jobs = {job.future_id: job for c in clients for job in await _rows(url, JobRow, c.id)}
        async with worker._engine_lock:
            tasks = [
                asyncio.create_task(_deliver(worker, jobs[future_id], num_delivered=1))
                for future_id in futures
            ]
            async with asyncio.timeout(30):
                while len(worker._joint_queue) < 2:
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(30):
            while not entered.is_set():
                await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        for client in clients:
            resident = worker._resident.get(client.id)
            assert resident is None or resident.applied_seq == -1
        # The job comes back while the pass still runs: its stale engine is closed (its
        # adapter leaves the shared base) only after the pass, on the engine thread.
        again = asyncio.create_task(_deliver(worker, jobs[futures[0]], num_delivered=2))
        await asyncio.sleep(0.3)
        assert not again.done() and closed_while_held == []
        release.set()
        async with asyncio.timeout(60):
            await again
        assert closed_while_held == [False]
        (future,) = await _results(stack, futures[:1])
        assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
    finally:
        release.set()
        worker.close()
        await database.dispose()


@pytest.mark.slow
async def test_killed_worker_mid_joint_pass_loses_and_repeats_no_clients_step(
    make_stack: Any, base_models_dir: Path, tmp_path: Path
) -> None:
    """Three DP clients' jobs, all queued before a worker (several jobs in flight, joint
    ForwardBackward passes) starts; the worker is killed with SIGKILL while one of the
    second steps' ForwardBackward jobs runs, possibly inside a pass shared with other
    clients. After a second worker finishes, every client's steps saw exactly their own
    two ForwardBackward calls, and its steps, DP steps, ledger and epsilon are those of an
    undisturbed run."""
    stack = await make_stack(worker=False)
    clients = [
        await create_client(stack, dp=dp_config(noise_multiplier=1.1), seed=seed)
        for seed in (1, 2, 3)
    ]
    futures: dict[str, list[Any]] = {c.id: [] for c in clients}
    for step in range(2):
        for index, client in enumerate(clients):
            batch = corpus_sequences(base_models_dir / BASE_MODEL, 8, offset=8 * (step + index))
            futures[client.id].append(await _submit_fb(stack, client.id, batch[:3]))
            futures[client.id].append(await _submit_fb(stack, client.id, batch[3:]))
            futures[client.id].append(await _submit_step(stack, client.id))
    victims = [futures[c.id][index] for c in clients for index in (3, 4)]
    log_file = tmp_path / "worker.log"
    first = _worker_process(stack, log_file, TENSAFE_LOG_LEVEL="DEBUG")
    try:
        running = False
        while not running:
            for victim in victims:
                status = (
                    await stack.futures.GetFuture(
                        common_pb2.GetFutureRequest(future_id=victim.id), metadata=stack.auth
                    )
                ).future.status
                assert status != common_pb2.FUTURE_STATUS_SUCCEEDED or victim is not victims[-1], (
                    "the jobs finished before the worker could be killed; see " + str(log_file)
                )
                if status == common_pb2.FUTURE_STATUS_RUNNING:
                    running = True
                    break
            assert first.poll() is None, log_file.read_text()
            await asyncio.sleep(0.002)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = _worker_process(stack, log_file)
        try:
            results = {
                client_id: [await wait(stack, f, timeout=120) for f in client_futures]
                for client_id, client_futures in futures.items()
            }
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    expected = reference_epsilon("rdp", 1.1, 2, 1e-5)
    for client in clients:
        done = results[client.id]
        assert all(r.status == common_pb2.FUTURE_STATUS_SUCCEEDED for r in done), (
            log_file.read_text()
        )
        steps = []
        for index in (2, 5):
            message = pb.OptimStepResult()
            assert done[index].result.Unpack(message)
            steps.append(message)
        assert [s.step for s in steps] == [1, 2]
        assert [s.metrics["examples"] for s in steps] == [8.0, 8.0]
        final = await _client_row(stack.config.database_url, client.id)
        assert (final.step, final.dp_steps, final.applied_seq) == (2, 2, 6)
        assert final.epsilon_spent == pytest.approx(expected, rel=1e-6)
        ledger = await _rows(stack.config.database_url, LedgerRow, client.id)
        assert sorted(row.dp_step for row in ledger) == [1, 2]
    # The first worker did share passes between clients (else this shows nothing).
    assert "ForwardBackward jobs" in log_file.read_text(), log_file.read_text()


async def test_claim_and_advance_are_fenced_single_statements(
    make_stack: Any, database_url: str
) -> None:
    """The worker's one-statement claim and commit refuse (None / False, nothing
    changed) a job out of order, a foreign live lease, a lost lease and a repeat."""
    stack = await make_stack(database_url, worker=False)
    client = await create_client(stack, dp=None)
    database = Database.from_url(stack.config.database_url)
    try:
        async with database.transaction() as session:
            claimed = await repo.claim_client(
                session, client.id, seq=1, owner="w1", lease_seconds=30.0
            )
            assert claimed is not None and claimed.lease_owner == "w1"
            assert claimed.applied_seq == 0 and claimed.lora_json
            # Another worker, the same job: the lease is live.
            assert (
                await repo.claim_client(session, client.id, seq=1, owner="w2", lease_seconds=30.0)
                is None
            )
            # The same worker, a later job: seq 1 is not applied yet.
            assert (
                await repo.claim_client(session, client.id, seq=2, owner="w1", lease_seconds=30.0)
                is None
            )
            assert not await repo.advance_client(
                session, client.id, seq=1, owner="w2", state=None, step=0
            )
            assert await repo.advance_client(
                session,
                client.id,
                seq=1,
                owner="w1",
                state=("states/x/1", "ab" * 32),
                step=0,
                loss_sum=3.0,
                tokens=6.0,
            )
            # A repeat of the commit no longer matches the fence.
            assert not await repo.advance_client(
                session, client.id, seq=1, owner="w1", state=None, step=0, loss_sum=1.0
            )
        row = await _client_row(stack.config.database_url, client.id)
        assert (row.applied_seq, row.lease_owner, row.state_path) == (1, "w1", "states/x/1")
        assert (row.pending_loss_sum, row.pending_tokens) == (3.0, 6.0)
    finally:
        await database.dispose()


async def test_a_job_cancelled_while_running_leaves_no_effect(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ForwardBackward cancelled while in the engine: its commit finds the future
    CANCELLED, nothing of it is committed, the engine that ran it is not reused (the
    next step sees only the next call's examples) and the client moves on."""
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=None)
    entered, release = threading.Event(), threading.Event()
    run_forward_backward = TrainerWorker._forward_backward
    calls: list[int] = []

    def instrumented_forward_backward(
        self: TrainerWorker, engine: Any, request: Any, **options: Any
    ) -> Any:
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert release.wait(_OVERLAP_TIMEOUT), "the test never released the job"
        return run_forward_backward(self, engine, request, **options)

    monkeypatch.setattr(TrainerWorker, "_forward_backward", instrumented_forward_backward)
    stack.start_worker()
    first = await _submit_fb(stack, client.id, corpus_sequences(base_models_dir / BASE_MODEL, 4))
    assert await asyncio.to_thread(entered.wait, _OVERLAP_TIMEOUT)
    cancelled = await stack.futures.CancelFuture(
        common_pb2.CancelFutureRequest(future_id=first.id), metadata=stack.auth
    )
    assert cancelled.future.status == common_pb2.FUTURE_STATUS_CANCELLED
    release.set()
    await forward_backward(stack, client.id, corpus_sequences(base_models_dir / BASE_MODEL, 2))
    result = await optim_step(stack, client.id, learning_rate=1e-2)
    assert result.step == 1 and result.metrics["examples"] == 2.0
    assert (await wait(stack, first)).status == common_pb2.FUTURE_STATUS_CANCELLED
    row = await _client_row(stack.config.database_url, client.id)
    assert (row.applied_seq, row.step) == (3, 1)
