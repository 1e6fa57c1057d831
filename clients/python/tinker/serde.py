"""Conversion between ``tensafe.tinker.types`` and ``tensafe.trainer.v1`` messages.

Every function is exact: a value converted to its message and back is the value again
(float32 data stays float32; tests check the round trips). Inputs the contract cannot
carry raise :class:`~tensafe.common.errors.InvalidArgument` naming the field, rather
than being dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tensafe.common.errors import InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker import types

_DTYPE_TO_PROTO = {"int64": pb.D_TYPE_INT64, "float32": pb.D_TYPE_FLOAT32}
_ACCOUNTANT_TO_PROTO: dict[str, pb.Accountant.ValueType] = {
    "rdp": pb.ACCOUNTANT_RDP,
    "pld": pb.ACCOUNTANT_PLD,
}
_ACCOUNTANT_FROM_PROTO: dict[int, types.Accountant] = {
    pb.ACCOUNTANT_RDP: "rdp",
    pb.ACCOUNTANT_PLD: "pld",
}
_STOP_REASON: dict[int, types.StopReason] = {
    pb.STOP_REASON_LENGTH: "length",
    pb.STOP_REASON_STOP: "stop",
}


def tensor_to_proto(tensor: types.TensorData) -> pb.TensorData:
    """``TensorData`` → message (the shape is always sent explicitly).

    Raises:
        InvalidArgument: A 0-d tensor: the contract reads an empty shape as 1-D, so it
            would come back with shape ``[1]``.
    """
    if tensor.shape == []:
        raise InvalidArgument("tensor_data.shape", "0-d tensors are not carried; use [1]")
    shape = tensor.shape if tensor.shape is not None else [len(tensor.data)]
    message = pb.TensorData(dtype=_DTYPE_TO_PROTO[tensor.dtype], shape=shape)
    if tensor.dtype == "int64":
        message.int_data.extend(int(v) for v in tensor.data)
    else:
        message.float_data.extend(float(v) for v in tensor.data)
    return message


def tensor_from_proto(message: pb.TensorData) -> types.TensorData:
    """Message → ``TensorData``; an empty shape means 1-D.

    Raises:
        InvalidArgument: Unspecified dtype, or a shape that does not hold the data.
    """
    if message.dtype == pb.D_TYPE_INT64:
        data: list[int] | list[float] = list(message.int_data)
        dtype: types.TensorDtype = "int64"
    elif message.dtype == pb.D_TYPE_FLOAT32:
        data, dtype = list(message.float_data), "float32"
    else:
        raise InvalidArgument("tensor_data.dtype", "unspecified element type")
    shape = list(message.shape) if message.shape else [len(data)]
    if math.prod(shape) != len(data):
        raise InvalidArgument("tensor_data.shape", f"{shape} does not hold {len(data)} values")
    return types.TensorData(data=data, dtype=dtype, shape=shape)


def model_input_to_proto(model_input: types.ModelInput) -> pb.ModelInput:
    """``ModelInput`` → message, chunk by chunk."""
    return pb.ModelInput(
        chunks=[
            pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=list(chunk.tokens)))
            for chunk in model_input.chunks
        ]
    )


def model_input_from_proto(message: pb.ModelInput) -> types.ModelInput:
    """Message → ``ModelInput``."""
    return types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=list(chunk.encoded_text.tokens))
            for chunk in message.chunks
        ]
    )


def datum_to_proto(datum: types.Datum) -> pb.Datum:
    """``Datum`` → message."""
    message = pb.Datum(model_input=model_input_to_proto(datum.model_input))
    for key, tensor in datum.loss_fn_inputs.items():
        message.loss_fn_inputs[key].CopyFrom(tensor_to_proto(tensor))
    return message


def datum_from_proto(message: pb.Datum) -> types.Datum:
    """Message → ``Datum``."""
    return types.Datum(
        model_input=model_input_from_proto(message.model_input),
        loss_fn_inputs={k: tensor_from_proto(v) for k, v in message.loss_fn_inputs.items()},
    )


def forward_backward_output_from_proto(
    message: pb.ForwardBackwardResult,
) -> types.ForwardBackwardOutput:
    """The result of ForwardBackward/Forward in Tinker's shape."""
    return types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[
            {key: tensor_from_proto(value) for key, value in output.outputs.items()}
            for output in message.loss_fn_outputs
        ],
        metrics=dict(message.metrics),
    )


