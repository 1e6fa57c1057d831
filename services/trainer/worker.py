"""The trainer worker: consumes jobs from JetStream and runs them with the engine.

Run it as ``python -m tensafe.trainer.worker`` (its own process; several may run).

For each delivered job (DESIGN §8):

1. ``seq <= applied_seq``: committed already (a redelivery) — ack and do nothing.
2. ``seq > applied_seq + 1``: an earlier job of the client is not committed yet —
   :class:`~tensafe.common.jetstream.RetryLater`.
3. Take the client's lease (a conditional UPDATE with an expiry; renewed while the job
   runs). Another worker holding an unexpired lease means RetryLater.
4. Use the resident engine if it is at ``applied_seq``; otherwise build it and load the
   last committed state (the object file the client row references).
5. Run the job in a thread (so the consumer's progress signals keep flowing).
6. If the state changed (ForwardBackward, OptimStep, LoadState), write the new state
   object first, keyed by client and seq; then in ONE transaction, under the client's
   row lock and fenced on ``applied_seq == seq - 1`` and the lease: the client's new
   state reference, step and ``applied_seq``; the future's result; for an OptimStep of a
   private client the accountant's new state, the ledger row and the reservation
   consumed; the job leaves the outbox. Only then does the consumer ack.

Several jobs are in flight at once (``TENSAFE_JOBS_IN_FLIGHT``; the consumer's lanes,
:mod:`tensafe.common.jetstream`): jobs of one client never overlap in a process (a later
one waits for the earlier one instead of bouncing through RetryLater), and engine work
on the shared base (building or evicting a client's engine, running a job) holds one
lock, because the active adapter is global model state, and runs on one thread
(:class:`~tensafe.trainer.domain.engine.thread.EngineThread`). What overlaps is one job's
claim and commit transactions, state write and ack with another job's engine step; on a
small step those fixed costs are most of a job's time (docs/trainer.md, Performance).

A ForwardBackward whose client's next job, an OptimStep, is admitted by the time it
leaves the engine is chained with it: the step runs at once on the same engine and
both commit in ONE transaction fenced on the ForwardBackward's ``seq - 1`` and the
lease (one state object, the step's; see ``_chain_optim_step`` and docs/trainer.md,
"A ForwardBackward and the OptimStep after it commit together"). A crash before that
commit loses both; after it, both deliveries are only acked. In a joint pass the steps
of a group's clients run as soon as the group leaves the engine, before the next group
runs, so their commits overlap the next group's compute instead of waiting for the end
of the pass (``_finish_calls``).

A job that fails with a typed error (bad input found by the engine, no data to step
on) fails its future, releases its reservation and advances ``applied_seq`` in the same
way, so the client is never stuck behind it and nothing else changes. A worker killed
at any point loses only the uncommitted job: the message is redelivered after
``ack_wait``, the lease expires, and the next worker resumes from the last committed
state. A redelivered job that did commit finds ``seq <= applied_seq`` and is only
acked, so a step is never applied, nor privacy charged, twice.

The state is persisted after every state-changing job, not every N: a LoRA state (the
adapter, its AdamW moments and the accumulated clipped-gradient sum) is small — well
under 1 MB for the tiny model's r=8 adapter, tens of MB for a 7B model's r=16 — so
per-job persistence costs little and makes recovery exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import Message
from opentelemetry import metrics
from opentelemetry.metrics import Observation
from transformers import AutoTokenizer

from tensafe.common import tls
from tensafe.common.config import load_config
from tensafe.common.db import Database, migrate
from tensafe.common.errors import (
    ConfigError,
    ErrorCode,
    FailedPrecondition,
    TenSafeError,
    Unavailable,
)
from tensafe.common.futures import SqlFutureStore
from tensafe.common.heartbeat import beating
from tensafe.common.jetstream import (
    Consumer,
    Delivery,
    JetStream,
    JetStreamConfig,
    PermanentJobError,
    RetryLater,
)
from tensafe.common.log import configure_logging
from tensafe.common.registry_client import RegistryClient
from tensafe.common.telemetry import setup_telemetry
from tensafe.common.wakeups import FutureWakeups
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer import serde
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.domain.datasets.crypto import keyring_from_settings
from tensafe.trainer.domain.datasets.service import DatasetVault
from tensafe.trainer.domain.engine.accounting import PrivacyAccountant
from tensafe.trainer.domain.engine.base import (
    BaseDtype,
    BaseModelPool,
    BasePlacement,
    resolve_device,
)
from tensafe.trainer.domain.engine.config import DpConfig
from tensafe.trainer.domain.engine.sampling import StopReason, sample
from tensafe.trainer.domain.engine.thread import EngineThread
from tensafe.trainer.domain.engine.training import (
    ForwardBackwardCall,
    ForwardBackwardResult,
    LoraTrainingEngine,
    forward_backward_jointly,
)
from tensafe.trainer.domain.jobs import (
    CHECKPOINT_KIND,
    SAMPLER_KIND,
    JobKind,
    JobMessage,
    checkpoint_path,
    future_wakeup_prefix,
    parse_path,
)
from tensafe.trainer.domain.ledger import PrivacyLedger, client_batches_mechanism, client_dp
from tensafe.trainer.domain.settings import lora_from_json
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.publisher import AdapterPublisher, load_signing_key
from tensafe.trainer.runners.audit import run_audit_job
from tensafe.trainer.runners.datasets import DatasetRunner, RunEnd
from tensafe.trainer.store import repository as repo
from tensafe.trainer.store.models import (
    FUTURES,
    MIGRATIONS,
    VERSION_TABLE,
    CheckpointRow,
    JobRow,
    TrainingClientRow,
)
from tensafe.trainer.store.sql import TrainerStore, TrainerTransaction

log = logging.getLogger(__name__)

# Deliveries after which a job that keeps failing with an unexpected error fails its
# future, so that one poisoned job cannot block its client forever.
_MAX_UNEXPECTED_FAILURES = 5

# Longest redelivery delay of a job that waits for an earlier job of its client.
_MAX_RETRY_DELAY = 1.0

# Chained OptimSteps remembered as committed until their delivery arrives (a delivery
# that went to another worker is forgotten after this many more).
_COMMITTED_AHEAD = 4096

# Jobs whose commit changes only the client row (seq, state, accumulated loss), the
# future and the job: committed in Core statements (TrainerWorker._commit_plain).
_PLAIN_KINDS = frozenset(
    {JobKind.FORWARD_BACKWARD, JobKind.FORWARD, JobKind.SAMPLE, JobKind.COMPUTE_LOGPROBS}
)


@dataclass
class _Resident:
    engine: LoraTrainingEngine
    applied_seq: int


@dataclass
class _Outcome:
    """What running a job produced, before it is committed."""

    result: Message
    state: bytes | None = None
    """The engine's new state when the job changed it."""
    dp_step: bool = False
    """An optimizer step of a private client (charged to the accountant)."""
    checkpoint: tuple[str, str, bytes] | None = None
    """(kind, name, state bytes) for SaveState / SaveWeightsForSampler."""
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    loaded: CheckpointRow | None = None
    """The checkpoint a LoadState loaded (its lineage joins the client's)."""
    engine: LoraTrainingEngine | None = None
    """The engine a ForwardBackward ran on (a following OptimStep may chain onto it)."""


@dataclass
class _Chained:
    """The OptimStep that ran right after its client's ForwardBackward."""

    job: JobRow
    step: _Outcome | None
    """Its outcome; None when it failed unexpectedly (see ``_forward_backward_solo``)."""


@dataclass
class _NextRead:
    """A ForwardBackward running solo, and the read of its client's next job once that
    job waits in the consumer's lane (``TrainerWorker.job_queued``)."""

    job: JobRow
    read: asyncio.Task[tuple[JobRow, Any] | None] | None = None


class _ChainedStepFailed(Exception):
    """A chained OptimStep failed unexpectedly (its engine was evicted)."""


class _PairRefused(Exception):
    """A chained ForwardBackward + OptimStep cannot commit together (a future was
    cancelled or the client deleted meanwhile): roll back; the ForwardBackward commits
    alone from its exported state, or runs again when its state was never exported."""


@dataclass
class _JointCall:
    """A queued ForwardBackward (see ``TrainerWorker._forward_backward_joint``)."""

    job: JobRow
    client: TrainingClientRow
    request: Any
    outcome: asyncio.Future[tuple[_Outcome, _Chained | None]]
    """Its outcome and, when its client's OptimStep was admitted, that step chained."""
    engine: LoraTrainingEngine | None = None


def _joinable(engine: LoraTrainingEngine) -> bool:
    """Whether the engine's ForwardBackward may share a pass (forward_backward_jointly's
    conditions: DP, LoRA dropout 0)."""
    return engine.dp is not None and engine.lora.dropout == 0


