"""SQLAlchemy 2.0 models of the trainer's tables (all prefixed ``trainer_``).

The schema is created by the Alembic migrations in ``migrations/versions``; these
models must match them (``tests/trainer_service/test_store.py`` checks it).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tensafe.common.futures import futures_table

TABLE_PREFIX = "trainer"
"""Prefix of every trainer table (and of its futures table)."""

VERSION_TABLE = "alembic_version_trainer"
"""The trainer's own Alembic version table."""

MIGRATIONS = "tensafe.trainer.store:migrations"
"""Where the migrations live, as ``package:folder``."""


class Base(DeclarativeBase):
    """Declarative base holding the trainer's metadata."""


FUTURES = futures_table(Base.metadata, prefix=TABLE_PREFIX)
"""The trainer's futures table (``trainer_futures``), shared schema from libs/common."""
sa.Index("ix_trainer_futures_tenant_status", FUTURES.c.tenant, FUTURES.c.status)


class TrainingClientRow(Base):
    """A LoRA training client and its progress counters."""

    __tablename__ = "trainer_training_clients"
    __table_args__ = (
        sa.UniqueConstraint("tenant", "request_id", name="uq_trainer_clients_tenant_request"),
        sa.Index("ix_trainer_clients_tenant_created", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    request_id: Mapped[str] = mapped_column(sa.String(128))
    request_fingerprint: Mapped[str] = mapped_column(sa.String(64))
    base_model: Mapped[str] = mapped_column(sa.String(128))
    lora_json: Mapped[str] = mapped_column(sa.Text)
    dp_json: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    private: Mapped[bool] = mapped_column(sa.Boolean)
    seed: Mapped[int] = mapped_column(sa.BigInteger)
    state: Mapped[str] = mapped_column(sa.String(16))
    next_seq: Mapped[int] = mapped_column(sa.BigInteger)
    """Last sequence number allocated to a job (0: none yet)."""
    applied_seq: Mapped[int] = mapped_column(sa.BigInteger)
    """Last sequence number whose job is committed (applied, failed or skipped)."""
    step: Mapped[int] = mapped_column(sa.BigInteger)
    """Optimizer steps in the committed state."""
    dp_steps: Mapped[int] = mapped_column(sa.BigInteger)
    """DP steps composed by the accountant (never rolled back, even by LoadState)."""
    epsilon_spent: Mapped[float] = mapped_column(sa.Float)
    accountant_state: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    state_path: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    state_sha256: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        sa.DateTime(timezone=True), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    lineage_json: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    """The other training clients whose steps the weights continue (migration 0004;
    :class:`tensafe.trainer.domain.ledger.Lineage`); None: none."""
    pending_loss_sum: Mapped[float] = mapped_column(
        sa.Float, default=0.0, server_default=sa.text("0")
    )
    """``loss:sum`` of the ForwardBackward jobs committed since the last optimizer step
    (0005): the loss of the gradients the next step applies."""
    pending_tokens: Mapped[float] = mapped_column(
        sa.Float, default=0.0, server_default=sa.text("0")
    )
    """``tokens:sum`` of those ForwardBackward jobs (0005)."""


class JobRow(Base):
    """An accepted job: its request, kept until the worker commits it (the outbox)."""

    __tablename__ = "trainer_jobs"
    __table_args__ = (
        sa.UniqueConstraint("client_id", "seq", name="uq_trainer_jobs_client_seq"),
        sa.Index("ix_trainer_jobs_status_created", "status", "created_at"),
    )

    future_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    kind: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)
    status: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class BudgetReservationRow(Base):
    """Privacy cost of an admitted OptimStep, held until its job commits or is dropped."""

    __tablename__ = "trainer_budget_reservations"
    __table_args__ = (sa.Index("ix_trainer_reservations_client_status", "client_id", "status"),)

    future_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    sampling: Mapped[str] = mapped_column(sa.String(32))
    noise_multiplier: Mapped[float] = mapped_column(sa.Float)
    sampling_probability: Mapped[float] = mapped_column(sa.Float)
    status: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    steps: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("1"))
    """DP steps still reserved: 1 for an OptimStep; a TrainOnDataset run reserves all its
    steps at admission and gives one back with each committed step (migration 0002)."""
    dataset_id: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    """The server-held dataset the steps sample from (its own budget); migration 0004."""


