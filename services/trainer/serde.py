"""Conversions between the contract's messages and the trainer's domain values.

Requests become the typed commands of :mod:`tensafe.trainer.domain.commands` (a job's
request also as the bytes it stores, and their fingerprint); records and reports become
messages; a job's stored payload is decoded back into its request (:func:`job_request`)
for the worker. Validation that only needs the request happens here, with the error's
field named as in the request (``adam_params.learning_rate``, ``data[2].model_input``,
...): the engine's own validators are reused and their field paths translated.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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
from tensafe.trainer.domain import commands
from tensafe.trainer.domain.audit.run import AuditReport, CanaryKind
from tensafe.trainer.domain.commands import Batch, checked, remap_field
from tensafe.trainer.domain.datasets.records import RecordFormat
from tensafe.trainer.domain.engine.accounting import BatchSampling
from tensafe.trainer.domain.engine.config import AdamConfig, LoraConfig
from tensafe.trainer.domain.engine.sampling import SamplingParams
from tensafe.trainer.domain.jobs import CHECKPOINT_KIND, SAMPLER_KIND, JobKind, checkpoint_path
from tensafe.trainer.domain.ledger import client_dp
from tensafe.trainer.domain.model import CheckpointRecord, ClientRecord, DatasetRecord, StepRecord
from tensafe.trainer.domain.settings import DpRequest, DpSettings, lora_from_json

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


def dp_request(message: pb.DpConfig) -> DpRequest:
    """The DP part of a request (validated by the domain,
    :func:`tensafe.trainer.domain.settings.check_dp`)."""
    if message.accountant == pb.ACCOUNTANT_UNSPECIFIED:
        accountant = "rdp"
    else:
        accountant = ACCOUNTANT_NAMES.get(message.accountant, "")
    return DpRequest(
        noise=message.WhichOneof("noise"),
        noise_multiplier=message.noise_multiplier,
        target_epsilon=message.target_epsilon,
        max_grad_norm=message.max_grad_norm,
        delta=message.delta,
        accountant=accountant,
        epsilon_budget=message.epsilon_budget,
        planned_steps=int(message.planned_steps),
    )


def _with_prefix(prefix: str) -> Callable[[str], str]:
    return lambda field: f"{prefix}.{field.split('.', 1)[-1]}" if "." in field else prefix


def lora_request(message: pb.LoraConfig) -> commands.LoraRequest:
    """The LoRA part of a request (zero values resolved by the domain)."""
    return commands.LoraRequest(
        rank=int(message.rank),
        alpha=float(message.alpha),
        dropout=float(message.dropout),
        target_modules=tuple(message.target_modules),
        seed=int(message.seed),
    )


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


def client_to_proto(row: ClientRecord) -> pb.TrainingClient:
    """The contract's TrainingClient of a stored client."""
    lora, seed = lora_from_json(row.lora_json)
    message = pb.TrainingClient(
        id=row.id,
        base_model=row.base_model,
        lora=lora_to_proto(lora, seed),
        private=row.private,
        step=int(row.step),
        state=(
            pb.TRAINING_CLIENT_STATE_ACTIVE
            if row.state == "ACTIVE"
            else pb.TRAINING_CLIENT_STATE_DELETED
        ),
    )
    dp = client_dp(row)
    if dp is not None:
        message.dp.CopyFrom(dp_to_proto(dp))
    created = timestamp(row.created_at)
    if created is not None:
        message.create_time.CopyFrom(created)
    return message


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


# ---------------------------------------------------------------- requests -> commands


