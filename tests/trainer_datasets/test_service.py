"""Server-held datasets end to end: the real trainer API and worker over gRPC."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from tensafe.common.db import Database
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.store.models import BudgetReservationRow, DatasetRunRow, LedgerRow

from .conftest import Stack, StackFactory
from .helpers import (
    SECRET_PHRASE,
    arithmetic_records,
    create_client,
    expect_code,
    gaussian_rdp_epsilon,
    jsonl,
    logprobs,
    poisson_rdp_epsilon,
    unpack,
    upload,
    wait,
)

ADAM = pb.AdamParams(learning_rate=1e-2)


async def _rows(stack: Stack, model: type, **where: object) -> list:
    database = Database.from_url(stack.config.database_url)
    try:
        async with database.transaction(read_only=True) as session:
            query = sa.select(model).filter_by(**where)
            return list((await session.execute(query)).scalars())
    finally:
        await database.dispose()


def _object_files(stack: Stack) -> list[Path]:
    return [path for path in (Path(stack.config.data_dir) / "trainer").rglob("*") if path.is_file()]


async def test_upload_is_tokenised_encrypted_and_tenant_scoped(make_stack: StackFactory) -> None:
    stack = await make_stack()
    records = arithmetic_records(12)
    dataset = await upload(stack, jsonl(records), request_id="upload-1")
    assert dataset.records == 12
    assert dataset.tokens > 12 * 3
    assert dataset.format == pb.DATASET_FORMAT_PROMPT_COMPLETION
    # Idempotent by request id: the same upload returns the same dataset.
    again = await upload(stack, jsonl(records), request_id="upload-1")
    assert again.id == dataset.id
    # A different upload under the same request id is refused.
    await expect_code(
        upload(stack, jsonl(records[:3]), request_id="upload-1"), grpc.StatusCode.INVALID_ARGUMENT
    )

    got = await stack.trainer.GetDataset(
        pb.GetDatasetRequest(dataset_id=dataset.id), metadata=stack.auth
    )
    assert got.dataset == dataset
    listed = await stack.trainer.ListDatasets(pb.ListDatasetsRequest(), metadata=stack.auth)
    assert [d.id for d in listed.datasets] == [dataset.id]

    # Encrypted at rest: no object file holds a record's text (nor the JSONL).
    files = _object_files(stack)
    assert any(path.suffix == ".tsds" for path in files)
    for path in files:
        content = path.read_bytes()
        assert SECRET_PHRASE.encode() not in content
        assert b"zebra" not in content
        assert b'"completion"' not in content
    # The database holds metadata only.
    database_bytes = Path(stack.config.database_url.split("///", 1)[1]).read_bytes()
    assert SECRET_PHRASE.encode() not in database_bytes

    # Another tenant can neither see nor use it.
    other = stack.other_auth
    await expect_code(
        stack.trainer.GetDataset(pb.GetDatasetRequest(dataset_id=dataset.id), metadata=other),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not (await stack.trainer.ListDatasets(pb.ListDatasetsRequest(), metadata=other)).datasets
    await expect_code(
        stack.trainer.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=dataset.id), metadata=other),
        grpc.StatusCode.NOT_FOUND,
    )
    other_client = await stack.trainer.CreateTrainingClient(
        pb.CreateTrainingClientRequest(
            base_model="tiny-llama",
            lora=pb.LoraConfig(rank=4, seed=1),
            dp=pb.DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
        ),
        metadata=other,
    )
    await expect_code(
        stack.trainer.TrainOnDataset(
            pb.TrainOnDatasetRequest(
                training_client_id=other_client.training_client.id,
                dataset_id=dataset.id,
                sample_rate=0.5,
                steps=1,
                adam_params=ADAM,
            ),
            metadata=other,
        ),
        grpc.StatusCode.NOT_FOUND,
    )

    # Deleting removes the metadata and the ciphertext.
    await stack.trainer.DeleteDataset(
        pb.DeleteDatasetRequest(dataset_id=dataset.id), metadata=stack.auth
    )
    await expect_code(
        stack.trainer.GetDataset(pb.GetDatasetRequest(dataset_id=dataset.id), metadata=stack.auth),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not any(path.suffix == ".tsds" for path in _object_files(stack))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """SQLite (the stack's default file) and PostgreSQL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("fresh_postgres_url"))


async def test_server_poisson_training_is_accounted_with_amplification(
    make_stack: StackFactory, database_url: str | None
) -> None:
    stack = await make_stack(database_url=database_url)
    dataset = await upload(stack, jsonl(arithmetic_records(40)))
    sigma, q, steps = 1.0, 0.1, 8
    client = await create_client(stack, noise_multiplier=sigma)
    response = await stack.trainer.TrainOnDataset(
        pb.TrainOnDatasetRequest(
            training_client_id=client.id,
            dataset_id=dataset.id,
            sample_rate=q,
            steps=steps,
            adam_params=ADAM,
        ),
        metadata=stack.auth,
    )
    # Progress is pollable while the run goes on: the committed steps only grow.
    observed: list[int] = []
    while True:
        future = (
            await stack.futures.GetFuture(
                common_pb2.GetFutureRequest(future_id=response.future.id), metadata=stack.auth
            )
        ).future
        spent = (
            await stack.trainer.GetPrivacySpent(
                pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
            )
        ).privacy_spent
        observed.append(int(spent.steps))
        if future.status not in (
            common_pb2.FUTURE_STATUS_PENDING,
            common_pb2.FUTURE_STATUS_RUNNING,
        ):
            break
        await asyncio.sleep(0.02)  # polling cadence, not synchronisation
    assert observed == sorted(observed)
    result = unpack(await wait(stack, response.future), pb.TrainOnDatasetResult)
    assert isinstance(result, pb.TrainOnDatasetResult)
    assert result.steps == steps
    assert len(result.batch_sizes) == steps and len(result.losses) == steps
    for size, loss in zip(result.batch_sizes, result.losses, strict=True):
        assert 0 <= size <= 40
        assert math.isnan(loss) if size == 0 else loss > 0
    # Empirical inclusion rate within 5 standard errors of q.
    trials = 40 * steps
    rate = sum(result.batch_sizes) / trials
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / trials)

    # epsilon is dp-accounting's PoissonSampledDpEvent composition.
    expected = poisson_rdp_epsilon(sigma=sigma, q=q, steps=steps, delta=1e-5)
    assert math.isclose(result.privacy_spent.epsilon, expected, rel_tol=1e-6)
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    assert spent.steps == steps
    assert math.isclose(spent.epsilon, expected, rel_tol=1e-6)
    # The step history holds the run's losses (an empty batch has none) and ends at
    # the epsilon GetPrivacySpent reports.
    history = (
        await stack.trainer.ListTrainingSteps(
            pb.ListTrainingStepsRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).steps
    assert [s.step for s in history] == list(range(1, steps + 1))
    assert [s.loss if s.has_loss else math.nan for s in history] == pytest.approx(
        list(result.losses), nan_ok=True
    )
    assert history[-1].epsilon == spent.epsilon
    trained = (
        await stack.trainer.GetTrainingClient(
            pb.GetTrainingClientRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).training_client
    assert trained.step == steps

    # The ledger holds one Poisson step per optimizer step, each with its epsilon.
    ledger = sorted(await _rows(stack, LedgerRow, client_id=client.id), key=lambda r: r.dp_step)
    assert [row.dp_step for row in ledger] == list(range(1, steps + 1))
    assert {row.sampling for row in ledger} == {"poisson"}
    assert {row.sampling_probability for row in ledger} == {q}
    for row in ledger:
        assert math.isclose(
            row.epsilon_after,
            poisson_rdp_epsilon(sigma=sigma, q=q, steps=row.dp_step, delta=1e-5),
            rel_tol=1e-6,
        )
    (reservation,) = await _rows(stack, BudgetReservationRow, future_id=response.future.id)
    assert (reservation.status, reservation.steps) == ("CONSUMED", 0)

    # The same sigma and number of steps over client batches: no amplification, larger.
    client_batches = await create_client(stack, noise_multiplier=sigma, seed=4)
    datum = pb.Datum(
        model_input=pb.ModelInput(
            chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=[1, 5, 9, 13]))]
        )
    )
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=[5, 9, 13, 2])
    )
    datum.loss_fn_inputs["weights"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * 4)
    )
    for _ in range(steps):
        await stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client_batches.id, data=[datum], loss_fn="cross_entropy"
            ),
            metadata=stack.auth,
        )
        step = await stack.trainer.OptimStep(
            pb.OptimStepRequest(training_client_id=client_batches.id, adam_params=ADAM),
            metadata=stack.auth,
        )
    unpack(await wait(stack, step.future), pb.OptimStepResult)
    unamplified = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client_batches.id), metadata=stack.auth
        )
    ).privacy_spent
    assert unamplified.steps == steps
    assert math.isclose(
        unamplified.epsilon,
        gaussian_rdp_epsilon(sigma=sigma, steps=steps, delta=1e-5),
        rel_tol=1e-6,
    )
    assert unamplified.epsilon > 2 * spent.epsilon