def _chunks(calls: list[_JointCall], max_rows: int) -> Iterator[list[_JointCall]]:
    """Consecutive groups of calls of at most ``max_rows`` rows (a call larger than that
    is a group of its own)."""
    group: list[_JointCall] = []
    rows = 0
    for call in calls:
        size = len(call.request.data)
        if group and rows + size > max_rows:
            yield group
            group, rows = [], 0
        group.append(call)
        rows += size
    if group:
        yield group


def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()


def _forward_backward_outcome(
    engine: LoraTrainingEngine, result: ForwardBackwardResult, *, keep: bool, export: bool = True
) -> _Outcome:
    """The job outcome of a ForwardBackward (``keep``) or Forward result; ``export=False``
    leaves a ForwardBackward's state to the caller (who still holds the engine)."""
    message = pb.ForwardBackwardResult(metrics=serde.metrics_map(result.metrics))
    for output in result.outputs:
        entry = message.loss_fn_outputs.add()
        entry.outputs["logprobs"].CopyFrom(serde.float_tensor(output.logprobs))
        entry.outputs["loss"].CopyFrom(serde.float_tensor([output.loss]))
    return _Outcome(
        message,
        state=engine.state_dict() if keep and export else None,
        step=engine.step,
        metrics=result.metrics,
        engine=engine,
    )


