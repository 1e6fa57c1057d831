"""The shadow run on the production DP-SGD path: canaries enter as data through the
production clipping, Poisson audits through the production sampler and step; the audit
is sound for the production mechanism and catches missing clipping and too little noise.

Sizes (documented in docs/privacy.md): the tiny model (7,168 LoRA parameters at r = 8),
m = 200 canaries, k = 20 guesses per side, 5 steps, delta = 1e-5, C = 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.audit import run as audit_run
from tensafe.trainer.domain.audit.bound import epsilon_lower_bound
from tensafe.trainer.domain.audit.run import (
    AuditConfig,
    AuditReport,
    CanaryKind,
    claimed_epsilon,
    run_privacy_audit,
    white_box_step_scores,
)
from tensafe.trainer.domain.datasets import steps as dataset_steps
from tensafe.trainer.domain.datasets.sampling import PoissonSampler
from tensafe.trainer.domain.engine import clipping
from tensafe.trainer.domain.engine.accounting import BatchSampling, calibrate_noise_multiplier
from tensafe.trainer.domain.engine.config import DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

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


def _audit(
    base_models_dir: Path, config: AuditConfig, *, engine_sigma: float, seed: int
) -> AuditReport:
    engine = _engine(base_models_dir, engine_sigma)
    try:
        return run_privacy_audit(engine, config, seed=seed)
    finally:
        engine.close()


def _no_clipping(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    """TEST ONLY: the clip factor of a mechanism that forgot to clip (every factor 1).

    Installed with monkeypatch in place of ``clipping.clip_factors_of``, the one place
    the production clipping computes its factor; no request can reach it.
    """
    del max_grad_norm
    return torch.ones_like(norms)


def test_production_mechanism_stays_below_the_claim(base_models_dir: Path) -> None:
    # (c) The correct mechanism is never refuted, and the audit does see the canaries
    # (at epsilon 8 well above chance), or it would prove nothing.
    for epsilon, seed in ((1.0, 0), (8.0, 2)):
        sigma = _sigma(epsilon)
        report = _audit(base_models_dir, _config(sigma), engine_sigma=sigma, seed=seed)
        assert report.claimed_epsilon == pytest.approx(epsilon, rel=1e-2)
        assert report.claimed_epsilon <= epsilon
        assert report.epsilon_lower_bound <= report.claimed_epsilon
        assert report.guesses == 40
        if epsilon == 8.0:
            assert report.correct_guesses >= 30


def test_missing_clipping_is_caught(base_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (a) The canaries are data: with the production clipping disabled their gradients
    # (norm ~14 against C = 1) reach the noised sum whole, and the audit refutes the
    # claim. The old gradient canaries (norm exactly C) could not see this.
    engine = _engine(base_models_dir, 1.0)
    canaries = torch.randint(0, engine.vocab_size, (8, audit_run.SEQUENCE_LENGTH))
    batch = [row[:-1] for row in canaries]
    inputs = [{"target_tokens": row[1:], "weights": torch.ones(len(row) - 1)} for row in canaries]
    gradients = engine.per_example_gradients(batch, "cross_entropy", inputs)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in gradients.values()))
    assert bool((norms > 5.0).all())  # far above C = 1: clipping matters for every canary
    engine.close()

    monkeypatch.setattr(clipping, "clip_factors_of", _no_clipping)
    sigma = _sigma(1.0)
    report = _audit(base_models_dir, _config(sigma), engine_sigma=sigma, seed=3)
    assert report.claimed_epsilon <= 1.0
    assert report.epsilon_lower_bound > report.claimed_epsilon


def test_broken_noise_is_caught(base_models_dir: Path) -> None:
    # (b) The engine adds a tenth of the noise the accountant is told about.
    sigma = _sigma(1.0)
    report = _audit(base_models_dir, _config(sigma), engine_sigma=sigma / 10, seed=4)
    assert report.claimed_epsilon <= 1.0
    assert report.epsilon_lower_bound > report.claimed_epsilon


class _Spies:
    """Records what the Poisson shadow run hands the production sampler and step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.draws: list[npt.NDArray[np.int64]] = []
        self.steps: list[dict[str, Any]] = []
        self.samplers: list[dict[str, Any]] = []
        draw, init, run_step = PoissonSampler.draw, PoissonSampler.__init__, dataset_steps.run_step

        def spy_init(sampler: PoissonSampler, **kwargs: Any) -> None:
            init(sampler, **kwargs)
            self.samplers.append(kwargs)

        def spy_draw(sampler: PoissonSampler) -> npt.NDArray[np.int64]:
            batch = draw(sampler)
            self.draws.append(batch)
            return batch

        def spy_run_step(*args: Any, **kwargs: Any) -> dataset_steps.StepOutcome:
            outcome = run_step(*args, **kwargs)
            self.steps.append({"batch": args[2], "outcome": outcome, **kwargs})
            return outcome

        monkeypatch.setattr(PoissonSampler, "__init__", spy_init)
        monkeypatch.setattr(PoissonSampler, "draw", spy_draw)
        monkeypatch.setattr(dataset_steps, "run_step", spy_run_step)