async def test_empty_poisson_batches_apply_noise_only_updates(make_stack: StackFactory) -> None:
    stack = await make_stack()
    dataset = await upload(stack, jsonl(arithmetic_records(5)))
    client = await create_client(stack, noise_multiplier=1.0)
    probe = [[1, 7, 11, 30, 2]]
    before = await logprobs(stack, client.id, probe)
    response = await stack.trainer.TrainOnDataset(
        pb.TrainOnDatasetRequest(
            training_client_id=client.id,
            dataset_id=dataset.id,
            sample_rate=1e-9,  # P(any record drawn in 3 steps) ~ 1.5e-8
            steps=3,
            adam_params=ADAM,
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.TrainOnDatasetResult)
    assert isinstance(result, pb.TrainOnDatasetResult)
    assert list(result.batch_sizes) == [0, 0, 0]
    assert all(math.isnan(loss) for loss in result.losses)
    # Empty batches are steps: charged, and the noise moved the adapter.
    assert result.privacy_spent.steps == 3
    assert math.isclose(
        result.privacy_spent.epsilon,
        poisson_rdp_epsilon(sigma=1.0, q=1e-9, steps=3, delta=1e-5),
        rel_tol=1e-6,
    )
    after = await logprobs(stack, client.id, probe)
    assert max(abs(a - b) for a, b in zip(after[0], before[0], strict=True)) > 1e-6


async def test_bad_requests_are_refused_and_change_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack()
    dataset = await upload(stack, jsonl(arithmetic_records(10)))
    client = await create_client(stack, noise_multiplier=1.0, budget=1.0)

    def request(**fields: object) -> pb.TrainOnDatasetRequest:
        values: dict[str, object] = {
            "training_client_id": client.id,
            "dataset_id": dataset.id,
            "steps": 2,
            "adam_params": ADAM,
        }
        values.update(fields)
        if "sample_rate" not in values and "expected_batch_size" not in values:
            values["sample_rate"] = 0.5
        return pb.TrainOnDatasetRequest(**values)  # type: ignore[arg-type]

    invalid = [
        request(sample_rate=0.0),
        request(sample_rate=1.5),
        request(sample_rate=-0.2),
        request(expected_batch_size=11.0),
        request(expected_batch_size=-1.0),
        request(steps=0),
        request(adam_params=pb.AdamParams(learning_rate=-1.0)),
    ]
    for bad in invalid:
        error = await expect_code(
            stack.trainer.TrainOnDataset(bad, metadata=stack.auth), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert error.details()
    # More steps than one job may run (max_steps_per_job, 100,000 by default).
    error = await expect_code(
        stack.trainer.TrainOnDataset(request(steps=100_001), metadata=stack.auth),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "max_steps_per_job=100000" in error.details()
    # Over the budget: sigma=1 for 1000 steps at q=0.5 is far above epsilon=1.
    error = await expect_code(
        stack.trainer.TrainOnDataset(request(steps=1000), metadata=stack.auth),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "budget" in error.details()
    # A non-private client cannot train on a server-held dataset.
    public = await create_client(stack, noise_multiplier=None)
    await expect_code(
        stack.trainer.TrainOnDataset(request(training_client_id=public.id), metadata=stack.auth),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await expect_code(
        stack.trainer.TrainOnDataset(request(dataset_id="0" * 32), metadata=stack.auth),
        grpc.StatusCode.NOT_FOUND,
    )
    # Uploads: zero records, a record longer than the context, a bad format.
    for data, fmt in [
        (b"\n", pb.DATASET_FORMAT_TEXT),
        (jsonl([{"text": "fine"}, {"text": "long " * 200}]), pb.DATASET_FORMAT_TEXT),
        (jsonl([{"text": "fine"}]), pb.DATASET_FORMAT_UNSPECIFIED),
    ]:
        await expect_code(
            upload(stack, data, name="bad", fmt=fmt), grpc.StatusCode.INVALID_ARGUMENT
        )
    # RL advantages of the wrong length.
    datum = pb.Datum(
        model_input=pb.ModelInput(
            chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=[1, 5, 9]))]
        )
    )
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=[5, 9, 2])
    )
    datum.loss_fn_inputs["logprobs"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[-1.0] * 3)
    )
    datum.loss_fn_inputs["advantages"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * 2)
    )
    error = await expect_code(
        stack.trainer.ForwardBackward(
            pb.ForwardBackwardRequest(
                training_client_id=client.id, data=[datum], loss_fn="importance_sampling"
            ),
            metadata=stack.auth,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "advantages" in error.details()

    # Nothing changed: one dataset, no step, no epsilon, no reservation, no run.
    listed = await stack.trainer.ListDatasets(pb.ListDatasetsRequest(), metadata=stack.auth)
    assert [d.id for d in listed.datasets] == [dataset.id]
    assert sum(path.suffix == ".tsds" for path in _object_files(stack)) == 1
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    assert (spent.steps, spent.epsilon) == (0, 0.0)
    assert await _rows(stack, BudgetReservationRow, client_id=client.id) == []
    assert await _rows(stack, DatasetRunRow, client_id=client.id) == []


async def test_pending_client_gradients_are_never_mixed_into_a_poisson_step(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    dataset = await upload(stack, jsonl(arithmetic_records(6)))
    client = await create_client(stack, noise_multiplier=1.0)
    datum = pb.Datum(
        model_input=pb.ModelInput(
            chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=[1, 5, 9]))]
        )
    )
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=[5, 9, 2])
    )
    datum.loss_fn_inputs["weights"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * 3)
    )
    await stack.trainer.ForwardBackward(
        pb.ForwardBackwardRequest(
            training_client_id=client.id, data=[datum], loss_fn="cross_entropy"
        ),
        metadata=stack.auth,
    )
    response = await stack.trainer.TrainOnDataset(
        pb.TrainOnDatasetRequest(
            training_client_id=client.id,
            dataset_id=dataset.id,
            sample_rate=0.5,
            steps=2,
            adam_params=ADAM,
        ),
        metadata=stack.auth,
    )
    future = await wait(stack, response.future)
    assert future.status == common_pb2.FUTURE_STATUS_FAILED
    assert future.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "OptimStep" in future.error.message
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    assert spent.steps == 0
    (reservation,) = await _rows(stack, BudgetReservationRow, future_id=response.future.id)
    assert reservation.status == "RELEASED"


