"""The SDK's wire shapes ⇄ the trainer's contract.

Inbound: JSON bodies (pydantic models of the SDK, ``model_dump(mode="json")``) and the
protobuf ``ForwardBackwardRequest``; outbound: the trainer's future results as the JSON
or protobuf the SDK parses. Every malformed input is an ``InvalidArgument`` naming the
field as the SDK spells it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import any_pb2

from tensafe.common.errors import InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker_api.wire import tinker_public_pb2 as wire

TINKER_SCHEME = "tinker://"
TENSAFE_SCHEME = "tensafe://"
PAIRED_PREFIX = "lp."
"""Request id of a sample with prompt logprobs: ``lp.<sample future>.<scoring future>``."""
CREATED_PREFIX = "created."
"""Request id of a create_model, which TenSafe completes at once: ``created.<client id>``."""


# -- ids, paths ------------------------------------------------------------------------


def to_tensafe_path(field: str, path: str) -> str:
    """A ``tinker://`` (or ``tensafe://``) path as the trainer's ``tensafe://`` path."""
    if path.startswith(TINKER_SCHEME):
        return TENSAFE_SCHEME + path[len(TINKER_SCHEME) :]
    if path.startswith(TENSAFE_SCHEME):
        return path
    raise InvalidArgument(field, "must be a tinker:// path returned by save_state or save_weights")


def to_tinker_path(path: str) -> str:
    """The trainer's ``tensafe://`` path as the ``tinker://`` path the SDK expects."""
    if path.startswith(TENSAFE_SCHEME):
        return TINKER_SCHEME + path[len(TENSAFE_SCHEME) :]
    return path


def client_of_path(field: str, tensafe_path: str) -> str:
    """The training client id inside a ``tensafe://training_clients/<id>/...`` path."""
    parts = tensafe_path[len(TENSAFE_SCHEME) :].split("/")
    if len(parts) != 4 or parts[0] != "training_clients" or not parts[1]:
        raise InvalidArgument(
            field, "must be tinker://training_clients/<model id>/<kind>/<name> (a saved path)"
        )
    return parts[1]


def sampling_session_id(tensafe_path: str, nonce: str = "") -> str:
    """The sampling session id of sampler weights: the base64url of their path, and a
    nonce that keeps two sessions on the same weights apart (their samples' idempotency
    keys are scoped by the session id)."""
    encoded = base64.urlsafe_b64encode(tensafe_path.encode()).decode().rstrip("=")
    return f"smp-{encoded}.{nonce}" if nonce else f"smp-{encoded}"


def path_of_sampling_session(field: str, session_id: str) -> str:
    """The sampler-weights path a sampling session id encodes."""
    if not session_id.startswith("smp-"):
        raise InvalidArgument(field, "is not a sampling session id of this server")
    encoded = session_id[len("smp-") :].split(".", 1)[0]
    try:
        path = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(field, "is not a sampling session id of this server") from None
    if not path.startswith(TENSAFE_SCHEME):
        raise InvalidArgument(field, "is not a sampling session id of this server")
    return path


def paired_request_id(sample_id: str, scoring_id: str) -> str:
    """The request id of a sample whose prompt is also scored (two trainer futures)."""
    return f"{PAIRED_PREFIX}{sample_id}.{scoring_id}"


def split_paired_request_id(request_id: str) -> tuple[str, str] | None:
    """The two future ids of a paired request id; ``None`` for any other id."""
    if not request_id.startswith(PAIRED_PREFIX):
        return None
    parts = request_id[len(PAIRED_PREFIX) :].split(".")
    if len(parts) != 2 or not all(parts):
        raise InvalidArgument("request_id", "is not a request id of this server")
    return parts[0], parts[1]


LOADED_MODEL_MARK = ":train:"
"""In the model ids the SDK derives itself for a client created from a checkpoint."""


def loaded_model_id(session_id: str, model_seq_id: int) -> str:
    """The model id the SDK derives for create_training_client_from_state (0.38.0:
    ``f"{session_id}:train:{model_seq_id}"``)."""
    if not session_id or LOADED_MODEL_MARK in session_id:
        raise InvalidArgument("session_id", "must be a session id this service handed out")
    return f"{session_id}{LOADED_MODEL_MARK}{model_seq_id}"


def loaded_client_request_id(model_id: str) -> str:
    """The CreateTrainingClient request id of the client behind such a model id: the
    trainer finds the client by it (tenant-scoped), so this service keeps no table."""
    return "tinker-load:" + model_id