class TrainerWorker:
    """Runs trainer jobs; ``handle`` is the JetStream consumer's handler.

    Args:
        database: The trainer's database.
        futures: The futures store.
        objects: The object folder for states and checkpoints.
        base_models: The base model registry.
        owner: This worker's lease owner id (unique per process).
        lease_seconds: Lease duration.
        retry_delay: Delay of RetryLater for out-of-order jobs.
        bases: The worker's shared base models (one per base model, loaded once).
        resident_bytes: Memory for resident clients' own state (adapter, accumulator,
            AdamW moments); least recently used clients are evicted above it.
        ledger: The privacy ledger.
        adapter_publisher: Seals and publishes SaveAdapter jobs (None: refused).
        dataset_runner: Runs TrainOnDataset jobs (None: refused).
        joint_rows: Most rows of one joint ForwardBackward pass of several DP clients
            on one base (0: every ForwardBackward runs alone).
        chain_optim_steps: Run a client's OptimStep that is admitted when its
            ForwardBackward leaves the engine right away, and commit both in one
            transaction (``_chain_optim_step``; False: every job on its own).
    """

    def __init__(
        self,
        *,
        database: Database,
        futures: SqlFutureStore,
        objects: ObjectFolder,
        base_models: BaseModelRegistry,
        owner: str,
        lease_seconds: float,
        retry_delay: float,
        bases: BaseModelPool,
        resident_bytes: int,
        ledger: PrivacyLedger,
        adapter_publisher: AdapterPublisher | None = None,
        dataset_runner: DatasetRunner | None = None,
        joint_rows: int = 0,
        chain_optim_steps: bool = True,
    ) -> None:
        self._db = database
        self._ledger = ledger
        meter = metrics.get_meter(__name__)
        self._engine_loads = meter.create_counter(
            "tensafe.trainer.engine_loads",
            unit="{load}",
            description="Client engines (adapter and state, on the shared base) built by "
            "this worker, by base model and reason: a client not resident, or resident "
            "at another seq.",
        )
        self._base_loads = meter.create_counter(
            "tensafe.trainer.base_loads",
            unit="{load}",
            description="Base models loaded by this worker (once per base model: "
            "switching clients never reloads one).",
        )
        self._futures = futures
        self._objects = objects
        self._base_models = base_models
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._retry_delay = retry_delay
        self._bases = bases
        self._resident_bytes = resident_bytes
        meter.create_observable_gauge(
            "tensafe.trainer.resident_clients",
            callbacks=[lambda _options: [Observation(len(self._resident))]],
            unit="{client}",
            description="Training clients whose state this worker holds in memory.",
        )
        meter.create_observable_gauge(
            "tensafe.trainer.resident_client_bytes",
            callbacks=[lambda _options: [Observation(self._resident_state_bytes())]],
            unit="By",
            description="Memory of the resident clients' own state (adapters, accumulators, "
            "AdamW moments), bounded by TENSAFE_RESIDENT_BYTES.",
        )
        meter.create_observable_gauge(
            "tensafe.trainer.base_model_bytes",
            callbacks=[lambda _options: [Observation(self._bases.resident_bytes())]],
            unit="By",
            description="Memory of the base models this worker has loaded (one copy each).",
        )
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        # Held while anything runs on the shared bases: building, evicting or running a
        # client's engine (peft's active adapter is global state of the base model).
        # Only the database and object I/O of other jobs proceeds meanwhile.
        self._engine_lock = asyncio.Lock()
        # ... and always on this one thread (see its module).
        self._engine_thread = EngineThread()
        self._joint_queue: list[_JointCall] = []
        self._joint_rows = joint_rows
        self._joint_passes = meter.create_counter(
            "tensafe.trainer.joint_passes",
            unit="{pass}",
            description="Forward/backward passes that ran several clients' ForwardBackward "
            "jobs together on one shared base, by number of clients.",
        )
        self._chain_optim_steps = chain_optim_steps
        self._chained_steps = meter.create_counter(
            "tensafe.trainer.chained_optim_steps",
            unit="{step}",
            description="OptimStep jobs run right after their client's ForwardBackward "
            "and committed with it in one transaction.",
        )
        self._wakeups: FutureWakeups | None = None
        # Chained OptimSteps committed before their own delivery reached this worker.
        self._committed_ahead: OrderedDict[str, None] = OrderedDict()
        # OptimSteps that failed unexpectedly when chained (they run on their own).
        self._not_chained: OrderedDict[str, None] = OrderedDict()
        # Per client with a ForwardBackward in _forward_backward_solo: the read of the job
        # after it, started when that job's delivery queues behind it (job_queued).
        self._next_reads: dict[str, _NextRead] = {}
        self._tokenizers: dict[str, Any] = {}
        self._publisher = adapter_publisher
        self._dataset_runner = dataset_runner

    @property
    def owner(self) -> str:
        """This worker's lease owner id."""
        return self._owner

    @property
    def bases(self) -> BaseModelPool:
        """The shared base models this worker has loaded."""
        return self._bases

    def job_queued(self, delivery: Delivery) -> None:
        """The consumer's ``on_queued``: a job waits in its client's lane behind the job
        this worker handles. When that is a ForwardBackward running solo and the waiting
        job is the next one, its row is read now, during the engine step, instead of
        after it (``_forward_backward_solo``); the job is still delivered as usual."""
        try:
            message = JobMessage.decode(delivery.data)
        except PermanentJobError:
            return
        entry = self._next_reads.get(message.client_id)
        if entry is None or entry.read is not None or message.seq != entry.job.seq + 1:
            return
        entry.read = asyncio.create_task(self._following_optim_step(entry.job, message.client_id))
        entry.read.add_done_callback(lambda done: done.cancelled() or done.exception())

    def use_wakeups(self, wakeups: FutureWakeups) -> None:
        """Wake the waiters of a future this worker finishes besides the delivered job's
        (a chained OptimStep's; the delivered job's own wake-up is :func:`waking`'s)."""
        self._wakeups = wakeups

    @property
    def resident_client_ids(self) -> list[str]:
        """Clients whose engines are in memory, least recently used first."""
        return list(self._resident)

    # ---------------------------------------------------------------- handler

    async def handle(self, delivery: Delivery) -> None:
        """Process one job delivery (see the module docstring)."""
        message = JobMessage.decode(delivery.data)
        if message.future_id in self._committed_ahead:
            # A chained OptimStep this worker committed (durably) with its
            # ForwardBackward: only the ack is left (no claim transaction).
            del self._committed_ahead[message.future_id]
            return
        if message.client_id == message.future_id:
            # A lane of its own: only AuditPrivacy jobs are admitted this way (domain/service.py).
            await self._audit(message, delivery)
            return
        # One short write transaction decides what to do: the order check, the lease
        # and the RUNNING mark commit together (a RetryLater rolls it back). Relaxed:
        # losing a lease or a RUNNING mark with the machine is harmless (the commit
        # below fences on the lease and the sequence), and its fsync was a large part
        # of a small job's overhead (docs/trainer.md, Performance).
        # The usual case costs three statements: the job, the claim (order check and
        # lease in one conditional UPDATE ... RETURNING the client) and the RUNNING mark.
        async with self._db.transaction(durable=False) as session:
            job = await repo.get_job(session, message.future_id)
            if job is None or job.client_id != message.client_id or job.seq != message.seq:
                raise PermanentJobError(f"job {message.future_id} does not exist")
            client = await repo.claim_client(
                session,
                job.client_id,
                seq=job.seq,
                owner=self._owner,
                lease_seconds=self._lease_seconds,
            )
            if client is not None:
                # False: cancelled (or finished without advancing the client).
                runnable = await self._futures.try_mark_running(session, job.tenant, job.future_id)
            else:
                client = await session.get(TrainingClientRow, job.client_id)
                if client is None:
                    raise PermanentJobError(f"job {message.future_id} does not exist")
                if job.seq <= client.applied_seq:
                    return  # committed already: a redelivery
                runnable = False  # a deleted client's job
                if client.state == repo.CLIENT_ACTIVE:
                    if job.seq > client.applied_seq + 1:
                        # Grows with each wait so a job queued behind a long one (on
                        # another worker) does not spin, while a merely reordered message
                        # is quick.
                        delay = min(self._retry_delay * delivery.num_delivered, _MAX_RETRY_DELAY)
                        raise RetryLater(delay, f"waits for seq {client.applied_seq + 1}")
                    raise RetryLater(
                        self._retry_delay * 10, "another worker holds the client's lease"
                    )
        if not runnable:
            deleted = client.state != repo.CLIENT_ACTIVE
            await self._finish_without_running(job, client, deleted=deleted)
            return
        renewer = asyncio.create_task(self._renew_lease(client.id))
        try:
            await self._run(job, client, delivery)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _audit(self, message: JobMessage, delivery: Delivery) -> None:
        async with self._db.transaction(read_only=True) as session:
            job = await repo.get_job(session, message.future_id)
        if job is None or job.kind != JobKind.AUDIT_PRIVACY.value:
            raise PermanentJobError(f"job {message.future_id} is not a privacy audit")
        await run_audit_job(
            job,
            database=self._db,
            futures=self._futures,
            base_models=self._base_models,
            deliveries=delivery.num_delivered,
        )

    async def on_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        """Fail the future of a job that will never be processed (if it exists)."""
        with contextlib.suppress(PermanentJobError):
            message = JobMessage.decode(delivery.data)
            async with self._db.transaction(read_only=True) as session:
                job = await repo.get_job(session, message.future_id)
            if job is not None:
                with contextlib.suppress(TenSafeError):
                    await self._futures.fail(
                        job.tenant, job.future_id, code=ErrorCode.INTERNAL, message=str(error)
                    )

    async def _renew_lease(self, client_id: str) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            with contextlib.suppress(TenSafeError):
                async with self._db.transaction(durable=False) as session:
                    await repo.take_lease(
                        session, client_id, owner=self._owner, lease_seconds=self._lease_seconds
                    )

    async def _run(self, job: JobRow, client: TrainingClientRow, delivery: Delivery) -> None:
        kind = JobKind(job.kind)
        request = serde.job_request(kind, job.payload)
        if kind is JobKind.TRAIN_ON_DATASET:
            await self._train_on_dataset(job, client, delivery, request)
            return
        chained: _Chained | None = None
        try:
            checkpoint, extra = await self._prefetch(job, kind, request)
            if kind is JobKind.FORWARD_BACKWARD and self._runs_solo():
                outcome, chained = await self._forward_backward_solo(job, client, request)
            elif kind is JobKind.FORWARD_BACKWARD and self._joint_rows > 0:
                outcome, chained = await self._forward_backward_joint(job, client, request)
            else:
                async with self._engine_lock:
                    resident = await self._engine_for(client)
                    if kind is JobKind.SAVE_ADAPTER:
                        outcome = _Outcome(
                            await self._save_adapter(job, client, resident.engine, request)
                        )
                    else:
                        outcome = await self._engine_thread.run(
                            self._execute, resident.engine, kind, request, extra
                        )
                        if kind is JobKind.LOAD_STATE:
                            outcome.loaded = checkpoint
        except TenSafeError as error:
            # Typed errors are raised before the engine changes (its contract), so the
            # resident engine stays valid; the job fails and the client moves on.
            await self._commit_failure(job, client, error)
            return
        except Exception as error:
            self._invalidate(client.id)
            if delivery.num_delivered >= _MAX_UNEXPECTED_FAILURES:
                log.exception("job %s failed %d times", job.future_id, delivery.num_delivered)
                internal = TenSafeError(f"job failed repeatedly ({type(error).__name__})")
                await self._commit_failure(job, client, internal)
                return
            raise
        if chained is not None:
            if chained.step is None:
                # The chained step failed unexpectedly on an engine that held the
                # ForwardBackward's unexported effect: run it again (without the step).
                raise RetryLater(self._retry_delay, f"chained step {chained.job.future_id} failed")
            if await self._commit_chained(job, client, outcome, chained.job, chained.step):
                return
        elif (
            kind is JobKind.FORWARD_BACKWARD
            and self._chain_optim_steps
            and await self._chain_optim_step(job, client, outcome)
        ):
            return
        try:
            await self._commit_success(job, client, kind, outcome)
        except BaseException:
            # The engine is ahead of the database: never reuse it.
            self._invalidate(client.id)
            raise
        if kind is JobKind.SAVE_ADAPTER and self._publisher is not None:
            self._publisher.forget(job.future_id)

    async def _save_adapter(
        self, job: JobRow, client: TrainingClientRow, engine: LoraTrainingEngine, request: Any
    ) -> pb.SaveAdapterResult:
        """Seal and publish the client's adapter (see :mod:`tensafe.trainer.publisher`)."""
        if self._publisher is None:
            raise FailedPrecondition(
                "SaveAdapter needs a registry: set TENSAFE_REGISTRY_URL and TENSAFE_KEK_DIR "
                "for the trainer workers",
                reason="REGISTRY_NOT_CONFIGURED",
            )
        try:
            return await self._publisher.publish(
                job=job, client=client, engine=engine, request=request
            )
        except Unavailable as error:
            # The registry may have stored the package before the answer was lost: a
            # redelivery publishes the same sealed bytes under the same request id and
            # gets that version back (after a few deliveries the job fails).
            raise RetryLater(self._retry_delay * 20, f"registry unavailable: {error}") from error
        except TenSafeError:
            # Refused for good: the job fails, its sealed bytes are not needed again.
            self._publisher.forget(job.future_id)
            raise

    async def _train_on_dataset(
        self, job: JobRow, client: TrainingClientRow, delivery: Delivery, request: Any
    ) -> None:
        """Run a TrainOnDataset job; its steps commit one by one (see
        :mod:`tensafe.trainer.runners.datasets`)."""
        try:
            if self._dataset_runner is None:
                raise FailedPrecondition(
                    "this worker was built without a dataset runner",
                    reason="NO_DATASET_RUNNER",
                )
            # The whole run holds the engine lock: its steps run back to back on the
            # shared base, while other clients' jobs only do their I/O meanwhile.
            async with self._engine_lock:
                resident = await self._engine_for(client)
                end = await self._dataset_runner.run(
                    job=job,
                    client=client,
                    engine=resident.engine,
                    engine_thread=self._engine_thread,
                    request=request,
                )
        except TenSafeError as error:
            # Steps committed before the error stay; the engine may hold a partial
            # step, so it is rebuilt from the last committed state.
            self._invalidate(client.id)
            await self._commit_failure(job, client, error)
            return
        except Exception as error:
            self._invalidate(client.id)
            if isinstance(error, RetryLater) or delivery.num_delivered < _MAX_UNEXPECTED_FAILURES:
                raise
            log.exception("job %s failed %d times", job.future_id, delivery.num_delivered)
            internal = TenSafeError(f"job failed repeatedly ({type(error).__name__})")
            await self._commit_failure(job, client, internal)
            return
        if end is RunEnd.CANCELLED:
            await self._finish_without_running(job, client, deleted=False)
            return
        resident.applied_seq = job.seq

    # ---------------------------------------------------------------- engines

    async def _engine_for(self, client: TrainingClientRow) -> _Resident:
        """The client's engine at its committed state (the caller holds the engine lock)."""
        resident = self._resident.get(client.id)
        if resident is not None and resident.applied_seq == client.applied_seq:
            self._resident.move_to_end(client.id)
            return resident
        await self._evict(client.id)
        state: bytes | None = None
        if client.state_path is not None:
            assert client.state_sha256 is not None
            state = await asyncio.to_thread(
                self._objects.read, client.state_path, sha256=client.state_sha256
            )
        engine = await self._engine_thread.run(self._build_engine, client, state)
        self._engine_loads.add(
            1,
            {
                "base_model": client.base_model,
                "reason": "stale" if resident is not None else "not_resident",
            },
        )
        resident = _Resident(engine, client.applied_seq)
        self._resident[client.id] = resident
        # Evict by bytes, least recently used first; the client just loaded stays even
        # when it alone exceeds the budget. An evicted client's state is in the database
        # (every state-changing job commits it), so it is reloaded when next used.
        while len(self._resident) > 1 and self._resident_state_bytes() > self._resident_bytes:
            await self._evict(next(iter(self._resident)))
        return resident

    def _resident_state_bytes(self) -> int:
        # list(): the metrics exporter's thread reads this while the loop may evict.
        return sum(r.engine.resident_bytes() for r in list(self._resident.values()))

    def _build_engine(self, client: TrainingClientRow, state: bytes | None) -> LoraTrainingEngine:
        info = self._base_models.get(client.base_model)
        lora, seed = lora_from_json(client.lora_json)
        dp = client_dp(client)
        loads = self._bases.loads
        base = self._bases.get(info.path)
        if self._bases.loads != loads:
            self._base_loads.add(1, {"base_model": client.base_model})
        engine = LoraTrainingEngine(
            base,
            lora=lora,
            dp=(
                DpConfig(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm)
                if dp is not None
                else None
            ),
            seed=seed,
        )
        if state is not None:
            try:
                engine.load_state(state)
            except BaseException:
                engine.close()  # its adapter would otherwise stay on the shared base
                raise
        return engine

    async def _evict(self, client_id: str) -> None:
        # Closing removes the adapter from the shared base: only under the engine lock,
        # and on the engine thread, after any call a cancelled job left running there.
        resident = self._resident.pop(client_id, None)
        if resident is not None:
            await self._engine_thread.run(resident.engine.close)

    def _invalidate(self, client_id: str) -> None:
        """Never reuse the client's resident engine (it may be ahead of the database).

        It is closed by the next ``_engine_for`` of the client, or evicted, under the
        engine lock; marking it here needs no lock, so it is safe in any handler path.
        """
        resident = self._resident.get(client_id)
        if resident is not None:
            resident.applied_seq = -1  # matches no committed seq

    def close(self) -> None:
        """Release every resident engine (when nothing runs any more)."""
        while self._resident:
            _, resident = self._resident.popitem()
            resident.engine.close()
        self._engine_thread.close()

    async def release_leases(self) -> None:
        """Give back the leases of resident clients (graceful shutdown), so another
        worker can take them at once instead of after they expire."""
        for client_id in list(self._resident):
            with contextlib.suppress(TenSafeError):
                async with self._db.transaction() as session:
                    await repo.release_lease(session, client_id, owner=self._owner)

    # ---------------------------------------------------------------- running

    async def _prefetch(
        self, job: JobRow, kind: JobKind, request: Message
    ) -> tuple[CheckpointRow | None, bytes | None]:
        """Read the checkpoint a LoadState or a model_path inference job needs."""
        path: str | None = None
        checkpoint_kind = SAMPLER_KIND
        if kind is JobKind.LOAD_STATE:
            assert isinstance(request, pb.LoadStateRequest)
            path, checkpoint_kind = request.path, CHECKPOINT_KIND
        elif (
            isinstance(request, pb.SampleRequest | pb.ComputeLogprobsRequest) and request.model_path
        ):
            path = request.model_path
        if path is None:
            return None, None
        parsed = parse_path("path", path, kind=checkpoint_kind)
        async with self._db.transaction(read_only=True) as session:
            row = await repo.get_checkpoint(
                session, job.tenant, parsed.client_id, checkpoint_kind, parsed.name
            )
        data = await asyncio.to_thread(self._objects.read, row.object_path, sha256=row.sha256)
        return row, data

    # ---------------------------------------------------------- joint steps

    async def _forward_backward_joint(
        self, job: JobRow, client: TrainingClientRow, request: Any
    ) -> tuple[_Outcome, _Chained | None]:
        """A ForwardBackward that may share one forward/backward pass with other clients'.

        The job queues its call, then takes the engine lock. Whichever job holds the
        lock runs the calls queued by then (at most one per client: a client's jobs
        never overlap in this worker) — the DP calls on one shared base together through
        :func:`forward_backward_jointly` in groups of at most ``joint_rows`` rows, each
        row through its own client's adapter and clipped into its own client's sum, the
        others one by one — until its own call is settled, and leaves the later groups
        to the next job to get the lock. A job whose call ran in another job's pass finds
        its outcome ready when it gets the lock. Each job
        still commits on its own, fenced on its own client's sequence and lease, so a
        worker killed mid-pass loses only uncommitted jobs (every one is redelivered and
        rebuilt from its client's last committed state), and one job's failed commit
        invalidates only its own client's engine.

        Returns:
            The outcome and, when the client's next job was an admitted OptimStep, that
            step, run right after the call's group left the engine (``_finish_calls``).
        """
        call = _JointCall(job, client, request, asyncio.get_running_loop().create_future())
        self._joint_queue.append(call)
        async with self._engine_lock:
            if not call.outcome.done():
                queued, self._joint_queue = self._joint_queue, []
                try:
                    left = await self._run_queued(queued, call)
                except BaseException:
                    # Interrupted (cancelled at shutdown): an engine whose call may have
                    # run in a thread is never reused, and its job fails this delivery
                    # (redelivered, rebuilt from the committed state), never waits.
                    for other in queued:
                        if not other.outcome.done():
                            self._invalidate(other.client.id)
                            if other is not call:
                                other.outcome.set_exception(
                                    RuntimeError("a joint ForwardBackward was interrupted")
                                )
                    raise
                # Each call left waits for the engine lock in its own job: the first of
                # them to get it runs them (and whatever queued meanwhile).
                self._joint_queue[:0] = left
        return await call.outcome

    async def _run_queued(self, queued: list[_JointCall], mine: _JointCall) -> list[_JointCall]:
        """Run queued ForwardBackward calls group by group (the caller holds the engine
        lock) until the caller's own call ``mine`` is settled; every call run has its
        outcome set, to a result or to the error its job would have raised.

        Returns:
            The calls not run: the caller's job goes on to commit while the next of
            their jobs to get the engine lock runs them.
        """
        while queued:
            ready: list[_JointCall] = []
            for call in queued:
                try:
                    call.engine = (await self._engine_for(call.client)).engine
                    ready.append(call)
                except Exception as error:
                    call.outcome.set_exception(error)
            # Building one client's engine can evict another's (least recently used, by
            # bytes): those are left for the next round.
            live = [c for c in ready if self._resident_engine(c.client.id) is c.engine]
            queued = [c for c in ready if c not in live]
            groups: list[list[_JointCall]] = []
            joint: dict[int, list[_JointCall]] = {}
            for call in live:
                engine = call.engine
                assert engine is not None
                if _joinable(engine):
                    joint.setdefault(id(engine.base), []).append(call)
                else:
                    groups.append([call])
            for calls in joint.values():
                groups.extend(_chunks(calls, self._joint_rows))
            for index, group in enumerate(groups):
                if mine.outcome.done():
                    return [c for later in groups[index:] for c in later] + queued
                await self._run_together(group)
        return []

    async def _run_together(self, calls: list[_JointCall]) -> None:
        if len(calls) == 1:
            await self._run_alone(calls[0])
            return
        reads = self._read_following_steps(calls)
        try:
            outcomes = await self._engine_thread.run(self._execute_jointly, calls)
        except TenSafeError:
            _cancel(reads)
            # A call is invalid; no engine changed (forward_backward_jointly's contract).
            # One by one, each job gets its own answer, the invalid one its error.
            for call in calls:
                await self._run_alone(call)
            return
        except Exception as error:
            _cancel(reads)
            for call in calls:
                call.outcome.set_exception(error)
            return
        except BaseException:
            # Cancelled: the outcomes stay unset, so _forward_backward_joint evicts
            # the engines the pass's thread may still change.
            _cancel(reads)
            raise
        self._joint_passes.add(1, {"clients": str(len(calls))})
        log.debug("one forward/backward pass ran %d clients' ForwardBackward jobs", len(calls))
        await self._finish_calls(calls, outcomes, reads)

    async def _run_alone(self, call: _JointCall) -> None:
        assert call.engine is not None
        reads = self._read_following_steps([call])
        try:
            outcome = await self._engine_thread.run(
                self._forward_backward, call.engine, call.request, keep=True, export=False
            )
        except Exception as error:
            _cancel(reads)
            call.outcome.set_exception(error)
            return
        except BaseException:
            _cancel(reads)  # (cancelled: as in _run_together)
            raise
        await self._finish_calls([call], [outcome], reads)

    def _read_following_steps(
        self, calls: list[_JointCall]
    ) -> list[asyncio.Task[tuple[JobRow, Any] | None]]:
        """Start reading each call's client's next job, which the engine's pass then
        need not wait for (read-only transactions: no writer lock)."""
        reads: list[asyncio.Task[tuple[JobRow, Any] | None]] = []
        for call in calls:
            read = asyncio.create_task(self._following_step(call))
            read.add_done_callback(lambda done: done.cancelled() or done.exception())
            reads.append(read)
        return reads

    async def _following_step(self, call: _JointCall) -> tuple[JobRow, Any] | None:
        if not self._chain_optim_steps:
            return None
        return await self._following_optim_step(call.job, call.client.id)

    async def _finish_calls(
        self,
        calls: list[_JointCall],
        outcomes: list[_Outcome],
        reads: list[asyncio.Task[tuple[JobRow, Any] | None]],
    ) -> None:
        """Settle calls whose ForwardBackward ran and was not exported (the caller holds
        the engine lock): each client's admitted OptimStep runs now, on the engine as the
        call left it (``_chain_or_export``), and the job, woken, commits the pair while
        the engine goes on with the next group; a call with no step to chain exports its
        state. Until this ran, a pair's commit waited for the engine lock behind every
        group of the pass (the steps ran one by one after it), so the pass's commits
        never overlapped its compute."""
        try:
            for call, outcome, read in zip(calls, outcomes, reads, strict=True):
                assert call.engine is not None
                try:
                    following = await read
                except Exception:
                    log.warning(
                        "reading the job after %s failed", call.job.future_id, exc_info=True
                    )
                    following = None  # the step is not chained: it runs on its own
                try:
                    settled = await self._chain_or_export(
                        call.engine, call.client.id, outcome, following
                    )
                except Exception as error:
                    call.outcome.set_exception(error)
                    continue
                call.outcome.set_result(settled)
        except BaseException:
            # Cancelled: the calls not settled keep no outcome, and
            # _forward_backward_joint evicts their engines.
            _cancel(reads)
            raise

    async def _chain_or_export(
        self,
        engine: LoraTrainingEngine,
        client_id: str,
        outcome: _Outcome,
        following: tuple[JobRow, Any] | None,
    ) -> tuple[_Outcome, _Chained | None]:
        """Run the admitted OptimStep ``following`` a ForwardBackward's ``outcome`` on
        ``engine`` (the caller holds the engine lock, the engine is exactly at that
        ForwardBackward, whose state was not exported); without one, or when it fails
        with a typed error, export the ForwardBackward's state instead.

        Returns:
            The outcome and the chained step; its ``step`` is None when it failed
            unexpectedly (the engine was evicted: the ForwardBackward runs again).
        """
        if following is not None:
            following_job, request = following
            try:
                step = await self._step_chained(engine, client_id, following_job, request)
            except _ChainedStepFailed:
                return outcome, _Chained(following_job, None)
            if step is not None:
                return outcome, _Chained(following_job, step)
        outcome.state = await self._engine_thread.run(engine.state_dict)
        return outcome, None

    def _execute_jointly(self, calls: list[_JointCall]) -> list[_Outcome]:
        pairs: list[tuple[LoraTrainingEngine, ForwardBackwardCall]] = []
        for call in calls:
            assert call.engine is not None
            batch = serde.batch_from_data(call.request.data)
            pairs.append(
                (
                    call.engine,
                    ForwardBackwardCall(
                        batch=batch.sequences,
                        loss_fn=call.request.loss_fn,
                        loss_fn_inputs=batch.loss_fn_inputs,
                        loss_fn_config=dict(call.request.loss_fn_config),
                    ),
                )
            )
        results = forward_backward_jointly(pairs)
        # Not exported: _finish_calls steps or exports each engine.
        return [
            _forward_backward_outcome(engine, result, keep=True, export=False)
            for (engine, _), result in zip(pairs, results, strict=True)
        ]

    def _resident_engine(self, client_id: str) -> LoraTrainingEngine | None:
        resident = self._resident.get(client_id)
        return resident.engine if resident is not None else None

    def _execute(
        self, engine: LoraTrainingEngine, kind: JobKind, request: Any, extra: bytes | None
    ) -> _Outcome:
        if kind is JobKind.FORWARD_BACKWARD:
            return self._forward_backward(engine, request, keep=True)
        if kind is JobKind.FORWARD:
            return self._forward_backward(engine, request, keep=False)
        if kind is JobKind.OPTIM_STEP:
            adam = serde.adam_config(request.adam_params, present=request.HasField("adam_params"))
            examples = engine.accumulated_examples
            result = engine.optim_step(adam)
            metrics = {**result.metrics, "examples": float(examples)}
            return _Outcome(
                pb.OptimStepResult(step=result.step, metrics=serde.metrics_map(metrics)),
                state=engine.state_dict(),
                dp_step=engine.dp is not None,
                step=result.step,
                metrics=metrics,
            )
        if kind is JobKind.SAMPLE:
            return self._with_weights(engine, extra, lambda: self._sample(engine, request))
        if kind is JobKind.COMPUTE_LOGPROBS:
            return self._with_weights(engine, extra, lambda: self._logprobs(engine, request))
        if kind is JobKind.SAVE_STATE:
            return _Outcome(
                pb.SaveStateResult(
                    path=checkpoint_path(request.training_client_id, CHECKPOINT_KIND, request.name),
                    step=engine.step,
                ),
                checkpoint=(CHECKPOINT_KIND, request.name, engine.state_dict()),
                step=engine.step,
            )
        if kind is JobKind.SAVE_WEIGHTS_FOR_SAMPLER:
            return _Outcome(
                pb.SaveWeightsForSamplerResult(
                    path=checkpoint_path(request.training_client_id, SAMPLER_KIND, request.name)
                ),
                checkpoint=(SAMPLER_KIND, request.name, engine.state_dict()),
                step=engine.step,
            )
        if kind is JobKind.LOAD_STATE:
            assert extra is not None
            engine.load_state(extra)
            return _Outcome(
                pb.LoadStateResult(step=engine.step), state=engine.state_dict(), step=engine.step
            )
        raise PermanentJobError(f"unknown job kind {kind}")

    def _forward_backward(
        self, engine: LoraTrainingEngine, request: Any, *, keep: bool, export: bool = True
    ) -> _Outcome:
        batch = serde.batch_from_data(request.data)
        run = engine.forward_backward if keep else engine.forward
        result = run(
            batch.sequences, request.loss_fn, batch.loss_fn_inputs, dict(request.loss_fn_config)
        )
        return _forward_backward_outcome(engine, result, keep=keep, export=export)

    def _with_weights(
        self, engine: LoraTrainingEngine, weights: bytes | None, run: Any
    ) -> _Outcome:
        if weights is None:
            outcome: _Outcome = run()
            return outcome
        snapshot = engine.state_dict()
        engine.load_state(weights)
        try:
            outcome = run()
        finally:
            engine.load_state(snapshot)
        return outcome

    def _sample(self, engine: LoraTrainingEngine, request: pb.SampleRequest) -> _Outcome:
        params = serde.sampling_params(request)
        tokenizer = None
        if params.stop_strings:
            tokenizer = self._tokenizer(engine)
        output = sample(
            engine.model,
            [serde.model_input_tokens(request.prompt)],
            params,
            tokenizer=tokenizer,
        )
        message = pb.SampleResult()
        for sequence in output.sequences[0]:
            message.sequences.add(
                tokens=list(sequence.tokens),
                logprobs=list(sequence.logprobs),
                stop_reason=(
                    pb.STOP_REASON_STOP
                    if sequence.stop_reason is StopReason.STOP
                    else pb.STOP_REASON_LENGTH
                ),
            )
        return _Outcome(message)

    def _tokenizer(self, engine: LoraTrainingEngine) -> Any:
        base_dir = str(engine.base_model_dir)
        if base_dir not in self._tokenizers:
            try:
                self._tokenizers[base_dir] = AutoTokenizer.from_pretrained(base_dir)
            except (OSError, ValueError) as error:
                raise FailedPrecondition(
                    f"the base model has no tokenizer, so string stop sequences cannot be "
                    f"matched: {error}"
                ) from error
        return self._tokenizers[base_dir]

    def _logprobs(self, engine: LoraTrainingEngine, request: pb.ComputeLogprobsRequest) -> _Outcome:
        sequences = [serde.model_input_tokens(s) for s in request.sequences]
        values = engine.compute_logprobs(sequences)
        message = pb.ComputeLogprobsResult()
        for logprobs in values:
            message.sequences.add(logprobs=[0.0, *logprobs], first_token_has_logprob=False)
        return _Outcome(message)

    # ---------------------------------------------------------------- commits

    async def _commit_success(
        self, job: JobRow, client: TrainingClientRow, kind: JobKind, outcome: _Outcome
    ) -> None:
        new_state: tuple[str, str] | None = None
        if outcome.state is not None:
            relative = f"states/{client.id}/{job.seq:012d}.safetensors"
            sha = await asyncio.to_thread(self._objects.write, relative, outcome.state)
            new_state = (relative, sha)
        checkpoint_object: tuple[str, str] | None = None
        if outcome.checkpoint is not None:
            checkpoint_kind, name, data = outcome.checkpoint
            relative = (
                f"checkpoints/{client.id}/{checkpoint_kind}/{name}-{job.seq:012d}.safetensors"
            )
            sha = await asyncio.to_thread(self._objects.write, relative, data)
            checkpoint_object = (relative, sha)
        old_paths: list[str] = []
        try:
            if kind in _PLAIN_KINDS:
                await self._commit_plain(job, client, kind, outcome, new_state)
                if new_state is not None and client.state_path is not None:
                    old_paths.append(client.state_path)
            else:
                await self._commit_locked(
                    job, client, kind, outcome, new_state, checkpoint_object, old_paths
                )
        except FailedPrecondition as error:
            if error.reason != "FUTURE_STATE":
                raise
            # Cancelled while running: discard the effect, move the client on.
            self._invalidate(client.id)
            await self._finish_without_running(job, client, deleted=False)
            return
        except repo.LostClient as error:
            raise RetryLater(self._retry_delay, str(error)) from error
        resident = self._resident.get(client.id)
        if resident is not None:
            resident.applied_seq = job.seq
        for path in old_paths:
            self._objects.delete(path)

    async def _commit_plain(
        self,
        job: JobRow,
        client: TrainingClientRow,
        kind: JobKind,
        outcome: _Outcome,
        new_state: tuple[str, str] | None,
    ) -> None:
        """Commit a job that changes only the client row and its future, in Core
        statements: the fenced client update, the future, the job (three round trips,
        where the ORM's read, flush and read-back took five).

        Raises:
            LostClient: The client moved on or the lease was lost.
            FailedPrecondition: The future was cancelled while the job ran (FUTURE_STATE).
        """
        loss_sum = tokens = 0.0
        if kind is JobKind.FORWARD_BACKWARD:
            # The loss of the gradients the next step applies (ListTrainingSteps).
            loss_sum, tokens = outcome.metrics["loss:sum"], outcome.metrics["tokens:sum"]
        async with self._db.transaction() as session:
            advanced = await repo.advance_client(
                session,
                client.id,
                seq=job.seq,
                owner=self._owner,
                state=new_state,
                step=outcome.step,
                loss_sum=loss_sum,
                tokens=tokens,
            )
            if not advanced:
                raise repo.LostClient(f"client {client.id} moved on or its lease was lost")
            await self._succeed(session, job, outcome.result)
            await repo.finish_job(session, job.future_id)

    async def _commit_locked(
        self,
        job: JobRow,
        client: TrainingClientRow,
        kind: JobKind,
        outcome: _Outcome,
        new_state: tuple[str, str] | None,
        checkpoint_object: tuple[str, str] | None,
        old_paths: list[str],
    ) -> None:
        """Commit a job that charges the ledger, saves a checkpoint or loads one, under
        the client's row lock (appends the objects it replaces to ``old_paths``)."""
        prepared = (
            await self._prepare_charge(client, outcome) if kind is JobKind.OPTIM_STEP else None
        )
        async with self._db.transaction() as session:
            row = await repo.fence_client(session, client.id, seq=job.seq, owner=self._owner)
            row.applied_seq = job.seq
            if new_state is not None:
                if row.state_path is not None:
                    old_paths.append(row.state_path)
                row.state_path, row.state_sha256 = new_state
                row.step = outcome.step
            result = outcome.result
            if kind is JobKind.OPTIM_STEP:
                await self._record_optim_step(session, row, job, outcome, prepared)
            elif kind is JobKind.LOAD_STATE:
                # The loaded state replaces whatever gradients were accumulated.
                row.pending_loss_sum, row.pending_tokens = 0.0, 0.0
            if outcome.loaded is not None:
                # Normally inherited at admission already; a checkpoint replaced
                # since then brings its own history too (merging is idempotent).
                await self._ledger.inherit(
                    TrainerTransaction(session), row, outcome.loaded, future_id=job.future_id
                )
            if outcome.checkpoint is not None and checkpoint_object is not None:
                checkpoint_kind, name, _ = outcome.checkpoint
                replaced = await repo.replace_checkpoint(
                    session,
                    CheckpointRow(
                        id=uuid.uuid4().hex,
                        tenant=row.tenant,
                        client_id=row.id,
                        kind=checkpoint_kind,
                        name=name,
                        seq=job.seq,
                        step=outcome.step,
                        object_path=checkpoint_object[0],
                        sha256=checkpoint_object[1],
                        accountant_state=row.accountant_state,
                        lineage_json=self._ledger.snapshot(row),
                        created_at=repo.now(),
                    ),
                )
                if replaced is not None:
                    old_paths.append(replaced.object_path)
            await self._succeed(session, job, result)
            await repo.finish_job(session, job.future_id)

    async def _prepare_charge(
        self, client: TrainingClientRow, outcome: _Outcome
    ) -> PrivacyAccountant | None:
        """Before an OptimStep's commit: its charge composed ahead, when the accountant
        is slow (``PrivacyLedger.prepare_step``), so the transaction composes nothing."""
        dp = client_dp(client)
        if dp is None or not outcome.dp_step:
            return None
        return await self._ledger.prepare_step(client, client_batches_mechanism(dp))

    async def _record_optim_step(
        self,
        session: repo.Session,
        row: TrainingClientRow,
        job: JobRow,
        outcome: _Outcome,
        prepared: PrivacyAccountant | None,
    ) -> None:
        """An OptimStep's effects on the locked client row (its state reference set
        already), in the commit's transaction: for a private client the accountant's new
        state and the ledger row (from ``prepared``, :meth:`_prepare_charge`'s, when it
        is still the client's), the reservation consumed, the step's history row with
        the loss accumulated since the last step; sets the result's privacy report."""
        result = outcome.result
        assert isinstance(result, pb.OptimStepResult)
        dp = client_dp(row)
        if dp is not None and outcome.dp_step:
            await self._ledger.commit_step(
                TrainerTransaction(session),
                row,
                mechanism=client_batches_mechanism(dp),
                seq=job.seq,
                future_id=job.future_id,
                accountant=prepared,
            )
        result.privacy_spent.CopyFrom(serde.privacy_spent(dp, self._ledger.report(row)))
        await self._ledger.settle(TrainerTransaction(session), job.future_id)
        tokens = float(row.pending_tokens)
        repo.record_step(
            session,
            row,
            seq=job.seq,
            future_id=job.future_id,
            loss=float(row.pending_loss_sum) / tokens if tokens > 0 else None,
            dp_step=int(row.dp_steps) if dp is not None and outcome.dp_step else None,
        )
        row.pending_loss_sum, row.pending_tokens = 0.0, 0.0

    # ------------------------------------------------------- chained steps

    async def _chain_optim_step(
        self, job: JobRow, client: TrainingClientRow, outcome: _Outcome
    ) -> bool:
        """Run the client's next job right after its ForwardBackward ``job`` when it is an
        OptimStep admitted already, and commit both in one transaction.

        A Tinker client sends ForwardBackward and OptimStep back to back, so the step is
        usually admitted while the ForwardBackward is in the engine. Committed one by one,
        the pair cost two state objects, two commits and the step's claim between them
        (docs/trainer.md, Performance). Chained, the engine (which holds this worker's
        lease and is exactly at the ForwardBackward's effect: a client's jobs never
        overlap in a process) steps at once, and ONE transaction, fenced on
        ``applied_seq == job.seq - 1`` and the lease, commits both: the ForwardBackward's
        future and loss, the step's state object (the only one written), ledger row,
        reservation and future, ``applied_seq`` past both, both jobs out of the outbox.
        A worker killed before that commit committed neither: both messages come back,
        and the ForwardBackward runs again from the last committed state. After it, both
        deliveries find ``seq <= applied_seq`` and are only acked. The step's own
        delivery is not waited for (its job row is the admitted job, the sequence fixes
        its place); its waiters are woken here.

        Returns:
            True when both committed; False when nothing was chained (no OptimStep
            next, the engine no longer resident as the ForwardBackward left it, the step
            failed or a future was cancelled meanwhile): the caller commits the
            ForwardBackward alone, from its own state, and the OptimStep runs on its own.

        Raises:
            RetryLater: The client moved on or the lease was lost (nothing committed).
        """
        following = await self._following_optim_step(job, client.id)
        if following is None:
            return False
        following_job, request = following
        async with self._engine_lock:
            resident = self._resident.get(client.id)
            if (
                resident is None
                or resident.engine is not outcome.engine
                or resident.applied_seq != job.seq - 1
            ):
                return False
            try:
                step = await self._step_chained(resident.engine, client.id, following_job, request)
            except _ChainedStepFailed:
                return False
            if step is None:
                return False
        return await self._commit_chained(job, client, outcome, following_job, step)

    async def _step_chained(
        self, engine: LoraTrainingEngine, client_id: str, following_job: JobRow, request: Any
    ) -> _Outcome | None:
        """Run a chained OptimStep on ``engine`` (the caller holds the engine lock).

        Returns:
            Its outcome; None when it failed with a typed error (the engine is unchanged,
            by its contract: the step then fails on its own delivery).

        Raises:
            _ChainedStepFailed: It failed unexpectedly; the engine, possibly half
                stepped, is evicted and the step is never chained again here.
        """
        try:
            return await self._engine_thread.run(
                self._execute, engine, JobKind.OPTIM_STEP, request, None
            )
        except TenSafeError:
            return None
        except Exception as error:
            log.warning("chained OptimStep %s failed", following_job.future_id, exc_info=True)
            await self._evict(client_id)
            self._unchainable(following_job.future_id)
            raise _ChainedStepFailed from error

    def _runs_solo(self) -> bool:
        """Whether a ForwardBackward may run with the OptimStep after it in one hold of
        the engine (``_forward_backward_solo``): no other client's job waits for the
        engine or queues for a joint pass, which it would otherwise join."""
        return self._chain_optim_steps and not self._engine_lock.locked() and not self._joint_queue

    async def _forward_backward_solo(
        self, job: JobRow, client: TrainingClientRow, request: Any
    ) -> tuple[_Outcome, _Chained | None]:
        """A ForwardBackward and, if admitted already, its client's OptimStep after it,
        in one hold of the engine lock (``_chain_optim_step``'s chain, minus a state
        export: the ForwardBackward's state is exported only when no step follows).

        Returns:
            The ForwardBackward's outcome (its state None when a step ran after it) and
            the chained step, if any.

        Raises:
            TenSafeError: The ForwardBackward's typed error (the engine is unchanged).
        """
        client_id = client.id
        async with self._engine_lock:
            resident = await self._engine_for(client)
            engine = resident.engine
            entry = _NextRead(job)
            self._next_reads[client_id] = entry
            try:
                outcome = await self._engine_thread.run(
                    self._forward_backward, engine, request, keep=True, export=False
                )
                following: tuple[JobRow, Any] | None = None
                read = False
                if entry.read is not None:
                    # Read while the engine ran; an error there: read again below.
                    with contextlib.suppress(Exception):
                        following, read = await entry.read, True
                if not read:
                    following = await self._following_optim_step(job, client_id)
            finally:
                if self._next_reads.get(client_id) is entry:
                    del self._next_reads[client_id]
                if entry.read is not None and not entry.read.done():
                    entry.read.cancel()
            return await self._chain_or_export(engine, client_id, outcome, following)

    async def _following_optim_step(self, job: JobRow, client_id: str) -> tuple[JobRow, Any] | None:
        """The client's job after ``job`` and its request, if it is an OptimStep admitted
        already (and not cancelled) that may chain."""
        async with self._db.transaction(read_only=True) as session:
            following = await repo.queued_job_at(session, client_id, job.seq + 1)
        if (
            following is None
            or following.kind != JobKind.OPTIM_STEP.value
            or following.tenant != job.tenant
            or following.future_id in self._not_chained
        ):
            return None
        return following, serde.job_request(JobKind.OPTIM_STEP, following.payload)

    def _unchainable(self, future_id: str) -> None:
        """Never chain this OptimStep again in this worker (it failed unexpectedly when
        chained: it runs on its own, and fails there after its own retries)."""
        self._not_chained[future_id] = None
        while len(self._not_chained) > _COMMITTED_AHEAD:
            self._not_chained.popitem(last=False)

    async def _commit_chained(
        self,
        job: JobRow,
        client: TrainingClientRow,
        outcome: _Outcome,
        following: JobRow,
        step: _Outcome,
    ) -> bool:
        """Commit a chained pair (``_commit_pair``), then wake the step's waiters.

        Returns:
            False when the pair was refused (a future cancelled, the client deleted
            meanwhile) and the ForwardBackward's own state is at hand: the caller
            commits it alone.

        Raises:
            RetryLater: The client moved on or the lease was lost; or the pair was
                refused and the ForwardBackward's state was never exported (it runs
                again, and its claim sees the cancellation or the deletion).
        """
        try:
            await self._commit_pair(job, following, client, outcome, step)
        except _PairRefused as error:
            async with self._engine_lock:
                await self._evict(client.id)  # it holds the uncommitted step
            if outcome.state is None:
                raise RetryLater(self._retry_delay, str(error)) from error
            return False
        except repo.LostClient as error:
            self._invalidate(client.id)
            raise RetryLater(self._retry_delay, str(error)) from error
        except BaseException:
            self._invalidate(client.id)
            raise
        self._chained_steps.add(1)
        self._committed_ahead[following.future_id] = None
        while len(self._committed_ahead) > _COMMITTED_AHEAD:
            self._committed_ahead.popitem(last=False)
        if self._wakeups is not None:
            await self._wakeups.notify(following.future_id)
        return True

    async def _commit_pair(
        self,
        job: JobRow,
        following: JobRow,
        client: TrainingClientRow,
        outcome: _Outcome,
        step: _Outcome,
    ) -> None:
        """Commit a ForwardBackward ``job`` and the OptimStep ``following`` it in one
        transaction (see :meth:`_chain_optim_step`).

        Raises:
            _PairRefused: A future was cancelled or the client deleted (rolled back).
            LostClient: The client moved on or the lease was lost (rolled back).
        """
        assert step.state is not None
        prepared = await self._prepare_charge(client, step)
        relative = f"states/{client.id}/{following.seq:012d}.safetensors"
        # The object is written (and fsynced) while the transaction's statements run;
        # the transaction awaits it before it references it and commits.
        write = asyncio.ensure_future(asyncio.to_thread(self._objects.write, relative, step.state))
        old_paths: list[str] = []
        try:
            async with self._db.transaction() as session:
                row = await repo.fence_client(session, client.id, seq=job.seq, owner=self._owner)
                if row.state != repo.CLIENT_ACTIVE:
                    raise _PairRefused(f"client {client.id} was deleted")
                # The ForwardBackward: its result, and the loss the step applies.
                if not await self._futures.try_succeed(
                    session, job.tenant, job.future_id, result=serde.pack_result(outcome.result)
                ):
                    raise _PairRefused(f"future {job.future_id} was cancelled")
                row.pending_loss_sum = float(row.pending_loss_sum) + outcome.metrics["loss:sum"]
                row.pending_tokens = float(row.pending_tokens) + outcome.metrics["tokens:sum"]
                # The OptimStep, as _commit_locked commits it.
                row.applied_seq = following.seq
                row.step = step.step
                await self._record_optim_step(session, row, following, step, prepared)
                if not await self._futures.try_succeed(
                    session,
                    following.tenant,
                    following.future_id,
                    result=serde.pack_result(step.result),
                ):
                    raise _PairRefused(f"future {following.future_id} was cancelled")
                await repo.finish_jobs(session, [job.future_id, following.future_id])
                if row.state_path is not None:
                    old_paths.append(row.state_path)
                row.state_path, row.state_sha256 = relative, await write
        except BaseException as error:
            if not write.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(write)
            if isinstance(error, _PairRefused):
                # Unreferenced (rolled back), and this worker still holds the lease.
                self._objects.delete(relative)
            raise
        resident = self._resident.get(client.id)
        if resident is not None:
            resident.applied_seq = following.seq
        for path in old_paths:
            self._objects.delete(path)

    async def _succeed(self, session: repo.Session, job: JobRow, result: Message) -> None:
        """The job's future SUCCEEDED, in the commit's transaction (no read-back).

        Raises:
            FailedPrecondition: The future was cancelled while the job ran (FUTURE_STATE).
        """
        succeeded = await self._futures.try_succeed(
            session, job.tenant, job.future_id, result=serde.pack_result(result)
        )
        if not succeeded:
            raise FailedPrecondition(f"future {job.future_id} was cancelled", reason="FUTURE_STATE")

    async def _commit_failure(
        self, job: JobRow, client: TrainingClientRow, error: TenSafeError
    ) -> None:
        try:
            async with self._db.transaction() as session:
                row = await repo.fence_client(session, client.id, seq=job.seq, owner=self._owner)
                row.applied_seq = job.seq
                with contextlib.suppress(FailedPrecondition):
                    await self._futures.fail(
                        job.tenant,
                        job.future_id,
                        code=error.code,
                        message=error.message,
                        reason=error.reason,
                        session=session,
                    )
                await self._ledger.release(TrainerTransaction(session), job.future_id)
                await repo.finish_job(session, job.future_id)
        except repo.LostClient as lost:
            raise RetryLater(self._retry_delay, str(lost)) from lost
        resident = self._resident.get(client.id)
        if resident is not None and resident.applied_seq == job.seq - 1:
            # (An engine invalidated by the failure stays invalid.)
            resident.applied_seq = job.seq

    async def _finish_without_running(
        self, job: JobRow, client: TrainingClientRow, *, deleted: bool
    ) -> None:
        """A cancelled job, or one of a deleted client: release, fail and move on."""
        async with self._db.transaction() as session:
            row = await session.get(
                TrainingClientRow, client.id, with_for_update=True, populate_existing=True
            )
            assert row is not None
            if row.applied_seq == job.seq - 1 and (
                deleted or row.lease_owner in (None, self._owner)
            ):
                row.applied_seq = job.seq
            if deleted:
                with contextlib.suppress(FailedPrecondition):
                    await self._futures.fail(
                        job.tenant,
                        job.future_id,
                        code=ErrorCode.NOT_FOUND,
                        message=f"training client {client.id} was deleted",
                        session=session,
                    )
            await self._ledger.release(TrainerTransaction(session), job.future_id)
            await repo.finish_job(session, job.future_id)
        resident = self._resident.get(client.id)
        if resident is not None and resident.applied_seq == job.seq - 1:
            resident.applied_seq = job.seq