def forward_backward_output_to_proto(
    output: types.ForwardBackwardOutput,
) -> pb.ForwardBackwardResult:
    """Inverse of :func:`forward_backward_output_from_proto` (for tests and tools)."""
    message = pb.ForwardBackwardResult(metrics=output.metrics)
    for record in output.loss_fn_outputs:
        item = message.loss_fn_outputs.add()
        for key, tensor in record.items():
            item.outputs[key].CopyFrom(tensor_to_proto(tensor))
    return message


def adam_params_to_proto(params: types.AdamParams) -> pb.AdamParams:
    """``AdamParams`` → message.

    The contract reads 0 in ``beta1``/``beta2``/``eps`` as "default"; a caller's 0 is
    therefore refused rather than silently replaced by the default.

    Raises:
        InvalidArgument: A value the server would misread or cannot apply.
    """
    if params.grad_clip_norm != 0.0:
        raise InvalidArgument(
            "adam_params.grad_clip_norm",
            "global gradient clipping is not supported; DP clients clip per example to "
            "max_grad_norm (set at create_lora_training_client)",
        )
    for field in ("beta1", "beta2", "eps"):
        value = getattr(params, field)
        if value == 0.0:
            raise InvalidArgument(f"adam_params.{field}", "0 is reserved for the default")
    return pb.AdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
    )


def adam_params_from_proto(message: pb.AdamParams) -> types.AdamParams:
    """Message → ``AdamParams`` (0 read as the contract's defaults)."""
    return types.AdamParams(
        learning_rate=message.learning_rate,
        beta1=message.beta1 or 0.9,
        beta2=message.beta2 or 0.95,
        eps=message.eps or 1e-12,
        weight_decay=message.weight_decay,
    )


def privacy_spent_from_proto(message: pb.PrivacySpent) -> types.PrivacySpent:
    """The ledger's report in SDK form (``inf`` epsilon for a non-private client)."""
    return types.PrivacySpent(
        epsilon=message.epsilon if message.private else math.inf,
        delta=message.delta,
        accountant=_ACCOUNTANT_FROM_PROTO.get(message.accountant),
        steps=message.steps,
        noise_multiplier=message.noise_multiplier,
        epsilon_budget=message.epsilon_budget or None,
        private=message.private,
        inherited_steps=message.inherited_steps,
        non_private_steps=message.non_private_steps,
    )


def privacy_spent_to_proto(spent: types.PrivacySpent) -> pb.PrivacySpent:
    """Inverse of :func:`privacy_spent_from_proto` (for tests and tools)."""
    return pb.PrivacySpent(
        epsilon=spent.epsilon,
        delta=spent.delta,
        accountant=_ACCOUNTANT_TO_PROTO[spent.accountant]
        if spent.accountant
        else pb.ACCOUNTANT_UNSPECIFIED,
        steps=spent.steps,
        noise_multiplier=spent.noise_multiplier,
        epsilon_budget=spent.epsilon_budget or 0.0,
        private=spent.private,
        inherited_steps=spent.inherited_steps,
        non_private_steps=spent.non_private_steps,
    )


def accountant_to_proto(accountant: str) -> pb.Accountant.ValueType:
    """``"rdp"``/``"pld"`` → enum.

    Raises:
        InvalidArgument: Another name.
    """
    try:
        return _ACCOUNTANT_TO_PROTO[accountant]
    except KeyError:
        raise InvalidArgument("accountant", f"{accountant!r}: use 'rdp' or 'pld'") from None


def optim_step_response_from_proto(message: pb.OptimStepResult) -> types.OptimStepResponse:
    """The result of OptimStep; ε spent is also in ``metrics`` under the Tinker API's
    ``dp/*`` keys, so a loop that logs a step's metrics (the cookbook's) logs ε."""
    spent = (
        privacy_spent_from_proto(message.privacy_spent)
        if message.HasField("privacy_spent")
        else None
    )
    metrics = dict(message.metrics)
    if spent is not None:
        metrics["dp/private"] = 1.0 if spent.private else 0.0
        if spent.private:
            metrics["dp/epsilon"] = spent.epsilon
            metrics["dp/delta"] = spent.delta
            metrics["dp/steps"] = float(spent.steps)
            metrics["dp/noise_multiplier"] = spent.noise_multiplier
            if spent.epsilon_budget is not None:
                metrics["dp/epsilon_budget"] = spent.epsilon_budget
    return types.OptimStepResponse(metrics=metrics, step=message.step, privacy_spent=spent)


