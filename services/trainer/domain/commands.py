"""The trainer's typed commands: what a request asks the domain, without its message.

:mod:`tensafe.trainer.serde` builds them from the contract's messages. A job's request
travels as :class:`JobRequest`: its idempotency key, its fingerprint and the bytes the
job stores as its payload (the worker decodes them; the domain never does).

A field whose conversion can fail on its own (a tensor's dtype, the sampling
parameters, ...) arrives :class:`Checked`: converted at once, its error raised only
when the use case reads it, at the point the use case validated it before, so a
request with several faults is refused for the same one as ever (a missing client is
NOT_FOUND whatever its data).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar, cast

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.audit.run import CanaryKind
from tensafe.trainer.domain.datasets.records import RecordFormat
from tensafe.trainer.domain.engine.accounting import BatchSampling
from tensafe.trainer.domain.engine.config import AdamConfig, LoraConfig
from tensafe.trainer.domain.engine.sampling import SamplingParams
from tensafe.trainer.domain.jobs import JobKind
from tensafe.trainer.domain.settings import DpRequest

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Checked(Generic[T]):
    """A converted request field, or the error its conversion raised."""

    value: T | None = None
    error: InvalidArgument | None = None

    def get(self) -> T:
        """The value.

        Raises:
            InvalidArgument: The conversion's error.
        """
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


def checked(convert: Callable[[], T]) -> Checked[T]:
    """Run a conversion now and keep its InvalidArgument for later."""
    try:
        return Checked(value=convert())
    except InvalidArgument as error:
        return Checked(error=error)


def remap_field(error: InvalidArgument, mapping: Callable[[str], str]) -> InvalidArgument:
    """The same error with its field path rewritten to the request's names."""
    return InvalidArgument(mapping(error.field), error.description, reason=error.reason)


_BATCH_ITEM = re.compile(r"^batch\[(\d+)\](.*)$")
_INPUT_ITEM = re.compile(r"^loss_fn_inputs\[(\d+)\]\.?(.*)$")


def batch_field(field: str) -> str:
    """Translate an engine batch field (``batch[2]``) to the request's (``data[2]...``)."""
    if field == "batch":
        return "data"
    match = _BATCH_ITEM.match(field)
    if match:
        return f"data[{match[1]}].model_input{match[2]}"
    match = _INPUT_ITEM.match(field)
    if match:
        suffix = f".{match[2]}" if match[2] else ""
        return f"data[{match[1]}].loss_fn_inputs{suffix}"
    if field == "loss_fn_inputs":
        return "data"
    return field


@dataclasses.dataclass(frozen=True)
class Batch:
    """A ForwardBackward/Forward batch in the engine's terms."""

    sequences: list[list[int]]
    loss_fn_inputs: list[dict[str, list[float] | list[int]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRequest:
    """A request as a job stores it."""

    request_id: str
    """The caller's idempotency key (empty: none)."""
    fingerprint: str
    """sha256 of the request without its request id: a reused key with another
    request is refused."""
    payload: bytes
    """The request's bytes, the job's payload (the worker's input)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraRequest:
    """The LoRA part of a request, zero values not yet resolved."""

    rank: int
    alpha: float
    """0: the rank."""
    dropout: float
    target_modules: tuple[str, ...]
    """Empty: the base model's defaults."""
    seed: int
    """0: a random seed."""

    def config(self, default_targets: Sequence[str]) -> LoraConfig:
        """The engine's LoRA config (zero values resolved).

        Raises:
            InvalidArgument: Field ``lora.*``.
        """
        alpha = self.alpha if self.alpha != 0 else float(self.rank)
        return LoraConfig(
            rank=int(self.rank),
            alpha=float(alpha),
            dropout=float(self.dropout),
            target_modules=self.target_modules or tuple(default_targets),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CreateClient:
    """CreateTrainingClient."""

    request_id: str
    fingerprint: str
    base_model: str
    lora: LoraRequest | None
    """None: absent (refused)."""
    dp: DpRequest | None
    """None: a non-private client."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardBackward:
    """ForwardBackward, or Forward (``kind`` says which)."""

    request: JobRequest
    kind: JobKind
    client_id: str
    loss_fn: str
    loss_fn_config: Mapping[str, float]
    batch: Checked[Batch]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientJob:
    """A job whose admission needs only its client (OptimStep, whose Adam parameters
    serde has validated)."""

    request: JobRequest
    client_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """Sample, from a client's current weights or saved sampler weights."""

    request: JobRequest
    client_id: str
    model_path: str
    params: Checked[SamplingParams]
    prompt: list[int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeLogprobs:
    """ComputeLogprobs."""

    request: JobRequest
    client_id: str
    model_path: str
    sequences: list[list[int]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NamedJob:
    """A job that saves under a name (SaveState, SaveWeightsForSampler, SaveAdapter) or
    loads a path (LoadState: ``name`` is the path)."""

    request: JobRequest
    kind: JobKind
    client_id: str
    name: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditPrivacy:
    """AuditPrivacy."""

    request: JobRequest
    base_model: str
    lora: LoraRequest | None
    dp: DpRequest | None
    canary_kind: CanaryKind | None
    """None: an unknown value (refused)."""
    sampling: BatchSampling | None
    """None: an unknown value (refused)."""
    canaries: int
    guesses_per_side: int
    confidence: float
    """0: the default."""
    steps: int
    batch_size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOnDataset:
    """TrainOnDataset."""

    request: JobRequest
    client_id: str
    dataset_id: str
    steps: int
    adam: Checked[AdamConfig]
    rate: str | None
    """``sample_rate``, ``expected_batch_size`` or None (neither given)."""
    sample_rate: float
    expected_batch_size: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class UploadHeader:
    """The first message of an UploadDataset stream."""

    name: str
    base_model: str
    format: RecordFormat | None
    """None: an unknown value (refused)."""
    request_id: str
    epsilon_budget: float
    delta: float
    fingerprint_bytes: bytes
    """The header's canonical bytes without its request id (the upload's fingerprint
    covers them and the content)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UploadPart:
    """One message of an UploadDataset stream: a header, a chunk, or neither."""

    header: UploadHeader | None = None
    chunk: bytes | None = None
