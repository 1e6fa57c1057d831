"""Shared steps of the dataset service tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import dp_accounting
import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb

from .conftest import BASE_MODEL, Stack

SECRET_PHRASE = "zebra quartz violet harbor"
"""A record text the tests look for in the object files."""


def arithmetic_records(count: int) -> list[dict[str, str]]:
    """Prompt/completion records; the first holds SECRET_PHRASE."""
    records = [{"prompt": f"{SECRET_PHRASE}:", "completion": " 42"}]
    for index in range(1, count):
        a, b = index % 10, (index * 3) % 10
        records.append({"prompt": f"{a} + {b} =", "completion": f" {a + b}"})
    return records


def jsonl(records: Sequence[object]) -> bytes:
    return ("\n".join(json.dumps(record) for record in records) + "\n").encode()


async def _parts(
    data: bytes,
    *,
    name: str,
    request_id: str,
    fmt: int,
    chunk: int,
    epsilon_budget: float = 0.0,
    delta: float = 0.0,
) -> AsyncIterator[pb.UploadDatasetRequest]:
    yield pb.UploadDatasetRequest(
        header=pb.UploadDatasetHeader(
            name=name,
            base_model=BASE_MODEL,
            format=fmt,
            request_id=request_id,
            epsilon_budget=epsilon_budget,
            delta=delta,
        )
    )
    for start in range(0, len(data), chunk):
        yield pb.UploadDatasetRequest(chunk=data[start : start + chunk])


async def upload(
    stack: Stack,
    data: bytes,
    *,
    name: str = "arith",
    request_id: str = "",
    fmt: int = pb.DATASET_FORMAT_PROMPT_COMPLETION,
    auth: tuple[tuple[str, str], ...] | None = None,
    chunk: int = 37,
    epsilon_budget: float = 0.0,
    delta: float = 0.0,
) -> pb.Dataset:
    """Upload JSONL in small chunks (records span chunks)."""
    response = await stack.trainer.UploadDataset(
        _parts(
            data,
            name=name,
            request_id=request_id,
            fmt=fmt,
            chunk=chunk,
            epsilon_budget=epsilon_budget,
            delta=delta,
        ),
        metadata=auth or stack.auth,
    )
    return response.dataset


async def create_client(
    stack: Stack, *, noise_multiplier: float | None = 1.0, budget: float = 0.0, seed: int = 3
) -> pb.TrainingClient:
    request = pb.CreateTrainingClientRequest(
        base_model=BASE_MODEL, lora=pb.LoraConfig(rank=4, alpha=8, seed=seed)
    )
    if noise_multiplier is not None:
        request.dp.CopyFrom(
            pb.DpConfig(
                noise_multiplier=noise_multiplier,
                max_grad_norm=1.0,
                delta=1e-5,
                accountant=pb.ACCOUNTANT_RDP,
                epsilon_budget=budget,
            )
        )
    response = await stack.trainer.CreateTrainingClient(request, metadata=stack.auth)
    return response.training_client


async def wait(
    stack: Stack, future: common_pb2.Future, timeout: float = 120.0
) -> common_pb2.Future:
    response = await stack.futures.WaitFuture(
        common_pb2.WaitFutureRequest(
            future_id=future.id, timeout=duration_pb2.Duration(seconds=int(timeout))
        ),
        metadata=stack.auth,
        timeout=timeout + 5,
    )
    assert response.future.status not in (
        common_pb2.FUTURE_STATUS_PENDING,
        common_pb2.FUTURE_STATUS_RUNNING,
    ), f"future {future.id} not finished after {timeout} s"
    return response.future


def unpack(future: common_pb2.Future, message_type: type[Message]) -> Message:
    assert future.status == common_pb2.FUTURE_STATUS_SUCCEEDED, future.error
    result = message_type()
    assert isinstance(future.result, any_pb2.Any)
    assert future.result.Unpack(result)
    return result


async def expect_code(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value


def model_input(tokens: Sequence[int]) -> pb.ModelInput:
    return pb.ModelInput(
        chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens))]
    )


async def logprobs(
    stack: Stack, client_id: str, sequences: Sequence[Sequence[int]]
) -> list[list[float]]:
    response = await stack.trainer.ComputeLogprobs(
        pb.ComputeLogprobsRequest(
            training_client_id=client_id, sequences=[model_input(s) for s in sequences]
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.ComputeLogprobsResult)
    assert isinstance(result, pb.ComputeLogprobsResult)
    return [list(sequence.logprobs) for sequence in result.sequences]


def poisson_rdp_epsilon(*, sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's own RDP composition of Poisson-subsampled Gaussian steps."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return float(accountant.get_epsilon(delta))


def gaussian_rdp_epsilon(*, sigma: float, steps: int, delta: float) -> float:
    """dp-accounting's RDP composition of full Gaussian steps (no amplification)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), steps)
    return float(accountant.get_epsilon(delta))
