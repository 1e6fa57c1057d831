"""Conversions between the contract's messages and the trainer's domain values.

Validation that only needs the request happens here, with the error's field named as
in the request (``adam_params.learning_rate``, ``data[2].model_input``, ...): the engine's
own validators are reused and their field paths translated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from tensafe.common.errors import ErrorCode, InvalidArgument
from tensafe.common.futures import Future, FutureStatus
from tensafe.common.grpc_errors import ERROR_DOMAIN
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.domain.engine.config import AdamConfig, LoraConfig
from tensafe.trainer.domain.engine.sampling import SamplingParams
from tensafe.trainer.domain.jobs import CHECKPOINT_KIND, SAMPLER_KIND, checkpoint_path
from tensafe.trainer.domain.model import CheckpointRecord, StepRecord
from tensafe.trainer.domain.settings import DpSettings

if TYPE_CHECKING:
    from tensafe.trainer.domain.ledger import Lineage, PrivacyReport

ACCOUNTANT_NAMES = {pb.ACCOUNTANT_RDP: "rdp", pb.ACCOUNTANT_PLD: "pld"}
ACCOUNTANT_ENUMS = {name: value for value, name in ACCOUNTANT_NAMES.items()}

# Defaults the contract documents for zero values (AdamParams).
_DEFAULT_BETA1 = 0.9
_DEFAULT_BETA2 = 0.95
_DEFAULT_ADAM_EPS = 1e-12


def dp_to_proto(dp: DpSettings) -> pb.DpConfig:
    """The applied DP configuration as the contract reports it."""
    return pb.DpConfig(
        noise_multiplier=dp.noise_multiplier,
        planned_steps=dp.planned_steps,
        max_grad_norm=dp.max_grad_norm,
        delta=dp.delta,
        accountant=ACCOUNTANT_ENUMS[dp.accountant],
        epsilon_budget=dp.epsilon_budget or 0.0,
    )


def _finite(value: float) -> bool:
    return math.isfinite(value)


def dp_request(message: pb.DpConfig) -> tuple[DpSettings | None, float | None]:
    """Validate a DpConfig; returns settings without sigma when it must be calibrated.

    Returns:
        ``(settings, None)`` when sigma was given, or ``(None, target_epsilon)`` when it
        must be calibrated; in that case call :func:`dp_with_noise` afterwards.

    Raises:
        InvalidArgument: The offending field of ``dp``.
    """
    if not _finite(message.max_grad_norm) or message.max_grad_norm <= 0:
        raise InvalidArgument("dp.max_grad_norm", "must be positive and finite")
    if not _finite(message.delta) or not 0.0 < message.delta < 1.0:
        raise InvalidArgument("dp.delta", "must be in (0, 1)")
    if message.accountant not in ACCOUNTANT_NAMES and message.accountant != 0:
        raise InvalidArgument("dp.accountant", "must be ACCOUNTANT_RDP or ACCOUNTANT_PLD")
    if not _finite(message.epsilon_budget) or message.epsilon_budget < 0:
        raise InvalidArgument("dp.epsilon_budget", "must be >= 0 and finite")
    if message.planned_steps < 0:
        raise InvalidArgument("dp.planned_steps", "must be >= 0")
    which = message.WhichOneof("noise")
    if which is None:
        raise InvalidArgument("dp.noise", "set noise_multiplier or target_epsilon")
    if which == "noise_multiplier":
        if not _finite(message.noise_multiplier) or message.noise_multiplier <= 0:
            raise InvalidArgument(
                "dp.noise_multiplier",
                "must be positive and finite (a non-private client leaves dp unset)",
            )
        return dp_with_noise(message, message.noise_multiplier), None
    if not _finite(message.target_epsilon) or message.target_epsilon <= 0:
        raise InvalidArgument("dp.target_epsilon", "must be positive and finite")
    if message.planned_steps < 1:
        raise InvalidArgument("dp.planned_steps", "must be >= 1 with target_epsilon")
    return None, message.target_epsilon


def accountant_name(message: pb.DpConfig) -> str:
    """The accountant a DpConfig asks for; unspecified means RDP."""
    return ACCOUNTANT_NAMES.get(message.accountant, "rdp")


def dp_with_noise(message: pb.DpConfig, noise_multiplier: float) -> DpSettings:
    """Settings of a validated DpConfig with sigma resolved."""
    target = message.target_epsilon if message.WhichOneof("noise") == "target_epsilon" else None
    if message.epsilon_budget > 0:
        budget: float | None = message.epsilon_budget
    else:
        budget = target
    return DpSettings(
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=message.max_grad_norm,
        delta=message.delta,
        accountant=accountant_name(message),
        target_epsilon=target,
        planned_steps=int(message.planned_steps) if target is not None else 0,
        epsilon_budget=budget,
    )


def remap_field(error: InvalidArgument, mapping: Callable[[str], str]) -> InvalidArgument:
    """The same error with its field path rewritten to the request's names."""
    return InvalidArgument(mapping(error.field), error.description, reason=error.reason)