# -------------------------------------------------------------------- process


def jobs_stream_config(config: TrainerConfig, *, durable: str | None) -> JetStreamConfig:
    """The JetStream settings of the trainer's job stream."""
    return JetStreamConfig(
        url=config.nats_url,
        stream=config.jobs_stream,
        subjects=(f"{config.jobs_subject_prefix}.>",),
        durable=durable,
        ack_wait=config.job_ack_wait_seconds,
        # Waiting for an earlier job (RetryLater) counts as a delivery; a job is never
        # dropped for that. A job that keeps failing unexpectedly is failed by the
        # worker itself after a few deliveries.
        max_deliver=-1,
        nak_initial_delay=0.5,
        nak_max_delay=10.0,
        fetch_wait=0.5,
        max_in_flight=config.jobs_in_flight,
    )


def adapter_publisher(
    config: TrainerConfig, database: Database, ledger: PrivacyLedger
) -> AdapterPublisher | None:
    """The SaveAdapter publisher, when a registry is configured (else None: SaveAdapter
    jobs fail with FAILED_PRECONDITION).

    Raises:
        ConfigError: A registry is configured without the service's credentials, the
            KEK folder or (outside dev mode) the trainer's signing key.
    """
    if not config.registry_url:
        return None
    data_dir = Path(config.data_dir)
    signing_key = load_signing_key(
        config.trainer_signing_key_file, dev_mode=config.dev_mode, data_dir=data_dir
    )
    kek_provider = config.open_kek_provider(config.kek_dir or data_dir / "keks")
    registry = RegistryClient.connect(
        registry_url=config.registry_url,
        auth_url=config.auth_url,
        service_api_key=config.service_api_key,
        channel_credentials=tls.channel_credentials(config),
    )
    log.info(
        "SaveAdapter publishes to %s, signed by trainer key %s, KEK provider %s",
        config.registry_url,
        signing_key.key_id,
        config.kek_provider,
    )
    return AdapterPublisher(
        database=database,
        base_models=BaseModelRegistry(config.base_models_path),
        registry=registry,
        kek_provider=kek_provider,
        signing_key=signing_key,
        staging_dir=data_dir / "trainer" / "sealed-adapters",
        dev_mode=config.dev_mode,
        ledger=ledger,
    )


