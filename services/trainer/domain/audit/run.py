"""The shadow training run of a privacy audit, on the production DP-SGD code path.

The audit trains a fresh LoRA engine (:class:`~tensafe.trainer.domain.engine.training.
LoraTrainingEngine`, the class the worker trains tenants with) on a base model, with
synthetic filler records drawn uniformly from the vocabulary: no tenant data is read
and no training client is charged. The engine clips every example and adds the noise in
``optim_step`` exactly as for a tenant; the claimed epsilon comes from the production
accountant (:func:`~tensafe.trainer.domain.engine.accounting.create_accountant`) composing the
same :class:`~tensafe.trainer.domain.engine.accounting.StepMechanism` the trainer charges.

Canaries are m random token sequences (uniform over the vocabulary, so their loss is
high and their raw gradient norm far above any useful C: about 14 on the tests' tiny
model), each included independently with probability 1/2, from a CSPRNG seed unless a
seed is given. An included canary is a datum like any other: it goes through
``forward_backward`` and so through the production one-backward per-example clipping
(:mod:`tensafe.trainer.domain.engine.clipping`); nothing about it is computed by the audit on
the step's path. Whatever that clipping lets through is what the scores see.

* **White-box** (Steinke, Nasr, Jagielski 2023, §6, with the auditor's access to the
  shadow model's weights and to each step's noised gradient sum, as in Nasr et al.
  2023, "Tight Auditing of Differentially Private Machine Learning"): before every step
  the auditor computes, for every canary included or not, its unit gradient ``ĝ_i`` at
  the current weights (``LoraTrainingEngine.per_example_gradients``, a side
  computation that changes nothing), observes the step's noised clipped sum through
  ``optim_step(noisy_sum_observer=...)``, and adds the canary's least-squares
  coefficient in that sum (:func:`white_box_step_scores`). The weights are a function
  of the earlier noised sums only, so the directions and the scores are
  post-processing of the mechanism's outputs, as the one-run theorem requires. A
  correctly clipped canary contributes ``C`` per step along ``ĝ_i`` against noise
  ``σC``: the Gaussian mechanism's own signal-to-noise, so the white-box audit is as
  strong as this method gets. With clipping missing it contributes ``‖g_i‖ ≫ C`` and
  the audit refutes the claim.
* **Black-box**: the score is the canary's loss decrease over the run (loss before
  minus loss after), which needs only the final model. Black-box bounds are far looser.

Participation, and the production path each mode runs:

* client batches (no amplification): every included canary joins **every** step, next
  to ``batch_size`` fresh filler records, through ``forward_backward`` and
  ``optim_step`` as a client's ForwardBackward/OptimStep do; each step is a full
  Gaussian mechanism for it, as accounted.
* Poisson sampling: the shadow dataset holds m filler records plus the included
  canaries; the production :class:`~tensafe.trainer.domain.datasets.sampling.PoissonSampler`
  draws each step's batch at ``q = batch_size / (2 m)`` (the ``q`` the accountant is
  told), and the production :func:`~tensafe.trainer.domain.datasets.steps.run_step` runs it,
  empty batches (the noise-only update) included: the code TrainOnDataset runs.

The gradient sum is always divided by a constant (``batch_size + m/2`` for client
batches, ``batch_size`` for Poisson), never by the realised count, so the normaliser
carries no information about membership.
"""

from __future__ import annotations

import enum
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.datasets import steps
from tensafe.trainer.domain.datasets.records import TokenizedDataset
from tensafe.trainer.domain.datasets.sampling import PoissonSampler
from tensafe.trainer.domain.engine.accounting import (
    BatchSampling,
    StepMechanism,
    create_accountant,
)
from tensafe.trainer.domain.engine.config import AdamConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

from .bound import count_correct_guesses, epsilon_lower_bound, validate_audit_shape

SHADOW_LEARNING_RATE = 1e-2
"""AdamW learning rate of the shadow run. White-box scores do not depend on it (they
are taken on the noised gradient sums); for black-box canaries a large rate makes the
loss decrease of a trained canary more visible."""

SEQUENCE_LENGTH = 16
"""Tokens per filler record and per black-box canary (capped by the model's context)."""

_SCORE_BATCH = 64
"""Canaries per forward pass when their losses or gradients are measured."""

CLIENT_BATCH = 64
"""Records per ``forward_backward`` call of a client-batch step (a client's batch; the
Poisson steps use the dataset runner's own micro-batches)."""

NoisySumObserver = Callable[[Mapping[str, torch.Tensor]], None]

_CG_ITERATIONS = 100
"""Most conjugate-gradient iterations per step for the white-box least-squares scores."""

