"""The trainer API's domain: admit jobs, serve reads, re-publish the outbox.

An accepted job goes through one transaction that locks the training client's row,
creates the future (idempotent by request id), allocates the client's next sequence
number, stores the request as the job's payload and, for an OptimStep of a private
client, checks and reserves the step's privacy cost against the budget. Only after the
commit is the job published to JetStream (``Nats-Msg-Id`` = future id). If the publish
fails, the job stays ``QUEUED`` in ``trainer_jobs`` and :meth:`TrainerDomain.run_outbox`
publishes it again; the stream's de-duplication and the worker's sequence check make a
second copy harmless.

Quotas (``max_training_clients_per_tenant``, ``max_pending_jobs_per_tenant``) are
checked in the same transaction that creates the client or the job, after taking the
tenant's quota lock (:func:`tensafe.common.quotas.lock_tenant`), so concurrent creates
never pass a limit together and a refused one leaves no row behind. A repeated request
id is answered before the check: a retry of an accepted call is never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tensafe.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TenSafeError,
)
from tensafe.common.futures import Future, FuturePage, SqlFutureStore
from tensafe.common.jetstream import JetStream
from tensafe.common.quotas import QUOTA_EXCEEDED, quota_exceeded
from tensafe.trainer.base_models import BaseModelInfo, BaseModelRegistry, tokenizer_files
from tensafe.trainer.domain.audit.service import audit_plan
from tensafe.trainer.domain.commands import (
    AuditPrivacy,
    ClientJob,
    ComputeLogprobs,
    CreateClient,
    ForwardBackward,
    JobRequest,
    NamedJob,
    Sample,
    batch_field,
    remap_field,
)
from tensafe.trainer.domain.engine.accounting import BatchSampling, calibrate_noise_multiplier
from tensafe.trainer.domain.engine.config import LossConfig
from tensafe.trainer.domain.engine.losses import (
    LossFn,
    check_distinct,
    datum_digests,
    loss_config_from_options,
    validate_batch,
    validate_token_sequences,
)
from tensafe.trainer.domain.jobs import (
    CHECKPOINT_KIND,
    SAMPLER_KIND,
    JobKind,
    JobMessage,
    check_adapter_name,
    check_name,
    job_subject,
    parse_path,
)
from tensafe.trainer.domain.ledger import (
    PrivacyLedger,
    PrivacyReport,
    client_batches_mechanism,
    client_dp,
)
from tensafe.trainer.domain.model import (
    CLIENT_ACTIVE,
    CheckpointRecord,
    ClientRecord,
    Page,
    StepRecord,
)
from tensafe.trainer.domain.settings import DpSettings, check_dp, dp_with_noise, lora_to_json
from tensafe.trainer.objects import ObjectFolder
from tensafe.trainer.store.sql import TrainerStore, TrainerTransaction

log = logging.getLogger(__name__)

AdmitHook = Callable[[TrainerTransaction, ClientRecord, str, int], Awaitable[None]]
"""Extra work inside a job's admission transaction: (transaction, locked client,
future id, sequence number). Raising rolls the admission back."""

_MAX_REQUEST_ID = 128
_OUTBOX_BATCH = 200
_CLIENT_FACTS = 4096
"""Clients whose base model and privacy an API process remembers (LRU)."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant every read and write is scoped to."""

    tenant: str
    principal: str


def _request_id(request_id: str) -> str:
    if len(request_id) > _MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"must be at most {_MAX_REQUEST_ID} characters")
    # Without a key a call is not idempotent: each one is a new request.
    return request_id or uuid.uuid4().hex


