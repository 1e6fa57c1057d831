"""The trainer's SQL store as the domain sees it: one transaction object per unit of work.

The domain opens :meth:`TrainerStore.transaction` and calls the methods of the
:class:`TrainerTransaction` it yields, which return domain records
(:mod:`tensafe.trainer.domain.model`); nothing here decides policy. A worker that
already holds a session of its own (its claim and commit sequence,
:mod:`tensafe.trainer.worker`) wraps it, ``TrainerTransaction(session)``, to hand the
ledger the same typed transaction.

Rows a transaction locked stay in the session's identity map: a write here to a
client (its sequence counter, its accountant state) reaches the very row object a
worker fenced, so what it commits next sees the change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.util import identity_key

from tensafe.common.db import Database
from tensafe.common.errors import InvalidArgument, NotFound
from tensafe.common.futures import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    CreateResult,
    SqlFutureStore,
)
from tensafe.common.quotas import lock_tenant
from tensafe.trainer.domain.datasets.crypto import WrappedKey
from tensafe.trainer.domain.engine.accounting import BatchSampling, StepMechanism
from tensafe.trainer.domain.model import (
    CLIENT_DELETED,
    ChargedStep,
    CheckpointRecord,
    ClientRecord,
    DatasetRecord,
    DatasetRunRecord,
    DuplicateRecord,
    Page,
    QueuedJob,
    StepRecord,
)
from tensafe.trainer.store import repository as repo
from tensafe.trainer.store.models import (
    BudgetReservationRow,
    CheckpointRow,
    DatasetKeyRow,
    DatasetRow,
    DatasetRunRow,
    JobRow,
    LedgerRow,
    LineageEventRow,
    StepRow,
    TrainingClientRow,
)


def client_record(row: TrainingClientRow) -> ClientRecord:
    """The domain record of a client row."""
    created = repo.utc(row.created_at)
    assert created is not None
    return ClientRecord(
        id=row.id,
        tenant=row.tenant,
        request_id=row.request_id,
        request_fingerprint=row.request_fingerprint,
        base_model=row.base_model,
        lora_json=row.lora_json,
        dp_json=row.dp_json,
        private=bool(row.private),
        seed=int(row.seed),
        state=row.state,
        next_seq=int(row.next_seq),
        applied_seq=int(row.applied_seq),
        step=int(row.step),
        dp_steps=int(row.dp_steps),
        epsilon_spent=float(row.epsilon_spent),
        accountant_state=row.accountant_state,
        state_path=row.state_path,
        state_sha256=row.state_sha256,
        created_at=created,
        lineage_json=row.lineage_json,
    )


def checkpoint_record(row: CheckpointRow) -> CheckpointRecord:
    """The domain record of a checkpoint row."""
    created = repo.utc(row.created_at)
    assert created is not None
    return CheckpointRecord(
        id=row.id,
        tenant=row.tenant,
        client_id=row.client_id,
        kind=row.kind,
        name=row.name,
        seq=int(row.seq),
        step=int(row.step),
        object_path=row.object_path,
        sha256=row.sha256,
        accountant_state=row.accountant_state,
        created_at=created,
        lineage_json=row.lineage_json,
    )


def step_record(row: StepRow) -> StepRecord:
    """The domain record of a committed step's row."""
    created = repo.utc(row.created_at)
    assert created is not None
    return StepRecord(
        step=int(row.step),
        dp_step=int(row.dp_step) if row.dp_step is not None else None,
        epsilon_after=float(row.epsilon_after) if row.epsilon_after is not None else None,
        loss=float(row.loss) if row.loss is not None else None,
        created_at=created,
    )