_CG_TOLERANCE = 1e-4
"""Relative residual at which the least-squares solve stops (far below the noise)."""

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
    canaries = _random_sequences(config.canaries, length, engine.vocab_size, generator)
    # The production sampler seeds itself from the OS CSPRNG; a seeded audit (tests)
    # seeds it too, so the whole run but the DP noise is reproducible.
    sampler_seed = None if seed is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    shadow = _ShadowSteps(
        engine,
        config,
        canaries=canaries,
        included=included,
        generator=generator,
        sampler_seed=sampler_seed,
    )
    if config.canary_kind is CanaryKind.WHITE_BOX:
        scores = _white_box_run(engine, config, canaries, shadow)
    else:
        scores = _black_box_run(engine, config, canaries, shadow)
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


def _cross_entropy_inputs(
    sequences: torch.Tensor,
) -> tuple[list[torch.Tensor], list[Mapping[str, torch.Tensor]]]:
    """Rows as cross-entropy data: (model inputs, loss_fn_inputs), weight 1 on every target."""
    batch = [row[:-1] for row in sequences]
    inputs: list[Mapping[str, torch.Tensor]] = [
        {"target_tokens": row[1:], "weights": torch.ones(row.numel() - 1)} for row in sequences
    ]
    return batch, inputs


def _train_on(engine: LoraTrainingEngine, sequences: torch.Tensor) -> None:
    """The rows through ``forward_backward`` (per-example clipping), in client batches."""
    for start in range(0, sequences.shape[0], CLIENT_BATCH):
        batch, inputs = _cross_entropy_inputs(sequences[start : start + CLIENT_BATCH])
        engine.forward_backward(batch, "cross_entropy", inputs)


def _dataset_of(sequences: torch.Tensor) -> TokenizedDataset:
    """Equal-length rows as a server-held dataset whose every target is trained on."""
    count, length = sequences.shape
    return TokenizedDataset(
        tokens=sequences.reshape(-1).numpy().astype(np.int64),
        offsets=np.arange(count + 1, dtype=np.int64) * length,
        loss_starts=np.zeros(count, dtype=np.int64),
    )


class _ShadowSteps:
    """The steps of the shadow run, each through the production code of its mode.

    * Client batches: ``batch_size`` fresh filler records and every included canary go
      through ``forward_backward``, then ``optim_step`` divides by the constant
      ``batch_size + m/2``.
    * Poisson: the shadow dataset (m filler records, then the included canaries) is
      sampled by the production :class:`~tensafe.trainer.domain.datasets.sampling.
      PoissonSampler` at ``q = batch_size / 2m`` and each step is the production
      :func:`~tensafe.trainer.domain.datasets.steps.run_step` (micro-batched clipping, the
      expected batch size ``q · 2m = batch_size`` as divisor, the noise-only update for
      an empty batch) — the code TrainOnDataset runs.
    """

    def __init__(
        self,
        engine: LoraTrainingEngine,
        config: AuditConfig,
        *,
        canaries: torch.Tensor,
        included: torch.Tensor,
        generator: torch.Generator,
        sampler_seed: int | None,
    ) -> None:
        self._engine = engine
        self._config = config
        self._canaries = canaries
        self._included = included
        self._generator = generator
        self._adam = AdamConfig(learning_rate=SHADOW_LEARNING_RATE)
        self._dataset: TokenizedDataset | None = None
        self._sampler: PoissonSampler | None = None
        if config.sampling is BatchSampling.POISSON:
            filler = _random_sequences(
                config.canaries, canaries.shape[1], engine.vocab_size, generator
            )
            self._dataset = _dataset_of(torch.cat([filler, canaries[included]]))
            self._sampler = PoissonSampler(
                records=self._dataset.records,
                sample_rate=config.sampling_probability,
                seed=sampler_seed,
            )

    def run(self, observer: NoisySumObserver | None) -> None:
        """One optimizer step; ``observer`` sees the step's noised clipped-gradient sum."""
        if self._sampler is not None:
            assert self._dataset is not None
            steps.run_step(
                self._engine,
                self._dataset,
                self._sampler.draw(),
                adam=self._adam,
                expected_batch_size=float(self._config.batch_size),
                noisy_sum_observer=observer,
            )
            return
        config = self._config
        filler = _random_sequences(
            config.batch_size, self._canaries.shape[1], self._engine.vocab_size, self._generator
        )
        _train_on(self._engine, torch.cat([filler, self._canaries[self._included]]))
        self._engine.optim_step(
            self._adam,
            expected_batch_size=config.batch_size + config.canaries / 2,
            noisy_sum_observer=observer,
        )