class TrainerDomain:
    """Admission, reads and the outbox of the trainer API.

    Args:
        store: The trainer's database and its futures.
        jetstream: Connection whose stream captures ``<subject_prefix>.>``.
        base_models: The registered base models.
        objects: The object folder (checkpoints are deleted with their client).
        subject_prefix: Subject prefix of job messages.
        outbox_grace_seconds: Age of a queued job before the outbox re-publishes it.
        max_clients_per_tenant: Most live training clients per tenant.
        max_pending_jobs_per_tenant: Most unfinished jobs (PENDING or RUNNING futures)
            per tenant.
        max_steps_per_job: Most steps of one TrainOnDataset or AuditPrivacy job.
        ledger: The privacy ledger (reservations and lineage).
    """

    def __init__(
        self,
        *,
        store: TrainerStore,
        jetstream: JetStream,
        base_models: BaseModelRegistry,
        objects: ObjectFolder,
        subject_prefix: str,
        outbox_grace_seconds: float,
        max_clients_per_tenant: int,
        max_pending_jobs_per_tenant: int,
        max_steps_per_job: int,
        ledger: PrivacyLedger,
    ) -> None:
        self._store = store
        self._ledger = ledger
        # (tenant, client id) -> (base model, private) of clients this process has read:
        # both are fixed at creation, and ForwardBackward needs them to validate a batch
        # before admission, whose transaction reads (and locks) the row anyway.
        self._client_facts: OrderedDict[tuple[str, str], tuple[str, bool]] = OrderedDict()
        self._futures = store.futures
        self._jetstream = jetstream
        self._base_models = base_models
        self._objects = objects
        self._subject_prefix = subject_prefix
        self._outbox_grace = timedelta(seconds=outbox_grace_seconds)
        self._max_clients = max_clients_per_tenant
        self._max_pending_jobs = max_pending_jobs_per_tenant
        self._max_steps_per_job = max_steps_per_job

    @property
    def ledger(self) -> PrivacyLedger:
        """The privacy ledger."""
        return self._ledger

    @property
    def futures(self) -> SqlFutureStore:
        """The futures store (FutureService reads it)."""
        return self._futures

    # ---------------------------------------------------------------- base models

    async def list_base_models(self) -> list[BaseModelInfo]:
        """Every registered base model."""
        return await asyncio.to_thread(self._base_models.list)

    async def base_model(self, name: str) -> BaseModelInfo:
        """One base model (NotFound if unknown)."""
        # Every ForwardBackward validates against its model: answered from memory when
        # the model was checked recently, which spares the step a thread hop and the
        # folder's stat calls (docs/trainer.md, Performance).
        info = self._base_models.peek(name)
        if info is not None:
            return info
        return await asyncio.to_thread(self._base_models.get, name)

    async def base_model_tokenizer(self, name: str) -> tuple[list[tuple[str, bytes]], str]:
        """A base model's tokenizer files and their digest (sha256 over each file's name,
        a NUL, its length and its content, in order).

        Raises:
            NotFound: Unknown base model. FailedPrecondition: it has no tokenizer.
        """
        info = await self.base_model(name)
        files = await asyncio.to_thread(tokenizer_files, info)
        digest = hashlib.sha256()
        for file_name, content in files:
            digest.update(f"{file_name}\0{len(content)}\0".encode())
            digest.update(content)
        return files, digest.hexdigest()

    # ---------------------------------------------------------------- clients

    async def create_client(self, caller: Caller, command: CreateClient) -> ClientRecord:
        """Create a training client, or return the one this request id created.

        Raises:
            InvalidArgument: A bad field (``lora.rank``, ``dp.delta``, ...).
            NotFound: Unknown base model.
            ResourceExhausted: The tenant holds ``max_training_clients_per_tenant``
                live clients already (reason ``QUOTA_EXCEEDED``).
        """
        request_id = _request_id(command.request_id)
        fingerprint = command.fingerprint
        info = await self.base_model(command.base_model)
        if command.lora is None:
            raise InvalidArgument("lora", "is required")
        lora = command.lora.config(info.default_target_modules)
        unknown = [m for m in lora.target_modules if m not in info.lora_target_modules]
        if unknown:
            raise InvalidArgument(
                "lora.target_modules",
                f"no linear layer named {', '.join(unknown)} in {info.name}; "
                f"choose from {', '.join(info.lora_target_modules)}",
            )
        seed = int(command.lora.seed) if command.lora.seed else secrets.randbits(63)
        dp: DpSettings | None = None
        if command.dp is not None:
            dp, target = check_dp(command.dp)
            if dp is None:
                assert target is not None
                # Client-supplied batches: the calibration composes full Gaussian steps,
                # exactly what the accountant will charge.
                sigma = await asyncio.to_thread(
                    calibrate_noise_multiplier,
                    target_epsilon=target,
                    delta=command.dp.delta,
                    steps=int(command.dp.planned_steps),
                    sampling=BatchSampling.CLIENT_BATCHES,
                    accountant=command.dp.accountant,
                )
                dp = dp_with_noise(command.dp, sigma)
        async with self._store.transaction() as tx:
            existing = await tx.client_by_request(caller.tenant, request_id)
            if existing is not None:
                if existing.request_fingerprint != fingerprint:
                    raise InvalidArgument(
                        "request_id",
                        "was already used for a different request",
                        reason="REQUEST_ID_REUSED",
                    )
                return existing
            await tx.lock_tenant("trainer.clients", caller.tenant)
            live = await tx.count_live_clients(caller.tenant)
            if live >= self._max_clients:
                raise quota_exceeded(
                    "max_training_clients_per_tenant",
                    self._max_clients,
                    f"{live} live training clients",
                )
            client = ClientRecord(
                id=uuid.uuid4().hex,
                tenant=caller.tenant,
                request_id=request_id,
                request_fingerprint=fingerprint,
                base_model=info.name,
                lora_json=lora_to_json(lora, seed),
                dp_json=dp.to_json() if dp is not None else None,
                private=dp is not None,
                seed=seed,
                state=CLIENT_ACTIVE,
                next_seq=0,
                applied_seq=0,
                step=0,
                dp_steps=0,
                epsilon_spent=0.0,
                accountant_state=None,
                state_path=None,
                state_sha256=None,
                created_at=datetime.now(UTC),
                lineage_json=None,
            )
            tx.add_client(client)
        return client

    async def get_client(self, caller: Caller, client_id: str) -> ClientRecord:
        """A client of the caller's tenant (NotFound otherwise)."""
        async with self._store.transaction(read_only=True) as tx:
            row = await tx.get_client(caller.tenant, client_id)
        self._client_facts[(caller.tenant, client_id)] = (row.base_model, row.private)
        self._client_facts.move_to_end((caller.tenant, client_id))
        while len(self._client_facts) > _CLIENT_FACTS:
            self._client_facts.popitem(last=False)
        return row

    async def _base_model_and_privacy(self, caller: Caller, client_id: str) -> tuple[str, bool]:
        """A client's base model and whether it is private, from memory when this
        process read the client before (a deleted or foreign client is refused by the
        admission transaction that follows, as NOT_FOUND)."""
        facts = self._client_facts.get((caller.tenant, client_id))
        if facts is None:
            row = await self.get_client(caller, client_id)
            facts = (row.base_model, row.private)
        return facts

    async def client_by_request(self, caller: Caller, request_id: str) -> ClientRecord:
        """The caller's client that a CreateTrainingClient with ``request_id`` made.

        Raises:
            NotFound: None did (or it is another tenant's).
        """
        async with self._store.transaction(read_only=True) as tx:
            row = await tx.client_by_request(caller.tenant, request_id)
        if row is None or row.state != CLIENT_ACTIVE:
            raise NotFound(f"no training client was created with request id {request_id!r}")
        return row

    async def list_clients(
        self, caller: Caller, *, page_size: int, page_token: str
    ) -> Page[ClientRecord]:
        """A page of the caller's clients."""
        async with self._store.transaction(read_only=True) as tx:
            return await tx.list_clients(
                caller.tenant, page_size=page_size, page_token=page_token
            )

    async def delete_client(self, caller: Caller, client_id: str) -> None:
        """Delete a client and its checkpoints; its ledger stays for audit."""
        async with self._store.transaction() as tx:
            paths = await tx.delete_client(caller.tenant, client_id)
        self._client_facts.pop((caller.tenant, client_id), None)
        for path in paths:
            self._objects.delete(path)

    async def privacy_spent(
        self, caller: Caller, client_id: str
    ) -> tuple[ClientRecord, PrivacyReport | None]:
        """The privacy a client's weights have spent (committed steps of their whole
        lineage); None for a non-private client."""
        row = await self.get_client(caller, client_id)
        return row, self._ledger.report(row)

    async def list_steps(
        self, caller: Caller, client_id: str, *, page_size: int, page_token: str
    ) -> Page[StepRecord]:
        """A page of a client's committed optimizer steps (loss, epsilon after each)."""
        async with self._store.transaction(read_only=True) as tx:
            await tx.get_client(caller.tenant, client_id)
            return await tx.list_steps(client_id, page_size=page_size, page_token=page_token)

    async def list_checkpoints(
        self, caller: Caller, client_id: str, *, page_size: int, page_token: str
    ) -> Page[CheckpointRecord]:
        """A page of a client's saved states and sampler weights."""
        async with self._store.transaction(read_only=True) as tx:
            await tx.get_client(caller.tenant, client_id)
            return await tx.list_checkpoints(
                client_id, page_size=page_size, page_token=page_token
            )

    # ---------------------------------------------------------------- jobs

    async def forward_backward(self, caller: Caller, command: ForwardBackward) -> Future:
        """Admit a ForwardBackward or Forward job after validating the batch."""
        kind = command.kind
        base_model, private = await self._base_model_and_privacy(caller, command.client_id)
        info = await self.base_model(base_model)
        loss = LossFn.parse(command.loss_fn)
        loss_config_from_options(loss, command.loss_fn_config, LossConfig())
        batch = command.batch.get()
        try:
            validate_batch(
                batch.sequences,
                loss,
                batch.loss_fn_inputs,
                vocab_size=info.vocab_size,
                max_length=info.max_context_length,
            )
        except InvalidArgument as error:
            raise remap_field(error, batch_field) from error
        if private and kind is JobKind.FORWARD_BACKWARD:
            # Refused here before anything is queued; duplicates across the calls of one
            # step are refused by the engine (it holds the step's data digests).
            check_distinct(datum_digests(batch.sequences, loss, batch.loss_fn_inputs))
        return await self._admit(caller, command.client_id, kind, command.request)

    async def optim_step(self, caller: Caller, command: ClientJob) -> Future:
        """Admit an OptimStep (its Adam parameters validated); a private client's step is
        checked against its budget."""
        return await self._admit(
            caller, command.client_id, JobKind.OPTIM_STEP, command.request, reserve=True
        )

    async def sample(self, caller: Caller, command: Sample) -> Future:
        """Admit a Sample job (from a client's current weights or saved sampler weights)."""
        client_id = await self._inference_client(caller, command.client_id, command.model_path)
        row = await self.get_client(caller, client_id)
        info = await self.base_model(row.base_model)
        params = command.params.get()
        prompt = command.prompt
        validate_token_sequences(
            [prompt], field="prompt", vocab_size=info.vocab_size, max_length=info.max_context_length
        )
        for index, entry in enumerate(params.stop_token_sequences):
            if any(not 0 <= token < info.vocab_size for token in entry):
                raise InvalidArgument(
                    f"sampling_params.stop_tokens[{index}]", f"ids must be < {info.vocab_size}"
                )
        if len(prompt) + params.max_tokens > info.max_context_length:
            raise InvalidArgument(
                "sampling_params.max_tokens",
                f"prompt plus max_tokens exceeds the context of {info.max_context_length}",
            )
        return await self._admit(caller, client_id, JobKind.SAMPLE, command.request)

    async def compute_logprobs(self, caller: Caller, command: ComputeLogprobs) -> Future:
        """Admit a ComputeLogprobs job."""
        client_id = await self._inference_client(caller, command.client_id, command.model_path)
        row = await self.get_client(caller, client_id)
        info = await self.base_model(row.base_model)
        validate_token_sequences(
            command.sequences,
            field="sequences",
            vocab_size=info.vocab_size,
            max_length=info.max_context_length,
        )
        return await self._admit(caller, client_id, JobKind.COMPUTE_LOGPROBS, command.request)

    async def save(self, caller: Caller, command: NamedJob) -> Future:
        """Admit a SaveState, SaveWeightsForSampler or SaveAdapter job.

        Raises:
            InvalidArgument: ``name`` (a checkpoint name) or ``adapter_name`` (a
                registry adapter name) is malformed.
        """
        if command.kind is JobKind.SAVE_ADAPTER:
            check_adapter_name("adapter_name", command.name)
        else:
            check_name("name", command.name)
        return await self._admit(caller, command.client_id, command.kind, command.request)

    async def load_state(self, caller: Caller, command: NamedJob) -> Future:
        """Admit a LoadState job (``command.name`` is the checkpoint's path); the
        checkpoint must exist for the caller's tenant."""
        parsed = parse_path("path", command.name, kind=CHECKPOINT_KIND)
        async with self._store.transaction(read_only=True) as tx:
            await tx.get_checkpoint(caller.tenant, parsed.client_id, CHECKPOINT_KIND, parsed.name)

        async def inherit(
            tx: TrainerTransaction, client: ClientRecord, future_id: str, seq: int
        ) -> None:
            # The weights' privacy history joins the client's at admission, so a step
            # queued behind this LoadState is checked against all of it (DESIGN §8).
            checkpoint = await tx.get_checkpoint(
                caller.tenant, parsed.client_id, CHECKPOINT_KIND, parsed.name
            )
            await self._ledger.inherit(tx, client, checkpoint, future_id=future_id)

        return await self._admit(
            caller, command.client_id, JobKind.LOAD_STATE, command.request, within=inherit
        )

    def check_job_steps(self, steps: int) -> None:
        """Refuse a job of more than ``max_steps_per_job`` steps.

        Raises:
            ResourceExhausted: Reason ``QUOTA_EXCEEDED``, the limit in the metadata.
        """
        if steps > self._max_steps_per_job:
            limit = self._max_steps_per_job
            raise ResourceExhausted(
                f"a job of {steps} steps passes the limit max_steps_per_job={limit}; "
                "split the run into several jobs",
                reason=QUOTA_EXCEEDED,
                metadata={"limit": "max_steps_per_job", "max": str(limit)},
            )

    async def audit_privacy(self, caller: Caller, command: AuditPrivacy) -> Future:
        """Admit a privacy audit (a shadow DP-SGD run on a base model; see
        :mod:`tensafe.trainer.domain.audit`).

        It involves no training client: the job gets a lane of its own (``client_id`` =
        its future id, ``seq`` 1), reads no tenant data and charges no budget.

        Raises:
            InvalidArgument: A bad field (``canaries``, ``guesses_per_side``, ...).
            NotFound: Unknown base model.
            ResourceExhausted: More steps than ``max_steps_per_job``.
        """
        info = await self.base_model(command.base_model)
        audit_plan(command, info)
        self.check_job_steps(command.steps)
        request_id = _request_id(command.request.request_id)
        fingerprint = command.request.fingerprint
        payload = command.request.payload
        async with self._store.transaction() as tx:
            await tx.lock_tenant("trainer.jobs", caller.tenant)
            created = await tx.create_future(
                caller.tenant,
                kind=JobKind.AUDIT_PRIVACY.value,
                request_id=request_id,
                resource="privacy_audits",
                fingerprint=fingerprint,
            )
            if not created.created:
                return created.future
            await self._check_pending_jobs(tx, caller.tenant)
            future_id = created.future.id
            tx.add_job(
                future_id=future_id,
                tenant=caller.tenant,
                client_id=future_id,
                seq=1,
                kind=JobKind.AUDIT_PRIVACY.value,
                payload=payload,
            )
        await self._publish(JobMessage(future_id, future_id, 1))
        return created.future

    async def _inference_client(self, caller: Caller, client_id: str, model_path: str) -> str:
        if bool(client_id) == bool(model_path):
            raise InvalidArgument(
                "model_path", "give exactly one of training_client_id, model_path"
            )
        if client_id:
            return client_id
        parsed = parse_path("model_path", model_path, kind=SAMPLER_KIND)
        async with self._store.transaction(read_only=True) as tx:
            await tx.get_checkpoint(caller.tenant, parsed.client_id, SAMPLER_KIND, parsed.name)
        return parsed.client_id

    async def admit(
        self,
        caller: Caller,
        client_id: str,
        kind: JobKind,
        request: JobRequest,
        *,
        within: AdmitHook,
    ) -> Future:
        """Admit a job whose admission needs more than the common steps.

        Args:
            caller: The caller.
            client_id: The training client the job runs on.
            kind: The job kind.
            request: The validated request (its payload is stored with the job).
            within: Called in the admission transaction after the job row is added
                (e.g. to check and reserve a TrainOnDataset run's privacy cost); not
                called for a repeated request id.

        Returns:
            The job's future.
        """
        return await self._admit(caller, client_id, kind, request, within=within)

    async def _admit(
        self,
        caller: Caller,
        client_id: str,
        kind: JobKind,
        request: JobRequest,
        *,
        reserve: bool = False,
        within: AdmitHook | None = None,
    ) -> Future:
        request_id = _request_id(request.request_id)
        fingerprint = request.fingerprint
        payload = request.payload
        async with self._store.transaction() as tx:
            # Tenant lock first, then the client row: the one order every admission takes.
            await tx.lock_tenant("trainer.jobs", caller.tenant)
            client = await tx.lock_client(caller.tenant, client_id)
            created = await tx.create_future(
                caller.tenant,
                kind=kind.value,
                request_id=request_id,
                resource=f"training_clients/{client_id}",
                fingerprint=fingerprint,
            )
            if not created.created:
                return created.future
            await self._check_pending_jobs(tx, caller.tenant)
            seq = await tx.allocate_seq(client_id)
            future_id = created.future.id
            tx.add_job(
                future_id=future_id,
                tenant=caller.tenant,
                client_id=client_id,
                seq=seq,
                kind=kind.value,
                payload=payload,
            )
            dp = client_dp(client)
            if reserve and dp is not None:
                await self._ledger.reserve(
                    tx,
                    client,
                    dp,
                    mechanism=client_batches_mechanism(dp),
                    future_id=future_id,
                    seq=seq,
                )
            if within is not None:
                await within(tx, client, future_id, seq)
        await self._publish(JobMessage(future_id, client_id, seq))
        return created.future

    async def _check_pending_jobs(self, tx: TrainerTransaction, tenant: str) -> None:
        """Refuse the job just created in ``tx`` if it takes the tenant over
        ``max_pending_jobs_per_tenant`` (raising rolls its future back)."""
        pending = await tx.count_unfinished_jobs(tenant)
        if pending > self._max_pending_jobs:
            raise quota_exceeded(
                "max_pending_jobs_per_tenant",
                self._max_pending_jobs,
                f"{pending - 1} queued or running jobs",
            )

    async def _publish(self, message: JobMessage) -> None:
        try:
            await self._jetstream.publish(
                job_subject(self._subject_prefix, message.client_id),
                message.encode(),
                msg_id=message.future_id,
            )
        except TenSafeError as error:
            # Committed already: the outbox publishes it again, so the caller still
            # gets its future.
            log.warning(
                "publish of job %s failed; the outbox retries: %s", message.future_id, error
            )

    # ---------------------------------------------------------------- futures

    async def get_future(self, caller: Caller, future_id: str) -> Future:
        """A future of the caller's tenant."""
        return await self._futures.get(caller.tenant, future_id)

    async def wait_future(self, caller: Caller, future_id: str, *, timeout: float) -> Future:
        """Wait for a future to finish, at most ``timeout`` seconds."""
        return await self._futures.wait(caller.tenant, future_id, timeout=timeout)

    async def cancel_future(self, caller: Caller, future_id: str) -> Future:
        """Cancel a future; finished ones are returned unchanged."""
        future = await self._futures.get(caller.tenant, future_id)
        if future.done and future.status.value != "CANCELLED":
            return future
        try:
            cancelled = await self._futures.cancel(caller.tenant, future_id)
        except TenSafeError:
            # It finished between the read and the cancel: a no-op on a finished one.
            return await self._futures.get(caller.tenant, future_id)
        if self._futures.wakeups is not None:
            await self._futures.wakeups.notify(future_id)
        return cancelled

    async def list_futures(
        self, caller: Caller, *, page_size: int, page_token: str, kind: str | None
    ) -> FuturePage:
        """A page of the caller's futures."""
        return await self._futures.list(
            caller.tenant, page_size=page_size, page_token=page_token, kind=kind
        )

    # ---------------------------------------------------------------- outbox

    async def republish_queued(self) -> int:
        """Publish again every job accepted a while ago and not yet committed.

        Returns:
            How many messages were sent.
        """
        async with self._store.transaction(read_only=True) as tx:
            jobs = await tx.queued_jobs(
                older_than=datetime.now(UTC) - self._outbox_grace, limit=_OUTBOX_BATCH
            )
        for job in jobs:
            await self._publish(JobMessage(job.future_id, job.client_id, job.seq))
        return len(jobs)

    async def run_outbox(self, *, interval: float, stop: asyncio.Event) -> None:
        """Re-publish queued jobs at start-up and then every ``interval`` seconds."""
        while not stop.is_set():
            try:
                await self.republish_queued()
            except TenSafeError as error:
                log.warning("outbox pass failed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
