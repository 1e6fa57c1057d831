"""The SDK's gRPC layer and futures against a real in-process FutureService (see conftest)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math

import grpc
import pytest

from tensafe.client.retry import RetryPolicy
from tensafe.client.training import (
    ChannelOptions,
    TrainerRpc,
    make_channel,
    parse_address,
)
from tensafe.common import errors
from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker import (
    DEFAULT_DELTA,
    DEFAULT_MAX_GRAD_NORM,
    DEFAULT_NOISE_MULTIPLIER,
    FutureCancelled,
    ServiceClient,
    TrainingClient,
    types,
)

from .conftest import Served


def _service(served: Served, *, sleeps: list[float] | None = None) -> ServiceClient:
    options = ChannelOptions(
        wait_slice_seconds=2.0,
        retry=RetryPolicy(max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.04),
    )
    client = ServiceClient(channel=grpc.insecure_channel(served.address), options=options)
    if sleeps is not None:
        client.rpc._sleep = sleeps.append
    return client


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints([1, 5, 7]),
        loss_fn_inputs={"target_tokens": [5, 7, 2], "weights": [1.0, 1.0, 0.5]},
    )


def _fb_result() -> pb.ForwardBackwardResult:
    result = pb.ForwardBackwardResult(metrics={"loss:sum": 3.5, "clipped_fraction": 0.25})
    record = result.loss_fn_outputs.add()
    record.outputs["logprobs"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, shape=[3], float_data=[-1.5, -0.25, -2.0])
    )
    return result


def test_default_client_is_private_with_the_documented_settings(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny", rank=4)
        non_private = service.create_lora_training_client(base_model="tiny", rank=4, private=False)
    dp_request, plain_request = served.trainer.requests["CreateTrainingClient"]
    assert dp_request.HasField("dp") and client.private
    assert dp_request.dp.WhichOneof("noise") == "noise_multiplier"
    assert dp_request.dp.noise_multiplier == DEFAULT_NOISE_MULTIPLIER
    assert dp_request.dp.max_grad_norm == DEFAULT_MAX_GRAD_NORM
    assert dp_request.dp.delta == DEFAULT_DELTA
    assert dp_request.dp.accountant == pb.ACCOUNTANT_RDP
    assert dp_request.lora.rank == 4 and list(dp_request.lora.target_modules) == []
    assert not plain_request.HasField("dp") and not non_private.private
    assert dp_request.request_id and dp_request.request_id != plain_request.request_id


def test_target_epsilon_and_flags_reach_the_server(served: Served) -> None:
    with _service(served) as service:
        service.create_lora_training_client(
            base_model="tiny",
            rank=8,
            seed=7,
            train_mlp=True,
            target_epsilon=3.0,
            planned_steps=40,
            accountant="pld",
            delta=1e-6,
        )
    (request,) = served.trainer.requests["CreateTrainingClient"]
    assert request.dp.WhichOneof("noise") == "target_epsilon"
    assert (request.dp.target_epsilon, request.dp.planned_steps) == (3.0, 40)
    assert request.dp.accountant == pb.ACCOUNTANT_PLD and request.dp.delta == 1e-6
    assert request.lora.seed == 7
    assert list(request.lora.target_modules) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"private": False, "dp_noise_multiplier": 1.0}, "dp_noise_multiplier"),
        ({"private": False, "delta": 1e-7}, "delta"),
        ({"dp_noise_multiplier": 1.0, "target_epsilon": 2.0}, "dp_noise_multiplier"),
        ({"target_epsilon": 2.0}, "planned_steps"),
        ({"accountant": "gdp"}, "accountant"),
        ({"seed": 0}, "seed"),
        ({"target_modules": ["q_proj"], "train_mlp": True}, "target_modules"),
    ],
)
def test_contradictory_settings_are_refused_before_any_call(
    served: Served, kwargs: dict[str, object], field: str
) -> None:
    with _service(served) as service, pytest.raises(errors.InvalidArgument) as info:
        service.create_lora_training_client(base_model="tiny", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert "CreateTrainingClient" not in served.trainer.requests


def test_forward_backward_result_waits_for_the_server_future(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        future = client.forward_backward([_datum()], "cross_entropy", {"x": 1.0})
        assert not future.done()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(future.result)
            (request,) = served.trainer.requests["ForwardBackward"]
            served.succeed(future.future_id, _fb_result())  # type: ignore[attr-defined]
            output = waiting.result(timeout=30)
    assert request.training_client_id == "tc-1" and request.loss_fn == "cross_entropy"
    assert dict(request.loss_fn_config) == {"x": 1.0}
    assert list(request.data[0].loss_fn_inputs["weights"].float_data) == [1.0, 1.0, 0.5]
    assert output.metrics == {"loss:sum": 3.5, "clipped_fraction": 0.25}
    assert output.loss_fn_outputs[0]["logprobs"].tolist() == [-1.5, -0.25, -2.0]
    assert future.done() and future.result() is output  # settled once, cached


def test_calls_are_submitted_in_call_order(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        fb = client.forward_backward([_datum()], "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=0.01, weight_decay=0.1))
        saved = client.save_state("ckpt-1")
    created = served.run(served.store.list("tenant-sdk", page_size=10))
    kinds = [future.kind for future in reversed(created.futures)]  # newest first
    assert kinds == ["ForwardBackward", "OptimStep", "SaveState"]
    (optim_request,) = served.trainer.requests["OptimStep"]
    assert optim_request.adam_params.learning_rate == 0.01
    assert optim_request.adam_params.weight_decay == pytest.approx(0.1)
    assert not fb.done() and not step.done() and not saved.done()


def test_failed_future_raises_the_typed_error(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        future = client.optim_step(types.AdamParams())
        served.fail(future.future_id, errors.BudgetExhausted("ε would reach 3.2 > 3.0"))  # type: ignore[attr-defined]
        with pytest.raises(errors.BudgetExhausted) as info:
            future.result()
        with pytest.raises(errors.BudgetExhausted):  # the error is kept, not re-fetched
            future.result()
    assert "3.2" in info.value.message
    assert info.value.code is errors.ErrorCode.FAILED_PRECONDITION


def test_cancelled_future_raises_future_cancelled(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        future = client.forward_backward([_datum()], "cross_entropy")
        assert future.cancel()  # type: ignore[attr-defined]
        with pytest.raises(FutureCancelled):
            future.result()


def test_timeout_leaves_the_future_usable(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        future = client.save_state("s1")
        with pytest.raises(TimeoutError):
            future.result(timeout=0.05)
        served.succeed(future.future_id, pb.SaveStateResult(path="tensafe://c/s1", step=4))  # type: ignore[attr-defined]
        saved = future.result(timeout=30)
    assert (saved.path, saved.step) == ("tensafe://c/s1", 4)


def test_result_of_the_wrong_type_is_an_error_not_a_guess(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        future = client.optim_step(types.AdamParams())
        served.succeed(future.future_id, pb.SaveStateResult(path="x"))  # type: ignore[attr-defined]
        with pytest.raises(errors.TenSafeError) as info:
            future.result()
    assert info.value.reason == "UNEXPECTED_RESULT_TYPE"


def test_async_variants_are_awaitable(served: Served) -> None:
    async def scenario(service: ServiceClient) -> types.OptimStepResponse:
        client = await service.create_lora_training_client_async("tiny", rank=2)
        future = await client.optim_step_async(types.AdamParams())
        result = pb.OptimStepResult(step=1, metrics={"examples": 8.0})
        result.privacy_spent.CopyFrom(
            pb.PrivacySpent(epsilon=0.5, delta=1e-5, accountant=pb.ACCOUNTANT_RDP, private=True)
        )
        served.succeed(future.future_id, result)  # type: ignore[attr-defined]
        return await future

    with _service(served) as service:
        response = asyncio.run(scenario(service))
    assert response.step == 1 and response.metrics["examples"] == 8.0
    assert response.metrics["dp/epsilon"] == 0.5  # ε in the metrics a loop logs
    assert response.privacy_spent is not None and response.privacy_spent.epsilon == 0.5


def test_sampling_with_prompt_logprobs_combines_two_jobs(served: Served) -> None:
    with _service(served) as service:
        client = service.create_lora_training_client(base_model="tiny")
        saved = client.save_weights_for_sampler("w1")
        served.succeed(saved.future_id, pb.SaveWeightsForSamplerResult(path="tensafe://w/1"))  # type: ignore[attr-defined]
        sampler = client.create_sampling_client(saved.result().path)
        params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[2], seed=5)
        future = sampler.sample(types.ModelInput.from_ints([1, 4]), 1, params, True)
        (sample_id,) = [f.id for f in _futures(served, "Sample")]
        (logprob_id,) = [f.id for f in _futures(served, "ComputeLogprobs")]
        sampled = pb.SampleResult()
        sampled.sequences.add(tokens=[9, 2], logprobs=[-0.5, -0.125], stop_reason=2)
        served.succeed(sample_id, sampled)
        scored = pb.ComputeLogprobsResult()
        scored.sequences.add(logprobs=[0.0, -3.0])
        served.succeed(logprob_id, scored)
        response = future.result(timeout=30)
    (request,) = served.trainer.requests["Sample"]
    assert request.model_path == "tensafe://w/1" and request.num_samples == 1
    assert request.sampling_params.top_k == 0 and request.sampling_params.seed == 5
    assert [list(c.tokens) for c in request.sampling_params.stop_tokens] == [[2]]
    assert response.sequences[0].tokens == [9, 2]
    assert response.sequences[0].logprobs == [-0.5, -0.125]
    assert response.sequences[0].stop_reason == "stop"
    assert response.prompt_logprobs == [None, -3.0]


def _futures(served: Served, kind: str) -> list[object]:
    page = served.run(served.store.list("tenant-sdk", page_size=100, kind=kind))
    return list(page.futures)


def test_unavailable_is_retried_with_the_same_request_id(served: Served) -> None:
    sleeps: list[float] = []
    served.trainer.unavailable_first = 2
    with _service(served, sleeps=sleeps) as service:
        client = TrainingClient(service.rpc, pb.TrainingClient(id="tc-1", base_model="tiny"))
        future = client.forward_backward([_datum()], "cross_entropy")
    attempts = served.trainer.requests["ForwardBackward"]
    assert len(attempts) == 3
    assert len({attempt.request_id for attempt in attempts}) == 1
    assert len(sleeps) == 2 and all(0 <= pause <= 0.04 for pause in sleeps)
    assert len(_futures(served, "ForwardBackward")) == 1
    assert future.future_id  # type: ignore[attr-defined]


def test_unavailable_gives_up_after_the_last_attempt(served: Served) -> None:
    sleeps: list[float] = []
    served.trainer.unavailable_first = 100
    with _service(served, sleeps=sleeps) as service, pytest.raises(errors.Unavailable):
        service.get_server_capabilities()
    assert len(served.trainer.requests["ListBaseModels"]) == 4 and len(sleeps) == 3


def test_other_errors_are_not_retried_and_keep_their_field(served: Served) -> None:
    sleeps: list[float] = []
    served.trainer.raise_on["CreateTrainingClient"] = errors.InvalidArgument(
        "lora.rank", "must be at least 1"
    )
    with _service(served, sleeps=sleeps) as service, pytest.raises(errors.InvalidArgument) as info:
        service.create_lora_training_client(base_model="tiny", rank=0)
    assert info.value.field == "lora.rank" and info.value.description == "must be at least 1"
    assert len(served.trainer.requests["CreateTrainingClient"]) == 1 and sleeps == []


def test_unknown_future_is_not_found(served: Served) -> None:
    with _service(served) as service, pytest.raises(errors.NotFound):
        service.rpc.get_future("0" * 32)


def test_privacy_spent_and_capabilities(served: Served) -> None:
    with _service(served) as service:
        capabilities = service.get_server_capabilities()
        client = service.create_lora_training_client(base_model="tiny")
        spent = client.get_privacy_spent()
    assert [m.model_name for m in capabilities.supported_models] == ["tiny"]
    assert capabilities.supported_models[0].vocab_size == 512
    assert spent == types.PrivacySpent(
        epsilon=1.25,
        delta=1e-5,
        accountant="pld",
        steps=3,
        noise_multiplier=1.1,
        epsilon_budget=None,
        private=True,
    )


def test_wait_future_is_bounded_by_the_slice(served: Served) -> None:
    options = ChannelOptions(wait_slice_seconds=0.05)
    rpc = TrainerRpc(grpc.insecure_channel(served.address), options=options)
    with rpc:
        created = served.run(served.store.create("tenant-sdk", kind="x", request_id="r-1"))
        future = rpc.wait_future(created.future.id, timeout=60.0)
    assert future.status == common_pb2.FUTURE_STATUS_PENDING  # returned after ~0.05 s


def test_retry_pause_is_capped_exponential_with_jitter() -> None:
    policy = RetryPolicy(initial_backoff_seconds=0.1, max_backoff_seconds=1.0, multiplier=2.0)
    assert [policy.pause(n, lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert policy.pause(3, lambda: 0.5) == pytest.approx(0.2)
    with pytest.raises(errors.InvalidArgument):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051", False)),
        ("grpc://localhost:7000/", ("localhost:7000", False)),
        ("grpcs://trainer.example.com:443", ("trainer.example.com:443", True)),
    ],
)
def test_parse_address(url: str, expected: tuple[str, bool]) -> None:
    assert parse_address(url) == expected


@pytest.mark.parametrize("url", ["http://x:1", "localhost", "grpc://:80", "host:port"])
def test_parse_address_refuses_bad_urls(url: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_address(url)


def test_privacy_of_a_non_private_client_is_infinite() -> None:
    from tensafe.tinker import serde

    spent = serde.privacy_spent_from_proto(pb.PrivacySpent(steps=5, private=False))
    assert math.isinf(spent.epsilon) and not spent.private and spent.accountant is None


def test_oversized_batch_fails_on_the_client_with_resource_exhausted(served: Served) -> None:
    options = ChannelOptions(max_message_bytes=4096)
    rpc = TrainerRpc(make_channel(served.address, options=options), options=options)
    with rpc:
        client = TrainingClient(rpc, pb.TrainingClient(id="tc-1", base_model="tiny"))
        tokens = list(range(1000, 6000))
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        with pytest.raises(errors.ResourceExhausted):
            client.forward_backward([datum], "cross_entropy")
    assert "ForwardBackward" not in served.trainer.requests


def test_resume_from_a_path_of_another_form_is_refused(served: Served) -> None:
    with _service(served) as service, pytest.raises(errors.InvalidArgument) as info:
        service.create_training_client_from_state("tinker://run/weights/ckpt-1")
    assert info.value.field == "path"
