"""Shared steps of the trainer service tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from transformers import AutoTokenizer

from tensafe.client.tiny_model import tiny_corpus
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb

from .conftest import BASE_MODEL, Stack

MAX_TOKENS = 40


def corpus_sequences(model_dir: Path, count: int, *, offset: int = 0) -> list[list[int]]:
    """Token sequences of the built-in corpus, 8..MAX_TOKENS tokens long."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = tiny_corpus()
    sequences = []
    for index in range(offset, offset + count):
        text = lines[index % len(lines)] + " " + lines[(index + 1) % len(lines)]
        tokens = tokenizer(text).input_ids
        sequences.append(tokens[: 8 + (index * 7) % (MAX_TOKENS - 8)])
    return sequences


def datum(sequence: Sequence[int]) -> pb.Datum:
    """A Tinker-style cross-entropy datum: input s[:-1], targets s[1:], weight 1."""
    message = pb.Datum(
        model_input=pb.ModelInput(
            chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=sequence[:-1]))]
        )
    )
    message.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=sequence[1:])
    )
    message.loss_fn_inputs["weights"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * (len(sequence) - 1))
    )
    return message


def model_input(tokens: Sequence[int]) -> pb.ModelInput:
    """A one-chunk ModelInput."""
    return pb.ModelInput(
        chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens))]
    )


def dp_config(**fields: object) -> pb.DpConfig:
    """A DpConfig with test defaults (sigma 1.0, C 1.0, delta 1e-5, RDP)."""
    values: dict[str, object] = {
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "accountant": pb.ACCOUNTANT_RDP,
    }
    values.update(fields)
    if "target_epsilon" not in values and "noise_multiplier" not in values:
        values["noise_multiplier"] = 1.0
    return pb.DpConfig(**values)  # type: ignore[arg-type]


async def create_client(
    stack: Stack,
    *,
    dp: pb.DpConfig | None,
    rank: int = 8,
    seed: int = 7,
    targets: Sequence[str] = (),
) -> pb.TrainingClient:
    """A training client on the tiny model."""
    request = pb.CreateTrainingClientRequest(
        base_model=BASE_MODEL,
        lora=pb.LoraConfig(rank=rank, alpha=16, seed=seed, target_modules=targets),
    )
    if dp is not None:
        request.dp.CopyFrom(dp)
    response = await stack.trainer.CreateTrainingClient(request, metadata=stack.auth)
    return response.training_client


async def wait(stack: Stack, future: common_pb2.Future, timeout: float = 60.0) -> common_pb2.Future:
    """Wait until the future is finished; fails the test after ``timeout`` seconds."""
    response = await stack.futures.WaitFuture(
        common_pb2.WaitFutureRequest(
            future_id=future.id, timeout=duration_pb2.Duration(seconds=int(timeout))
        ),
        metadata=stack.auth,
        timeout=timeout + 5,
    )
    result = response.future
    assert result.status not in (
        common_pb2.FUTURE_STATUS_PENDING,
        common_pb2.FUTURE_STATUS_RUNNING,
    ), f"future {future.id} not finished after {timeout} s"
    return result


def unpack(future: common_pb2.Future, message_type: type[Message]) -> Message:
    """The result message of a SUCCEEDED future."""
    assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
    result = message_type()
    assert isinstance(future.result, any_pb2.Any)
    assert future.result.Unpack(result)
    return result


async def expect_code(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await a call that must fail with ``code``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value


async def forward_backward(
    stack: Stack, client_id: str, sequences: Sequence[Sequence[int]]
) -> pb.ForwardBackwardResult:
    """Run one ForwardBackward and return its result."""
    response = await stack.trainer.ForwardBackward(
        pb.ForwardBackwardRequest(
            training_client_id=client_id,
            data=[datum(s) for s in sequences],
            loss_fn="cross_entropy",
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.ForwardBackwardResult)
    assert isinstance(result, pb.ForwardBackwardResult)
    return result


async def forward_loss(stack: Stack, client_id: str, sequences: Sequence[Sequence[int]]) -> float:
    """Summed cross-entropy of a batch under the current weights (no gradient kept)."""
    response = await stack.trainer.Forward(
        pb.ForwardRequest(
            training_client_id=client_id,
            data=[datum(s) for s in sequences],
            loss_fn="cross_entropy",
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.ForwardBackwardResult)
    assert isinstance(result, pb.ForwardBackwardResult)
    return result.metrics["loss:sum"]


async def optim_step(stack: Stack, client_id: str, learning_rate: float) -> pb.OptimStepResult:
    """Run one OptimStep and return its result."""
    response = await stack.trainer.OptimStep(
        pb.OptimStepRequest(
            training_client_id=client_id, adam_params=pb.AdamParams(learning_rate=learning_rate)
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.OptimStepResult)
    assert isinstance(result, pb.OptimStepResult)
    return result


async def logprobs(
    stack: Stack, client_id: str, sequences: Sequence[Sequence[int]], *, model_path: str = ""
) -> list[list[float]]:
    """ComputeLogprobs of sequences."""
    request = pb.ComputeLogprobsRequest(sequences=[model_input(s) for s in sequences])
    if model_path:
        request.model_path = model_path
    else:
        request.training_client_id = client_id
    response = await stack.trainer.ComputeLogprobs(request, metadata=stack.auth)
    result = unpack(await wait(stack, response.future), pb.ComputeLogprobsResult)
    assert isinstance(result, pb.ComputeLogprobsResult)
    return [list(sequence.logprobs) for sequence in result.sequences]