def test_poisson_audit_runs_the_production_sampler_and_step(
    base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (d) Membership of a step is the production sampler's draw over the shadow
    # dataset, and the step is the production run_step; the bound stays below the claim.
    spies = _Spies(monkeypatch)
    config = _config(1.0, sampling=BatchSampling.POISSON, batch_size=100)
    sigma = _sigma(4.0, BatchSampling.POISSON, config.sampling_probability)
    config = _config(sigma, sampling=BatchSampling.POISSON, batch_size=100)
    report = _audit(base_models_dir, config, engine_sigma=sigma, seed=6)
    assert report.claimed_epsilon == pytest.approx(4.0, rel=1e-2)
    assert report.epsilon_lower_bound <= report.claimed_epsilon
    assert len(spies.samplers) == 1
    # m filler records plus the included canaries, sampled at the accountant's q.
    assert 200 < spies.samplers[0]["records"] < 400
    assert spies.samplers[0]["sample_rate"] == config.sampling_probability == 0.25
    assert len(spies.draws) == len(spies.steps) == STEPS
    for drawn, step in zip(spies.draws, spies.steps, strict=True):
        assert step["batch"] is drawn  # the draw goes to the step untouched
        assert step["expected_batch_size"] == 100.0
        assert step["outcome"].batch_size == len(drawn)
        assert step["noisy_sum_observer"] is not None


def test_poisson_audit_applies_empty_batches_as_noise_only_steps(
    base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # q = 1 / 20 over ~15 records: about half the steps draw nothing, and run_step
    # applies them as the noise-only update, as TrainOnDataset does.
    spies = _Spies(monkeypatch)
    sigma = 2.0
    config = _config(
        sigma,
        canaries=10,
        guesses_per_side=2,
        sampling=BatchSampling.POISSON,
        batch_size=1,
        steps=12,
    )
    report = _audit(base_models_dir, config, engine_sigma=sigma, seed=7)
    assert report.epsilon_lower_bound <= report.claimed_epsilon
    sizes = [step["outcome"].batch_size for step in spies.steps]
    assert 0 in sizes and any(sizes)
    assert [step["outcome"].step for step in spies.steps] == list(range(1, 13))


def test_black_box_audit_stays_below_the_claim(base_models_dir: Path) -> None:
    sigma = _sigma(8.0)
    config = _config(sigma, canary_kind=CanaryKind.BLACK_BOX)
    report = _audit(base_models_dir, config, engine_sigma=sigma, seed=5)
    assert report.epsilon_lower_bound <= report.claimed_epsilon


def test_no_noise_gives_the_largest_bound_m_allows(base_models_dir: Path) -> None:
    report = _audit(base_models_dir, _config(0.0), engine_sigma=0.0, seed=0)
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
    row = torch.arange(6)
    engine.forward_backward(
        [row[:-1]], "cross_entropy", [{"target_tokens": row[1:], "weights": torch.ones(5)}]
    )
    with pytest.raises(InvalidArgument):
        run_privacy_audit(engine, _config(1.0), seed=0)
    engine.close()


def test_per_example_gradients_are_the_datums_own_and_change_nothing(
    base_models_dir: Path,
) -> None:
    engine = _engine(base_models_dir, 0.0)
    rows = torch.randint(0, engine.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    batch = [row[:-1] for row in rows]
    inputs = [{"target_tokens": row[1:], "weights": torch.ones(8)} for row in rows]
    state = engine.state_dict()
    gradients = engine.per_example_gradients(batch, "cross_entropy", inputs)
    assert engine.state_dict() == state
    assert engine.accumulated_examples == 0
    # Each row's gradient equals forward_backward of that datum alone with no noise and
    # a clipping bound it does not reach (the accumulator holds its raw gradient).
    for index in range(3):
        reference = LoraTrainingEngine(
            base_models_dir / MODEL,
            lora=LoraConfig(rank=8, alpha=16.0),
            dp=DpConfig(noise_multiplier=0.0, max_grad_norm=1e6),
            seed=1,
        )
        reference.forward_backward([batch[index]], "cross_entropy", [inputs[index]])
        for name, total in reference.pending_gradient_sum().items():
            torch.testing.assert_close(gradients[name][index], total, rtol=1e-4, atol=1e-7)
        reference.close()
    engine.close()


def test_white_box_scores_undo_correlated_directions() -> None:
    # Directions sharing a component in varying amounts, and canaries that contribute 8
    # against a claimed C = 1 and unit noise (clipping missing): each plain projection
    # also carries the other included canaries' contributions and the two groups
    # overlap; the least-squares scores separate them.
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 4000, generator=generator)
    weights = 1.5 * torch.rand(50, 1, generator=generator)
    raw = torch.randn(50, 4000, generator=generator) + weights * shared
    directions = raw / raw.norm(dim=1, keepdim=True)
    included = torch.zeros(50, dtype=torch.bool)
    included[torch.randperm(50, generator=generator)[:25]] = True
    noisy_sum = directions.T @ (8.0 * included.float()) + torch.randn(4000, generator=generator)
    scores = white_box_step_scores(directions, noisy_sum)
    assert float(scores[included].min()) > float(scores[~included].max())
    projections = directions @ noisy_sum
    assert float(projections[included].min()) < float(projections[~included].max())
    # Without noise the scores are the contributions themselves (to float32 round-off
    # through the Gram matrix the shared component makes ill-conditioned).
    exact = white_box_step_scores(directions, directions.T @ (8.0 * included.float()))
    torch.testing.assert_close(exact, 8.0 * included.double(), rtol=0, atol=0.05)