def fingerprint(message: Message) -> str:
    """sha256 of a request without its ``request_id`` (deterministic serialisation)."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def job(message: Message) -> commands.JobRequest:
    """A request as its job stores it: key, fingerprint and payload bytes."""
    return commands.JobRequest(
        request_id=getattr(message, "request_id", ""),
        fingerprint=fingerprint(message),
        payload=message.SerializeToString(deterministic=True),
    )


REQUEST_TYPES: dict[JobKind, type[Message]] = {
    JobKind.FORWARD_BACKWARD: pb.ForwardBackwardRequest,
    JobKind.FORWARD: pb.ForwardRequest,
    JobKind.OPTIM_STEP: pb.OptimStepRequest,
    JobKind.SAMPLE: pb.SampleRequest,
    JobKind.COMPUTE_LOGPROBS: pb.ComputeLogprobsRequest,
    JobKind.SAVE_STATE: pb.SaveStateRequest,
    JobKind.LOAD_STATE: pb.LoadStateRequest,
    JobKind.SAVE_WEIGHTS_FOR_SAMPLER: pb.SaveWeightsForSamplerRequest,
    JobKind.AUDIT_PRIVACY: pb.AuditPrivacyRequest,
    JobKind.SAVE_ADAPTER: pb.SaveAdapterRequest,
    JobKind.TRAIN_ON_DATASET: pb.TrainOnDatasetRequest,
}
"""The request message each job kind stores as its payload."""


def job_request(kind: JobKind, payload: bytes) -> Message:
    """Decode a job's stored payload into its request message."""
    return REQUEST_TYPES[kind].FromString(payload)


def create_client(request: pb.CreateTrainingClientRequest) -> commands.CreateClient:
    """The command of a CreateTrainingClient request."""
    return commands.CreateClient(
        request_id=request.request_id,
        fingerprint=fingerprint(request),
        base_model=request.base_model,
        lora=lora_request(request.lora) if request.HasField("lora") else None,
        dp=dp_request(request.dp) if request.HasField("dp") else None,
    )


def forward_backward(
    request: pb.ForwardBackwardRequest | pb.ForwardRequest,
) -> commands.ForwardBackward:
    """The command of a ForwardBackward or Forward request."""
    forward_only = isinstance(request, pb.ForwardRequest)
    return commands.ForwardBackward(
        request=job(request),
        kind=JobKind.FORWARD if forward_only else JobKind.FORWARD_BACKWARD,
        client_id=request.training_client_id,
        loss_fn=request.loss_fn,
        loss_fn_config=dict(request.loss_fn_config),
        batch=checked(lambda: batch_from_data(request.data)),
    )


def optim_step(request: pb.OptimStepRequest) -> commands.ClientJob:
    """The command of an OptimStep request.

    Raises:
        InvalidArgument: Field ``adam_params.*``.
    """
    adam_config(request.adam_params, present=request.HasField("adam_params"))
    return commands.ClientJob(request=job(request), client_id=request.training_client_id)


def sample(request: pb.SampleRequest) -> commands.Sample:
    """The command of a Sample request."""
    return commands.Sample(
        request=job(request),
        client_id=request.training_client_id,
        model_path=request.model_path,
        params=checked(lambda: sampling_params(request)),
        prompt=model_input_tokens(request.prompt),
    )


def compute_logprobs(request: pb.ComputeLogprobsRequest) -> commands.ComputeLogprobs:
    """The command of a ComputeLogprobs request."""
    return commands.ComputeLogprobs(
        request=job(request),
        client_id=request.training_client_id,
        model_path=request.model_path,
        sequences=[model_input_tokens(sequence) for sequence in request.sequences],
    )


def _named_job(request: Message, kind: JobKind, client_id: str, name: str) -> commands.NamedJob:
    return commands.NamedJob(request=job(request), kind=kind, client_id=client_id, name=name)


def save_state(request: pb.SaveStateRequest) -> commands.NamedJob:
    """The command of a SaveState request."""
    return _named_job(request, JobKind.SAVE_STATE, request.training_client_id, request.name)


def save_weights_for_sampler(request: pb.SaveWeightsForSamplerRequest) -> commands.NamedJob:
    """The command of a SaveWeightsForSampler request."""
    return _named_job(
        request, JobKind.SAVE_WEIGHTS_FOR_SAMPLER, request.training_client_id, request.name
    )


def save_adapter(request: pb.SaveAdapterRequest) -> commands.NamedJob:
    """The command of a SaveAdapter request."""
    return _named_job(
        request, JobKind.SAVE_ADAPTER, request.training_client_id, request.adapter_name
    )


def load_state(request: pb.LoadStateRequest) -> commands.NamedJob:
    """The command of a LoadState request (its name is the checkpoint's path)."""
    return _named_job(request, JobKind.LOAD_STATE, request.training_client_id, request.path)


