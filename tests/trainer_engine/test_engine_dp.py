"""DP-SGD semantics of the engine: exactness, accumulation, noise, learning, RL losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.clipping import CLIP_NORM_EPSILON
from tensafe.trainer.domain.engine.config import (
    AdamConfig,
    DpConfig,
    EngineOptions,
    LossConfig,
    NormMethod,
)
from tensafe.trainer.domain.engine.losses import LossFn, loss_config_from_options
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

from .conftest import EngineFactory, cross_entropy_batch, global_norm, randomise_adapter

ADAM = AdamConfig(learning_rate=1e-2)


def _reference_clipped_sum(
    engine: LoraTrainingEngine, sequences: list[list[int]], max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """Materialised DP-SGD clipping, written independently of the engine: one unpadded
    forward and backward per example, cross-entropy from log_softmax."""
    model = engine.model
    model.train()
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for sequence in sequences:
        tokens = torch.tensor([sequence])
        logits = model(input_ids=tokens[:, :-1]).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        loss = -logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).sum()
        grads = torch.autograd.grad(loss, list(parameters.values()))
        norm = global_norm(grads)
        factor = min(1.0, max_grad_norm / (float(norm) + CLIP_NORM_EPSILON))
        for name, grad in zip(parameters, grads, strict=True):
            total[name] += factor * grad
    return total


@pytest.mark.parametrize("norm_method", [NormMethod.DIRECT, NormMethod.GRAM])
def test_engine_clipped_sum_equals_materialised_per_example_clipping(
    make_engine: EngineFactory, corpus_sequences: list[list[int]], norm_method: NormMethod
) -> None:
    max_grad_norm = 0.4
    engine = make_engine(
        dp=DpConfig(noise_multiplier=1.0, max_grad_norm=max_grad_norm),
        options=EngineOptions(norm_method=norm_method),
    )
    randomise_adapter(engine, seed=11)
    sequences = corpus_sequences[:10]  # lengths differ: padding must not matter
    assert len({len(s) for s in sequences}) > 3
    batch, inputs = cross_entropy_batch(sequences)
    engine.forward_backward(batch, "cross_entropy", inputs)
    ours = engine.pending_gradient_sum()
    reference = _reference_clipped_sum(engine, sequences, max_grad_norm)
    largest = max(float(t.abs().max()) for t in reference.values())
    assert largest > 1e-2
    for name, expected in reference.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6)


def test_dp_step_without_noise_or_effective_clipping_equals_non_dp_step(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    dp_engine = make_engine(dp=DpConfig(noise_multiplier=0.0, max_grad_norm=1e6), seed=3)
    plain_engine = make_engine(dp=None, seed=3)
    before = plain_engine.adapter_tensors()
    # Two ForwardBackward calls accumulate into one step, then two steps.
    for step in range(2):
        for part in range(2):
            start = 8 * (2 * step + part)
            batch, inputs = cross_entropy_batch(corpus_sequences[start : start + 8])
            dp_result = dp_engine.forward_backward(batch, "cross_entropy", inputs)
            plain_result = plain_engine.forward_backward(batch, "cross_entropy", inputs)
            assert dp_result.metrics["loss:sum"] == pytest.approx(
                plain_result.metrics["loss:sum"], rel=1e-6
            )
        assert dp_engine.accumulated_examples == 16
        plain_sum = plain_engine.pending_gradient_sum()
        dp_sum = dp_engine.pending_gradient_sum()
        scale = max(float(v.abs().max()) for v in plain_sum.values())
        assert scale > 1e-2
        for name, value in plain_sum.items():
            # float32 sums in a different order: agree to 1e-5 of the largest entry.
            torch.testing.assert_close(dp_sum[name], value, rtol=1e-5, atol=1e-5 * scale)
        assert dp_engine.optim_step(ADAM).step == plain_engine.optim_step(ADAM).step == step + 1
    after = plain_engine.adapter_tensors()
    for name, value in dp_engine.adapter_tensors().items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-5)
        # And the step did move the adapter.
    assert any(not torch.equal(after[name], before[name]) for name in after)


def test_accumulation_over_calls_equals_one_call(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    dp = DpConfig(noise_multiplier=0.0, max_grad_norm=0.2)
    split = make_engine(dp=dp)
    whole = make_engine(dp=dp)
    randomise_adapter(split, seed=2)
    randomise_adapter(whole, seed=2)
    sequences = corpus_sequences[40:52]
    for part in (sequences[:5], sequences[5:]):
        split.forward_backward(
            *cross_entropy_batch(part)[0:1], "cross_entropy", cross_entropy_batch(part)[1]
        )
    batch, inputs = cross_entropy_batch(sequences)
    whole.forward_backward(batch, "cross_entropy", inputs)
    assert split.accumulated_examples == whole.accumulated_examples == 12
    for name, value in whole.pending_gradient_sum().items():
        torch.testing.assert_close(split.pending_gradient_sum()[name], value, rtol=1e-5, atol=1e-7)


def _linear_adam() -> AdamConfig:
    # beta1 = beta2 = 0 and eps >> |g| make the AdamW update lr * g / (|g| + eps), i.e.
    # (lr / eps) * g to within |g| / eps; with lr = eps the update is the gradient.
    return AdamConfig(learning_rate=1e5, betas=(0.0, 0.0), eps=1e5)


def test_empty_step_adds_noise_only_with_the_documented_std(make_engine: EngineFactory) -> None:
    noise_multiplier, max_grad_norm, expected_batch_size = 1.5, 2.0, 6.0
    engine = make_engine(
        dp=DpConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    )
    before = engine.adapter_tensors()
    forward_calls: list[int] = []
    hook = engine.model.register_forward_hook(lambda *_: forward_calls.append(1))
    result = engine.optim_step(_linear_adam(), expected_batch_size=expected_batch_size)
    hook.remove()
    assert result.step == 1
    assert forward_calls == []  # noise only: the model never ran on a made-up batch
    after = engine.adapter_tensors()
    # The optimizer descends: update = -noise / expected_batch_size.
    deltas = torch.cat([(before[n] - after[n]).flatten() for n in after]).double()
    expected_std = noise_multiplier * max_grad_norm / expected_batch_size  # 0.5
    assert result.metrics["noise_std"] == pytest.approx(expected_std)
    count = deltas.numel()
    assert count > 4000
    std = float(deltas.std())
    # Standard error of the std estimate is ~1/sqrt(2n) < 1.1 %; 6 % is > 5 standard
    # errors, and a noise off by 2x (or not divided by the batch size) fails by far.
    assert abs(std / expected_std - 1) < 0.06
    assert abs(float(deltas.mean())) < 6 * expected_std / math.sqrt(count)
    within_one_std = float((deltas.abs() < expected_std).double().mean())
    assert abs(within_one_std - 0.6827) < 0.03  # Gaussian, not e.g. uniform


def test_noise_is_fresh_every_step(make_engine: EngineFactory) -> None:
    first = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0), seed=4)
    second = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0), seed=4)
    start = first.adapter_tensors()
    first.optim_step(_linear_adam(), expected_batch_size=1.0)
    second.optim_step(_linear_adam(), expected_batch_size=1.0)
    a = torch.cat([(first.adapter_tensors()[n] - start[n]).flatten() for n in start])
    b = torch.cat([(second.adapter_tensors()[n] - start[n]).flatten() for n in start])
    # Independent N(0, 1) vectors: correlation ~ N(0, 1/n).
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(correlation) < 0.1


def test_dp_noise_is_added_to_the_clipped_sum_once_per_step(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=0.5))
    randomise_adapter(engine, seed=9)
    for part in (corpus_sequences[:8], corpus_sequences[8:16]):
        batch, inputs = cross_entropy_batch(part)
        engine.forward_backward(batch, "cross_entropy", inputs)
    clipped_sum = engine.pending_gradient_sum()
    before = engine.adapter_tensors()
    result = engine.optim_step(_linear_adam())
    assert result.metrics["divisor"] == 16.0  # both calls' data, one step
    after = engine.adapter_tensors()
    names = engine.parameter_names
    adapter_names = list(after)
    # adapter_tensors() uses peft's saved names, in the same order as the parameters.
    assert len(adapter_names) == len(names)
    residual = torch.cat(
        [
            ((before[a] - after[a]) * 16.0 - clipped_sum[p]).flatten()
            for a, p in zip(adapter_names, names, strict=True)
        ]
    )
    # What is left after removing the clipped sum is one draw of N(0, (sigma C)^2).
    assert abs(float(residual.std()) / 0.5 - 1) < 0.06


def test_dp_training_lowers_the_training_loss(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    dp = DpConfig(noise_multiplier=0.7, max_grad_norm=1.0)
    engine = make_engine(dp=dp, seed=7)
    # Control: the same number of noise-only steps (no data) must not do the same.
    control = make_engine(dp=dp, seed=7)
    train = corpus_sequences[:32]

    def mean_nll(model_engine: LoraTrainingEngine) -> float:
        logprobs = model_engine.compute_logprobs(train)
        return -sum(sum(lp) for lp in logprobs) / sum(len(lp) for lp in logprobs)

    start = mean_nll(engine)
    generator = torch.Generator().manual_seed(0)
    adam = AdamConfig(learning_rate=2e-2)
    for _ in range(40):
        picks = torch.randperm(len(train), generator=generator)[:16].tolist()
        batch, inputs = cross_entropy_batch([train[i] for i in picks])
        engine.forward_backward(batch, "cross_entropy", inputs)
        engine.optim_step(adam)
        control.optim_step(adam, expected_batch_size=16)
    end = mean_nll(engine)
    assert engine.step == control.step == 40
    # Untrained, the tiny model is near uniform (ln 512 = 6.24 nats per token). Its
    # frozen random lm_head limits how far attention-only LoRA can go (non-DP training
    # reaches about start - 0.13 here); DP reaches start - 0.16 ± 0.005.
    assert start > 6.0
    assert end < start - 0.1
    # Noise-only steps drift the loss by 0.00-0.02 nats in either direction.
    assert start - mean_nll(control) < (start - end) / 2


def test_ppo_with_zero_advantages_gives_zero_gradient(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=0.0, max_grad_norm=1.0))
    randomise_adapter(engine, seed=3)
    sequences = corpus_sequences[:6]
    sampler_logprobs = [[lp - 0.3 for lp in row] for row in engine.compute_logprobs(sequences)]
    batch = [s[:-1] for s in sequences]
    inputs: list[dict[str, Sequence[float]]] = [
        {"target_tokens": s[1:], "logprobs": lp, "advantages": [0.0] * len(lp)}
        for s, lp in zip(sequences, sampler_logprobs, strict=True)
    ]
    result = engine.forward_backward(batch, "ppo", inputs)
    assert all(output.loss == 0.0 for output in result.outputs)
    for value in engine.pending_gradient_sum().values():
        assert float(value.abs().max()) == 0.0
    # And non-zero advantages do give a gradient (the check above is not vacuous). The
    # ratio is e^0.3 > 1.2, so a positive advantage would be clipped (zero gradient);
    # a negative one takes the unclipped branch.
    inputs[0]["advantages"] = [-1.0] * len(sampler_logprobs[0])
    # Only the changed datum: the other five would be the same data twice in one step.
    engine.forward_backward(batch[:1], "ppo", inputs[:1])
    assert any(float(v.abs().max()) > 0 for v in engine.pending_gradient_sum().values())


def test_importance_ratio_is_one_when_sampler_equals_learner(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    rl_engine = make_engine(dp=None, seed=5)
    ce_engine = make_engine(dp=None, seed=5)
    randomise_adapter(rl_engine, seed=8)
    randomise_adapter(ce_engine, seed=8)
    sequences = corpus_sequences[60:66]
    learner = rl_engine.compute_logprobs(sequences)
    generator = torch.Generator().manual_seed(1)
    advantages = [torch.randn(len(lp), generator=generator).tolist() for lp in learner]
    batch = [s[:-1] for s in sequences]
    is_inputs: list[dict[str, Sequence[float]]] = [
        {"target_tokens": s[1:], "logprobs": lp, "advantages": adv}
        for s, lp, adv in zip(sequences, learner, advantages, strict=True)
    ]
    result = rl_engine.forward_backward(batch, "importance_sampling", is_inputs)
    for output, sampled, adv in zip(result.outputs, learner, advantages, strict=True):
        # The learner's logprobs equal the sampler's, so the ratio is 1 and the loss
        # is -Σ A_t.
        torch.testing.assert_close(
            torch.tensor(output.logprobs), torch.tensor(sampled), rtol=0, atol=2e-5
        )
        assert output.loss == pytest.approx(-sum(adv), rel=1e-4, abs=1e-4)
    # At ratio 1, ∇(ratio·A) = A·∇log p: the gradient equals cross-entropy weighted by A.
    ce_inputs = [
        {"target_tokens": s[1:], "weights": adv}
        for s, adv in zip(sequences, advantages, strict=True)
    ]
    ce_engine.forward_backward(batch, "cross_entropy", ce_inputs)
    expected = ce_engine.pending_gradient_sum()
    for name, value in rl_engine.pending_gradient_sum().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-5)
    # PPO at ratio 1 clips nothing and equals importance sampling.
    ppo = rl_engine.forward_backward(batch, "ppo", is_inputs)
    for ppo_output, is_output in zip(ppo.outputs, result.outputs, strict=True):
        assert ppo_output.loss == pytest.approx(is_output.loss, rel=1e-6, abs=1e-6)


def test_ppo_clips_the_ratio(make_engine: EngineFactory, corpus_sequences: list[list[int]]) -> None:
    engine = make_engine(dp=None)
    sequence = corpus_sequences[3]
    learner = engine.compute_logprobs([sequence])[0]
    # Sampler logprobs 1.0 lower: ratio e ≈ 2.72; positive advantages are clipped at 1.2.
    sampler = [lp - 1.0 for lp in learner]
    inputs: list[dict[str, Sequence[float]]] = [
        {"target_tokens": sequence[1:], "logprobs": sampler, "advantages": [1.0] * len(sampler)}
    ]
    ppo = engine.forward_backward([sequence[:-1]], "ppo", inputs)
    assert ppo.outputs[0].loss == pytest.approx(-1.2 * len(sampler), rel=1e-5)
    importance = engine.forward_backward([sequence[:-1]], "importance_sampling", inputs)
    assert importance.outputs[0].loss == pytest.approx(-math.e * len(sampler), rel=1e-3)


def test_ppo_clip_thresholds_are_set_per_call(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=None)
    sequence = corpus_sequences[3]
    learner = engine.compute_logprobs([sequence])[0]
    # Ratio e ≈ 2.72 on every token; Tinker's per-call option moves the upper clip to 1.5.
    sampler = [lp - 1.0 for lp in learner]
    inputs: list[dict[str, Sequence[float]]] = [
        {"target_tokens": sequence[1:], "logprobs": sampler, "advantages": [1.0] * len(sampler)}
    ]
    wide = engine.forward([sequence[:-1]], "ppo", inputs, {"clip_high_threshold": 1.5})
    assert wide.outputs[0].loss == pytest.approx(-1.5 * len(sampler), rel=1e-5)
    # A negative advantage with the ratio 1/e ≈ 0.37 below the range: the minimum of
    # r·A and clip(r)·A is the clipped term, -0.5 per token with the lower bound at 0.5
    # (it would be -0.8 with the default).
    low_inputs: list[dict[str, Sequence[float]]] = [
        {
            "target_tokens": sequence[1:],
            "logprobs": [lp + 1.0 for lp in learner],
            "advantages": [-1.0] * len(sampler),
        }
    ]
    tight = engine.forward([sequence[:-1]], "ppo", low_inputs, {"clip_low_threshold": 0.5})
    assert tight.outputs[0].loss == pytest.approx(0.5 * len(sampler), rel=1e-5)
    # The default applies when the call sets nothing.
    default = engine.forward([sequence[:-1]], "ppo", inputs)
    assert default.outputs[0].loss == pytest.approx(-1.2 * len(sampler), rel=1e-5)


@pytest.mark.parametrize(
    ("loss_fn", "options", "field"),
    [
        ("ppo", {"clip_epsilon": 0.1}, "loss_fn_config.clip_epsilon"),
        ("cross_entropy", {"clip_low_threshold": 0.8}, "loss_fn_config.clip_low_threshold"),
        ("ppo", {"clip_low_threshold": 0.0}, "loss_fn_config.clip_low_threshold"),
        ("ppo", {"clip_low_threshold": 1.5}, "loss_fn_config.clip_low_threshold"),
        ("ppo", {"clip_high_threshold": 0.9}, "loss_fn_config.clip_high_threshold"),
        ("ppo", {"clip_high_threshold": math.inf}, "loss_fn_config.clip_high_threshold"),
        ("ppo", {"clip_high_threshold": math.nan}, "loss_fn_config.clip_high_threshold"),
    ],
)
def test_bad_loss_options_name_the_option(
    loss_fn: str, options: dict[str, float], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        loss_config_from_options(LossFn.parse(loss_fn), options, LossConfig())
    assert caught.value.field == field