def _with_prefix(prefix: str) -> Callable[[str], str]:
    return lambda field: f"{prefix}.{field.split('.', 1)[-1]}" if "." in field else prefix


def lora_config(message: pb.LoraConfig, default_targets: Sequence[str]) -> LoraConfig:
    """The engine's LoRA config from the request (zero values resolved)."""
    alpha = message.alpha if message.alpha != 0 else float(message.rank)
    try:
        return LoraConfig(
            rank=int(message.rank),
            alpha=float(alpha),
            dropout=float(message.dropout),
            target_modules=tuple(message.target_modules) or tuple(default_targets),
        )
    except InvalidArgument as error:
        raise remap_field(error, lambda field: field) from error


def lora_to_proto(config: LoraConfig, seed: int) -> pb.LoraConfig:
    """The applied LoRA config as the contract reports it."""
    return pb.LoraConfig(
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=list(config.target_modules),
        seed=seed,
    )


def adam_config(message: pb.AdamParams, *, present: bool) -> AdamConfig:
    """The engine's AdamW config from AdamParams (zero values resolved).

    Raises:
        InvalidArgument: Field ``adam_params.*``.
    """
    if not present:
        raise InvalidArgument("adam_params", "is required")
    try:
        return AdamConfig(
            learning_rate=message.learning_rate,
            betas=(message.beta1 or _DEFAULT_BETA1, message.beta2 or _DEFAULT_BETA2),
            eps=message.eps or _DEFAULT_ADAM_EPS,
            weight_decay=message.weight_decay,
        )
    except InvalidArgument as error:
        raise remap_field(error, _adam_field) from error


def _adam_field(field: str) -> str:
    if field.startswith("adam.betas[0]"):
        return "adam_params.beta1"
    if field.startswith("adam.betas[1]"):
        return "adam_params.beta2"
    return _with_prefix("adam_params")(field)


def model_input_tokens(message: pb.ModelInput) -> list[int]:
    """The token ids of a ModelInput (its chunks concatenated)."""
    tokens: list[int] = []
    for chunk in message.chunks:
        tokens.extend(chunk.encoded_text.tokens)
    return tokens


def tensor_values(field: str, tensor: pb.TensorData) -> list[float] | list[int]:
    """The values of a TensorData, checked against its dtype and shape."""
    if tensor.dtype == pb.D_TYPE_INT64 or (
        tensor.dtype == pb.D_TYPE_UNSPECIFIED and tensor.int_data and not tensor.float_data
    ):
        values: list[float] | list[int] = list(tensor.int_data)
    elif tensor.dtype in (pb.D_TYPE_FLOAT32, pb.D_TYPE_UNSPECIFIED):
        values = list(tensor.float_data)
    else:
        raise InvalidArgument(f"{field}.dtype", "unknown dtype")
    if tensor.shape:
        size = math.prod(tensor.shape)
        if any(dim < 0 for dim in tensor.shape) or size != len(values):
            raise InvalidArgument(f"{field}.shape", f"does not match {len(values)} values")
    return values


@dataclasses.dataclass(frozen=True)
class Batch:
    """A ForwardBackward/Forward batch in the engine's terms."""

    sequences: list[list[int]]
    loss_fn_inputs: list[dict[str, list[float] | list[int]]]


def batch_from_data(data: Sequence[pb.Datum]) -> Batch:
    """Token sequences and per-datum loss inputs of a request's data."""
    sequences = [model_input_tokens(datum.model_input) for datum in data]
    inputs = [
        {
            name: tensor_values(f"data[{index}].loss_fn_inputs.{name}", tensor)
            for name, tensor in datum.loss_fn_inputs.items()
        }
        for index, datum in enumerate(data)
    ]
    return Batch(sequences, inputs)


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


def sampling_params(request: pb.SampleRequest) -> SamplingParams:
    """The engine's sampling parameters of a SampleRequest.

    Raises:
        InvalidArgument: Field ``sampling_params.*`` or ``num_samples``.
    """
    params = request.sampling_params
    if not request.HasField("sampling_params"):
        raise InvalidArgument("sampling_params", "is required")
    stop: list[str | tuple[int, ...]] = list(params.stop)
    for index, chunk in enumerate(params.stop_tokens):
        if not chunk.tokens:
            raise InvalidArgument(f"sampling_params.stop_tokens[{index}]", "must not be empty")
        stop.append(tuple(chunk.tokens))
    try:
        return SamplingParams(
            max_tokens=int(params.max_tokens),
            temperature=float(params.temperature),
            top_k=int(params.top_k),
            top_p=float(params.top_p) if params.top_p != 0 else 1.0,
            stop=stop,
            seed=int(params.seed) if params.seed != 0 else None,
            num_samples=int(request.num_samples),
        )
    except InvalidArgument as error:
        field = error.field
        mapped = "num_samples" if field == "num_samples" else f"sampling_params.{field}"
        raise InvalidArgument(mapped, error.description) from error


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp of an aware datetime (None stays None)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