_CANARY_KINDS = {
    pb.CANARY_KIND_UNSPECIFIED: CanaryKind.WHITE_BOX,
    pb.CANARY_KIND_WHITE_BOX: CanaryKind.WHITE_BOX,
    pb.CANARY_KIND_BLACK_BOX: CanaryKind.BLACK_BOX,
}
_SAMPLINGS = {
    pb.SAMPLING_UNSPECIFIED: BatchSampling.CLIENT_BATCHES,
    pb.SAMPLING_CLIENT_BATCHES: BatchSampling.CLIENT_BATCHES,
    pb.SAMPLING_POISSON: BatchSampling.POISSON,
}


def audit_privacy(request: pb.AuditPrivacyRequest) -> commands.AuditPrivacy:
    """The command of an AuditPrivacy request (also what the worker runs)."""
    return commands.AuditPrivacy(
        request=job(request),
        base_model=request.base_model,
        lora=lora_request(request.lora) if request.HasField("lora") else None,
        dp=dp_request(request.dp) if request.HasField("dp") else None,
        canary_kind=_CANARY_KINDS.get(request.canary_kind),
        sampling=_SAMPLINGS.get(request.sampling),
        canaries=int(request.canaries),
        guesses_per_side=int(request.guesses_per_side),
        confidence=request.confidence,
        steps=int(request.steps),
        batch_size=int(request.batch_size),
    )


def audit_report_to_proto(report: AuditReport) -> pb.AuditPrivacyResult:
    """The contract's AuditPrivacyResult of a report."""
    return pb.AuditPrivacyResult(
        claimed_epsilon=report.claimed_epsilon,
        epsilon_lower_bound=report.epsilon_lower_bound,
        canaries=report.canaries,
        guesses=report.guesses,
        correct_guesses=report.correct_guesses,
        confidence=report.confidence,
        delta=report.delta,
    )


def train_on_dataset(request: pb.TrainOnDatasetRequest) -> commands.TrainOnDataset:
    """The command of a TrainOnDataset request."""
    return commands.TrainOnDataset(
        request=job(request),
        client_id=request.training_client_id,
        dataset_id=request.dataset_id,
        steps=int(request.steps),
        adam=checked(
            lambda: adam_config(request.adam_params, present=request.HasField("adam_params"))
        ),
        rate=request.WhichOneof("rate"),
        sample_rate=request.sample_rate,
        expected_batch_size=request.expected_batch_size,
    )


_FORMATS = {
    pb.DATASET_FORMAT_TEXT: RecordFormat.TEXT,
    pb.DATASET_FORMAT_PROMPT_COMPLETION: RecordFormat.PROMPT_COMPLETION,
}
_FORMAT_ENUMS = {value: key for key, value in _FORMATS.items()}


def upload_header(header: pb.UploadDatasetHeader) -> commands.UploadHeader:
    """The header of an UploadDataset stream."""
    copy = pb.UploadDatasetHeader()
    copy.CopyFrom(header)
    copy.ClearField("request_id")
    return commands.UploadHeader(
        name=header.name,
        base_model=header.base_model,
        format=_FORMATS.get(header.format),
        request_id=header.request_id,
        epsilon_budget=header.epsilon_budget,
        delta=header.delta,
        fingerprint_bytes=copy.SerializeToString(deterministic=True),
    )


async def upload_parts(
    messages: AsyncIterator[pb.UploadDatasetRequest],
) -> AsyncIterator[commands.UploadPart]:
    """The parts of an UploadDataset stream, as they arrive."""
    async for message in messages:
        which = message.WhichOneof("part")
        if which == "header":
            yield commands.UploadPart(header=upload_header(message.header))
        elif which == "chunk":
            yield commands.UploadPart(chunk=message.chunk)
        else:
            yield commands.UploadPart()


def dataset_to_proto(row: DatasetRecord, epsilon_spent: float | None = None) -> pb.Dataset:
    """The contract's Dataset of a stored dataset (and the epsilon spent on it)."""
    message = pb.Dataset(
        id=row.id,
        name=row.name,
        base_model=row.base_model,
        format=_FORMAT_ENUMS[RecordFormat(row.format)],
        records=int(row.records),
        tokens=int(row.tokens),
        epsilon_budget=row.epsilon_budget or 0.0,
        delta=row.delta or 0.0,
        epsilon_spent=epsilon_spent or 0.0,
    )
    created = timestamp(row.created_at)
    if created is not None:
        message.create_time.CopyFrom(created)
    return message