async def test_a_run_handed_back_at_shutdown_resumes_without_double_charging(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    dataset = await upload(stack, jsonl(arithmetic_records(5)))
    client = await create_client(stack, noise_multiplier=1.0)
    steps, q = 60, 0.05
    response = await stack.trainer.TrainOnDataset(
        pb.TrainOnDatasetRequest(
            training_client_id=client.id,
            dataset_id=dataset.id,
            sample_rate=q,
            steps=steps,
            adam_params=ADAM,
        ),
        metadata=stack.auth,
    )
    # Stop the worker once the run has committed a step (polling, then a clean stop).
    while True:
        spent = (
            await stack.trainer.GetPrivacySpent(
                pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
            )
        ).privacy_spent
        if spent.steps >= 1:
            break
        await asyncio.sleep(0.01)
    await stack.stop_workers()
    (run,) = await _rows(stack, DatasetRunRow, future_id=response.future.id)
    assert 1 <= run.steps_done < steps, "the run finished before the worker stopped"
    handed_back_at = run.steps_done
    # Another worker resumes after the last committed step.
    stack.start_worker()
    result = unpack(await wait(stack, response.future), pb.TrainOnDatasetResult)
    assert isinstance(result, pb.TrainOnDatasetResult)
    assert result.steps == steps and len(result.batch_sizes) == steps
    ledger = await _rows(stack, LedgerRow, client_id=client.id)
    assert sorted(row.dp_step for row in ledger) == list(range(1, steps + 1))
    assert math.isclose(
        result.privacy_spent.epsilon,
        poisson_rdp_epsilon(sigma=1.0, q=q, steps=steps, delta=1e-5),
        rel_tol=1e-6,
    )
    assert handed_back_at < steps


async def test_a_dataset_budget_composes_over_every_client_that_samples_it(
    make_stack: StackFactory,
) -> None:
    """A hyper-parameter search over one dataset spends one budget: runs of several
    clients compose on the dataset, and the run that would pass it is refused even
    for a client without a budget of its own."""
    stack = await make_stack()
    sigma, q = 1.0, 0.1
    eight = poisson_rdp_epsilon(sigma=sigma, q=q, steps=8, delta=1e-5)
    nine = poisson_rdp_epsilon(sigma=sigma, q=q, steps=9, delta=1e-5)
    assert nine > eight * 1.0001
    dataset = await upload(
        stack, jsonl(arithmetic_records(30)), epsilon_budget=eight * 1.0001, delta=1e-5
    )
    assert (dataset.epsilon_budget, dataset.delta) == (eight * 1.0001, 1e-5)

    def run(client: pb.TrainingClient, steps: int) -> pb.TrainOnDatasetRequest:
        return pb.TrainOnDatasetRequest(
            training_client_id=client.id,
            dataset_id=dataset.id,
            sample_rate=q,
            steps=steps,
            adam_params=ADAM,
        )

    first = await create_client(stack, noise_multiplier=sigma, seed=5)
    second = await create_client(stack, noise_multiplier=sigma, seed=6)
    third = await create_client(stack, noise_multiplier=sigma, seed=7)
    futures = [
        (await stack.trainer.TrainOnDataset(run(first, 5), metadata=stack.auth)).future,
        (await stack.trainer.TrainOnDataset(run(second, 3), metadata=stack.auth)).future,
    ]
    # Reserved steps count: 5 + 3 admitted, one more is over the dataset's budget.
    error = await expect_code(
        stack.trainer.TrainOnDataset(run(third, 1), metadata=stack.auth),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert dataset.id in (error.details() or "") and "dataset's budget" in (error.details() or "")
    assert await _rows(stack, BudgetReservationRow, client_id=third.id) == []
    for future in futures:
        unpack(await wait(stack, future), pb.TrainOnDatasetResult)
    got = (
        await stack.trainer.GetDataset(
            pb.GetDatasetRequest(dataset_id=dataset.id), metadata=stack.auth
        )
    ).dataset
    assert math.isclose(got.epsilon_spent, eight, rel_tol=1e-6)
    # Each client's own epsilon is its own 5 or 3 steps: the dataset composes them all.
    ledger = await _rows(stack, LedgerRow, dataset_id=dataset.id)
    assert len(ledger) == 8


async def test_a_dataset_budget_needs_its_delta(make_stack: StackFactory) -> None:
    stack = await make_stack()
    error = await expect_code(
        upload(stack, jsonl(arithmetic_records(4)), epsilon_budget=1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "header.delta" in (error.details() or "")
