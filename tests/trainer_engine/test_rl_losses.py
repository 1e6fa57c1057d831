"""The ``cispo`` and ``dro`` losses against Tinker's published formulas, per token, with
their gradients with respect to the learner's log-probabilities; ``stable_reinforce``
refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.config import LossConfig
from tensafe.trainer.domain.engine.losses import (
    LossFn,
    loss_config_from_options,
    per_token_loss,
    validate_batch,
)

# Two data of different lengths, so the second row is padded.
SAMPLER_LOGPROBS = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -0.1]]
ADVANTAGES = [[1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, 0.0]]
LEARNER_LOGPROBS = [[-0.5, -2.6, -0.5, -1.0], [-0.9, -1.0, -0.4]]


def _loss_and_grad(loss_fn: LossFn, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    batch = [[1, 2, 3, 4], [5, 6, 7]]
    inputs = [
        {"target_tokens": tokens, "logprobs": q, "advantages": a}
        for tokens, q, a in zip(batch, SAMPLER_LOGPROBS, ADVANTAGES, strict=True)
    ]
    padded = validate_batch(batch, loss_fn, inputs, vocab_size=16, max_length=8)
    learner = torch.tensor([LEARNER_LOGPROBS[0], [*LEARNER_LOGPROBS[1], 0.0]], requires_grad=True)
    loss = per_token_loss(loss_fn, learner, padded, config)
    loss.sum().backward()
    assert learner.grad is not None
    return loss.detach(), learner.grad


def _tokens() -> list[tuple[int, int, float, float, float]]:
    return [
        (row, t, p, q, a)
        for row, (ps, qs, advs) in enumerate(
            zip(LEARNER_LOGPROBS, SAMPLER_LOGPROBS, ADVANTAGES, strict=True)
        )
        for t, (p, q, a) in enumerate(zip(ps, qs, advs, strict=True))
    ]


def test_cispo_is_the_clipped_ratio_as_a_constant_weight() -> None:
    low, high = 0.8, 1.3
    config = loss_config_from_options(
        LossFn.CISPO, {"clip_low_threshold": low, "clip_high_threshold": high}, LossConfig()
    )
    loss, grad = _loss_and_grad(LossFn.CISPO, config)
    clipped_somewhere = False
    for row, t, p, q, a in _tokens():
        weight = min(max(math.exp(p - q), low), high)
        clipped_somewhere |= weight != math.exp(p - q)
        assert loss[row, t].item() == pytest.approx(-weight * p * a, rel=1e-5)
        # d/dp of -sg(w)·p·A is -w·A: no gradient through the ratio (ppo's would have one).
        assert grad[row, t].item() == pytest.approx(-weight * a, rel=1e-5)
    assert clipped_somewhere, "the data must exercise the clip"
    assert loss[1, 3].item() == 0.0 and grad[1, 3].item() == 0.0  # padding


def test_dro_is_the_reward_term_minus_the_quadratic_penalty() -> None:
    beta = 0.3
    config = loss_config_from_options(LossFn.DRO, {"beta": beta}, LossConfig())
    loss, grad = _loss_and_grad(LossFn.DRO, config)
    for row, t, p, q, a in _tokens():
        assert loss[row, t].item() == pytest.approx(-(p * a - 0.5 * beta * (p - q) ** 2), abs=1e-6)
        assert grad[row, t].item() == pytest.approx(-(a - beta * (p - q)), abs=1e-6)
    assert loss[1, 3].item() == 0.0 and grad[1, 3].item() == 0.0


def test_dro_default_beta_and_cispo_default_clip() -> None:
    assert loss_config_from_options(LossFn.DRO, {}, LossConfig()).dro_beta == 0.05
    config = loss_config_from_options(LossFn.CISPO, {"clip_high_threshold": 1.5}, LossConfig())
    assert config.ppo_clip_low == pytest.approx(0.2) and config.ppo_clip_high == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("loss_fn", "options", "field"),
    [
        ("dro", {"clip_low_threshold": 0.8}, "loss_fn_config.clip_low_threshold"),
        ("cispo", {"beta": 0.1}, "loss_fn_config.beta"),
        ("dro", {"beta": -1.0}, "loss_fn_config.beta"),
        ("dro", {"beta": math.nan}, "loss_fn_config.beta"),
        ("cispo", {"clip_high_threshold": 0.5}, "loss_fn_config.clip_high_threshold"),
    ],
)
def test_bad_options_name_the_option(loss_fn: str, options: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        loss_config_from_options(LossFn.parse(loss_fn), options, LossConfig())
    assert caught.value.field == field


def test_stable_reinforce_is_refused_by_name_saying_why() -> None:
    with pytest.raises(InvalidArgument) as caught:
        LossFn.parse("stable_reinforce")
    assert caught.value.field == "loss_fn"
    assert caught.value.reason == "UNSUPPORTED_LOSS"
    assert "not published" in str(caught.value) and "cispo" in str(caught.value)