def _white_box_run(
    engine: LoraTrainingEngine, config: AuditConfig, canaries: torch.Tensor, shadow: _ShadowSteps
) -> npt.NDArray[np.float64]:
    names = engine.parameter_names
    parameters = sum(tensor.numel() for tensor in engine.pending_gradient_sum().values())
    if config.canaries * parameters > MAX_CANARY_ELEMENTS:
        raise InvalidArgument(
            "canaries",
            f"{config.canaries} gradients of {parameters} LoRA parameters exceed the "
            f"audit's memory limit of {MAX_CANARY_ELEMENTS} values",
        )
    scores = torch.zeros(config.canaries, dtype=torch.float64)
    observed: list[torch.Tensor] = []

    def observe(noisy_sum: Mapping[str, torch.Tensor]) -> None:
        observed.append(torch.cat([noisy_sum[name].reshape(-1) for name in names]))

    for _ in range(config.steps):
        # Directions first: they must be at the weights the step's gradients are taken at.
        directions = _canary_directions(engine, canaries, names)
        shadow.run(observe)
        scores += white_box_step_scores(directions, observed.pop())
    return scores.numpy()


def _canary_directions(
    engine: LoraTrainingEngine, canaries: torch.Tensor, names: list[str]
) -> torch.Tensor:
    """``[m, d]`` every canary's unit gradient at the current weights (the side computation).

    Computed for every canary, included or not, from the current weights only (a
    function of the earlier steps' noised outputs), so it is post-processing of the
    mechanism and may be used to score.
    """
    rows: list[torch.Tensor] = []
    for start in range(0, canaries.shape[0], _SCORE_BATCH):
        batch, inputs = _cross_entropy_inputs(canaries[start : start + _SCORE_BATCH])
        gradients = engine.per_example_gradients(batch, "cross_entropy", inputs)
        rows.append(torch.cat([gradients[name].flatten(1) for name in names], dim=1))
    flat = torch.cat(rows)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    directions: torch.Tensor = flat / norms
    return directions


def white_box_step_scores(directions: torch.Tensor, noisy_sum: torch.Tensor) -> torch.Tensor:
    """One step's white-box scores: every canary's least-squares coefficient in the sum.

    The noised sum is ``s = Σ_j S_j a_j ĝ_j + F + N(0, σ²C² I)`` with ``a_j ĝ_j`` what the
    production clipping let canary j contribute (``a_j = C`` when it clips, ``‖g_j‖``
    when it does not), ``S_j`` its membership in the step and ``F`` the filler. The
    plain projections ``<s, ĝ_i>`` also carry the other canaries' terms
    ``a_j <ĝ_j, ĝ_i>``: canary gradients are not orthogonal (on the tiny model their
    mean |cos| is three times that of random directions), which costs a third of the
    separation once the noise is small, exactly the broken mechanisms the audit is for.
    The least-squares coefficients ``β = argmin ‖s − Σ_j β_j ĝ_j‖``, the solution of
    ``(Ĝ Ĝᵀ) β = Ĝ s``, carry none of them; the price is a larger noise per coefficient
    (1.2–2.2x in variance on the tiny model), about one correct guess in 40 when the
    noise dominates (measured in docs/privacy.md, with the alternatives tried).

    Solved by conjugate gradients on ``Ĝ Ĝᵀ`` applied as ``Ĝ (Ĝᵀ v)`` (2 m d operations
    per iteration instead of m² d for the Gram matrix; about 15 iterations on the tiny
    model). With m > d the system is singular but consistent, and CG from zero still
    converges to the minimum-norm solution.

    Args:
        directions: ``[m, d]`` the canaries' unit gradients at the step's weights.
        noisy_sum: ``[d]`` the step's noised clipped-gradient sum.

    Returns:
        ``[m]`` float64 scores.
    """
    rhs = (directions @ noisy_sum).double()
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    residual_sq = float(residual @ residual)
    target = (_CG_TOLERANCE * float(rhs.norm())) ** 2
    for _ in range(_CG_ITERATIONS):
        if residual_sq <= target:
            break
        product = (directions @ (directions.T @ direction.float())).double()
        curvature = float(direction @ product)
        if curvature <= 0.0:
            break
        step = residual_sq / curvature
        solution += step * direction
        residual -= step * product
        previous, residual_sq = residual_sq, float(residual @ residual)
        direction = residual + (residual_sq / previous) * direction
    return solution


def _canary_losses(engine: LoraTrainingEngine, canaries: torch.Tensor) -> torch.Tensor:
    losses: list[float] = []
    for start in range(0, canaries.shape[0], _SCORE_BATCH):
        batch, inputs = _cross_entropy_inputs(canaries[start : start + _SCORE_BATCH])
        result = engine.forward(batch, "cross_entropy", inputs)
        losses.extend(output.loss for output in result.outputs)
    return torch.tensor(losses, dtype=torch.float64)


def _black_box_run(
    engine: LoraTrainingEngine, config: AuditConfig, canaries: torch.Tensor, shadow: _ShadowSteps
) -> npt.NDArray[np.float64]:
    before = _canary_losses(engine, canaries)
    for _ in range(config.steps):
        shadow.run(None)
    after = _canary_losses(engine, canaries)
    scores: npt.NDArray[np.float64] = (before - after).numpy()
    return scores