def sampling_params_to_proto(params: types.SamplingParams) -> pb.SamplingParams:
    """``SamplingParams`` → message (Tinker's ``top_k=-1`` is the contract's 0).

    Raises:
        InvalidArgument: ``max_tokens`` missing or below 1, ``top_k`` below -1 or 0,
            ``seed`` of 0 (the contract's "server draws one"), or a mixed ``stop`` list.
    """
    if params.max_tokens is None or params.max_tokens < 1:
        raise InvalidArgument("sampling_params.max_tokens", "must be given and >= 1")
    if params.top_k == 0 or params.top_k < -1:
        raise InvalidArgument("sampling_params.top_k", "must be -1 (all) or >= 1")
    if params.seed == 0:
        raise InvalidArgument("sampling_params.seed", "0 is reserved; use None or >= 1")
    message = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=0 if params.top_k == -1 else params.top_k,
        top_p=params.top_p,
        seed=params.seed or 0,
    )
    stop = params.stop
    if isinstance(stop, str):
        message.stop.append(stop)
    elif stop is not None:
        items: list[str | int] = list(stop)
        strings = [item for item in items if isinstance(item, str)]
        token_ids = [int(item) for item in items if isinstance(item, int | np.integer)]
        if len(strings) == len(items):
            message.stop.extend(strings)
        elif len(token_ids) == len(items):
            # Tinker's list of ints is a set of stop tokens, each ending a sequence alone.
            message.stop_tokens.extend(pb.EncodedTextChunk(tokens=[t]) for t in token_ids)
        else:
            raise InvalidArgument("sampling_params.stop", "mixes strings and token ids")
    return message


def sampling_params_from_proto(message: pb.SamplingParams) -> types.SamplingParams:
    """Message → ``SamplingParams`` (inverse of :func:`sampling_params_to_proto`).

    Raises:
        InvalidArgument: Both stop strings and multi-token stop sequences, which
            Tinker's ``stop`` cannot express.
    """
    stop: str | list[str] | list[int] | None = None
    if message.stop and message.stop_tokens:
        raise InvalidArgument("sampling_params.stop", "both strings and token sequences")
    if message.stop:
        stop = list(message.stop)
    elif message.stop_tokens:
        if any(len(chunk.tokens) != 1 for chunk in message.stop_tokens):
            raise InvalidArgument("sampling_params.stop_tokens", "multi-token stop sequence")
        stop = [chunk.tokens[0] for chunk in message.stop_tokens]
    return types.SamplingParams(
        max_tokens=message.max_tokens,
        seed=message.seed or None,
        stop=stop,
        temperature=message.temperature,
        top_k=-1 if message.top_k == 0 else message.top_k,
        top_p=message.top_p or 1.0,
    )


def sample_response_from_proto(
    message: pb.SampleResult,
    *,
    prompt_logprobs: list[float | None] | None = None,
    future_id: str | None = None,
) -> types.SampleResponse:
    """The result of Sample (with prompt logprobs when they were requested); with the
    Sample future's id, each sequence is named ``<future id>.<index>``."""
    sequences = []
    for index, sequence in enumerate(message.sequences):
        if sequence.stop_reason not in _STOP_REASON:
            raise InvalidArgument("sequences.stop_reason", "unspecified in the server's reply")
        sequences.append(
            types.SampledSequence(
                stop_reason=_STOP_REASON[sequence.stop_reason],
                tokens=list(sequence.tokens),
                logprobs=list(sequence.logprobs),
                sequence_id=f"{future_id}.{index}" if future_id else None,
            )
        )
    return types.SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs)


def sequence_logprobs_from_proto(message: pb.SequenceLogprobs) -> list[float | None]:
    """Per-token logprobs with Tinker's ``None`` for the first token."""
    values: list[float | None] = list(message.logprobs)
    if values and not message.first_token_has_logprob:
        values[0] = None
    return values


