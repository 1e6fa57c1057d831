"""The shadow training run of a privacy audit, on the production DP-SGD code path.

The audit trains a fresh LoRA engine (:class:`~tensafe.trainer.engine.training.
LoraTrainingEngine`, the class the worker trains tenants with) on a base model, with
synthetic filler records drawn uniformly from the vocabulary: no tenant data is read
and no training client is charged. The engine clips every example and adds the noise in
``optim_step`` exactly as for a tenant; the claimed epsilon comes from the production
accountant (:func:`~tensafe.trainer.engine.accounting.create_accountant`) composing the
same :class:`~tensafe.trainer.engine.accounting.StepMechanism` the trainer charges.

Canaries (m of them, each included independently with probability 1/2, from a CSPRNG
seed unless a seed is given):

* **White-box** (Steinke, Nasr, Jagielski 2023, §6 "gradient canaries"): canary i is a
  gradient ``C u_i`` with ``u_i`` a fixed uniformly random unit direction of the LoRA
  parameter space and ``C = max_grad_norm``. An included canary is one more per-example
  gradient of a step (``LoraTrainingEngine.add_clipped_gradients``: the production clip
  factor, then the production noise). Its score is ``<sum_t noisy_sum_t, u_i>``, the
  inner product of the summed outputs of the steps' Gaussian mechanisms (observed via
  ``optim_step(noisy_sum_observer=...)``) with its direction. This is the sufficient
  statistic of the composed Gaussian mechanism, so the white-box audit is the strongest
  attack on a canary the accountant's model allows.
* **Black-box**: canary i is a random token sequence trained with cross-entropy like any
  datum; its score is its loss decrease over the run (loss before minus loss after),
  which needs only the final model. Black-box bounds are far looser.

Participation. The accountant's guarantee is per example for the sampling the server
performs, so an included canary participates the way a datum of the audited mode does:

* client batches (no amplification): in **every** step, next to ``batch_size`` fresh
  filler records; each step is a full Gaussian mechanism for it, as accounted.
* Poisson sampling: the shadow dataset holds m filler records plus the included
  canaries, and every record joins each step independently with probability
  ``q = batch_size / (2 m)`` (``batch_size`` is the expected batch size at full
  membership), which is the ``q`` the accountant is told.

The gradient sum is always divided by a constant (``batch_size + m/2`` for client
batches, ``batch_size`` for Poisson), never by the realised count, so the normaliser
carries no information about membership.
"""

from __future__ import annotations

import enum
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.engine.accounting import (
    BatchSampling,
    StepMechanism,
    create_accountant,
)
from tensafe.trainer.engine.config import AdamConfig
from tensafe.trainer.engine.training import LoraTrainingEngine

from .bound import count_correct_guesses, epsilon_lower_bound, validate_audit_shape

SHADOW_LEARNING_RATE = 1e-2
"""AdamW learning rate of the shadow run. White-box scores do not depend on it (they
are taken on the noised gradient sums); for black-box canaries a large rate makes the
loss decrease of a trained canary more visible."""

SEQUENCE_LENGTH = 16
"""Tokens per filler record and per black-box canary (capped by the model's context)."""

_SCORE_BATCH = 64
"""Black-box canaries per forward pass when their losses are measured."""

_CANARY_CHUNK = 128
"""White-box canaries handed to the engine per call (bounds the temporary copies)."""

MAX_STEPS = 100_000
"""Most shadow steps an audit may ask for."""

MAX_CANARY_ELEMENTS = 1 << 28
"""Largest m × (LoRA parameters) of white-box canary directions held in memory (1 GiB
of float32); a larger audit is refused rather than exhausting the worker."""