class LedgerRow(Base):
    """One DP optimizer step as the accountant composed it (kept after deletion)."""

    __tablename__ = "trainer_privacy_ledger"
    __table_args__ = (
        sa.UniqueConstraint("client_id", "dp_step", name="uq_trainer_ledger_client_step"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    dp_step: Mapped[int] = mapped_column(sa.BigInteger)
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    future_id: Mapped[str] = mapped_column(sa.String(32))
    sampling: Mapped[str] = mapped_column(sa.String(32))
    noise_multiplier: Mapped[float] = mapped_column(sa.Float)
    sampling_probability: Mapped[float] = mapped_column(sa.Float)
    delta: Mapped[float] = mapped_column(sa.Float)
    accountant: Mapped[str] = mapped_column(sa.String(16))
    epsilon_after: Mapped[float] = mapped_column(sa.Float)
    accountant_state: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    dataset_id: Mapped[str | None] = mapped_column(sa.String(32), nullable=True, index=True)
    """The server-held dataset the step sampled from; None for client batches (0004)."""


class StepRow(Base):
    """One committed optimizer step of a client: its loss and epsilon after it (0005).

    Keyed by the job's sequence number, not the step number: a LoadState may take the
    step counter back, and the steps taken after it are new rows.
    """

    __tablename__ = "trainer_steps"
    __table_args__ = (sa.Index("ix_trainer_steps_client", "client_id", "id"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    future_id: Mapped[str] = mapped_column(sa.String(32))
    step: Mapped[int] = mapped_column(sa.BigInteger)
    """The optimizer step number after the step."""
    dp_step: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    """The privacy ledger's step (None: a step without DP)."""
    epsilon_after: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    """Mean loss per token of the step's batch; None when no ForwardBackward fed it."""
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class LineageEventRow(Base):
    """A training client's weights took on another client's privacy history (LoadState).

    Append-only, like the ledger: ``epsilon_after`` is the client's epsilon once the
    inherited steps were composed.
    """

    __tablename__ = "trainer_privacy_lineage"
    __table_args__ = (sa.Index("ix_trainer_lineage_client", "client_id", "id"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    source_client_id: Mapped[str] = mapped_column(sa.String(32))
    checkpoint_id: Mapped[str] = mapped_column(sa.String(32))
    future_id: Mapped[str] = mapped_column(sa.String(32))
    private: Mapped[bool] = mapped_column(sa.Boolean)
    dp_steps_before: Mapped[int] = mapped_column(sa.BigInteger)
    dp_steps_after: Mapped[int] = mapped_column(sa.BigInteger)
    steps_after: Mapped[int] = mapped_column(sa.BigInteger)
    epsilon_after: Mapped[float] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class CheckpointRow(Base):
    """A named checkpoint (``state``) or frozen sampler weights (``sampler``)."""

    __tablename__ = "trainer_checkpoints"
    __table_args__ = (
        sa.UniqueConstraint("client_id", "kind", "name", name="uq_trainer_checkpoints_name"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    kind: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(64))
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    step: Mapped[int] = mapped_column(sa.BigInteger)
    object_path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    accountant_state: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    lineage_json: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    """The privacy lineage of the saved weights, the saving client included (0004)."""


class DatasetKeyRow(Base):
    """A tenant's dataset data key, wrapped by the trainer's key-encryption key."""

    __tablename__ = "trainer_dataset_keys"

    tenant: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    key_id: Mapped[str] = mapped_column(sa.String(32))
    kek_id: Mapped[str] = mapped_column(sa.String(64))
    wrapped_key: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


class DatasetRow(Base):
    """A server-held, tokenised dataset; its records live encrypted in the object folder."""

    __tablename__ = "trainer_datasets"
    __table_args__ = (
        sa.UniqueConstraint("tenant", "request_id", name="uq_trainer_datasets_tenant_request"),
        sa.Index("ix_trainer_datasets_tenant_created", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    request_id: Mapped[str] = mapped_column(sa.String(128))
    request_fingerprint: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(64))
    base_model: Mapped[str] = mapped_column(sa.String(128))
    format: Mapped[str] = mapped_column(sa.String(32))
    records: Mapped[int] = mapped_column(sa.BigInteger)
    tokens: Mapped[int] = mapped_column(sa.BigInteger)
    key_id: Mapped[str] = mapped_column(sa.String(32))
    object_path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    """Bytes of the encrypted object; counts toward the tenant's storage quota
    (migration 0003; 0 for datasets stored before it)."""
    epsilon_budget: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    """The dataset's own budget over every client and job that samples it (0004)."""
    delta: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    """The delta the dataset's budget is at."""


class DatasetRunRow(Base):
    """Progress of a TrainOnDataset job, committed with each of its steps."""

    __tablename__ = "trainer_dataset_runs"

    future_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(128))
    client_id: Mapped[str] = mapped_column(sa.String(32))
    dataset_id: Mapped[str] = mapped_column(sa.String(32))
    sample_rate: Mapped[float] = mapped_column(sa.Float)
    expected_batch_size: Mapped[float] = mapped_column(sa.Float)
    steps: Mapped[int] = mapped_column(sa.BigInteger)
    steps_done: Mapped[int] = mapped_column(sa.BigInteger)
    losses_json: Mapped[str] = mapped_column(sa.Text)
    batch_sizes_json: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
