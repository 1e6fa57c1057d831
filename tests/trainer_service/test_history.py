"""ListTrainingSteps and ListCheckpoints: a client's history as the worker committed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb

from .conftest import BASE_MODEL
from .helpers import (
    corpus_sequences,
    create_client,
    dp_config,
    expect_code,
    forward_backward,
    forward_loss,
    optim_step,
    unpack,
    wait,
)


async def _save(stack: Any, client_id: str, name: str, *, sampler: bool = False) -> str:
    if sampler:
        response = await stack.trainer.SaveWeightsForSampler(
            pb.SaveWeightsForSamplerRequest(training_client_id=client_id, name=name),
            metadata=stack.auth,
        )
        result = unpack(await wait(stack, response.future), pb.SaveWeightsForSamplerResult)
    else:
        response = await stack.trainer.SaveState(
            pb.SaveStateRequest(training_client_id=client_id, name=name), metadata=stack.auth
        )
        result = unpack(await wait(stack, response.future), pb.SaveStateResult)
    assert isinstance(result, pb.SaveStateResult | pb.SaveWeightsForSamplerResult)
    return result.path


async def test_steps_report_the_loss_and_epsilon_the_client_saw(
    make_stack: Any, database_url: str, base_models_dir: Path
) -> None:
    stack = await make_stack(database_url)
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.1))
    corpus = corpus_sequences(base_models_dir / BASE_MODEL, 9)
    expected: list[tuple[int, float, float]] = []
    paths: list[str] = []
    for index in range(3):
        # Two ForwardBackward calls of unequal batches feed each step, and a Forward
        # (no gradient) in between does not: the step's loss is their pooled mean.
        first = await forward_backward(stack, client.id, corpus[3 * index : 3 * index + 1])
        await forward_loss(stack, client.id, corpus[:4])
        second = await forward_backward(stack, client.id, corpus[3 * index + 1 : 3 * index + 3])
        step = await optim_step(stack, client.id, learning_rate=5e-2)
        spent = (
            await stack.trainer.GetPrivacySpent(
                pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
            )
        ).privacy_spent
        loss = (first.metrics["loss:sum"] + second.metrics["loss:sum"]) / (
            first.metrics["tokens:sum"] + second.metrics["tokens:sum"]
        )
        expected.append((step.step, spent.epsilon, loss))
        paths.append(await _save(stack, client.id, f"after-{index + 1}"))
    paths.append(await _save(stack, client.id, "serve", sampler=True))
    epsilons = [e for _, e, _ in expected]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3

    first_page = await stack.trainer.ListTrainingSteps(
        pb.ListTrainingStepsRequest(training_client_id=client.id, page_size=2), metadata=stack.auth
    )
    assert first_page.next_page_token
    last_page = await stack.trainer.ListTrainingSteps(
        pb.ListTrainingStepsRequest(
            training_client_id=client.id, page_size=2, page_token=first_page.next_page_token
        ),
        metadata=stack.auth,
    )
    assert last_page.next_page_token == ""
    steps = [*first_page.steps, *last_page.steps]
    assert [(s.step, s.epsilon, s.loss) for s in steps] == [
        (number, pytest.approx(epsilon, rel=1e-12), pytest.approx(loss, rel=1e-9))
        for number, epsilon, loss in expected
    ]
    assert all(s.private and s.has_loss and s.HasField("create_time") for s in steps)

    checkpoints = await stack.trainer.ListCheckpoints(
        pb.ListCheckpointsRequest(training_client_id=client.id), metadata=stack.auth
    )
    assert checkpoints.next_page_token == ""
    assert [(c.path, c.kind, c.name, c.step) for c in checkpoints.checkpoints] == [
        (paths[0], pb.CHECKPOINT_KIND_STATE, "after-1", 1),
        (paths[1], pb.CHECKPOINT_KIND_STATE, "after-2", 2),
        (paths[2], pb.CHECKPOINT_KIND_STATE, "after-3", 3),
        (paths[3], pb.CHECKPOINT_KIND_SAMPLER, "serve", 3),
    ]
    assert all(not c.lineage_client_ids for c in checkpoints.checkpoints)
    paged = await stack.trainer.ListCheckpoints(
        pb.ListCheckpointsRequest(
            training_client_id=client.id,
            page_size=3,
        ),
        metadata=stack.auth,
    )
    rest = await stack.trainer.ListCheckpoints(
        pb.ListCheckpointsRequest(
            training_client_id=client.id, page_size=3, page_token=paged.next_page_token
        ),
        metadata=stack.auth,
    )
    assert [c.name for c in [*paged.checkpoints, *rest.checkpoints]] == [
        "after-1",
        "after-2",
        "after-3",
        "serve",
    ]
    assert rest.next_page_token == ""


async def test_a_loaded_checkpoint_shows_its_source_and_steps_continue_after_it(
    make_stack: Any, database_url: str, base_models_dir: Path
) -> None:
    stack = await make_stack(database_url)
    source = await create_client(stack, dp=None)
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 2)
    await forward_backward(stack, source.id, batch)
    await optim_step(stack, source.id, learning_rate=1e-2)
    path = await _save(stack, source.id, "base")
    target = await create_client(stack, dp=None)
    loaded = await stack.trainer.LoadState(
        pb.LoadStateRequest(training_client_id=target.id, path=path), metadata=stack.auth
    )
    await wait(stack, loaded.future)
    result = await forward_backward(stack, target.id, batch)
    await optim_step(stack, target.id, learning_rate=1e-2)
    await _save(stack, target.id, "continued")

    steps = (
        await stack.trainer.ListTrainingSteps(
            pb.ListTrainingStepsRequest(training_client_id=target.id), metadata=stack.auth
        )
    ).steps
    # The loaded step is the source's; the target's own history has one step, number 2.
    assert [(s.step, s.private, s.epsilon) for s in steps] == [(2, False, 0.0)]
    assert steps[0].loss == pytest.approx(
        result.metrics["loss:sum"] / result.metrics["tokens:sum"], rel=1e-9
    )
    (checkpoint,) = (
        await stack.trainer.ListCheckpoints(
            pb.ListCheckpointsRequest(training_client_id=target.id), metadata=stack.auth
        )
    ).checkpoints
    assert checkpoint.step == 2 and list(checkpoint.lineage_client_ids) == [source.id]


async def test_history_is_tenant_scoped_and_paging_is_validated(
    make_stack: Any, database_url: str
) -> None:
    stack = await make_stack(database_url, worker=False)
    client = await create_client(stack, dp=dp_config())
    other = stack.tokens.metadata("another-tenant")
    steps_request = pb.ListTrainingStepsRequest(training_client_id=client.id)
    checkpoints_request = pb.ListCheckpointsRequest(training_client_id=client.id)
    for request, call in (
        (steps_request, stack.trainer.ListTrainingSteps),
        (checkpoints_request, stack.trainer.ListCheckpoints),
    ):
        empty = await call(request, metadata=stack.auth)
        assert len(empty.ListFields()) == 0
        await expect_code(call(request, metadata=other), grpc.StatusCode.NOT_FOUND)
        unknown = type(request)(training_client_id="0" * 32)
        await expect_code(call(unknown, metadata=stack.auth), grpc.StatusCode.NOT_FOUND)
        for token in ("not-a-token", str(2**63)):
            bad_token = type(request)(training_client_id=client.id, page_token=token)
            error = await expect_code(
                call(bad_token, metadata=stack.auth), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert "page_token" in (error.details() or "")
        negative = type(request)(training_client_id=client.id, page_size=-1)
        error = await expect_code(
            call(negative, metadata=stack.auth), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "page_size" in (error.details() or "")
