"""The shadow run on the production engine: sound for the production mechanism, catches
a broken one, and is bounded only by m and the confidence without noise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.audit.bound import epsilon_lower_bound
from tensafe.trainer.audit.run import (
    AuditConfig,
    CanaryKind,
    claimed_epsilon,
    run_privacy_audit,
)
from tensafe.trainer.engine.accounting import BatchSampling, calibrate_noise_multiplier
from tensafe.trainer.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.engine.training import LoraTrainingEngine

MODEL = "tiny-llama"
STEPS = 5
DELTA = 1e-5


def _engine(base_models_dir: Path, noise_multiplier: float) -> LoraTrainingEngine:
    return LoraTrainingEngine(
        base_models_dir / MODEL,
        lora=LoraConfig(rank=8, alpha=16.0),
        dp=DpConfig(noise_multiplier=noise_multiplier, max_grad_norm=1.0),
        seed=1,
    )


def _sigma(
    epsilon: float, sampling: BatchSampling = BatchSampling.CLIENT_BATCHES, q: float = 1.0
) -> float:
    return calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=DELTA, steps=STEPS, sampling=sampling, sampling_probability=q
    )


def _config(sigma: float, **fields: object) -> AuditConfig:
    values: dict[str, object] = {
        "canaries": 200,
        "guesses_per_side": 20,
        "steps": STEPS,
        "batch_size": 4,
        "noise_multiplier": sigma,
        "delta": DELTA,
    }
    values.update(fields)
    return AuditConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_production_mechanism_is_never_refuted(base_models_dir: Path, epsilon: float) -> None:
    sigma = _sigma(epsilon)
    for seed in range(3):
        engine = _engine(base_models_dir, sigma)
        report = run_privacy_audit(engine, _config(sigma), seed=seed)
        engine.close()
        assert report.claimed_epsilon == pytest.approx(epsilon, rel=1e-2)
        assert report.claimed_epsilon <= epsilon
        assert report.epsilon_lower_bound <= report.claimed_epsilon
        assert report.guesses == 40
        # Well above chance: the audit does see the canaries (or it would prove nothing).
        if epsilon == 8.0:
            assert report.correct_guesses >= 30


def test_black_box_and_poisson_audits_stay_below_the_claim(base_models_dir: Path) -> None:
    sigma = _sigma(8.0)
    engine = _engine(base_models_dir, sigma)
    report = run_privacy_audit(engine, _config(sigma, canary_kind=CanaryKind.BLACK_BOX), seed=5)
    engine.close()
    assert report.epsilon_lower_bound <= report.claimed_epsilon
    config = _config(1.0, sampling=BatchSampling.POISSON, batch_size=100)
    poisson_sigma = _sigma(4.0, BatchSampling.POISSON, config.sampling_probability)
    config = _config(poisson_sigma, sampling=BatchSampling.POISSON, batch_size=100)
    engine = _engine(base_models_dir, poisson_sigma)
    report = run_privacy_audit(engine, config, seed=6)
    engine.close()
    assert report.claimed_epsilon == pytest.approx(4.0, rel=1e-2)
    assert report.epsilon_lower_bound <= report.claimed_epsilon


def test_broken_noise_is_caught(base_models_dir: Path) -> None:
    # The engine adds a tenth of the noise the accountant is told about.
    sigma = _sigma(1.0)
    for seed in range(3):
        engine = _engine(base_models_dir, sigma / 10)
        report = run_privacy_audit(engine, _config(sigma), seed=seed)
        engine.close()
        assert report.claimed_epsilon <= 1.0
        assert report.epsilon_lower_bound > report.claimed_epsilon


def test_no_noise_gives_the_largest_bound_m_allows(base_models_dir: Path) -> None:
    engine = _engine(base_models_dir, 0.0)
    report = run_privacy_audit(engine, _config(0.0), seed=0)
    engine.close()
    assert math.isinf(report.claimed_epsilon)
    assert report.correct_guesses == report.guesses
    limit = epsilon_lower_bound(canaries=200, guesses=40, correct=40, delta=DELTA, confidence=0.95)
    assert report.epsilon_lower_bound == limit
    assert 2.0 < limit < math.log(40)


def test_claimed_epsilon_is_the_production_accountants() -> None:
    assert claimed_epsilon(_config(_sigma(4.0))) <= 4.0
    assert math.isinf(claimed_epsilon(_config(0.0)))


def test_bad_configs_are_invalid_arguments(base_models_dir: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"canaries": 9}, "canaries"),
        ({"guesses_per_side": 101}, "guesses_per_side"),
        ({"confidence": 1.0}, "confidence"),
        ({"steps": 0}, "steps"),
        ({"steps": 100_001}, "steps"),
        ({"sampling": BatchSampling.POISSON, "batch_size": 401}, "batch_size"),
    ]
    for fields, field in cases:
        with pytest.raises(InvalidArgument) as raised:
            _config(1.0, **fields)
        assert raised.value.field == field
    engine = _engine(base_models_dir, 1.0)
    engine.add_clipped_gradients(
        {name: torch.zeros(1, *t.shape) for name, t in engine.pending_gradient_sum().items()}
    )
    with pytest.raises(InvalidArgument):
        run_privacy_audit(engine, _config(1.0), seed=0)
    engine.close()


def test_canary_gradients_are_clipped_and_noised_like_data(base_models_dir: Path) -> None:
    engine = _engine(base_models_dir, 0.0)
    shapes = {name: t.shape for name, t in engine.pending_gradient_sum().items()}
    # Example 0 has norm 3 (clipped to 1), example 1 norm 0.5 (kept).
    gradients = {}
    total = sum(math.prod(shape) for shape in shapes.values())
    for name, shape in shapes.items():
        gradients[name] = torch.stack(
            [torch.full(shape, 3.0 / math.sqrt(total)), torch.full(shape, 0.5 / math.sqrt(total))]
        )
    factors = engine.add_clipped_gradients(gradients)
    assert factors[0].item() == pytest.approx(1 / 3, rel=1e-5)
    assert factors[1].item() == 1.0
    assert engine.accumulated_examples == 2
    pending = engine.pending_gradient_sum()
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in pending.values()))
    assert norm == pytest.approx(1.5, rel=1e-5)
    observed: dict[str, torch.Tensor] = {}
    engine.optim_step(
        AdamConfig(learning_rate=1e-3),
        noisy_sum_observer=lambda noisy: observed.update({k: v.clone() for k, v in noisy.items()}),
    )
    for name, value in pending.items():
        assert torch.equal(observed[name], value)
    engine.close()
