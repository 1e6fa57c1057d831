"""The worker side of TrainOnDataset: server-drawn Poisson batches, one commit per step.

For each step of a run the worker

1. checks that the run's future was not cancelled and that one more Poisson step fits
   the client's budget (the admission reserved the run, so this is a second line);
2. draws the batch: every record independently with probability q
   (:class:`~.sampling.PoissonSampler`, seeded from the OS CSPRNG per run attempt);
3. runs ForwardBackward on the batch in micro-batches (per-example clipping) and
   OptimStep with ``expected_batch_size = q · N``; an empty batch skips the model and
   applies the noise-only update (a zero-sequence batch is not a model input);
4. writes the engine state, then commits in ONE transaction, fenced on the client's
   ``applied_seq`` and the worker's lease: the client's state, step, accountant and
   epsilon; the ledger row with ``PoissonSampledDpEvent(q, Gaussian(sigma))``; one step
   given back from the run's reservation; and the run's progress (losses, batch sizes).

Progress is therefore visible while the run goes on: GetPrivacySpent and
GetTrainingClient report every committed step. A worker that dies mid-run loses at most
the step in flight; the redelivered job resumes after the last committed step with a
freshly seeded sampler (steps are independent draws, so this changes no guarantee).
After the last step the future succeeds with the per-step losses and batch sizes.

What the result reveals: the batch sizes and the mean losses are computed from the data
without noise. They are returned to the dataset's owner only (the tenant who uploaded the
records); the DP guarantee covers the trained adapter, not these diagnostics.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math

from tensafe.common.db import Database
from tensafe.common.errors import FailedPrecondition, NotFound
from tensafe.common.futures import FutureStatus, SqlFutureStore
from tensafe.common.jetstream import RetryLater
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer import serde
from tensafe.trainer.domain.datasets.sampling import PoissonSampler
from tensafe.trainer.domain.datasets.service import DatasetVault
from tensafe.trainer.domain.datasets.steps import StepOutcome, run_step
from tensafe.trainer.domain.engine.accounting import PrivacyAccountant, StepMechanism
from tensafe.trainer.domain.engine.thread import EngineThread
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.domain.ledger import PrivacyLedger, client_dp
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.store import repository as repo
from tensafe.trainer.store.models import JobRow, TrainingClientRow
from tensafe.trainer.store.sql import TrainerTransaction


class RunEnd(enum.Enum):
    """How a run left the worker."""

    SUCCEEDED = "succeeded"
    """Every step committed and the future succeeded."""
    CANCELLED = "cancelled"
    """The future was cancelled; committed steps stay, the rest is released."""


class DatasetRunner:
    """Runs TrainOnDataset jobs for a trainer worker.

    Args:
        database: The trainer's database.
        futures: The futures store.
        objects: The object folder (engine states).
        vault: Dataset keys and objects.
        owner: The worker's lease owner id.
        retry_delay: Delay of a retry after the lease was lost.
        stop: Set when the worker shuts down: a run stops after its current step and
            its job is handed back (it resumes, on any worker, after that step), so a
            long run never holds up a graceful shutdown.
        ledger: The privacy ledger.
    """

    def __init__(
        self,
        *,
        database: Database,
        futures: SqlFutureStore,
        objects: ObjectFolder,
        vault: DatasetVault,
        owner: str,
        retry_delay: float,
        stop: asyncio.Event,
        ledger: PrivacyLedger,
    ) -> None:
        self._stop = stop
        self._ledger = ledger
        self._db = database
        self._futures = futures
        self._objects = objects
        self._vault = vault
        self._owner = owner
        self._retry_delay = retry_delay

    async def run(
        self,
        *,
        job: JobRow,
        client: TrainingClientRow,
        engine: LoraTrainingEngine,
        engine_thread: EngineThread,
        request: pb.TrainOnDatasetRequest,
    ) -> RunEnd:
        """Run (or resume) a TrainOnDataset job to its end.

        Raises:
            TenSafeError: A typed failure (dataset gone, not private, budget, ...): the
                worker fails the future; steps committed before stay committed.
            RetryLater: The lease was lost; the engine must be discarded.
        """
        async with self._db.transaction(read_only=True) as session:
            tx = TrainerTransaction(session)
            run = await tx.dataset_run(job.future_id)
            if run is None:
                raise NotFound(f"the run of job {job.future_id} is missing")
            dataset_row = await tx.get_dataset(job.tenant, run.dataset_id)
        dp = client_dp(client)
        if dp is None:
            raise FailedPrecondition("TrainOnDataset needs a private (DP) training client")
        if engine.accumulated_examples:
            raise FailedPrecondition(
                f"the client holds {engine.accumulated_examples} example(s) from "
                "ForwardBackward calls not yet applied; call OptimStep before TrainOnDataset "
                "(a Poisson step must contain only server-drawn records)"
            )
        dataset = await self._vault.load(dataset_row)
        if dataset.records != dataset_row.records:
            raise FailedPrecondition(f"dataset {dataset_row.id} does not match its metadata")
        adam = serde.adam_config(request.adam_params, present=request.HasField("adam_params"))
        mechanism = StepMechanism.poisson(dp.noise_multiplier, run.sample_rate)
        sampler = PoissonSampler(records=dataset.records, sample_rate=run.sample_rate)
        accountant = self._ledger.accountant(client, dp)
        losses: list[float | None] = json.loads(run.losses_json)
        batch_sizes: list[int] = json.loads(run.batch_sizes_json)
        for _ in range(int(run.steps_done), int(run.steps)):
            if await self._cancelled(job):
                return RunEnd.CANCELLED
            if self._stop.is_set():
                # Hand the client over at once instead of after the lease expires.
                async with self._db.transaction() as session:
                    await repo.release_lease(session, client.id, owner=self._owner)
                raise RetryLater(0.0, "the worker is stopping; the run resumes after its last step")
            await asyncio.to_thread(self._ledger.check_next, client, dp, accountant, mechanism)
            batch = sampler.draw()
            outcome = await engine_thread.run(
                run_step,
                engine,
                dataset,
                batch,
                adam=adam,
                expected_batch_size=run.expected_batch_size,
            )
            losses.append(outcome.mean_loss)
            batch_sizes.append(outcome.batch_size)
            await self._commit_step(
                job, client, accountant, mechanism, outcome, losses=losses, sizes=batch_sizes
            )
        return await self._finish(job, client, losses=losses, sizes=batch_sizes)

    async def _cancelled(self, job: JobRow) -> bool:
        future = await self._futures.get(job.tenant, job.future_id)
        return future.status is FutureStatus.CANCELLED

    async def _commit_step(
        self,
        job: JobRow,
        client: TrainingClientRow,
        accountant: PrivacyAccountant,
        mechanism: StepMechanism,
        outcome: StepOutcome,
        *,
        losses: list[float | None],
        sizes: list[int],
    ) -> None:
        dp_step = accountant.steps + 1
        relative = f"states/{client.id}/{job.seq:012d}-{dp_step:010d}.safetensors"
        sha = await asyncio.to_thread(self._objects.write, relative, outcome.state)
        # The ledger records the step into this accountant (local to the run, so PLD
        # compositions are reused); if the commit fails, run() raises and the
        # accountant is discarded with the engine.
        old_path: str | None = None
        try:
            async with self._db.transaction() as session:
                row = await repo.fence_client(session, client.id, seq=job.seq, owner=self._owner)
                old_path = row.state_path
                row.state_path, row.state_sha256 = relative, sha
                row.step = outcome.step
                tx = TrainerTransaction(session)
                run = await tx.dataset_run(job.future_id)
                assert run is not None
                await self._ledger.commit_step(
                    tx,
                    row,
                    mechanism=mechanism,
                    seq=job.seq,
                    future_id=job.future_id,
                    dataset_id=run.dataset_id,
                    accountant=accountant,
                )
                repo.record_step(
                    session,
                    row,
                    seq=job.seq,
                    future_id=job.future_id,
                    loss=outcome.mean_loss,
                    dp_step=int(row.dp_steps),
                )
                await tx.record_run_progress(
                    job.future_id,
                    steps_done=len(sizes),
                    losses_json=json.dumps(losses),
                    batch_sizes_json=json.dumps(sizes),
                )
        except repo.LostClient as error:
            self._objects.delete(relative)
            raise RetryLater(self._retry_delay, str(error)) from error
        if old_path is not None and old_path != relative:
            self._objects.delete(old_path)

    async def _finish(
        self,
        job: JobRow,
        client: TrainingClientRow,
        *,
        losses: list[float | None],
        sizes: list[int],
    ) -> RunEnd:
        try:
            async with self._db.transaction() as session:
                row = await repo.fence_client(session, client.id, seq=job.seq, owner=self._owner)
                row.applied_seq = job.seq
                result = pb.TrainOnDatasetResult(
                    steps=len(sizes),
                    losses=[math.nan if loss is None else float(loss) for loss in losses],
                    batch_sizes=sizes,
                    privacy_spent=serde.privacy_spent(client_dp(row), self._ledger.report(row)),
                )
                await self._ledger.settle(TrainerTransaction(session), job.future_id)
                await self._futures.succeed(
                    job.tenant, job.future_id, result=serde.pack_result(result), session=session
                )
                await repo.finish_job(session, job.future_id)
        except FailedPrecondition as error:
            if error.reason != "FUTURE_STATE":
                raise
            return RunEnd.CANCELLED
        except repo.LostClient as error:
            raise RetryLater(self._retry_delay, str(error)) from error
        return RunEnd.SUCCEEDED