def dataset_runner(
    config: TrainerConfig,
    database: Database,
    futures: SqlFutureStore,
    *,
    owner: str,
    stop: asyncio.Event,
    ledger: PrivacyLedger,
) -> DatasetRunner:
    """The TrainOnDataset runner with the deployment's dataset KEK.

    Raises:
        ConfigError: The configured KEK file is unusable, or missing outside dev mode.
    """
    keyring = keyring_from_settings(
        kek_file=config.dataset_kek_file, dev_mode=config.dev_mode, data_dir=config.data_dir
    )
    objects = ObjectFolder(Path(config.data_dir) / "trainer")
    return DatasetRunner(
        database=database,
        futures=futures,
        objects=objects,
        vault=DatasetVault(store=TrainerStore(database, futures), objects=objects, keyring=keyring),
        owner=owner,
        retry_delay=config.retry_delay_seconds,
        stop=stop,
        ledger=ledger,
    )


def client_lane(delivery: Delivery) -> str | None:
    """The consumer lane of a job: its training client (:meth:`Consumer.run`'s ``key``),
    so that a client's jobs run one after another in this worker. A malformed message
    gets no lane (the handler refuses it)."""
    try:
        return JobMessage.decode(delivery.data).client_id
    except PermanentJobError:
        return None


def waking(
    handler: Callable[[Delivery], Awaitable[None]], wakeups: FutureWakeups
) -> Callable[[Delivery], Awaitable[None]]:
    """``handler``, then a wake-up for the job's future: when the handler returns, the
    job's effects are committed (its future finished, or it was a redelivery of a
    finished one), so a waiter in the API can read it at once instead of polling."""

    async def handle(delivery: Delivery) -> None:
        await handler(delivery)
        await wakeups.notify(JobMessage.decode(delivery.data).future_id)

    return handle