class CanaryKind(enum.Enum):
    """How canaries are inserted and scored."""

    WHITE_BOX = "white_box"
    """A gradient of norm C in a fixed random direction; score on the noised sums."""
    BLACK_BOX = "black_box"
    """A random token sequence; score is its loss decrease."""


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """What one audit runs and what it tests against.

    The DP noise the run actually adds is the engine's; ``noise_multiplier`` here is
    the one the accountant is told (the claim). The trainer passes the same value to
    both; the tests pass a smaller one to the engine to build a broken mechanism.
    """

    canaries: int
    """m, >= 10."""
    guesses_per_side: int
    """k, 1 <= k <= m/2; 2k guesses are made."""
    confidence: float = 0.95
    """1 - beta, in (0, 1)."""
    canary_kind: CanaryKind = CanaryKind.WHITE_BOX
    """White-box or black-box canaries."""
    steps: int
    """Optimizer steps of the shadow run, >= 1."""
    batch_size: int
    """Filler records per step (client batches) or expected batch size (Poisson), >= 1."""
    sampling: BatchSampling = BatchSampling.CLIENT_BATCHES
    """How batches are formed, and what the accountant assumes."""
    noise_multiplier: float
    """The sigma the accountant composes; 0 claims nothing (epsilon = infinity)."""
    delta: float
    """The claimed delta, in (0, 1)."""
    accountant: str = "rdp"
    """``"rdp"`` or ``"pld"``."""

    def __post_init__(self) -> None:
        validate_audit_shape(
            canaries=self.canaries,
            guesses_per_side=self.guesses_per_side,
            confidence=self.confidence,
        )
        if not isinstance(self.canary_kind, CanaryKind):
            raise InvalidArgument("canary_kind", "must be white-box or black-box")
        if (
            isinstance(self.steps, bool)
            or not isinstance(self.steps, int)
            or not 1 <= self.steps <= MAX_STEPS
        ):
            raise InvalidArgument("steps", f"must be in 1..{MAX_STEPS}, got {self.steps}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise InvalidArgument("batch_size", f"must be positive, not {self.batch_size}")
        if self.sampling is BatchSampling.POISSON and self.batch_size > 2 * self.canaries:
            raise InvalidArgument(
                "batch_size",
                f"the Poisson shadow dataset holds 2m = {2 * self.canaries} records; "
                f"the expected batch size must not exceed it",
            )
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise InvalidArgument("dp.noise_multiplier", "must be non-negative and finite")
        if not 0.0 < self.delta < 1.0:
            raise InvalidArgument("dp.delta", f"must be in (0, 1), got {self.delta}")
        create_accountant(self.accountant)

    @property
    def sampling_probability(self) -> float:
        """Per-step inclusion probability of a record: 1 (client batches) or ``batch_size / 2m``."""
        if self.sampling is BatchSampling.CLIENT_BATCHES:
            return 1.0
        return self.batch_size / (2 * self.canaries)

    @property
    def guesses(self) -> int:
        """Guesses made, r = 2k."""
        return 2 * self.guesses_per_side


@dataclass(frozen=True)
class AuditReport:
    """The outcome of an audit (``AuditPrivacyResult`` of the contract)."""

    claimed_epsilon: float
    """What the production accountant claims for the configuration (inf without noise)."""
    epsilon_lower_bound: float
    """Empirical lower bound on epsilon at ``confidence``."""
    canaries: int
    """m."""
    guesses: int
    """Guesses made, r = 2k."""
    correct_guesses: int
    """v."""
    confidence: float
    """1 - beta."""
    delta: float
    """The delta both epsilons are at."""


def claimed_epsilon(config: AuditConfig) -> float:
    """The epsilon the production accountant gives ``config.steps`` steps of the mechanism.

    Returns:
        The accountant's epsilon at ``config.delta``; ``inf`` for noise multiplier 0.
    """
    if config.noise_multiplier == 0:
        return math.inf
    mechanism = StepMechanism(
        sampling=config.sampling,
        noise_multiplier=config.noise_multiplier,
        sampling_probability=config.sampling_probability,
    )
    accountant = create_accountant(config.accountant)
    accountant.record(mechanism, steps=config.steps)
    return accountant.epsilon(config.delta)


def run_privacy_audit(
    engine: LoraTrainingEngine, config: AuditConfig, *, seed: int | None = None
) -> AuditReport:
    """Run the shadow training with canaries and turn the guesses into a bound.

    Args:
        engine: A fresh private engine on the audited base model; its ``dp`` is the
            noise actually added. It is trained by the audit and should be discarded.
        config: The audit.
        seed: Seeds membership, canaries and filler data (not the DP noise, which the
            engine always draws from the OS CSPRNG); ``None`` draws one from the CSPRNG.

    Returns:
        The report.

    Raises:
        InvalidArgument: The engine is not private or has already trained.
    """
    dp = engine.dp
    if dp is None:
        raise InvalidArgument("dp", "an audit needs a DP-SGD engine")
    if engine.step != 0 or engine.accumulated_examples != 0:
        raise InvalidArgument("engine", "the audit needs a fresh engine")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    included = torch.rand(config.canaries, generator=generator) < 0.5
    length = max(2, min(SEQUENCE_LENGTH, engine.max_sequence_length))
    adam = AdamConfig(learning_rate=SHADOW_LEARNING_RATE)

    if config.canary_kind is CanaryKind.WHITE_BOX:
        scores = _white_box_run(engine, config, included, generator, length, adam)
    else:
        scores = _black_box_run(engine, config, included, generator, length, adam)
    correct = count_correct_guesses(
        scores, included.numpy(), guesses_per_side=config.guesses_per_side
    )
    bound = epsilon_lower_bound(
        canaries=config.canaries,
        guesses=config.guesses,
        correct=correct,
        delta=config.delta,
        confidence=config.confidence,
    )
    return AuditReport(
        claimed_epsilon=claimed_epsilon(config),
        epsilon_lower_bound=bound,
        canaries=config.canaries,
        guesses=config.guesses,
        correct_guesses=correct,
        confidence=config.confidence,
        delta=config.delta,
    )


def _random_sequences(
    count: int, length: int, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    return torch.randint(0, vocab_size, (count, length), generator=generator)


def _train_on(engine: LoraTrainingEngine, sequences: torch.Tensor) -> None:
    """One forward_backward (cross-entropy, weight 1 on every target) on the rows."""
    if sequences.shape[0] == 0:
        return
    batch = [row[:-1] for row in sequences]
    inputs = [
        {"target_tokens": row[1:], "weights": torch.ones(row.numel() - 1)} for row in sequences
    ]
    engine.forward_backward(batch, "cross_entropy", inputs)


def _participants(
    config: AuditConfig, candidates: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the candidate records that join this step."""
    if config.sampling is BatchSampling.CLIENT_BATCHES:
        return candidates.nonzero().flatten()
    draws = torch.rand(candidates.shape[0], generator=generator) < config.sampling_probability
    return (candidates & draws).nonzero().flatten()


def _filler_for_step(
    engine: LoraTrainingEngine,
    config: AuditConfig,
    filler: torch.Tensor | None,
    generator: torch.Generator,
    length: int,
) -> torch.Tensor:
    if filler is None:
        # Client batches: batch_size fresh filler records.
        return _random_sequences(config.batch_size, length, engine.vocab_size, generator)
    chosen = _participants(config, torch.ones(filler.shape[0], dtype=torch.bool), generator)
    return filler[chosen]


def _divisor(config: AuditConfig) -> float:
    if config.sampling is BatchSampling.CLIENT_BATCHES:
        return config.batch_size + config.canaries / 2
    return float(config.batch_size)


def _white_box_run(
    engine: LoraTrainingEngine,
    config: AuditConfig,
    included: torch.Tensor,
    generator: torch.Generator,
    length: int,
    adam: AdamConfig,
) -> np.typing.NDArray[np.float64]:
    dp = engine.dp
    assert dp is not None
    shapes = {name: tensor.shape for name, tensor in engine.pending_gradient_sum().items()}
    sizes = [math.prod(shape) for shape in shapes.values()]
    if config.canaries * sum(sizes) > MAX_CANARY_ELEMENTS:
        raise InvalidArgument(
            "canaries",
            f"{config.canaries} directions of {sum(sizes)} LoRA parameters exceed the "
            f"audit's memory limit of {MAX_CANARY_ELEMENTS} values",
        )
    directions = torch.randn(config.canaries, sum(sizes), generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    per_parameter = dict(zip(shapes, torch.split(directions, sizes, dim=1), strict=True))
    scores = torch.zeros(config.canaries, dtype=torch.float64)
    filler = (
        None
        if config.sampling is BatchSampling.CLIENT_BATCHES
        else _random_sequences(config.canaries, length, engine.vocab_size, generator)
    )

    def observe(noisy_sum: Mapping[str, torch.Tensor]) -> None:
        flat = torch.cat([noisy_sum[name].reshape(-1) for name in shapes])
        scores.add_((directions @ flat).double())

    for _ in range(config.steps):
        _train_on(engine, _filler_for_step(engine, config, filler, generator, length))
        chosen = _participants(config, included, generator)
        for part in torch.split(chosen, _CANARY_CHUNK):
            gradients = {
                name: (dp.max_grad_norm * block[part]).reshape(-1, *shapes[name])
                for name, block in per_parameter.items()
            }
            engine.add_clipped_gradients(gradients)
        engine.optim_step(adam, expected_batch_size=_divisor(config), noisy_sum_observer=observe)
    return scores.numpy()


def _canary_losses(engine: LoraTrainingEngine, canaries: torch.Tensor) -> torch.Tensor:
    losses: list[float] = []
    for start in range(0, canaries.shape[0], _SCORE_BATCH):
        part = canaries[start : start + _SCORE_BATCH]
        inputs = [
            {"target_tokens": row[1:], "weights": torch.ones(row.numel() - 1)} for row in part
        ]
        result = engine.forward([row[:-1] for row in part], "cross_entropy", inputs)
        losses.extend(output.loss for output in result.outputs)
    return torch.tensor(losses, dtype=torch.float64)


def _black_box_run(
    engine: LoraTrainingEngine,
    config: AuditConfig,
    included: torch.Tensor,
    generator: torch.Generator,
    length: int,
    adam: AdamConfig,
) -> np.typing.NDArray[np.float64]:
    canaries = _random_sequences(config.canaries, length, engine.vocab_size, generator)
    filler = (
        None
        if config.sampling is BatchSampling.CLIENT_BATCHES
        else _random_sequences(config.canaries, length, engine.vocab_size, generator)
    )
    before = _canary_losses(engine, canaries)
    for _ in range(config.steps):
        step_filler = _filler_for_step(engine, config, filler, generator, length)
        chosen = _participants(config, included, generator)
        _train_on(engine, torch.cat([step_filler, canaries[chosen]]))
        engine.optim_step(adam, expected_batch_size=_divisor(config))
    after = _canary_losses(engine, canaries)
    scores: np.typing.NDArray[np.float64] = (before - after).numpy()
    return scores