def dataset_record(row: DatasetRow) -> DatasetRecord:
    """The domain record of a dataset row."""
    created = repo.utc(row.created_at)
    assert created is not None
    return DatasetRecord(
        id=row.id,
        tenant=row.tenant,
        request_id=row.request_id,
        request_fingerprint=row.request_fingerprint,
        name=row.name,
        base_model=row.base_model,
        format=row.format,
        records=int(row.records),
        tokens=int(row.tokens),
        key_id=row.key_id,
        object_path=row.object_path,
        sha256=row.sha256,
        size_bytes=int(row.size_bytes),
        epsilon_budget=row.epsilon_budget,
        delta=row.delta,
        created_at=created,
    )


def _mechanism(row: LedgerRow | BudgetReservationRow) -> StepMechanism:
    return StepMechanism(
        sampling=BatchSampling(row.sampling),
        noise_multiplier=row.noise_multiplier,
        sampling_probability=row.sampling_probability,
    )


def _reserved(row: BudgetReservationRow) -> ChargedStep:
    return ChargedStep(mechanism=_mechanism(row), steps=int(row.steps))


def _charged(row: LedgerRow) -> ChargedStep:
    return ChargedStep(mechanism=_mechanism(row), dp_step=int(row.dp_step))


class TrainerTransaction:
    """Reads and writes of one transaction.

    Args:
        session: The open session.
        futures: The futures store on ``trainer_futures`` (None: a worker's bound
            transaction, which creates no futures).
    """

    def __init__(self, session: AsyncSession, futures: SqlFutureStore | None = None) -> None:
        self._session = session
        self._futures = futures

    async def lock_tenant(self, scope: str, tenant: str) -> None:
        """Serialise the quota checks of ``scope`` for one tenant until the end."""
        await lock_tenant(self._session, scope, tenant)

    # ------------------------------------------------------------------ clients

    async def client_by_request(self, tenant: str, request_id: str) -> ClientRecord | None:
        """The client a CreateTrainingClient with this request id made, if any."""
        row = await repo.client_by_request(self._session, tenant, request_id)
        return client_record(row) if row is not None else None

    async def count_live_clients(self, tenant: str) -> int:
        """How many active training clients ``tenant`` holds."""
        return await repo.count_live_clients(self._session, tenant)

    def add_client(self, client: ClientRecord) -> None:
        """Insert a new training client."""
        self._session.add(
            TrainingClientRow(
                id=client.id,
                tenant=client.tenant,
                request_id=client.request_id,
                request_fingerprint=client.request_fingerprint,
                base_model=client.base_model,
                lora_json=client.lora_json,
                dp_json=client.dp_json,
                private=client.private,
                seed=client.seed,
                state=client.state,
                next_seq=client.next_seq,
                applied_seq=client.applied_seq,
                step=client.step,
                dp_steps=client.dp_steps,
                epsilon_spent=client.epsilon_spent,
                accountant_state=client.accountant_state,
                state_path=client.state_path,
                state_sha256=client.state_sha256,
                lease_owner=None,
                lease_expires_at=None,
                created_at=client.created_at,
                lineage_json=client.lineage_json,
            )
        )

    async def get_client(self, tenant: str, client_id: str) -> ClientRecord:
        """An active client of ``tenant``.

        Raises:
            NotFound: No such active client for this tenant.
        """
        return client_record(await repo.get_client(self._session, tenant, client_id))

    async def lock_client(self, tenant: str, client_id: str) -> ClientRecord:
        """An active client of ``tenant``, its row locked until the transaction ends.

        Raises:
            NotFound: No such active client for this tenant.
        """
        return client_record(await repo.lock_client(self._session, tenant, client_id))

    async def client(self, client_id: str) -> ClientRecord | None:
        """Any client by id (deleted ones too), whatever its tenant."""
        row = await self._session.get(TrainingClientRow, client_id)
        return client_record(row) if row is not None else None

    async def _client_row(self, client_id: str) -> TrainingClientRow:
        # Already in the identity map when the transaction locked or fenced it: taken
        # from there directly (AsyncSession.get costs a hop through its greenlet, about
        # half a millisecond per call on the admission's and the step commit's path).
        cached = self._session.identity_map.get(identity_key(TrainingClientRow, client_id))
        if isinstance(cached, TrainingClientRow) and not sa.inspect(cached).expired_attributes:
            return cached
        row = await self._session.get(TrainingClientRow, client_id)
        if row is None:
            raise NotFound(f"training client {client_id!r} not found")
        return row

    async def allocate_seq(self, client_id: str) -> int:
        """The client's next job sequence number (call with its row locked)."""
        row = await self._client_row(client_id)
        row.next_seq = int(row.next_seq) + 1
        return int(row.next_seq)

    async def list_clients(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> Page[ClientRecord]:
        """A page of a tenant's active clients, newest first (AIP-158)."""
        page = await repo.list_clients(
            self._session, tenant, page_size=page_size, page_token=page_token
        )
        return Page([client_record(row) for row in page.clients], page.next_page_token)

    async def delete_client(self, tenant: str, client_id: str) -> list[str]:
        """Mark a client deleted and drop its checkpoints' rows.

        Returns:
            The object paths that no row references any more.

        Raises:
            NotFound: No such active client for this tenant.
        """
        row = await repo.lock_client(self._session, tenant, client_id)
        row.state = CLIENT_DELETED
        checkpoints = await repo.checkpoints_of(self._session, client_id)
        for checkpoint in checkpoints:
            await self._session.delete(checkpoint)
        paths = [c.object_path for c in checkpoints]
        if row.state_path is not None:
            paths.append(row.state_path)
        return paths

    async def set_client_privacy(
        self,
        client_id: str,
        *,
        accountant_state: str,
        epsilon_spent: float,
        dp_steps: int | None = None,
        lineage_json: str | None = None,
    ) -> None:
        """Store a client's new accountant state and epsilon (and, when given, its DP
        step count and lineage)."""
        row = await self._client_row(client_id)
        row.accountant_state = accountant_state
        row.epsilon_spent = epsilon_spent
        if dp_steps is not None:
            row.dp_steps = dp_steps
        if lineage_json is not None:
            row.lineage_json = lineage_json

    async def set_client_lineage(self, client_id: str, lineage_json: str | None) -> None:
        """Store a client's lineage."""
        row = await self._client_row(client_id)
        row.lineage_json = lineage_json

    # ------------------------------------------------------------------ steps, checkpoints

    async def list_steps(
        self, client_id: str, *, page_size: int, page_token: str
    ) -> Page[StepRecord]:
        """A page of a client's committed optimizer steps in commit order."""
        page = await repo.list_steps(
            self._session, client_id, page_size=page_size, page_token=page_token
        )
        return Page([step_record(row) for row in page.steps], page.next_page_token)

    async def list_checkpoints(
        self, client_id: str, *, page_size: int, page_token: str
    ) -> Page[CheckpointRecord]:
        """A page of a client's checkpoints in the order their jobs ran."""
        page = await repo.list_checkpoints(
            self._session, client_id, page_size=page_size, page_token=page_token
        )
        return Page([checkpoint_record(row) for row in page.checkpoints], page.next_page_token)

    async def get_checkpoint(
        self, tenant: str, client_id: str, kind: str, name: str
    ) -> CheckpointRecord:
        """A checkpoint of an active client of ``tenant``.

        Raises:
            NotFound: No such checkpoint for this tenant.
        """
        row = await repo.get_checkpoint(self._session, tenant, client_id, kind, name)
        return checkpoint_record(row)

    # ------------------------------------------------------------------ jobs

    async def create_future(
        self, tenant: str, *, kind: str, request_id: str, resource: str, fingerprint: str
    ) -> CreateResult:
        """Create a job's future in this transaction (or find the request id's)."""
        assert self._futures is not None, "a bound worker transaction creates no futures"
        return await self._futures.create(
            tenant,
            kind=kind,
            request_id=request_id,
            resource=resource,
            request_fingerprint=fingerprint,
            session=self._session,
        )

    async def count_unfinished_jobs(self, tenant: str) -> int:
        """How many of ``tenant``'s futures are still PENDING or RUNNING."""
        return await repo.count_unfinished_jobs(self._session, tenant)

    def add_job(
        self, *, future_id: str, tenant: str, client_id: str, seq: int, kind: str, payload: bytes
    ) -> None:
        """Queue a job: its stored request, in the outbox until a worker commits it."""
        self._session.add(
            JobRow(
                future_id=future_id,
                tenant=tenant,
                client_id=client_id,
                seq=seq,
                kind=kind,
                payload=payload,
                status=repo.JOB_QUEUED,
                created_at=repo.now(),
            )
        )

    async def queued_jobs(self, *, older_than: datetime, limit: int) -> list[QueuedJob]:
        """Jobs accepted before ``older_than`` and not yet committed by a worker."""
        rows = await repo.queued_jobs(self._session, older_than=older_than, limit=limit)
        return [QueuedJob(future_id=r.future_id, client_id=r.client_id, seq=r.seq) for r in rows]

    # ------------------------------------------------------------------ privacy ledger

    async def open_reservations(self, client_id: str) -> list[ChargedStep]:
        """Admitted DP steps of a client whose jobs have not committed yet."""
        return [_reserved(r) for r in await repo.open_reservations(self._session, client_id)]

    def add_reservation(
        self,
        *,
        future_id: str,
        tenant: str,
        client_id: str,
        seq: int,
        mechanism: StepMechanism,
        steps: int,
        dataset_id: str | None,
    ) -> None:
        """Reserve ``steps`` DP steps of a job."""
        self._session.add(
            BudgetReservationRow(
                future_id=future_id,
                tenant=tenant,
                client_id=client_id,
                seq=seq,
                sampling=mechanism.sampling.value,
                noise_multiplier=mechanism.noise_multiplier,
                sampling_probability=mechanism.sampling_probability,
                status=repo.RESERVED,
                steps=steps,
                dataset_id=dataset_id,
                created_at=repo.now(),
            )
        )

    async def consume_reserved_step(self, future_id: str) -> None:
        """One step of a job's reservation was charged (the last one consumes it)."""
        reservation = await self._session.get(BudgetReservationRow, future_id)
        if reservation is not None and reservation.status == repo.RESERVED:
            reservation.steps = max(int(reservation.steps) - 1, 0)
            if reservation.steps == 0:
                reservation.status = repo.CONSUMED

    async def settle_reservation(self, future_id: str) -> None:
        """A job ended with its steps charged: nothing it reserved stays open."""
        await repo.settle_reservation(self._session, future_id, status=repo.CONSUMED)

    async def release_reservation(self, future_id: str) -> None:
        """A job failed or was dropped: what it reserved and did not use is given back."""
        await repo.settle_reservation(self._session, future_id, status=repo.RELEASED)

    async def ledger_entries(self, client_id: str, *, after: int, upto: int) -> list[ChargedStep]:
        """A client's ledger entries ``after < dp_step <= upto``, in step order."""
        rows = await repo.ledger_rows(self._session, client_id, after=after, upto=upto)
        return [_charged(row) for row in rows]

    async def dataset_ledger(self, dataset_id: str) -> list[ChargedStep]:
        """Every committed DP step of any client that sampled a dataset."""
        return [_charged(row) for row in await repo.dataset_ledger(self._session, dataset_id)]

    async def dataset_reservations(self, dataset_id: str) -> list[ChargedStep]:
        """Steps still reserved on a dataset by admitted runs."""
        rows = await repo.dataset_reservations(self._session, dataset_id)
        return [_reserved(row) for row in rows]

    def add_ledger_entry(
        self,
        *,
        tenant: str,
        client_id: str,
        dp_step: int,
        seq: int,
        future_id: str,
        mechanism: StepMechanism,
        delta: float,
        accountant: str,
        epsilon_after: float,
        accountant_state: str,
        dataset_id: str | None,
    ) -> None:
        """Append a charged DP step to a client's privacy ledger."""
        self._session.add(
            LedgerRow(
                tenant=tenant,
                client_id=client_id,
                dp_step=dp_step,
                seq=seq,
                future_id=future_id,
                sampling=mechanism.sampling.value,
                noise_multiplier=mechanism.noise_multiplier,
                sampling_probability=mechanism.sampling_probability,
                delta=delta,
                accountant=accountant,
                epsilon_after=epsilon_after,
                accountant_state=accountant_state,
                dataset_id=dataset_id,
                created_at=repo.now(),
            )
        )

    def add_lineage_event(
        self,
        *,
        tenant: str,
        client_id: str,
        source_client_id: str,
        checkpoint_id: str,
        future_id: str,
        private: bool,
        dp_steps_before: int,
        dp_steps_after: int,
        steps_after: int,
        epsilon_after: float,
    ) -> None:
        """Record that a client's weights took in another client's steps."""
        self._session.add(
            LineageEventRow(
                tenant=tenant,
                client_id=client_id,
                source_client_id=source_client_id,
                checkpoint_id=checkpoint_id,
                future_id=future_id,
                private=private,
                dp_steps_before=dp_steps_before,
                dp_steps_after=dp_steps_after,
                steps_after=steps_after,
                epsilon_after=epsilon_after,
                created_at=repo.now(),
            )
        )

    # ------------------------------------------------------------------ datasets

    async def dataset_key(self, tenant: str) -> WrappedKey | None:
        """The tenant's wrapped dataset key, if it has one."""
        row = await self._session.get(DatasetKeyRow, tenant)
        if row is None:
            return None
        return WrappedKey(row.key_id, row.kek_id, row.wrapped_key)

    def add_dataset_key(self, tenant: str, key: WrappedKey) -> None:
        """Store the tenant's wrapped dataset key."""
        self._session.add(
            DatasetKeyRow(
                tenant=tenant,
                key_id=key.key_id,
                kek_id=key.kek_id,
                wrapped_key=key.wrapped,
                created_at=repo.now(),
            )
        )

    async def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord:
        """A dataset of ``tenant``.

        Raises:
            NotFound: No such dataset for this tenant.
        """
        return dataset_record(await self._dataset_row(tenant, dataset_id))

    async def _dataset_row(self, tenant: str, dataset_id: str) -> DatasetRow:
        row = (
            await self._session.execute(
                sa.select(DatasetRow).where(
                    DatasetRow.id == dataset_id, DatasetRow.tenant == tenant
                )
            )
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return row

    async def dataset_by_request(self, tenant: str, request_id: str) -> DatasetRecord | None:
        """The dataset an upload with this request id stored, if any."""
        row = (
            await self._session.execute(
                sa.select(DatasetRow).where(
                    DatasetRow.tenant == tenant, DatasetRow.request_id == request_id
                )
            )
        ).scalar_one_or_none()
        return dataset_record(row) if row is not None else None

    async def stored_dataset_bytes(self, tenant: str) -> int:
        """Bytes of encrypted datasets ``tenant`` stores."""
        total = (
            await self._session.execute(
                sa.select(sa.func.coalesce(sa.func.sum(DatasetRow.size_bytes), 0)).where(
                    DatasetRow.tenant == tenant
                )
            )
        ).scalar_one()
        return int(total)

    def add_dataset(self, dataset: DatasetRecord) -> None:
        """Insert a dataset's metadata."""
        self._session.add(
            DatasetRow(
                id=dataset.id,
                tenant=dataset.tenant,
                request_id=dataset.request_id,
                request_fingerprint=dataset.request_fingerprint,
                name=dataset.name,
                base_model=dataset.base_model,
                format=dataset.format,
                records=dataset.records,
                tokens=dataset.tokens,
                key_id=dataset.key_id,
                object_path=dataset.object_path,
                sha256=dataset.sha256,
                size_bytes=dataset.size_bytes,
                epsilon_budget=dataset.epsilon_budget,
                delta=dataset.delta,
                created_at=dataset.created_at,
            )
        )

    async def list_datasets(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> Page[DatasetRecord]:
        """A page of a tenant's datasets, newest first (AIP-158)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        query = sa.select(DatasetRow).where(DatasetRow.tenant == tenant)
        if page_token:
            after_created, after_id = repo.decode_page_token(page_token)
            query = query.where(
                sa.or_(
                    DatasetRow.created_at < after_created,
                    sa.and_(DatasetRow.created_at == after_created, DatasetRow.id < after_id),
                )
            )
        query = query.order_by(DatasetRow.created_at.desc(), DatasetRow.id.desc())
        rows = list((await self._session.execute(query.limit(size + 1))).scalars())
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            created = repo.utc(last.created_at)
            assert created is not None
            token = repo.encode_page_token(created, last.id)
        return Page([dataset_record(row) for row in rows[:size]], token)

    async def delete_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord:
        """Delete a dataset's metadata; returns what it was.

        Raises:
            NotFound: No such dataset for this tenant.
        """
        row = await self._dataset_row(tenant, dataset_id)
        await self._session.delete(row)
        return dataset_record(row)

    def add_dataset_run(
        self,
        *,
        future_id: str,
        tenant: str,
        client_id: str,
        dataset_id: str,
        sample_rate: float,
        expected_batch_size: float,
        steps: int,
    ) -> None:
        """Record an admitted TrainOnDataset run (no step done yet)."""
        moment = repo.now()
        self._session.add(
            DatasetRunRow(
                future_id=future_id,
                tenant=tenant,
                client_id=client_id,
                dataset_id=dataset_id,
                sample_rate=sample_rate,
                expected_batch_size=expected_batch_size,
                steps=steps,
                steps_done=0,
                losses_json="[]",
                batch_sizes_json="[]",
                created_at=moment,
                updated_at=moment,
            )
        )

    async def dataset_run(self, future_id: str) -> DatasetRunRecord | None:
        """The run of a TrainOnDataset job, if it was admitted."""
        row = await self._session.get(DatasetRunRow, future_id)
        if row is None:
            return None
        return DatasetRunRecord(
            future_id=row.future_id,
            dataset_id=row.dataset_id,
            sample_rate=float(row.sample_rate),
            expected_batch_size=float(row.expected_batch_size),
            steps=int(row.steps),
            steps_done=int(row.steps_done),
            losses_json=row.losses_json,
            batch_sizes_json=row.batch_sizes_json,
        )

    async def record_run_progress(
        self, future_id: str, *, steps_done: int, losses_json: str, batch_sizes_json: str
    ) -> None:
        """Store how far a run got, with the step just committed."""
        row = await self._session.get(DatasetRunRow, future_id)
        assert row is not None, f"the run of job {future_id} is missing"
        row.steps_done = steps_done
        row.losses_json = losses_json
        row.batch_sizes_json = batch_sizes_json
        row.updated_at = repo.now()


class TrainerStore:
    """The trainer's database, one :class:`TrainerTransaction` per unit of work.

    Args:
        database: The trainer's database.
        futures: The futures store on ``trainer_futures``.
    """

    def __init__(self, database: Database, futures: SqlFutureStore) -> None:
        self._db = database
        self._futures = futures

    @property
    def futures(self) -> SqlFutureStore:
        """The futures store."""
        return self._futures

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[TrainerTransaction]:
        """Open a transaction: commit if the block succeeds, roll back if it raises.

        Raises:
            DuplicateRecord: An insert collided with a unique key at commit.
            Unavailable: The database cannot be reached. Aborted: a serialization
                failure (PostgreSQL).
        """
        try:
            async with self._db.transaction(read_only=read_only) as session:
                yield TrainerTransaction(session, self._futures)
        except sa_exc.IntegrityError as error:
            raise DuplicateRecord(str(error.orig)) from error