def dp_config_to_proto(
    *,
    dp_noise_multiplier: float | None,
    target_epsilon: float | None,
    planned_steps: int | None,
    max_grad_norm: float,
    delta: float,
    accountant: str,
    epsilon_budget: float | None,
) -> pb.DpConfig:
    """The DP settings of ``create_lora_training_client`` as a ``DpConfig``.

    Raises:
        InvalidArgument: Both or neither of the noise choices, ``target_epsilon``
            without ``planned_steps``, or an unknown accountant.
    """
    if (dp_noise_multiplier is None) == (target_epsilon is None):
        raise InvalidArgument(
            "dp_noise_multiplier", "give exactly one of dp_noise_multiplier and target_epsilon"
        )
    message = pb.DpConfig(
        max_grad_norm=max_grad_norm,
        delta=delta,
        accountant=accountant_to_proto(accountant),
        epsilon_budget=epsilon_budget or 0.0,
    )
    if dp_noise_multiplier is not None:
        if planned_steps is not None:
            message.planned_steps = planned_steps
        message.noise_multiplier = dp_noise_multiplier
    else:
        if planned_steps is None:
            raise InvalidArgument("planned_steps", "required with target_epsilon")
        assert target_epsilon is not None
        message.target_epsilon = target_epsilon
        message.planned_steps = planned_steps
    return message


def lora_target_modules(
    *, train_attn: bool | None, train_mlp: bool | None, train_unembed: bool | None
) -> list[str]:
    """Module names for Tinker's ``train_attn``/``train_mlp``/``train_unembed`` flags.

    All three ``None`` means the server's default (the attention projections). Names
    are those of Llama-style models (the families TenSafe's base models use); the
    server checks them against the model and refuses unknown ones.
    """
    if train_attn is None and train_mlp is None and train_unembed is None:
        return []
    modules: list[str] = []
    if train_attn is not False:
        modules += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if train_mlp:
        modules += ["gate_proj", "up_proj", "down_proj"]
    if train_unembed:
        modules.append("lm_head")
    if not modules:
        raise InvalidArgument("train_attn", "at least one group of modules must be trained")
    return modules


def datums_to_proto(data: Sequence[types.Datum]) -> list[pb.Datum]:
    """A batch of datums as messages.

    Raises:
        InvalidArgument: An item that is not a ``Datum``.
    """
    messages = []
    for index, datum in enumerate(data):
        if not isinstance(datum, types.Datum):
            datum = _from_official_datum(index, datum)
        messages.append(datum_to_proto(datum))
    return messages


def _from_official_datum(index: int, datum: object) -> types.Datum:
    """A datum of the official ``tinker`` SDK as ours: the cookbook builds its data with
    ``import tinker`` inside its own modules, so a recipe whose import alone was switched
    hands those to this SDK. Same fields; image chunks are refused here as on the server.

    Raises:
        InvalidArgument: Not a datum of either SDK, or one with a non-text chunk.
    """
    model_input = getattr(datum, "model_input", None)
    inputs = getattr(datum, "loss_fn_inputs", None)
    chunks = getattr(model_input, "chunks", None)
    if chunks is None or not isinstance(inputs, dict):
        raise InvalidArgument(f"data[{index}]", f"expected Datum, got {type(datum).__name__}")
    text_chunks = []
    for position, chunk in enumerate(chunks):
        tokens = getattr(chunk, "tokens", None)
        if tokens is None:
            raise InvalidArgument(
                f"data[{index}].model_input.chunks[{position}]",
                f"{type(chunk).__name__} is not supported: TenSafe trains text models only",
            )
        text_chunks.append(types.EncodedTextChunk(tokens=list(tokens)))
    converted: dict[str, types.TensorData] = {}
    for key, value in inputs.items():
        if hasattr(value, "data") and hasattr(value, "dtype"):
            converted[key] = types.TensorData(
                data=list(value.data), dtype=value.dtype, shape=getattr(value, "shape", None)
            )
        else:
            converted[key] = types.to_tensor_data(key, value)
    return types.Datum(model_input=types.ModelInput(chunks=text_chunks), loss_fn_inputs=converted)
