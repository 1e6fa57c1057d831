"""Training through gRPC + JetStream + the worker: learning, checkpoints, accounting."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.domain.engine.accounting import PldAccountant, PrivacyAccountant
from tensafe.trainer.domain.ledger import PrivacyLedger

from .conftest import BASE_MODEL
from .helpers import (
    corpus_sequences,
    create_client,
    dp_config,
    forward_backward,
    forward_loss,
    logprobs,
    model_input,
    optim_step,
    unpack,
    wait,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_epsilon(accountant: str, noise_multiplier: float, steps: int, delta: float) -> float:
    """dp-accounting's own epsilon of `steps` full Gaussian mechanisms (no sampling)."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), steps
    )
    if accountant == "rdp":
        reference: Any = rdp_privacy_accountant.RdpAccountant()
    else:
        reference = pld_privacy_accountant.PLDAccountant()
    reference.compose(event)
    return float(reference.get_epsilon(delta))


async def test_dp_training_loop_lowers_loss_and_charges_exactly_the_steps_run(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(
        stack,
        dp=dp_config(noise_multiplier=0.6, max_grad_norm=1.0),
        targets=ALL_LINEAR,
    )
    assert client.private and client.dp.noise_multiplier == pytest.approx(0.6)
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 16)
    before = await forward_loss(stack, client.id, batch)
    steps = 20
    for _ in range(steps):
        result = await forward_backward(stack, client.id, batch)
        assert len(result.loss_fn_outputs) == len(batch)
        assert len(result.loss_fn_outputs[0].outputs["logprobs"].float_data) == len(batch[0]) - 1
        step = await optim_step(stack, client.id, learning_rate=5e-2)
        assert step.metrics["examples"] == len(batch)
    assert step.step == steps
    after = await forward_loss(stack, client.id, batch)
    tokens = sum(len(s) - 1 for s in batch)
    # Untrained the tiny model is near uniform (ln 512 = 6.24 nats per token); the
    # engine tests show noise-only steps move it by less than 0.03 nats per token.
    assert before / tokens > 6.0
    assert after / tokens < before / tokens - 0.05, (before / tokens, after / tokens)

    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    expected = reference_epsilon("rdp", 0.6, steps, 1e-5)
    assert spent.private and spent.steps == steps
    assert spent.epsilon == pytest.approx(expected, rel=1e-6)
    assert step.privacy_spent.epsilon == pytest.approx(expected, rel=1e-6)
    fetched = (
        await stack.trainer.GetTrainingClient(
            pb.GetTrainingClientRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).training_client
    assert fetched.step == steps


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
async def test_privacy_spent_equals_dp_accounting(
    make_stack: Any, base_models_dir: Path, accountant: str
) -> None:
    stack = await make_stack()
    enum = pb.ACCOUNTANT_RDP if accountant == "rdp" else pb.ACCOUNTANT_PLD
    client = await create_client(
        stack, dp=dp_config(noise_multiplier=1.3, delta=1e-6, accountant=enum)
    )
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    for _ in range(3):
        await forward_backward(stack, client.id, batch)
        await optim_step(stack, client.id, learning_rate=1e-3)
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    assert spent.steps == 3
    assert spent.accountant == enum
    assert spent.delta == 1e-6
    assert spent.epsilon == pytest.approx(reference_epsilon(accountant, 1.3, 3, 1e-6), rel=1e-6)


async def test_pld_accounting_runs_off_the_event_loop_and_out_of_the_commit(
    make_stack: Any, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PLD query takes 0.07-8 s: the admission's budget check (API) and the step's
    # charge (worker) must not run it on the loop that serves every other request, and
    # the worker composes the step before its commit's transaction, not inside it.
    loop_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []
    charging: list[bool] = []
    composed_while_charging: list[bool] = []

    def recording(name: str) -> Any:
        original = getattr(PldAccountant, name)

        def method(self: PrivacyAccountant, *args: Any, **kwargs: Any) -> Any:
            calls.append((name, threading.get_ident() == loop_thread))
            if name == "_compute_epsilon":
                composed_while_charging.append(bool(charging))
            return original(self, *args, **kwargs)

        return method

    for name in ("epsilon", "epsilon_if", "_compute_epsilon"):
        monkeypatch.setattr(PldAccountant, name, recording(name))
    commit_step = PrivacyLedger.commit_step

    async def charge(self: PrivacyLedger, *args: Any, **kwargs: Any) -> float:
        charging.append(True)
        try:
            return await commit_step(self, *args, **kwargs)
        finally:
            charging.pop()

    monkeypatch.setattr(PrivacyLedger, "commit_step", charge)
    stack = await make_stack()
    client = await create_client(
        stack,
        dp=dp_config(noise_multiplier=1.3, accountant=pb.ACCOUNTANT_PLD, epsilon_budget=100.0),
    )
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    for steps in (1, 2):
        await forward_backward(stack, client.id, batch)
        step = await optim_step(stack, client.id, learning_rate=1e-3)
        assert step.privacy_spent.epsilon == pytest.approx(
            reference_epsilon("pld", 1.3, steps, 1e-5), rel=1e-6
        )
    assert {name for name, _ in calls} == {"epsilon", "epsilon_if", "_compute_epsilon"}
    assert [call for call in calls if call[1]] == []
    assert composed_while_charging and not any(composed_while_charging)


async def test_non_private_client_says_so(make_stack: Any, base_models_dir: Path) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=None)
    assert not client.private and not client.HasField("dp")
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    await forward_backward(stack, client.id, batch)
    result = await optim_step(stack, client.id, learning_rate=1e-2)
    assert result.metrics["noise_std"] == 0.0
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    assert not spent.private and math.isinf(spent.epsilon)


async def test_save_and_load_state_restore_identical_logprobs_without_refunding_privacy(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=dp_config(noise_multiplier=1.0))
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 8)
    probe = corpus_sequences(base_models_dir / BASE_MODEL, 3, offset=20)
    await forward_backward(stack, client.id, batch)
    await optim_step(stack, client.id, learning_rate=5e-2)
    saved = unpack(
        await wait(
            stack,
            (
                await stack.trainer.SaveState(
                    pb.SaveStateRequest(training_client_id=client.id, name="after-one"),
                    metadata=stack.auth,
                )
            ).future,
        ),
        pb.SaveStateResult,
    )
    assert isinstance(saved, pb.SaveStateResult)
    assert saved.step == 1
    assert saved.path == f"tensafe://training_clients/{client.id}/checkpoints/after-one"
    at_checkpoint = await logprobs(stack, client.id, probe)

    await forward_backward(stack, client.id, batch)
    await optim_step(stack, client.id, learning_rate=5e-2)
    moved = await logprobs(stack, client.id, probe)
    assert moved != at_checkpoint

    loaded = unpack(
        await wait(
            stack,
            (
                await stack.trainer.LoadState(
                    pb.LoadStateRequest(training_client_id=client.id, path=saved.path),
                    metadata=stack.auth,
                )
            ).future,
        ),
        pb.LoadStateResult,
    )
    assert isinstance(loaded, pb.LoadStateResult)
    assert loaded.step == 1
    assert await logprobs(stack, client.id, probe) == at_checkpoint
    spent = (
        await stack.trainer.GetPrivacySpent(
            pb.GetPrivacySpentRequest(training_client_id=client.id), metadata=stack.auth
        )
    ).privacy_spent
    # Both steps touched the data: restoring weights does not give privacy back.
    assert spent.steps == 2