def idempotency_key(kind: str, scope: str, seq_id: object, request: Any) -> str:
    """The trainer's ``request_id`` of a submission: the same SDK request (retried) maps
    to the same key; another request with the same seq id does not."""
    digest = hashlib.sha256()
    for part in (kind, scope, str(seq_id)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(request.SerializeToString(deterministic=True))
    return "tinker-" + digest.hexdigest()[:48]


# -- JSON helpers ----------------------------------------------------------------------


def field(body: Mapping[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """``body[name]`` checked to be of ``kind`` (ints accepted for floats)."""
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidArgument(name, "is required")
        return None
    accepted: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise InvalidArgument(name, f"must be a {kind.__name__}")
    return value


def number(body: Mapping[str, Any], name: str, default: float) -> float:
    """``body[name]`` as a finite float, ``default`` when absent."""
    value = field(body, name, float, required=False)
    if value is None:
        return default
    if not math.isfinite(value):
        raise InvalidArgument(name, "must be finite")
    return float(value)


def integer(body: Mapping[str, Any], name: str, default: int) -> int:
    """``body[name]`` as an int, ``default`` when absent."""
    value = field(body, name, int, required=False)
    return default if value is None else int(value)


def tokens_of(field_name: str, model_input: Any) -> list[int]:
    """The token ids of a JSON ``ModelInput`` (text chunks only)."""
    if not isinstance(model_input, Mapping) or not isinstance(model_input.get("chunks"), list):
        raise InvalidArgument(field_name, "must be a ModelInput with chunks")
    tokens: list[int] = []
    for i, chunk in enumerate(model_input["chunks"]):
        kind = chunk.get("type") if isinstance(chunk, Mapping) else None
        if kind != "encoded_text":
            raise InvalidArgument(
                f"{field_name}.chunks[{i}]",
                f"chunk type {kind!r} is not supported: TenSafe trains text models only",
            )
        values = chunk.get("tokens")
        if not isinstance(values, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in values
        ):
            raise InvalidArgument(f"{field_name}.chunks[{i}].tokens", "must be a list of ints")
        tokens.extend(values)
    return tokens


# -- forward_backward ------------------------------------------------------------------


def _tensor(field_name: str, tensor: Any) -> pb.TensorData:
    if tensor.HasField("sparse_csr"):
        raise InvalidArgument(field_name, "sparse tensors are not supported; send it dense")
    shape = [int(s) for s in tensor.shape]
    if tensor.dtype == wire.DTYPE_FLOAT32:
        values = np.frombuffer(tensor.dense, dtype=np.float32)
        if not np.isfinite(values).all():
            raise InvalidArgument(field_name, "must be finite")
        out = pb.TensorData(dtype=pb.D_TYPE_FLOAT32, shape=shape)
        out.float_data.extend(values.tolist())
    elif tensor.dtype == wire.DTYPE_INT64:
        out = pb.TensorData(dtype=pb.D_TYPE_INT64, shape=shape)
        out.int_data.extend(np.frombuffer(tensor.dense, dtype=np.int64).tolist())
    else:
        raise InvalidArgument(field_name, "dtype must be float32 or int64")
    count = len(out.float_data) + len(out.int_data)
    if shape and math.prod(shape) != count:
        raise InvalidArgument(field_name, f"shape {shape} does not hold {count} values")
    return out


def datums(request: Any) -> list[pb.Datum]:
    """The trainer's datums of a wire ``ForwardBackwardRequest``."""
    out: list[pb.Datum] = []
    for i, datum in enumerate(request.data):
        name = f"forward_backward_input.data[{i}]"
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidArgument(
                    f"{name}.model_input.chunks[{j}]",
                    f"chunk type {chunk.WhichOneof('chunk')!r} is not supported: TenSafe "
                    "trains text models only",
                )
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        message = pb.Datum(
            model_input=pb.ModelInput(
                chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens))]
            )
        )
        for key, tensor in datum.loss_fn_inputs.items():
            message.loss_fn_inputs[key].CopyFrom(_tensor(f"{name}.loss_fn_inputs.{key}", tensor))
        out.append(message)
    return out


def loss_fn_config(request: Any) -> dict[str, float]:
    """The numeric loss options (the trainer's are all numbers)."""
    config = {key: float(value) for key, value in request.loss_fn_config.items()}
    for key, value in request.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise InvalidArgument(
                f"loss_fn_config.{key}", "text options are not supported; options are numbers"
            )
        config[key] = float(value.number)
    return config


# -- results ---------------------------------------------------------------------------


def _batched(values: list[pb.TensorData]) -> Any:
    """One field of every datum as the SDK's ``BatchedTensor`` (concatenated bytes and
    per-datum byte offsets)."""
    floats = values[0].dtype == pb.D_TYPE_FLOAT32
    np_type = np.float32 if floats else np.int64
    arrays = [np.asarray(v.float_data if floats else v.int_data, dtype=np_type) for v in values]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    trailing = list(values[0].shape[1:]) if len(values[0].shape) > 1 else []
    return wire.BatchedTensor(
        dtype=wire.DTYPE_FLOAT32 if floats else wire.DTYPE_INT64,
        data=b"".join(a.tobytes() for a in arrays),
        offsets=offsets.tobytes(),
        trailing_shape=trailing,
    )


