"""Tinker's built-in losses and the validation of a ForwardBackward batch.

A datum follows Tinker's alignment: ``model_input`` is a token sequence of length N and
every per-token input in ``loss_fn_inputs`` has length N, position ``t`` describing the
token that ``model_input[t]`` must predict. All losses are token-level and summed (the
Tinker docs, "Loss functions": https://tinker-docs.thinkingmachines.ai/losses):

- ``cross_entropy`` (``target_tokens``, ``weights``):
  ``loss = -Σ_t weights_t · log p_θ(target_t)``.
- ``importance_sampling`` (``target_tokens``, ``logprobs`` of the sampler,
  ``advantages``): ``loss = -Σ_t exp(log p_θ − log q)_t · A_t``.
- ``ppo`` (same inputs): ``loss = -Σ_t min(r_t A_t, clip(r_t, 1 − ε_low, 1 + ε_high) A_t)``
  with ``r_t = exp(log p_θ − log q)_t`` (Schulman et al., 2017).
- ``cispo`` (same inputs): ``loss = -Σ_t sg(clip(r_t, 1 − ε_low, 1 + ε_high)) · log p_θ(t) · A_t``,
  the clipped ratio a constant weight of the policy gradient (MiniMax-M1, Chen et al.,
  2025, arXiv:2506.13585; Tinker's "CISPO" page).
- ``dro`` (same inputs): ``loss = -Σ_t (log p_θ(t) · A_t − ½β (log p_θ − log q)_t²)``
  (Richemond et al., 2024, arXiv:2405.19107; Tinker's "DRO" page).

Tinker's ``stable_reinforce`` is refused by name: its objective is not published (Tinker
documents only that it reads information its sampler records per sequence), so nothing
here could compute what a Tinker user asked for.

A datum's loss is the sum over its tokens; the batch loss is the sum over data. Under
DP-SGD each datum is one example: its gradient is clipped as a whole.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tensafe.common.errors import InvalidArgument

from .config import LossConfig

STABLE_REINFORCE = "stable_reinforce"
"""Tinker's loss refused by name (see the module docstring)."""


class LossFn(enum.Enum):
    """The loss functions ``forward_backward`` accepts, by their Tinker names."""

    CROSS_ENTROPY = "cross_entropy"
    IMPORTANCE_SAMPLING = "importance_sampling"
    PPO = "ppo"
    CISPO = "cispo"
    DRO = "dro"

    @classmethod
    def parse(cls, name: str | LossFn) -> LossFn:
        """Return the loss named ``name``.

        Args:
            name: A Tinker loss name or a ``LossFn``.

        Returns:
            The matching member.

        Raises:
            InvalidArgument: ``loss_fn`` names no supported loss.
        """
        if isinstance(name, LossFn):
            return name
        for member in cls:
            if member.value == name:
                return member
        supported = ", ".join(member.value for member in cls)
        if name == STABLE_REINFORCE:
            raise InvalidArgument(
                "loss_fn",
                "stable_reinforce is not served: Tinker has not published its objective, so "
                f"TenSafe cannot compute it; use one of {supported} (e.g. the cookbook's "
                "rl_loop with loss_fn=cispo)",
                reason="UNSUPPORTED_LOSS",
            )
        raise InvalidArgument("loss_fn", f"unknown loss {name!r}; supported: {supported}")


CLIP_LOW_THRESHOLD = "clip_low_threshold"
CLIP_HIGH_THRESHOLD = "clip_high_threshold"
BETA = "beta"

# The loss_fn_config options each loss reads (Tinker's names).
_OPTIONS: dict[LossFn, tuple[str, ...]] = {
    LossFn.CROSS_ENTROPY: (),
    LossFn.IMPORTANCE_SAMPLING: (),
    LossFn.PPO: (CLIP_LOW_THRESHOLD, CLIP_HIGH_THRESHOLD),
    LossFn.CISPO: (CLIP_LOW_THRESHOLD, CLIP_HIGH_THRESHOLD),
    LossFn.DRO: (BETA,),
}