async def test_sampler_weights_are_frozen_and_sample_returns_logprobs(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=None)
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 8)
    probe = corpus_sequences(base_models_dir / BASE_MODEL, 2, offset=30)
    await forward_backward(stack, client.id, batch)
    await optim_step(stack, client.id, learning_rate=5e-2)
    frozen = unpack(
        await wait(
            stack,
            (
                await stack.trainer.SaveWeightsForSampler(
                    pb.SaveWeightsForSamplerRequest(training_client_id=client.id, name="v1"),
                    metadata=stack.auth,
                )
            ).future,
        ),
        pb.SaveWeightsForSamplerResult,
    )
    assert isinstance(frozen, pb.SaveWeightsForSamplerResult)
    at_save = await logprobs(stack, client.id, probe)
    await forward_backward(stack, client.id, batch)
    await optim_step(stack, client.id, learning_rate=5e-2)
    assert await logprobs(stack, client.id, probe) != at_save
    assert await logprobs(stack, "", probe, model_path=frozen.path) == at_save

    response = await stack.trainer.Sample(
        pb.SampleRequest(
            model_path=frozen.path,
            prompt=model_input(probe[0][:5]),
            num_samples=3,
            sampling_params=pb.SamplingParams(max_tokens=6, temperature=1.0, seed=11),
        ),
        metadata=stack.auth,
    )
    result = unpack(await wait(stack, response.future), pb.SampleResult)
    assert isinstance(result, pb.SampleResult)
    assert len(result.sequences) == 3
    for sequence in result.sequences:
        assert len(sequence.tokens) == len(sequence.logprobs) == 6
        assert all(value <= 0.0 for value in sequence.logprobs)
        assert sequence.stop_reason == pb.STOP_REASON_LENGTH
    # The reported logprob of each sampled token is its probability under the frozen
    # weights at temperature 1 (no truncation), which ComputeLogprobs gives too.
    first = result.sequences[0]
    full = list(probe[0][:5]) + list(first.tokens)
    scored = (await logprobs(stack, "", [full], model_path=frozen.path))[0]
    assert scored[5:] == pytest.approx(list(first.logprobs), abs=1e-4)


