"""Autoregressive sampling from a causal LM, with the exact log-probability of each token.

:func:`sample` draws ``num_samples`` continuations of each prompt from a transformers
causal LM (with or without a peft adapter), one batch per prompt sharing the prompt's
KV cache. For every sampled token it returns the log-probability under the
distribution the token was actually drawn from, i.e. after temperature scaling, top-k
and top-p (nucleus, Holtzman et al. 2020, arXiv:1904.09751) truncation and
renormalisation. An RL loss that divides the current policy's probability by the
sampling probability (importance sampling, PPO) therefore gets exact ratios.

The processing order is the one of Hugging Face ``generate`` and vLLM: logits /
temperature, then keep the ``top_k`` largest (exactly ``top_k`` tokens; ties broken by
``torch.topk``), then keep the smallest prefix of the tokens sorted by probability whose
mass reaches ``top_p`` (the most likely token is always kept), then renormalise.

Greedy decoding (``temperature == 0``) takes the argmax. The distribution it draws from
is a point mass, whose log-probability 0 says nothing; the reported value is instead
the log-probability of the argmax under the model's temperature-1 distribution (what
:func:`compute_logprobs` gives for the same token). Importance ratios are not defined
for greedy rollouts; use temperature > 0 for RL.

Stop sequences are token-id sequences matched against the generated tokens, or
strings matched against the decoded generated text (needs a tokenizer). A sample stops
at the first token that completes a stop sequence, and that token (with the rest of
the stop sequence) is part of the returned tokens, with its log-probability.

Randomness comes from one ``torch.Generator`` per call seeded with ``seed``, so a call
is reproducible for a seed on the same hardware and library versions; without a seed,
63 bits from the OS CSPRNG are drawn and returned so the call can be replayed.
"""

from __future__ import annotations

import contextlib
import enum
import math
import numbers
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from tensafe.common.errors import InvalidArgument

_MAX_SEED = 2**64
"""Seeds are unsigned 64-bit integers (``torch.Generator.manual_seed`` accepts them)."""

MAX_NUM_SAMPLES = 1024
"""Most samples per prompt: they decode as one batch (the prompt's KV cache repeated
``num_samples`` times), so an unbounded count is an unbounded allocation in the worker."""


class TokenDecoder(Protocol):
    """Anything that turns token ids into text (a transformers or tokenizers tokenizer)."""

    def decode(self, token_ids: list[int], /) -> str:
        """Decode ``token_ids`` to text."""
        ...


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample continuations. Invalid values raise ``InvalidArgument(field, ...)``."""

    max_tokens: int = 16
    """Most tokens to generate per sample; >= 1."""

    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy decoding; >= 0."""

    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 disables; >= 0."""

    top_p: float = 1.0
    """Keep the smallest set of most likely tokens with mass >= ``top_p``; in (0, 1]."""

    stop: Sequence[str | int | Sequence[int]] = ()
    """Stop sequences: strings, token-id sequences, or bare token ids (one-token sequences).

    Normalised at construction to a tuple of strings and token-id tuples; read it through
    :attr:`stop_strings` and :attr:`stop_token_sequences`.
    """

    seed: int | None = None
    """Seed of the random generator, in [0, 2**64); None draws one from the OS CSPRNG."""

    num_samples: int = 1
    """Independent samples per prompt; >= 1."""

    def __post_init__(self) -> None:
        _check_int(self.max_tokens, "max_tokens", minimum=1)
        temperature = _check_real(self.temperature, "temperature")
        if temperature < 0.0 or not math.isfinite(temperature):
            raise InvalidArgument("temperature", f"must be finite and >= 0, got {temperature!r}")
        object.__setattr__(self, "temperature", temperature)
        _check_int(self.top_k, "top_k", minimum=0)
        top_p = _check_real(self.top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p!r}")
        object.__setattr__(self, "top_p", top_p)
        _check_int(self.num_samples, "num_samples", minimum=1)
        if self.num_samples > MAX_NUM_SAMPLES:
            raise InvalidArgument("num_samples", f"must be at most {MAX_NUM_SAMPLES}")
        if self.seed is not None:
            _check_int(self.seed, "seed", minimum=0)
            if self.seed >= _MAX_SEED:
                raise InvalidArgument("seed", "must be < 2**64")
        object.__setattr__(self, "stop", _normalise_stop(self.stop))

    @property
    def stop_token_sequences(self) -> tuple[tuple[int, ...], ...]:
        """The token-id stop sequences."""
        return tuple(entry for entry in self.stop if isinstance(entry, tuple))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The text stop sequences."""
        return tuple(entry for entry in self.stop if isinstance(entry, str))


class StopReason(enum.Enum):
    """Why a sample ended."""

    STOP = "stop"
    """A stop sequence was generated (it is included in the tokens)."""

    LENGTH = "length"
    """``max_tokens`` tokens were generated."""


@dataclass(frozen=True)
class SampledSequence:
    """One sampled continuation."""

    tokens: tuple[int, ...]
    """The generated token ids (the prompt not included)."""

    logprobs: tuple[float, ...]
    """Natural-log probability of each token under the distribution it was drawn from."""

    stop_reason: StopReason
    """Why sampling ended."""


