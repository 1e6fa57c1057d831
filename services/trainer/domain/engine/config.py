"""Validated configuration of a LoRA training client: adapter, optimizer, DP and losses.

Every dataclass is frozen and validates itself on construction, raising
:class:`~tensafe.common.errors.InvalidArgument` with the offending field's path
(``lora.rank``, ``adam.learning_rate``, ``dp.max_grad_norm``, ...), so a bad request is
refused before any model is touched.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from tensafe.common.errors import InvalidArgument

# Largest LoRA rank accepted. Ranks beyond a few hundred defeat the purpose of a
# low-rank adapter and would make the per-example book-keeping tensors large.
MAX_LORA_RANK = 1024

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The low-rank adapter added to the base model (Hu et al., 2021, "LoRA").

    Each targeted linear layer ``W`` becomes ``W x + (alpha / rank) * B A dropout(x)``
    with ``A: in -> rank`` and ``B: rank -> out``; only ``A`` and ``B`` are trained.
    """

    rank: int
    """Rank ``r`` of the update ``B A``; 1..MAX_LORA_RANK."""
    alpha: float
    """Scale numerator: the update is multiplied by ``alpha / rank``; positive."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names (last component) of the linear layers to adapt, e.g. ``q_proj``."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise InvalidArgument("lora.rank", "must be an integer")
        if not 1 <= self.rank <= MAX_LORA_RANK:
            raise InvalidArgument("lora.rank", f"must be in 1..{MAX_LORA_RANK}, got {self.rank}")
        if not _finite(self.alpha) or self.alpha <= 0:
            raise InvalidArgument("lora.alpha", f"must be positive and finite, got {self.alpha}")
        if not _finite(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument("lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise InvalidArgument("lora.target_modules", "must be a non-empty list of names")
        # A list given by a caller becomes a tuple, so the config stays hashable and
        # compares equal to the same config built from a tuple.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in self.target_modules:
            if not isinstance(name, str) or not _MODULE_NAME.match(name):
                raise InvalidArgument("lora.target_modules", f"invalid module name {name!r}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise InvalidArgument("lora.target_modules", "names must be unique")

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to the adapter's output."""
        return float(self.alpha) / self.rank


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    """AdamW hyper-parameters for one optimizer step (Loshchilov & Hutter, 2019).

    Tinker passes them with every ``optim_step``, so a schedule is the caller's loop.
    """

    learning_rate: float
    """Step size; positive."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates, each in [0, 1)."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability; positive."""
    weight_decay: float = 0.0
    """Decoupled weight decay; non-negative."""

    def __post_init__(self) -> None:
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise InvalidArgument(
                "adam.learning_rate", f"must be positive and finite, got {self.learning_rate}"
            )
        if isinstance(self.betas, str) or len(self.betas) != 2:
            raise InvalidArgument("adam.betas", "must be a pair (beta1, beta2)")
        object.__setattr__(self, "betas", (self.betas[0], self.betas[1]))
        for index, beta in enumerate(self.betas):
            if not _finite(beta) or not 0.0 <= beta < 1.0:
                raise InvalidArgument(f"adam.betas[{index}]", f"must be in [0, 1), got {beta}")
        if not _finite(self.eps) or self.eps <= 0:
            raise InvalidArgument("adam.eps", f"must be positive and finite, got {self.eps}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise InvalidArgument(
                "adam.weight_decay", f"must be non-negative and finite, got {self.weight_decay}"
            )