def loss_config_from_options(
    loss_fn: LossFn, options: Mapping[str, float], default: LossConfig
) -> LossConfig:
    """Apply a call's ``loss_fn_config`` (Tinker's per-call loss options) to ``default``.

    Tinker names the PPO and CISPO clip range by the ratio's bounds:
    ``clip_low_threshold`` (default 0.8) and ``clip_high_threshold`` (default 1.2), the
    ratio being clipped to ``[clip_low_threshold, clip_high_threshold]``; DRO takes
    ``beta``. Options that the chosen loss does not read are refused rather than
    ignored, so a typo cannot silently train with defaults.

    Args:
        loss_fn: The call's loss.
        options: The call's ``loss_fn_config``.
        default: The options in force when the call sets none.

    Returns:
        The loss options for this call.

    Raises:
        InvalidArgument: An unknown option, an option the loss does not take, or a bound
            out of range; the field is ``loss_fn_config.<option>``.
    """
    if not options:
        return default
    accepted = _OPTIONS[loss_fn]
    for key in options:
        if key not in accepted:
            takes = ", ".join(accepted) or "no options"
            raise InvalidArgument(f"loss_fn_config.{key}", f"{loss_fn.value} takes {takes}")
    low = float(options.get(CLIP_LOW_THRESHOLD, 1.0 - default.ppo_clip_low))
    high = float(options.get(CLIP_HIGH_THRESHOLD, 1.0 + default.ppo_clip_high))
    if not 0.0 < low <= 1.0:
        raise InvalidArgument(
            f"loss_fn_config.{CLIP_LOW_THRESHOLD}", f"must be in (0, 1], got {low}"
        )
    if not 1.0 <= high < float("inf"):
        raise InvalidArgument(
            f"loss_fn_config.{CLIP_HIGH_THRESHOLD}", f"must be finite and >= 1, got {high}"
        )
    beta = float(options.get(BETA, default.dro_beta))
    if not 0.0 <= beta < float("inf"):
        raise InvalidArgument(f"loss_fn_config.{BETA}", f"must be finite and >= 0, got {beta}")
    return LossConfig(ppo_clip_low=1.0 - low, ppo_clip_high=high - 1.0, dro_beta=beta)


TARGET_TOKENS = "target_tokens"
WEIGHTS = "weights"
SAMPLING_LOGPROBS = "logprobs"
ADVANTAGES = "advantages"

# Per-token float inputs each loss needs besides target_tokens.
_FLOAT_INPUTS: dict[LossFn, tuple[str, ...]] = {
    LossFn.CROSS_ENTROPY: (WEIGHTS,),
    LossFn.IMPORTANCE_SAMPLING: (SAMPLING_LOGPROBS, ADVANTAGES),
    LossFn.PPO: (SAMPLING_LOGPROBS, ADVANTAGES),
    LossFn.CISPO: (SAMPLING_LOGPROBS, ADVANTAGES),
    LossFn.DRO: (SAMPLING_LOGPROBS, ADVANTAGES),
}

TokenSequence = Sequence[int] | torch.Tensor
"""A 1-D sequence of token ids (list, tuple, numpy or torch integer array)."""

PerTokenValues = Sequence[float] | Sequence[int] | torch.Tensor
"""A 1-D sequence of per-token numbers."""