def forward_backward_output(result: pb.ForwardBackwardResult) -> bytes:
    """A trainer ``ForwardBackwardResult`` as the SDK's protobuf ``ForwardBackwardOutput``."""
    output = wire.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        output.metrics[key] = value
    outputs = list(result.loss_fn_outputs)
    if outputs:
        record = output.loss_fn_outputs.add()
        record.num_datums = len(outputs)
        for name in outputs[0].outputs:
            record.fields[name].CopyFrom(_batched([o.outputs[name] for o in outputs]))
    return bytes(output.SerializeToString())


_STOP = {pb.STOP_REASON_LENGTH: wire.STOP_REASON_LENGTH, pb.STOP_REASON_STOP: wire.STOP_REASON_STOP}


def sample_response(
    result: pb.SampleResult, *, prompt_logprobs: pb.SequenceLogprobs | None = None
) -> bytes:
    """A trainer ``SampleResult`` as the SDK's protobuf ``SampleResponse``; with the
    prompt's scores, ``prompt_logprobs`` too (NaN where there is none: the first token,
    which the SDK reads as ``None``)."""
    response = wire.SampleResponse()
    if prompt_logprobs is not None:
        scores = np.asarray(prompt_logprobs.logprobs, dtype=np.float32)
        if scores.size and not prompt_logprobs.first_token_has_logprob:
            scores[0] = np.nan
        response.prompt_logprobs = scores.tobytes()
    for sequence in result.sequences:
        response.sequences.add(
            tokens=np.asarray(sequence.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(sequence.logprobs, dtype=np.float32).tobytes(),
            stop_reason=_STOP.get(sequence.stop_reason, wire.STOP_REASON_STOP),
        )
    return bytes(response.SerializeToString())


def privacy_metrics(spent: pb.PrivacySpent) -> dict[str, float]:
    """ε spent as optim_step metrics (the SDK keeps every metric it is sent)."""
    if not spent.private:
        return {"dp/private": 0.0}
    return {
        "dp/private": 1.0,
        "dp/epsilon": spent.epsilon,
        "dp/delta": spent.delta,
        "dp/steps": float(spent.steps),
        "dp/noise_multiplier": spent.noise_multiplier,
        "dp/epsilon_budget": spent.epsilon_budget,
    }


def privacy_json(spent: pb.PrivacySpent) -> dict[str, Any]:
    """The ``privacy`` block of get_info."""
    return {
        "private": spent.private,
        "epsilon": spent.epsilon if spent.private else None,
        "delta": spent.delta,
        "steps": spent.steps,
        "noise_multiplier": spent.noise_multiplier,
        "epsilon_budget": spent.epsilon_budget or None,
        "accountant": pb.Accountant.Name(spent.accountant),
    }


def json_result(result: any_pb2.Any) -> dict[str, Any] | None:
    """The JSON the SDK expects for a trainer result that is not protobuf on the wire;
    ``None`` for the protobuf ones."""
    if result.Is(pb.OptimStepResult.DESCRIPTOR):
        optim = pb.OptimStepResult()
        result.Unpack(optim)
        metrics = {key: float(value) for key, value in optim.metrics.items()}
        metrics["step"] = float(optim.step)
        metrics.update(privacy_metrics(optim.privacy_spent))
        return {"metrics": metrics}
    if result.Is(pb.SaveStateResult.DESCRIPTOR):
        saved = pb.SaveStateResult()
        result.Unpack(saved)
        return {"path": to_tinker_path(saved.path), "type": "save_weights"}
    if result.Is(pb.LoadStateResult.DESCRIPTOR):
        return {"type": "load_weights"}
    if result.Is(pb.SaveWeightsForSamplerResult.DESCRIPTOR):
        sampler = pb.SaveWeightsForSamplerResult()
        result.Unpack(sampler)
        return {
            "path": to_tinker_path(sampler.path),
            "sampling_session_id": sampling_session_id(sampler.path),
            "type": "save_weights_for_sampler",
        }
    return None


def proto_result(result: any_pb2.Any) -> bytes | None:
    """The protobuf body of a ForwardBackwardResult or SampleResult; ``None`` otherwise."""
    if result.Is(pb.ForwardBackwardResult.DESCRIPTOR):
        fwd = pb.ForwardBackwardResult()
        result.Unpack(fwd)
        return forward_backward_output(fwd)
    if result.Is(pb.SampleResult.DESCRIPTOR):
        sample = pb.SampleResult()
        result.Unpack(sample)
        return sample_response(sample)
    return None
