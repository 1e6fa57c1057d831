"""The trainer's domain records: what the store hands the domain and the servicer.

Plain frozen dataclasses, one per stored thing the use cases read (the ORM rows stay
in :mod:`tensafe.trainer.store`). :class:`ClientState` and :class:`CheckpointState` are
the read-only views the privacy ledger needs; both the records here and the rows a
worker holds locked in its own transaction satisfy them.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from tensafe.trainer.domain.engine.accounting import StepMechanism

CLIENT_ACTIVE = "ACTIVE"
"""``state`` of a training client that exists."""

CLIENT_DELETED = "DELETED"
"""``state`` of a deleted training client (its ledger stays for audit)."""

T = TypeVar("T")


class DuplicateRecord(Exception):
    """An insert collided with a unique key at commit (a concurrent request won)."""


class ClientState(Protocol):
    """What the ledger reads of a training client."""

    @property
    def id(self) -> str: ...  # noqa: D102

    @property
    def tenant(self) -> str: ...  # noqa: D102

    @property
    def dp_json(self) -> str | None: ...  # noqa: D102

    @property
    def accountant_state(self) -> str | None: ...  # noqa: D102

    @property
    def lineage_json(self) -> str | None: ...  # noqa: D102

    @property
    def dp_steps(self) -> int: ...  # noqa: D102

    @property
    def step(self) -> int: ...  # noqa: D102

    @property
    def epsilon_spent(self) -> float: ...  # noqa: D102


class CheckpointState(Protocol):
    """What the ledger reads of a checkpoint."""

    @property
    def id(self) -> str: ...  # noqa: D102

    @property
    def client_id(self) -> str: ...  # noqa: D102

    @property
    def name(self) -> str: ...  # noqa: D102

    @property
    def step(self) -> int: ...  # noqa: D102

    @property
    def accountant_state(self) -> str | None: ...  # noqa: D102

    @property
    def lineage_json(self) -> str | None: ...  # noqa: D102


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientRecord:
    """A LoRA training client and its progress counters."""

    id: str
    tenant: str
    request_id: str
    request_fingerprint: str
    base_model: str
    lora_json: str
    """The applied LoRA config and its seed (:func:`.settings.lora_to_json`)."""
    dp_json: str | None
    """The DP settings (:class:`.settings.DpSettings`); None: non-private."""
    private: bool
    seed: int
    state: str
    """:data:`CLIENT_ACTIVE` or :data:`CLIENT_DELETED`."""
    next_seq: int
    """Last sequence number allocated to a job (0: none yet)."""
    applied_seq: int
    """Last sequence number whose job is committed."""
    step: int
    """Optimizer steps in the committed state."""
    dp_steps: int
    """DP steps composed by the accountant."""
    epsilon_spent: float
    accountant_state: str | None
    state_path: str | None
    state_sha256: str | None
    created_at: datetime
    lineage_json: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """A saved state or sampler weights of a training client."""

    id: str
    tenant: str
    client_id: str
    kind: str
    """:data:`tensafe.trainer.domain.jobs.CHECKPOINT_KIND` or ``SAMPLER_KIND``."""
    name: str
    seq: int
    step: int
    object_path: str
    sha256: str
    accountant_state: str | None
    created_at: datetime
    lineage_json: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRecord:
    """A committed optimizer step of a training client."""

    step: int
    dp_step: int | None
    """The ledger's DP step; None for a step without DP."""
    epsilon_after: float | None
    loss: float | None
    created_at: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetRecord:
    """A server-held dataset's metadata (its records are encrypted in the object folder)."""

    id: str
    tenant: str
    request_id: str
    request_fingerprint: str
    name: str
    base_model: str
    format: str
    """A :class:`tensafe.trainer.domain.datasets.records.RecordFormat` value."""
    records: int
    tokens: int
    key_id: str
    object_path: str
    sha256: str
    size_bytes: int
    epsilon_budget: float | None
    delta: float | None
    created_at: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetRunRecord:
    """An admitted TrainOnDataset run and how far it got."""

    future_id: str
    dataset_id: str
    sample_rate: float
    expected_batch_size: float
    steps: int
    steps_done: int
    losses_json: str
    """Mean loss of each committed step (JSON list; null for an empty batch)."""
    batch_sizes_json: str
    """Records of each committed step's batch (JSON list)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueuedJob:
    """A job accepted and not yet committed by a worker (an outbox entry)."""

    future_id: str
    client_id: str
    seq: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChargedStep:
    """A DP step in a privacy ledger or a reservation: its mechanism, how many times."""

    mechanism: StepMechanism
    steps: int = 1
    dp_step: int = 0
    """The ledger's step number (ledger entries; 0 for reservations)."""


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the token of the next (empty: the last page)."""

    items: list[T]
    next_page_token: str