async def test_ppo_clip_range_is_set_per_call_through_the_worker(
    make_stack: Any, base_models_dir: Path
) -> None:
    stack = await make_stack()
    client = await create_client(stack, dp=None)
    sequence = corpus_sequences(base_models_dir / BASE_MODEL, 1)[0]
    # The learner's logprobs of the targets sequence[1:] (the RPC also reports a first
    # entry for the unscored first token).
    learner = (await logprobs(stack, client.id, [sequence]))[0][-(len(sequence) - 1) :]
    sampler = [lp - 1.0 for lp in learner]  # ratio e on every token, above any clip

    async def ppo_loss(config: dict[str, float]) -> float:
        message = pb.Datum(model_input=model_input(sequence[:-1]))
        message.loss_fn_inputs["target_tokens"].CopyFrom(
            pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=sequence[1:])
        )
        for key, values in (("logprobs", sampler), ("advantages", [1.0] * len(sampler))):
            message.loss_fn_inputs[key].CopyFrom(
                pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=values)
            )
        response = await stack.trainer.Forward(
            pb.ForwardRequest(
                training_client_id=client.id, data=[message], loss_fn="ppo", loss_fn_config=config
            ),
            metadata=stack.auth,
        )
        result = unpack(await wait(stack, response.future), pb.ForwardBackwardResult)
        assert isinstance(result, pb.ForwardBackwardResult)
        return result.metrics["loss:sum"]

    assert await ppo_loss({}) == pytest.approx(-1.2 * len(sampler), rel=1e-4)
    assert await ppo_loss({"clip_high_threshold": 1.5}) == pytest.approx(
        -1.5 * len(sampler), rel=1e-4
    )


async def test_dp_weights_continued_from_a_non_private_checkpoint_say_so(
    make_stack: Any, base_models_dir: Path
) -> None:
    """Public (non-DP) pre-training then DP fine-tuning: the load is allowed, epsilon
    covers only the DP steps, and the report names the non-private steps."""
    stack = await make_stack()
    public = await create_client(stack, dp=None, rank=4)
    batch = corpus_sequences(base_models_dir / BASE_MODEL, 4)
    await forward_backward(stack, public.id, batch)
    await optim_step(stack, public.id, learning_rate=5e-2)
    saved = unpack(
        await wait(
            stack,
            (
                await stack.trainer.SaveState(
                    pb.SaveStateRequest(training_client_id=public.id, name="public"),
                    metadata=stack.auth,
                )
            ).future,
        ),
        pb.SaveStateResult,
    )
    assert isinstance(saved, pb.SaveStateResult)
    private = await create_client(stack, dp=dp_config(noise_multiplier=1.0), rank=4)
    loaded = unpack(
        await wait(
            stack,
            (
                await stack.trainer.LoadState(
                    pb.LoadStateRequest(training_client_id=private.id, path=saved.path),
                    metadata=stack.auth,
                )
            ).future,
        ),
        pb.LoadStateResult,
    )
    assert isinstance(loaded, pb.LoadStateResult) and loaded.step == 1
    await forward_backward(stack, private.id, batch)
    result = await optim_step(stack, private.id, learning_rate=5e-2)
    spent = result.privacy_spent
    assert (spent.steps, spent.inherited_steps, spent.non_private_steps) == (1, 0, 1)
    assert spent.epsilon == pytest.approx(reference_epsilon("rdp", 1.0, 1, 1e-5), rel=1e-6)