_STATUS = {
    FutureStatus.PENDING: common_pb2.FUTURE_STATUS_PENDING,
    FutureStatus.RUNNING: common_pb2.FUTURE_STATUS_RUNNING,
    FutureStatus.SUCCEEDED: common_pb2.FUTURE_STATUS_SUCCEEDED,
    FutureStatus.FAILED: common_pb2.FUTURE_STATUS_FAILED,
    FutureStatus.CANCELLED: common_pb2.FUTURE_STATUS_CANCELLED,
}


def pack_result(message: Message) -> bytes:
    """A result message packed in ``Any`` and serialised, as futures store it."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed.SerializeToString()


def future_to_proto(future: Future) -> common_pb2.Future:
    """The contract's Future of a stored future."""
    message = common_pb2.Future(id=future.id, kind=future.kind, status=_STATUS[future.status])
    created = timestamp(future.created_at)
    if created is not None:
        message.create_time.CopyFrom(created)
    started = timestamp(future.started_at)
    if started is not None:
        message.start_time.CopyFrom(started)
    finished = timestamp(future.finished_at)
    if finished is not None:
        message.finish_time.CopyFrom(finished)
    if future.status is FutureStatus.SUCCEEDED and future.result is not None:
        message.result.CopyFrom(any_pb2.Any.FromString(future.result))
    elif future.error is not None:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=future.error.reason, domain=ERROR_DOMAIN))
        message.error.CopyFrom(
            common_pb2.ErrorStatus(
                code=_grpc_code(future.error.code), message=future.error.message, details=[info]
            )
        )
    return message


def _grpc_code(code: ErrorCode) -> int:
    import grpc

    value: int = grpc.StatusCode[code.value].value[0]
    return value


def privacy_spent(dp: DpSettings | None, report: PrivacyReport | None) -> pb.PrivacySpent:
    """The PrivacySpent message of a client (epsilon +inf for a non-private one)."""
    if dp is None or report is None:
        return pb.PrivacySpent(epsilon=math.inf, private=False)
    return pb.PrivacySpent(
        epsilon=report.epsilon,
        delta=report.delta,
        accountant=ACCOUNTANT_ENUMS[dp.accountant],
        steps=report.steps,
        noise_multiplier=dp.noise_multiplier,
        epsilon_budget=report.epsilon_budget or 0.0,
        private=True,
        inherited_steps=report.inherited_steps,
        non_private_steps=sum(source.steps for source in report.non_private_sources),
    )


def float_tensor(values: Sequence[float]) -> pb.TensorData:
    """A FLOAT32 TensorData of 1-D values."""
    return pb.TensorData(dtype=pb.D_TYPE_FLOAT32, shape=[len(values)], float_data=list(values))


def metrics_map(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as plain floats."""
    return {key: float(value) for key, value in metrics.items()}


def step_to_proto(row: StepRecord) -> pb.TrainingStep:
    """A committed optimizer step as its message."""
    message = pb.TrainingStep(
        step=int(row.step),
        private=row.dp_step is not None,
        epsilon=float(row.epsilon_after) if row.epsilon_after is not None else 0.0,
        has_loss=row.loss is not None,
        loss=float(row.loss) if row.loss is not None else 0.0,
    )
    message.create_time.FromDatetime(row.created_at)
    return message


_CHECKPOINT_KINDS = {
    CHECKPOINT_KIND: pb.CHECKPOINT_KIND_STATE,
    SAMPLER_KIND: pb.CHECKPOINT_KIND_SAMPLER,
}


def checkpoint_to_proto(row: CheckpointRecord, lineage: Lineage) -> pb.Checkpoint:
    """A saved checkpoint as its message; ``lineage`` is the one stored with it."""
    message = pb.Checkpoint(
        path=checkpoint_path(row.client_id, row.kind, row.name),
        kind=_CHECKPOINT_KINDS[row.kind],
        name=row.name,
        step=int(row.step),
        lineage_client_ids=[s.client_id for s in lineage.sources if s.client_id != row.client_id],
    )
    message.create_time.FromDatetime(row.created_at)
    return message
