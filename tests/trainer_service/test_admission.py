"""Admission through the API on SQLite and PostgreSQL: budget races, idempotency, bad
input, tenancy. The worker does not run here unless a test starts it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2

from tensafe.common.auth import SCOPE_READ
from tensafe.common.db import Database
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.store.models import BudgetReservationRow, JobRow

from .conftest import BASE_MODEL
from .helpers import corpus_sequences, create_client, datum, dp_config, expect_code, model_input


async def _count(url: str, table: Any, **where: object) -> int:
    database = Database.from_url(url)
    try:
        async with database.transaction(read_only=True) as session:
            query = sa.select(sa.func.count()).select_from(table)
            for column, value in where.items():
                query = query.where(getattr(table, column) == value)
            return int((await session.execute(query)).scalar_one())
    finally:
        await database.dispose()


async def test_concurrent_optim_steps_never_overspend_the_budget(
    make_stack: Any, database_url: str
) -> None:
    stack = await make_stack(database_url, worker=False)
    # sigma is calibrated so that exactly 10 full Gaussian steps fit epsilon = 2.
    client = await create_client(stack, dp=dp_config(target_epsilon=2.0, planned_steps=10))
    assert client.dp.noise_multiplier > 0 and client.dp.epsilon_budget == 2.0

    async def step(index: int) -> grpc.StatusCode:
        try:
            await stack.trainer.OptimStep(
                pb.OptimStepRequest(
                    training_client_id=client.id,
                    adam_params=pb.AdamParams(learning_rate=1e-3),
                    request_id=f"step-{index}",
                ),
                metadata=stack.auth,
            )
        except grpc.aio.AioRpcError as error:
            assert from_rpc_error(error).reason == "PRIVACY_BUDGET_EXHAUSTED"
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(step(index) for index in range(20)))
    assert codes.count(grpc.StatusCode.OK) == 10
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 10
    assert await _count(database_url, BudgetReservationRow, client_id=client.id) == 10
    assert await _count(database_url, JobRow, client_id=client.id) == 10


async def test_request_id_makes_calls_idempotent(make_stack: Any, database_url: str) -> None:
    stack = await make_stack(database_url, worker=False)
    client = await create_client(stack, dp=None)
    request = pb.OptimStepRequest(
        training_client_id=client.id,
        adam_params=pb.AdamParams(learning_rate=1e-3),
        request_id="same",
    )
    first = (await stack.trainer.OptimStep(request, metadata=stack.auth)).future
    again = (await stack.trainer.OptimStep(request, metadata=stack.auth)).future
    assert first.id == again.id
    assert await _count(database_url, JobRow, client_id=client.id) == 1
    request.adam_params.learning_rate = 2e-3
    error = await expect_code(
        stack.trainer.OptimStep(request, metadata=stack.auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert from_rpc_error(error).reason == "REQUEST_ID_REUSED"

    create = pb.CreateTrainingClientRequest(
        base_model=BASE_MODEL, lora=pb.LoraConfig(rank=4), request_id="create-1"
    )
    one = (await stack.trainer.CreateTrainingClient(create, metadata=stack.auth)).training_client
    two = (await stack.trainer.CreateTrainingClient(create, metadata=stack.auth)).training_client
    assert one.id == two.id


def _field(error: grpc.aio.AioRpcError) -> str:
    converted = from_rpc_error(error)
    return str(getattr(converted, "field", ""))


async def test_bad_input_is_refused_with_the_field_and_changes_nothing(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=dp_config())
    good = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    async def refused(call: Any, field: str) -> None:
        error = await expect_code(call, invalid)
        assert _field(error) == field, error.details()

    await refused(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(training_client_id=client.id, loss_fn="cross_entropy"),
            metadata=stack.auth,
        ),
        "data",
    )
    out_of_vocab = datum([*good[0][:5], 10_000, *good[0][5:]])
    await refused(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id,
                data=[datum(good[1]), out_of_vocab],
                loss_fn="cross_entropy",
            ),
            metadata=stack.auth,
        ),
        "data[1].model_input",
    )
    await refused(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id, data=[datum(good[0])], loss_fn="mse"
            ),
            metadata=stack.auth,
        ),
        "loss_fn",
    )
    await refused(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id,
                data=[datum(good[0])],
                loss_fn="cross_entropy",
                loss_fn_config={"clip_high_threshold": 1.5},
            ),
            metadata=stack.auth,
        ),
        "loss_fn_config.clip_high_threshold",
    )
    short_weights = datum(good[0])
    del short_weights.loss_fn_inputs["weights"].float_data[-1]
    await refused(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id, data=[short_weights], loss_fn="cross_entropy"
            ),
            metadata=stack.auth,
        ),
        "data[0].loss_fn_inputs.weights",
    )
    await refused(
        stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client.id, adam_params=pb.AdamParams(learning_rate=-1.0)
            ),
            metadata=stack.auth,
        ),
        "adam_params.learning_rate",
    )
    await refused(
        stack.trainer.Sample(
            pb.SampleRequest(
                training_client_id=client.id,
                prompt=model_input(good[0][:4]),
                num_samples=1,
                sampling_params=pb.SamplingParams(max_tokens=0),
            ),
            metadata=stack.auth,
        ),
        "sampling_params.max_tokens",
    )
    await refused(  # found by tests/fuzz: 2**31-1 samples were one batch in the worker
        stack.trainer.Sample(
            pb.SampleRequest(
                training_client_id=client.id,
                prompt=model_input(good[0][:4]),
                num_samples=2**31 - 1,
                sampling_params=pb.SamplingParams(max_tokens=1),
            ),
            metadata=stack.auth,
        ),
        "num_samples",
    )
    create = stack.trainer.CreateTrainingClient
    await refused(
        create(
            pb.CreateTrainingClientRequest(base_model=BASE_MODEL, lora=pb.LoraConfig(rank=0)),
            metadata=stack.auth,
        ),
        "lora.rank",
    )
    await refused(
        create(
            pb.CreateTrainingClientRequest(
                base_model=BASE_MODEL,
                lora=pb.LoraConfig(rank=4, target_modules=["not_a_layer"]),
            ),
            metadata=stack.auth,
        ),
        "lora.target_modules",
    )
    for dp, field in (
        (dp_config(delta=0.0), "dp.delta"),
        (dp_config(max_grad_norm=-1.0), "dp.max_grad_norm"),
        (dp_config(noise_multiplier=0.0), "dp.noise_multiplier"),
        (dp_config(target_epsilon=1.0), "dp.planned_steps"),
    ):
        await refused(
            create(
                pb.CreateTrainingClientRequest(
                    base_model=BASE_MODEL, lora=pb.LoraConfig(rank=4), dp=dp
                ),
                metadata=stack.auth,
            ),
            field,
        )
    await expect_code(
        create(
            pb.CreateTrainingClientRequest(base_model="no-such-model", lora=pb.LoraConfig(rank=4)),
            metadata=stack.auth,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # Nothing was accepted: no future, no job, no other client.
    futures = await stack.futures.ListFutures(common_pb2.ListFuturesRequest(), metadata=stack.auth)
    assert list(futures.futures) == []
    clients = await stack.trainer.ListTrainingClients(
        pb.ListTrainingClientsRequest(), metadata=stack.auth
    )
    assert [c.id for c in clients.training_clients] == [client.id]


async def test_other_tenants_objects_are_not_found(
    make_stack: Any, database_url: str, base_models_dir: Path
) -> None:
    stack = await make_stack(database_url, worker=False)
    client = await create_client(stack, dp=dp_config())
    future = (
        await stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client.id, adam_params=pb.AdamParams(learning_rate=1e-3)
            ),
            metadata=stack.auth,
        )
    ).future
    other = stack.tokens.metadata("another-tenant")
    not_found = grpc.StatusCode.NOT_FOUND
    await expect_code(
        stack.trainer.GetTrainingClient(
            pb.GetTrainingClientRequest(training_client_id=client.id), metadata=other
        ),
        not_found,
    )
    await expect_code(
        stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=other
        ),
        not_found,
    )
    await expect_code(
        stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client.id, adam_params=pb.AdamParams(learning_rate=1e-3)
            ),
            metadata=other,
        ),
        not_found,
    )
    # The API remembers the owner's client (base model, privacy) for validation; the
    # other tenant still gets NOT_FOUND, from the admission's own tenant check.
    batch = pb.ForwardBackwardRequest(
        training_client_id=client.id,
        data=[datum(s) for s in corpus_sequences(base_models_dir / BASE_MODEL, 2)],
        loss_fn="cross_entropy",
    )
    await stack.trainer.ForwardBackward(batch, metadata=stack.auth)
    await expect_code(stack.trainer.ForwardBackward(batch, metadata=other), not_found)
    await expect_code(
        stack.futures.GetFuture(common_pb2.GetFutureRequest(future_id=future.id), metadata=other),
        not_found,
    )
    await expect_code(
        stack.trainer.DeleteTrainingClient(
            pb.DeleteTrainingClientRequest(training_client_id=client.id), metadata=other
        ),
        not_found,
    )
    listed = await stack.trainer.ListTrainingClients(
        pb.ListTrainingClientsRequest(), metadata=other
    )
    assert list(listed.training_clients) == []
    # A reader may look but not train; no token at all is UNAUTHENTICATED.
    reader = stack.tokens.metadata(stack.tenant, scopes=[SCOPE_READ])
    await stack.trainer.GetTrainingClient(
        pb.GetTrainingClientRequest(training_client_id=client.id), metadata=reader
    )
    await expect_code(
        stack.trainer.OptimStep(
            pb.OptimStepRequest(
                training_client_id=client.id, adam_params=pb.AdamParams(learning_rate=1e-3)
            ),
            metadata=reader,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_code(
        stack.trainer.ListBaseModels(pb.ListBaseModelsRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    # The owner still sees its client unchanged.
    mine = await stack.trainer.GetTrainingClient(
        pb.GetTrainingClientRequest(training_client_id=client.id), metadata=stack.auth
    )
    assert mine.training_client.id == client.id


async def test_list_base_models_reports_the_weights_digest(
    make_stack: Any, base_models_dir: Path
) -> None:
    from tensafe.client.tiny_model import weights_digest

    stack = await make_stack(worker=False)
    models = (
        await stack.trainer.ListBaseModels(pb.ListBaseModelsRequest(), metadata=stack.auth)
    ).base_models
    assert [m.name for m in models] == [BASE_MODEL]
    model = models[0]
    assert model.weights_sha256 == weights_digest(base_models_dir / BASE_MODEL)
    assert model.max_context_length == 128
    assert {"q_proj", "v_proj", "down_proj"} <= set(model.lora_target_modules)
    assert "lm_head" not in model.lora_target_modules


@pytest.mark.parametrize("page_size", [1, 2])
async def test_training_clients_page(make_stack: Any, page_size: int) -> None:
    stack = await make_stack(worker=False)
    created = [(await create_client(stack, dp=None, seed=index + 1)).id for index in range(3)]
    seen: list[str] = []
    token = ""
    while True:
        page = await stack.trainer.ListTrainingClients(
            pb.ListTrainingClientsRequest(page_size=page_size, page_token=token),
            metadata=stack.auth,
        )
        assert len(page.training_clients) <= page_size
        seen.extend(c.id for c in page.training_clients)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(created) and len(seen) == 3


async def test_wait_future_with_a_huge_timeout_is_bounded_by_the_deadline(
    make_stack: Any, base_models_dir: Path
) -> None:
    # Found by tests/fuzz: Duration(seconds=2**63-1).ToTimedelta() overflowed (INTERNAL).
    stack = await make_stack(worker=False)
    client = await create_client(stack, dp=None)
    submitted = await stack.trainer.ForwardBackward(
        pb.ForwardBackwardRequest(
            training_client_id=client.id,
            data=[datum(corpus_sequences(base_models_dir / BASE_MODEL, 1)[0])],
            loss_fn="cross_entropy",
        ),
        metadata=stack.auth,
    )
    response = await stack.futures.WaitFuture(
        common_pb2.WaitFutureRequest(
            future_id=submitted.future.id, timeout=duration_pb2.Duration(seconds=2**63 - 1)
        ),
        metadata=stack.auth,
        timeout=1.0,
    )
    assert response.future.status == common_pb2.FUTURE_STATUS_PENDING


async def test_a_datum_twice_in_one_step_is_refused_at_admission(
    make_stack: Any, database_url: str, base_models_dir: Path
) -> None:
    stack = await make_stack(database_url, worker=False)
    private = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    a, b = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    error = await expect_code(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=private.id,
                data=[datum(a), datum(b), datum(a)],
                loss_fn="cross_entropy",
            ),
            metadata=stack.auth,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "data[2]" in (error.details() or "") and "data[0]" in (error.details() or "")
    assert from_rpc_error(error).reason == "DUPLICATE_DATUM"
    # Nothing was queued or charged.
    assert await _count(database_url, JobRow, client_id=private.id) == 0
    assert await _count(database_url, BudgetReservationRow, client_id=private.id) == 0
    # A non-private client has no per-datum guarantee to protect.
    plain = await create_client(stack, dp=None)
    await stack.trainer.ForwardBackward(
        pb.ForwardBackwardRequest(
            training_client_id=plain.id, data=[datum(a), datum(a)], loss_fn="cross_entropy"
        ),
        metadata=stack.auth,
    )
    assert await _count(database_url, JobRow, client_id=plain.id) == 1


async def test_a_client_is_found_by_its_creation_request_id_in_its_tenant_only(
    make_stack: Any,
) -> None:
    stack = await make_stack(worker=False)
    request = pb.CreateTrainingClientRequest(
        base_model=BASE_MODEL, lora=pb.LoraConfig(rank=2, alpha=4), request_id="tinker-load:s:1"
    )
    created = (
        await stack.trainer.CreateTrainingClient(request, metadata=stack.auth)
    ).training_client
    found = await stack.trainer.GetTrainingClient(
        pb.GetTrainingClientRequest(request_id="tinker-load:s:1"), metadata=stack.auth
    )
    assert found.training_client.id == created.id
    other = stack.tokens.metadata("another-tenant")
    by_request = pb.GetTrainingClientRequest(request_id="tinker-load:s:1")
    await expect_code(
        stack.trainer.GetTrainingClient(by_request, metadata=other), grpc.StatusCode.NOT_FOUND
    )
    unknown = pb.GetTrainingClientRequest(request_id="tinker-load:s:2")
    await expect_code(
        stack.trainer.GetTrainingClient(unknown, metadata=stack.auth), grpc.StatusCode.NOT_FOUND
    )
    both = pb.GetTrainingClientRequest(training_client_id=created.id, request_id="tinker-load:s:1")
    error = await expect_code(
        stack.trainer.GetTrainingClient(both, metadata=stack.auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _field(error) == "request_id"


async def test_base_model_tokenizer_files_are_served_and_nothing_else(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack(worker=False)
    served = await stack.trainer.GetBaseModelTokenizer(
        pb.GetBaseModelTokenizerRequest(base_model=BASE_MODEL), metadata=stack.auth
    )
    folder = base_models_dir / BASE_MODEL
    names = [f.name for f in served.files]
    assert "tokenizer.json" in names and "config.json" in names
    assert not any(name.endswith(".safetensors") for name in names)
    for file in served.files:
        assert file.content == (folder / file.name).read_bytes()
    assert len(served.sha256) == 64
    await expect_code(
        stack.trainer.GetBaseModelTokenizer(
            pb.GetBaseModelTokenizerRequest(base_model="no-such-model"), metadata=stack.auth
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_code(
        stack.trainer.GetBaseModelTokenizer(pb.GetBaseModelTokenizerRequest(base_model=BASE_MODEL)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