async def run_worker(
    config: TrainerConfig, *, stop: asyncio.Event, metrics_port: int | None = None
) -> None:
    """Migrate, connect and consume jobs until ``stop`` is set.

    Args:
        config: The trainer configuration.
        stop: Set to drain the current job and exit.
        metrics_port: The port ``/metrics`` is served on (written to the ready file).
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    database = Database.from_url(config.database_url)
    worker: TrainerWorker | None = None
    publisher: AdapterPublisher | None = None
    try:
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        futures = SqlFutureStore(database, FUTURES)
        ledger = PrivacyLedger()
        publisher = adapter_publisher(config, database, ledger)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        worker = TrainerWorker(
            database=database,
            futures=futures,
            objects=ObjectFolder(Path(config.data_dir) / "trainer"),
            base_models=BaseModelRegistry(config.base_models_path),
            owner=owner,
            lease_seconds=config.lease_seconds,
            retry_delay=config.retry_delay_seconds,
            bases=BaseModelPool(
                BasePlacement(
                    dtype=BaseDtype(config.base_dtype), device=resolve_device(config.device)
                )
            ),
            resident_bytes=config.resident_bytes_limit,
            ledger=ledger,
            joint_rows=config.joint_forward_backward_rows,
            adapter_publisher=publisher,
            dataset_runner=dataset_runner(
                config, database, futures, owner=owner, stop=stop, ledger=ledger
            ),
        )
        async with await JetStream.connect(
            jobs_stream_config(config, durable=config.jobs_durable),
            client_name="tensafe-trainer-worker",
            tls=tls.nats_client_context(config),
        ) as jetstream:
            await jetstream.ensure_stream()
            consumer = Consumer(jetstream, on_dead_letter=worker.on_dead_letter)
            await consumer.ensure_consumer()
            if config.ready_file:
                # Same shape as the servers' ready file; port 0: a worker serves no RPC.
                ready = Path(config.ready_file)
                temporary = ready.with_suffix(ready.suffix + ".tmp")
                fields: dict[str, int] = {"port": 0, "pid": os.getpid()}
                if metrics_port is not None:
                    fields["metrics_port"] = metrics_port
                temporary.write_text(json.dumps(fields))
                os.replace(temporary, ready)
            wakeups = await FutureWakeups.start(
                jetstream.connection, future_wakeup_prefix(config.jobs_subject_prefix)
            )
            worker.use_wakeups(wakeups)
            log.info("trainer worker consuming", extra={"owner": worker.owner})
            try:
                await consumer.run(
                    waking(worker.handle, wakeups),
                    stop=stop,
                    key=client_lane,
                    on_queued=worker.job_queued,
                )
            finally:
                await wakeups.close()
            await worker.release_leases()
    finally:
        if worker is not None:
            worker.close()
        if publisher is not None:
            await publisher.close()
        await database.dispose()


def main() -> int:
    """Entry point of ``python -m tensafe.trainer.worker``."""
    try:
        config = load_config(TrainerConfig)
    except ConfigError as error:
        print(f"tensafe-trainer-worker: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging("trainer-worker", level=config.log_level, fmt=config.log_format)
    shutdown_telemetry = setup_telemetry(
        "tensafe-trainer-worker",
        exporter=config.otel_exporter,
        endpoint=config.otel_endpoint,
        metrics_port=config.metrics_port,
        metrics_host=config.host,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if config.heartbeat_file is not None:  # the chart's liveness probe reads it
            await beating(
                run_worker(config, stop=stop, metrics_port=shutdown_telemetry.metrics_port),
                config.heartbeat_file,
            )
        else:
            await run_worker(config, stop=stop, metrics_port=shutdown_telemetry.metrics_port)

    # As in tensafe.common.grpc_server.run_service: the imports (torch, transformers,
    # scipy) are frozen out of the collector, so the exit after SIGTERM is not seconds
    # of final collection on a loaded machine.
    gc.freeze()
    try:
        asyncio.run(serve())
    except ConfigError as error:
        print(f"tensafe-trainer-worker: configuration error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