@dataclass(frozen=True)
class PaddedBatch:
    """A validated batch, right-padded to a common length.

    Right padding with a causal mask means no real token attends to a pad position, so
    padded rows compute exactly what the unpadded sequence would.
    """

    input_ids: torch.Tensor
    """``[B, T]`` int64; pad positions hold token 0."""
    attention_mask: torch.Tensor
    """``[B, T]`` int64; 1 on real tokens."""
    target_tokens: torch.Tensor
    """``[B, T]`` int64; 0 on pad positions."""
    float_inputs: dict[str, torch.Tensor]
    """Per-token float32 inputs by name, ``[B, T]``, 0 on pad positions."""
    lengths: tuple[int, ...]
    """Unpadded length of each datum."""

    @property
    def mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True on real positions."""
        return self.attention_mask.bool()


def _as_1d(values: object, field: str, *, integer: bool) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidArgument(field, f"not a sequence of numbers ({error})") from error
    if tensor.dim() != 1:
        raise InvalidArgument(field, f"must be one-dimensional, got shape {tuple(tensor.shape)}")
    if tensor.numel() and tensor.dtype == torch.bool:
        raise InvalidArgument(field, "must hold numbers, not booleans")
    if integer:
        if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
            raise InvalidArgument(field, "must hold integer token ids")
        return tensor.to(torch.int64)
    if tensor.dtype.is_complex:
        raise InvalidArgument(field, "must hold real numbers")
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidArgument(field, "must hold finite numbers")
    return tensor


def _check_token_range(tokens: torch.Tensor, field: str, vocab_size: int) -> None:
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidArgument(
            field, f"token id {bad} is outside the vocabulary 0..{vocab_size - 1}"
        )


def validate_token_sequences(
    sequences: Sequence[TokenSequence],
    *,
    field: str,
    vocab_size: int,
    max_length: int,
    min_length: int = 1,
) -> list[torch.Tensor]:
    """Check token sequences and return them as int64 tensors.

    Args:
        sequences: One token-id sequence per datum.
        field: Request field name used in errors (``batch``, ``sequences``).
        vocab_size: Token ids must be in ``0..vocab_size-1``.
        max_length: Longest accepted sequence (the model's context).
        min_length: Shortest accepted sequence.

    Returns:
        One int64 tensor per sequence.

    Raises:
        InvalidArgument: Empty list, a sequence too short or long, non-integer or
            out-of-vocabulary ids; the field names the offending sequence.
    """
    if isinstance(sequences, str | bytes) or len(sequences) == 0:
        raise InvalidArgument(field, "must hold at least one sequence")
    tensors: list[torch.Tensor] = []
    for index, sequence in enumerate(sequences):
        item_field = f"{field}[{index}]"
        tokens = _as_1d(sequence, item_field, integer=True)
        if tokens.numel() < min_length:
            raise InvalidArgument(item_field, f"must hold at least {min_length} token(s)")
        if tokens.numel() > max_length:
            raise InvalidArgument(
                item_field, f"has {tokens.numel()} tokens; the model accepts at most {max_length}"
            )
        _check_token_range(tokens, item_field, vocab_size)
        tensors.append(tokens)
    return tensors


def validate_batch(
    batch: Sequence[TokenSequence],
    loss_fn: LossFn,
    loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
    *,
    vocab_size: int,
    max_length: int,
) -> PaddedBatch:
    """Validate a ForwardBackward request completely and pad it.

    Nothing is computed on the model before the whole request is known to be valid, so
    an error leaves the engine untouched.

    Args:
        batch: One ``model_input`` token sequence per datum.
        loss_fn: The loss the inputs are for.
        loss_fn_inputs: One mapping per datum with exactly the inputs ``loss_fn`` needs
            (``target_tokens`` plus ``weights``, or ``logprobs`` and ``advantages``).
        vocab_size: Model vocabulary size.
        max_length: Model context length.

    Returns:
        The padded batch.

    Raises:
        InvalidArgument: The field names what is wrong, e.g. ``batch``,
            ``batch[2]``, ``loss_fn_inputs``, ``loss_fn_inputs[1].weights``.
    """
    sequences = validate_token_sequences(
        batch, field="batch", vocab_size=vocab_size, max_length=max_length
    )
    if isinstance(loss_fn_inputs, Mapping) or len(loss_fn_inputs) != len(sequences):
        count = "a mapping" if isinstance(loss_fn_inputs, Mapping) else len(loss_fn_inputs)
        raise InvalidArgument(
            "loss_fn_inputs", f"need one mapping per datum ({len(sequences)}), got {count}"
        )
    float_names = _FLOAT_INPUTS[loss_fn]
    expected = {TARGET_TOKENS, *float_names}
    targets: list[torch.Tensor] = []
    floats: dict[str, list[torch.Tensor]] = {name: [] for name in float_names}
    for index, (tokens, inputs) in enumerate(zip(sequences, loss_fn_inputs, strict=True)):
        prefix = f"loss_fn_inputs[{index}]"
        if not isinstance(inputs, Mapping):
            raise InvalidArgument(prefix, "must be a mapping of input name to values")
        missing = sorted(expected - set(inputs))
        if missing:
            raise InvalidArgument(f"{prefix}.{missing[0]}", f"required by {loss_fn.value}")
        unexpected = sorted(set(inputs) - expected)
        if unexpected:
            raise InvalidArgument(
                f"{prefix}.{unexpected[0]}", f"is not an input of {loss_fn.value}"
            )
        length = tokens.numel()
        target = _as_1d(inputs[TARGET_TOKENS], f"{prefix}.{TARGET_TOKENS}", integer=True)
        _check_length(target, length, f"{prefix}.{TARGET_TOKENS}")
        _check_token_range(target, f"{prefix}.{TARGET_TOKENS}", vocab_size)
        targets.append(target)
        for name in float_names:
            values = _as_1d(inputs[name], f"{prefix}.{name}", integer=False)
            _check_length(values, length, f"{prefix}.{name}")
            floats[name].append(values)

    lengths = tuple(tokens.numel() for tokens in sequences)
    return PaddedBatch(
        input_ids=_pad(sequences, torch.int64),
        attention_mask=_pad([torch.ones_like(t) for t in sequences], torch.int64),
        target_tokens=_pad(targets, torch.int64),
        float_inputs={name: _pad(values, torch.float32) for name, values in floats.items()},
        lengths=lengths,
    )


def _check_length(values: torch.Tensor, length: int, field: str) -> None:
    if values.numel() != length:
        raise InvalidArgument(
            field, f"has length {values.numel()}; model_input has length {length}"
        )


def _pad(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(
        [t.to(dtype) for t in tensors], batch_first=True, padding_value=0
    )


def token_logprobs(logits: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Return ``log p(target_t)`` for every position.

    Args:
        logits: ``[B, T, V]`` model output.
        target_tokens: ``[B, T]`` int64.

    Returns:
        ``[B, T]`` float32 log-probabilities (temperature 1).
    """
    logits = logits.float()
    picked = logits.gather(-1, target_tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def per_token_loss(
    loss_fn: LossFn,
    target_logprobs: torch.Tensor,
    batch: PaddedBatch,
    config: LossConfig,
) -> torch.Tensor:
    """Return the per-token loss, exactly zero (with zero gradient) on pad positions.

    Args:
        loss_fn: Which loss.
        target_logprobs: ``[B, T]`` learner log-probabilities of the target tokens.
        batch: The padded batch holding the loss inputs.
        config: The clip range (``ppo``, ``cispo``) and β (``dro``).

    Returns:
        ``[B, T]`` float32; the datum loss is its row sum.
    """
    if loss_fn is LossFn.CROSS_ENTROPY:
        loss = -target_logprobs * batch.float_inputs[WEIGHTS]
    else:
        advantages = batch.float_inputs[ADVANTAGES]
        log_ratio = target_logprobs - batch.float_inputs[SAMPLING_LOGPROBS]
        ratio = torch.exp(log_ratio)
        if loss_fn is LossFn.IMPORTANCE_SAMPLING:
            loss = -ratio * advantages
        elif loss_fn is LossFn.PPO:
            clipped = torch.clamp(ratio, 1.0 - config.ppo_clip_low, 1.0 + config.ppo_clip_high)
            loss = -torch.minimum(ratio * advantages, clipped * advantages)
        elif loss_fn is LossFn.CISPO:
            # detach(): the clipped ratio weighs the gradient of log p_θ, it is not one.
            weight = torch.clamp(
                ratio, 1.0 - config.ppo_clip_low, 1.0 + config.ppo_clip_high
            ).detach()
            loss = -weight * target_logprobs * advantages
        else:
            loss = -(target_logprobs * advantages - 0.5 * config.dro_beta * log_ratio**2)
    # where(), not a multiplication by the mask: a pad position can never leak a NaN or
    # an infinity into the sum or the gradient.
    return torch.where(batch.mask, loss, torch.zeros_like(loss))


def datum_digests(
    batch: Sequence[TokenSequence],
    loss_fn: LossFn,
    loss_fn_inputs: Sequence[Mapping[str, PerTokenValues]],
) -> list[str]:
    """A digest per datum of everything that makes it up: loss, tokens and inputs.

    Two data are identical when every token and every loss input is (DESIGN §8: the
    guarantee is per datum per step, and a datum given twice in one step has twice the
    sensitivity). Near-duplicates (one token or weight apart) are distinct data.
    """
    digests = []
    for tokens, inputs in zip(batch, loss_fn_inputs, strict=True):
        hasher = hashlib.sha256(loss_fn.value.encode())
        hasher.update(_as_list_bytes(tokens))
        for key in sorted(inputs):
            hasher.update(b"\x00" + key.encode() + b"\x00")
            hasher.update(_as_list_bytes(inputs[key]))
        digests.append(hasher.hexdigest())
    return digests


def check_distinct(digests: Sequence[str]) -> None:
    """Refuse a batch that holds the same datum twice (see :func:`datum_digests`).

    Raises:
        InvalidArgument: ``data[later]`` names both indexes; reason ``DUPLICATE_DATUM``.
    """
    seen: dict[str, int] = {}
    for index, digest in enumerate(digests):
        if digest in seen:
            raise InvalidArgument(
                f"data[{index}]",
                f"is identical to data[{seen[digest]}]: under DP a datum may appear once "
                "per optimizer step (its sensitivity would double)",
                reason="DUPLICATE_DATUM",
            )
        seen[digest] = index


def _as_list_bytes(values: TokenSequence | PerTokenValues) -> bytes:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return json.dumps([float(v) for v in values]).encode()