@dataclass(frozen=True, kw_only=True)
class DpConfig:
    """DP-SGD parameters (Abadi et al., 2016, "Deep Learning with Differential Privacy").

    Each example's gradient (over all LoRA parameters together) is clipped to
    ``max_grad_norm`` in L2; once per optimizer step Gaussian noise with standard
    deviation ``noise_multiplier * max_grad_norm`` is added to the sum of the clipped
    gradients. ``noise_multiplier`` 0 is accepted for tests of exactness but gives no
    privacy (an accountant reports epsilon = infinity for it).
    """

    noise_multiplier: float
    """Ratio sigma of the noise standard deviation to ``max_grad_norm``; >= 0."""
    max_grad_norm: float
    """Per-example L2 clipping bound C; positive."""

    def __post_init__(self) -> None:
        if not _finite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise InvalidArgument(
                "dp.noise_multiplier",
                f"must be non-negative and finite, got {self.noise_multiplier}",
            )
        if not _finite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise InvalidArgument(
                "dp.max_grad_norm", f"must be positive and finite, got {self.max_grad_norm}"
            )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped-gradient sum."""
        return self.noise_multiplier * self.max_grad_norm


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Parameters of the built-in RL losses.

    Tinker fixes the PPO clip range to 0.2 on both sides; here it is configurable with
    the same default. The ratio is clipped to ``[1 - ppo_clip_low, 1 + ppo_clip_high]``
    (Schulman et al., 2017, "Proximal Policy Optimization Algorithms").
    """

    ppo_clip_low: float = 0.2
    """Lower clip epsilon, in [0, 1)."""
    ppo_clip_high: float = 0.2
    """Upper clip epsilon; non-negative. ``cispo`` clips its ratio to the same range."""
    dro_beta: float = 0.05
    """Weight β of ``dro``'s quadratic penalty ``½β(log p_θ − log q)²``. Tinker does not
    publish its default; 0.05 is the value of its documentation's example."""

    def __post_init__(self) -> None:
        if not _finite(self.dro_beta) or self.dro_beta < 0:
            raise InvalidArgument(
                "loss.dro_beta", f"must be non-negative and finite, got {self.dro_beta}"
            )
        if not _finite(self.ppo_clip_low) or not 0.0 <= self.ppo_clip_low < 1.0:
            raise InvalidArgument(
                "loss.ppo_clip_low", f"must be in [0, 1), got {self.ppo_clip_low}"
            )
        if not _finite(self.ppo_clip_high) or self.ppo_clip_high < 0:
            raise InvalidArgument(
                "loss.ppo_clip_high", f"must be non-negative and finite, got {self.ppo_clip_high}"
            )


class NormMethod(enum.Enum):
    """How per-example gradient norms of a LoRA linear layer are computed.

    Both are exact; they differ in cost. For a layer with input ``a_i: [T, in]`` and
    output gradient ``g_i: [T, out]`` of example ``i``, the per-example weight gradient
    is ``G_i = g_iᵀ a_i``.
    """

    AUTO = "auto"
    """Per layer, pick the cheaper of the two (see :func:`choose_norm_method`)."""
    DIRECT = "direct"
    """Form ``G_i`` (``[B, out, in]``) and take its norm; cost ``B T in out``. The same
    tensors then give the clipped sum for free. Cheap for LoRA, where one side is r."""
    GRAM = "gram"
    """Ghost norm (Goodfellow, 2015; Li et al., 2022): ``‖G_i‖² = Σ_{t,s} (a_t·a_s)
    (g_t·g_s)``; cost ``B T² (in + out)``, never materialises ``G_i``."""


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Engine settings that are not part of the training client's contract."""

    norm_method: NormMethod = NormMethod.AUTO
    """How per-example gradient norms are computed; all choices are exact."""
    logprob_batch_size: int = 32
    """Sequences per forward pass in ``compute_logprobs``; positive."""

    def __post_init__(self) -> None:
        if self.logprob_batch_size < 1:
            raise InvalidArgument("options.logprob_batch_size", "must be positive")


def choose_norm_method(*, tokens: int, in_features: int, out_features: int) -> NormMethod:
    """Pick the cheaper exact per-example norm method for one linear layer.

    The direct method costs ``T * in * out`` multiply-adds per example and its result is
    reused for the clipped sum; the Gram method costs ``T² * (in + out)`` and needs a
    second contraction of the same ``T * in * out`` size for the sum. Direct therefore
    wins unless the per-example gradient is larger than ``T * (in + out)`` elements,
    which is the memory criterion of Li et al. (2022), "Large Language Models Can Be
    Strong Differentially Private Learners", §4.

    Args:
        tokens: Padded sequence length T.
        in_features: Layer input width.
        out_features: Layer output width.

    Returns:
        ``NormMethod.DIRECT`` or ``NormMethod.GRAM``.
    """
    if in_features * out_features <= tokens * (in_features + out_features):
        return NormMethod.DIRECT
    return NormMethod.GRAM