@dataclass(frozen=True)
class SamplingOutput:
    """Everything :func:`sample` produced."""

    sequences: tuple[tuple[SampledSequence, ...], ...]
    """Per prompt, its ``num_samples`` samples."""

    seed: int
    """The seed used; passing it back with the same inputs reproduces the output."""


def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    tokenizer: TokenDecoder | None = None,
) -> SamplingOutput:
    """Sample ``params.num_samples`` continuations of every prompt.

    The model is switched to evaluation mode (no dropout) for the call and its modules'
    previous modes restored afterwards. Prompts are processed one after another with
    one random generator; the samples of a prompt run as one batch on a shared KV cache.

    Args:
        model: A transformers causal LM, or a peft model wrapping one.
        prompts: Token ids of each prompt; every prompt has at least one token.
        params: Sampling parameters.
        tokenizer: Needed only when ``params.stop`` contains strings.

    Returns:
        The samples and the seed used.

    Raises:
        InvalidArgument: Empty prompt, token id outside the vocabulary (field
            ``prompts[i][j]`` or ``stop[i]``), string stops without a tokenizer, or a
            prompt plus ``max_tokens`` longer than the model's context.
    """
    vocab_size = _vocab_size(model)
    checked_prompts = _check_sequences(prompts, "prompts", vocab_size, minimum_length=1)
    for index, entry in enumerate(params.stop):
        if isinstance(entry, tuple) and any(token >= vocab_size for token in entry):
            raise InvalidArgument(f"stop[{index}]", f"token ids must be < {vocab_size}")
    if params.stop_strings and tokenizer is None:
        raise InvalidArgument("stop", "string stop sequences need a tokenizer")
    context = _context_length(model)
    if context is not None:
        longest = max((len(prompt) for prompt in checked_prompts), default=0)
        if longest + params.max_tokens > context:
            raise InvalidArgument(
                "max_tokens",
                f"prompt of {longest} tokens plus {params.max_tokens} new tokens exceeds "
                f"the model's context of {context}",
            )

    seed = params.seed if params.seed is not None else secrets.randbits(63)
    device = _device(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    with _evaluation_mode(model), torch.inference_mode():
        results = tuple(
            _sample_prompt(
                model,
                prompt,
                params,
                generator=generator,
                device=device,
                vocab_size=vocab_size,
                tokenizer=tokenizer,
            )
            for prompt in checked_prompts
        )
    return SamplingOutput(sequences=results, seed=seed)


def compute_logprobs(
    model: nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int = 8
) -> list[tuple[float | None, ...]]:
    """Per-token log-probabilities of sequences under the model at temperature 1.

    Args:
        model: A transformers causal LM, or a peft model wrapping one.
        sequences: Token ids; each sequence has at least one token.
        batch_size: Sequences per forward pass (right-padded, so results do not depend
            on it).

    Returns:
        Per sequence, one entry per token: ``None`` for the first token (it has no
        context), then ``log p(token_t | tokens_<t)``.

    Raises:
        InvalidArgument: Empty sequence or token id outside the vocabulary (field
            ``sequences[i][j]``), or ``batch_size`` < 1.
    """
    _check_int(batch_size, "batch_size", minimum=1)
    vocab_size = _vocab_size(model)
    checked = _check_sequences(sequences, "sequences", vocab_size, minimum_length=1)
    device = _device(model)
    results: list[tuple[float | None, ...]] = []
    with _evaluation_mode(model), torch.inference_mode():
        for start in range(0, len(checked), batch_size):
            chunk = checked[start : start + batch_size]
            width = max(len(sequence) for sequence in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
            attention_mask = torch.zeros_like(input_ids)
            for row, sequence in enumerate(chunk):
                input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                attention_mask[row, : len(sequence)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            log_probs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
            # Row t predicts token t + 1; padding sits after each sequence's end, so
            # causal attention keeps it out of every real position.
            picked = log_probs[:, :-1, :].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            for row, sequence in enumerate(chunk):
                values = picked[row, : len(sequence) - 1].tolist()
                results.append((None, *values))
    return results


# ------------------------------------------------------------------------- internals


def _sample_prompt(
    model: nn.Module,
    prompt: tuple[int, ...],
    params: SamplingParams,
    *,
    generator: torch.Generator,
    device: torch.device,
    vocab_size: int,
    tokenizer: TokenDecoder | None,
) -> tuple[SampledSequence, ...]:
    count = params.num_samples
    cache = DynamicCache(config=_config(model))
    # The prompt is run once; its cache is then repeated for the samples.
    output = model(
        input_ids=torch.tensor([prompt], dtype=torch.long, device=device),
        cache=cache,
        use_cache=True,
    )
    logits = output.logits[:, -1, :vocab_size].float().expand(count, -1)
    if count > 1:
        cache.batch_repeat_interleave(count)

    tokens: list[list[int]] = [[] for _ in range(count)]
    logprobs: list[list[float]] = [[] for _ in range(count)]
    reasons: list[StopReason] = [StopReason.LENGTH] * count
    active = list(range(count))  # batch row r holds sample active[r]
    for position in range(params.max_tokens):
        chosen, chosen_logprobs = _choose(logits, params, generator)
        still_active: list[int] = []
        for row, sample_index in enumerate(active):
            tokens[sample_index].append(int(chosen[row]))
            logprobs[sample_index].append(float(chosen_logprobs[row]))
            if _hits_stop(tokens[sample_index], params, tokenizer):
                reasons[sample_index] = StopReason.STOP
            else:
                still_active.append(row)
        if not still_active or position == params.max_tokens - 1:
            break
        if len(still_active) < len(active):
            keep = torch.tensor(still_active, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            chosen = chosen[keep]
            active = [active[row] for row in still_active]
        output = model(input_ids=chosen[:, None], cache=cache, use_cache=True)
        logits = output.logits[:, -1, :vocab_size].float()

    return tuple(
        SampledSequence(
            tokens=tuple(tokens[index]),
            logprobs=tuple(logprobs[index]),
            stop_reason=reasons[index],
        )
        for index in range(count)
    )


def _choose(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return it with its log-probability (see module doc)."""
    if params.temperature == 0.0:
        chosen = logits.argmax(dim=-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        return chosen, log_probs.gather(-1, chosen[:, None]).squeeze(-1)

    scaled = logits / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        top = torch.topk(scaled, params.top_k, dim=-1)
        truncated = torch.full_like(scaled, -math.inf)
        scaled = truncated.scatter(-1, top.indices, top.values)
    if params.top_p < 1.0:
        probabilities = torch.softmax(scaled.double(), dim=-1)
        sorted_probabilities, order = torch.sort(
            probabilities, dim=-1, descending=True, stable=True
        )
        mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -math.inf)
    log_probs = torch.log_softmax(scaled, dim=-1)
    chosen = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
    return chosen, log_probs.gather(-1, chosen[:, None]).squeeze(-1)


def _hits_stop(
    generated: list[int], params: SamplingParams, tokenizer: TokenDecoder | None
) -> bool:
    for sequence in params.stop_token_sequences:
        if len(generated) >= len(sequence) and tuple(generated[-len(sequence) :]) == sequence:
            return True
    if params.stop_strings and tokenizer is not None:
        text = tokenizer.decode(list(generated))
        return any(stop in text for stop in params.stop_strings)
    return False


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) for the block; each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise InvalidArgument("model", "is not a transformers causal LM (it has no config)")
    return config


def _vocab_size(model: nn.Module) -> int:
    vocab_size = getattr(_config(model), "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InvalidArgument("model", "its config has no vocab_size")
    return vocab_size


def _context_length(model: nn.Module) -> int | None:
    context = getattr(_config(model), "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    raise InvalidArgument("model", "has no parameters")


def _check_sequences(
    sequences: Sequence[Sequence[int]], field: str, vocab_size: int, *, minimum_length: int
) -> list[tuple[int, ...]]:
    if isinstance(sequences, str | bytes) or not isinstance(sequences, Sequence):
        raise InvalidArgument(field, "must be a sequence of token-id sequences")
    checked: list[tuple[int, ...]] = []
    for index, sequence in enumerate(sequences):
        if isinstance(sequence, str | bytes) or not isinstance(sequence, Sequence):
            raise InvalidArgument(f"{field}[{index}]", "must be a sequence of token ids")
        if len(sequence) < minimum_length:
            raise InvalidArgument(f"{field}[{index}]", f"needs at least {minimum_length} token")
        for position, token in enumerate(sequence):
            if (
                isinstance(token, bool)
                or not isinstance(token, numbers.Integral)
                or not 0 <= token < vocab_size
            ):
                raise InvalidArgument(
                    f"{field}[{index}][{position}]",
                    f"must be a token id in [0, {vocab_size}), got {token!r}",
                )
        checked.append(tuple(int(token) for token in sequence))
    return checked


def _normalise_stop(stop: object) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(stop, str | bytes) or not isinstance(stop, Sequence):
        raise InvalidArgument("stop", "must be a sequence of strings or token-id sequences")
    normalised: list[str | tuple[int, ...]] = []
    for index, entry in enumerate(stop):
        field = f"stop[{index}]"
        if isinstance(entry, str):
            if not entry:
                raise InvalidArgument(field, "must not be empty")
            normalised.append(entry)
            continue
        if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
            entry = (entry,)
        if not isinstance(entry, Sequence) or isinstance(entry, bytes) or not entry:
            raise InvalidArgument(field, "must be a non-empty string or token-id sequence")
        for token in entry:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                raise InvalidArgument(field, f"token ids must be integers >= 0, got {token!r}")
        normalised.append(tuple(int(token) for token in entry))
    return tuple(normalised)


def _check_int(value: object, field: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(field, f"must be >= {minimum}, got {value}")


def _check_real(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field, f"must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise InvalidArgument(field, "must not be NaN")
    return number
