"""Sampling from a tiny random Llama: exact logprobs, distributions, stops, seeds."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy import stats
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.sampling import (
    SamplingParams,
    StopReason,
    compute_logprobs,
    sample,
)

VOCAB = 64
PROMPT = (3, 17, 42, 5)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random init gives near-uniform next-token distributions; sharpen them so that
        # frequency tests can tell distributions apart.
        model.lm_head.weight.mul_(15.0)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def adapted_model() -> nn.Module:
    peft_model = get_peft_model(
        tiny_llama(0),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return peft_model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    characters = string.ascii_letters + string.digits + "+/"
    assert len(characters) == VOCAB
    built = Tokenizer(WordLevel({c: i for i, c in enumerate(characters)}, unk_token="a"))
    built.decoder = decoders.Fuse()
    return built


def next_token_logits(model: nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    """Logits of every position of one sequence, by a plain forward pass (no cache)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(tokens)])).logits[0].double()


def continuation_logprobs(
    model: nn.Module, prompt: Sequence[int], tokens: Sequence[int]
) -> list[float]:
    values = compute_logprobs(model, [list(prompt) + list(tokens)])[0]
    return [float(v) for v in values[len(prompt) :] if v is not None]


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Pearson statistic (bins with expected < 5 merged) and its 1e-4 critical value."""
    total = counts.sum()
    expected = probabilities * total
    large = expected >= 5
    observed_bins = [*counts[large], counts[~large].sum()]
    expected_bins = [*expected[large], expected[~large].sum()]
    statistic = sum(
        (o - e) ** 2 / e for o, e in zip(observed_bins, expected_bins, strict=True) if e > 0
    )
    degrees = sum(1 for e in expected_bins if e > 0) - 1
    return float(statistic), float(stats.chi2.isf(1e-4, degrees))


# -------------------------------------------------------------- exact logprobs


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_temperature_one_logprobs_equal_compute_logprobs(
    which: str, model: nn.Module, adapted_model: nn.Module
) -> None:
    chosen = model if which == "base" else adapted_model
    output = sample(chosen, [PROMPT], SamplingParams(max_tokens=12, num_samples=5, seed=7))
    samples = output.sequences[0]
    assert len(samples) == 5
    assert len({s.tokens for s in samples}) > 1
    for sampled in samples:
        assert len(sampled.tokens) == 12 and sampled.stop_reason is StopReason.LENGTH
        expected = continuation_logprobs(chosen, PROMPT, sampled.tokens)
        np.testing.assert_allclose(sampled.logprobs, expected, atol=1e-5, rtol=0)


def test_adapter_changes_the_distribution(model: nn.Module, adapted_model: nn.Module) -> None:
    tokens = [*PROMPT, 1, 2, 3, 4]
    base = compute_logprobs(model, [tokens])[0][1:]
    adapted = compute_logprobs(adapted_model, [tokens])[0][1:]
    assert max(abs(a - b) for a, b in zip(base, adapted, strict=True)) > 0.05  # type: ignore[operator]


def test_top_k_one_is_greedy_with_zero_logprobs(model: nn.Module) -> None:
    greedy = sample(model, [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, seed=1))
    top_one = sample(model, [PROMPT], SamplingParams(max_tokens=10, top_k=1, num_samples=3))
    greedy_tokens = greedy.sequences[0][0].tokens
    for sampled in top_one.sequences[0]:
        assert sampled.tokens == greedy_tokens
        assert sampled.logprobs == (0.0,) * 10
    # Greedy reports the temperature-1 logprob of the argmax (documented choice), and the
    # tokens really are the argmax of an uncached forward pass.
    logits = next_token_logits(model, list(PROMPT) + list(greedy_tokens))
    argmax = logits[len(PROMPT) - 1 : -1].argmax(-1).tolist()
    assert tuple(argmax) == greedy_tokens
    np.testing.assert_allclose(
        greedy.sequences[0][0].logprobs,
        continuation_logprobs(model, PROMPT, greedy_tokens),
        atol=1e-5,
        rtol=0,
    )
    assert all(value < 0 for value in greedy.sequences[0][0].logprobs)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_logprob_is_log_softmax_of_scaled_logits(model: nn.Module, temperature: float) -> None:
    output = sample(
        model,
        [PROMPT],
        SamplingParams(max_tokens=8, temperature=temperature, num_samples=3, seed=3),
    )
    for sampled in output.sequences[0]:
        logits = next_token_logits(model, list(PROMPT) + list(sampled.tokens))
        positions = logits[len(PROMPT) - 1 : -1]
        expected = torch.log_softmax(positions / temperature, dim=-1)
        picked = expected.gather(-1, torch.tensor(sampled.tokens)[:, None]).squeeze(-1)
        np.testing.assert_allclose(sampled.logprobs, picked.numpy(), atol=1e-5, rtol=0)
        # and not the untempered value
        untempered = torch.log_softmax(positions, dim=-1)
        plain = untempered.gather(-1, torch.tensor(sampled.tokens)[:, None]).squeeze(-1)
        assert np.max(np.abs(np.array(sampled.logprobs) - plain.numpy())) > 1e-2


def truncated_distribution(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """The renormalised sampling distribution, computed independently with numpy."""
    scaled = logits.double().numpy() / temperature
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")
    keep = np.zeros(len(probabilities), dtype=bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    kept = np.where(keep, probabilities, 0.0)
    kept /= kept.sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for index in np.argsort(-kept, kind="stable"):
        if mass >= top_p or kept[index] == 0:
            break
        nucleus[index] = True
        mass += kept[index]
    final = np.where(nucleus, kept, 0.0)
    return final / final.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 5, 1.0), (1.0, 0, 0.7), (0.8, 10, 0.9)]
)
def test_truncated_logprobs_are_renormalised(
    model: nn.Module, temperature: float, top_k: int, top_p: float
) -> None:
    params = SamplingParams(
        max_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=4, seed=11
    )
    for sampled in sample(model, [PROMPT], params).sequences[0]:
        logits = next_token_logits(model, list(PROMPT) + list(sampled.tokens))
        for position, (token, logprob) in enumerate(
            zip(sampled.tokens, sampled.logprobs, strict=True)
        ):
            distribution = truncated_distribution(
                logits[len(PROMPT) - 1 + position],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
            assert distribution[token] > 0
            assert logprob == pytest.approx(np.log(distribution[token]), abs=1e-5)


# ------------------------------------------------------ empirical distributions


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)], ids=["t1", "t0.6", "p0.8"]
)
def test_first_token_frequencies_match_the_distribution(
    model: nn.Module, temperature: float, top_p: float
) -> None:
    # 20,000 draws, in calls of 1,000 (a call takes at most MAX_NUM_SAMPLES).
    first = np.array(
        [
            s.tokens[0]
            for seed in range(20)
            for s in sample(
                model,
                [PROMPT],
                SamplingParams(
                    max_tokens=1, temperature=temperature, top_p=top_p, num_samples=1000, seed=seed
                ),
            ).sequences[0]
        ]
    )
    assert len(first) == 20_000
    counts = np.bincount(first, minlength=VOCAB)
    logits = next_token_logits(model, PROMPT)[-1]
    target = truncated_distribution(logits, temperature=temperature, top_k=0, top_p=top_p)
    assert (target > 0.01).sum() >= 3  # a distribution worth testing
    statistic, critical = chi_square(counts, target)
    assert statistic < critical
    assert counts[target == 0].sum() == 0
    # The same counts are rejected against the distribution a wrong sampler would use.
    plain = truncated_distribution(logits, temperature=1.0, top_k=0, top_p=1.0)
    wrong = plain if (temperature, top_p) != (1.0, 1.0) else np.full(VOCAB, 1.0 / VOCAB)
    wrong_statistic, _ = chi_square(counts, wrong)
    assert wrong_statistic > 10 * critical


# --------------------------------------------------------------------- stopping


def test_token_stop_sequences_stop_and_are_included(model: nn.Module) -> None:
    free = sample(model, [PROMPT], SamplingParams(max_tokens=20, seed=21)).sequences[0][0]
    stop_token = free.tokens[4]
    first = free.tokens.index(stop_token)
    stopped = sample(
        model, [PROMPT], SamplingParams(max_tokens=20, seed=21, stop=(stop_token,))
    ).sequences[0][0]
    assert stopped.stop_reason is StopReason.STOP
    assert stopped.tokens == free.tokens[: first + 1]
    assert stopped.logprobs == free.logprobs[: first + 1]

    pair = free.tokens[5:7]
    pair_end = next(i + 2 for i in range(len(free.tokens) - 1) if free.tokens[i : i + 2] == pair)
    by_pair = sample(
        model, [PROMPT], SamplingParams(max_tokens=20, seed=21, stop=(tuple(pair),))
    ).sequences[0][0]
    assert by_pair.tokens == free.tokens[:pair_end]
    assert by_pair.stop_reason is StopReason.STOP


def test_string_stop_needs_and_uses_a_tokenizer(model: nn.Module, tokenizer: Tokenizer) -> None:
    free = sample(model, [PROMPT], SamplingParams(max_tokens=20, seed=4)).sequences[0][0]
    text = tokenizer.decode(list(free.tokens))
    stop_text = text[6:8]
    end = text.index(stop_text) + len(stop_text)  # one character per token
    params = SamplingParams(max_tokens=20, seed=4, stop=(stop_text,))
    with pytest.raises(InvalidArgument) as raised:
        sample(model, [PROMPT], params)
    assert raised.value.field == "stop"
    stopped = sample(model, [PROMPT], params, tokenizer=tokenizer).sequences[0][0]
    assert stopped.stop_reason is StopReason.STOP
    assert stopped.tokens == free.tokens[:end]
    assert tokenizer.decode(list(stopped.tokens)).endswith(stop_text)


def test_samples_that_stop_early_leave_the_others_exact(adapted_model: nn.Module) -> None:
    # Stopping on a frequent token drops rows from the shared KV cache mid-batch; the
    # remaining rows must still be sampled from their own histories.
    probe = sample(adapted_model, [PROMPT], SamplingParams(max_tokens=16, num_samples=8, seed=9))
    all_tokens = [t for s in probe.sequences[0] for t in s.tokens]
    frequent = max(set(all_tokens), key=all_tokens.count)
    output = sample(
        adapted_model,
        [PROMPT, (9, 8)],
        SamplingParams(max_tokens=16, num_samples=8, seed=9, stop=(frequent,)),
    )
    lengths = {len(s.tokens) for per_prompt in output.sequences for s in per_prompt}
    assert len(lengths) > 2
    for prompt, samples in zip([PROMPT, (9, 8)], output.sequences, strict=True):
        for sampled in samples:
            if sampled.stop_reason is StopReason.STOP:
                assert sampled.tokens[-1] == frequent
                assert frequent not in sampled.tokens[:-1]
            else:
                assert len(sampled.tokens) == 16 and frequent not in sampled.tokens
            np.testing.assert_allclose(
                sampled.logprobs,
                continuation_logprobs(adapted_model, prompt, sampled.tokens),
                atol=1e-5,
                rtol=0,
            )


# ------------------------------------------------------------ seeds and modes


def test_seed_determinism(model: nn.Module) -> None:
    params = SamplingParams(max_tokens=10, num_samples=3, top_p=0.95, seed=1234)
    first = sample(model, [PROMPT, (1, 2)], params)
    again = sample(model, [PROMPT, (1, 2)], params)
    other = sample(model, [PROMPT, (1, 2)], SamplingParams(max_tokens=10, num_samples=3, seed=99))
    assert first == again and first.seed == 1234
    assert first.sequences != other.sequences
    unseeded = sample(model, [PROMPT], SamplingParams(max_tokens=10))
    replay = sample(model, [PROMPT], SamplingParams(max_tokens=10, seed=unseeded.seed))
    assert replay.sequences == unseeded.sequences


def test_dropout_is_off_while_sampling_and_modes_are_restored(adapted_model: nn.Module) -> None:
    adapted_model.train()
    try:
        output = sample(adapted_model, [PROMPT], SamplingParams(max_tokens=8, seed=2))
        assert adapted_model.training
        assert all(module.training for module in adapted_model.modules())
        sampled = output.sequences[0][0]
        adapted_model.eval()
        np.testing.assert_allclose(
            sampled.logprobs,
            continuation_logprobs(adapted_model, PROMPT, sampled.tokens),
            atol=1e-5,
            rtol=0,
        )
    finally:
        adapted_model.eval()


def test_compute_logprobs_shape_and_batching(model: nn.Module) -> None:
    sequences = [[1, 2, 3, 4, 5], [7], [8, 9, 10]]
    one_by_one = compute_logprobs(model, sequences, batch_size=1)
    together = compute_logprobs(model, sequences, batch_size=3)
    assert [len(values) for values in together] == [5, 1, 3]
    assert all(values[0] is None for values in together)
    for single, batched in zip(one_by_one, together, strict=True):
        np.testing.assert_allclose(
            np.array(single[1:], dtype=float), np.array(batched[1:], dtype=float), atol=1e-6
        )
    logits = next_token_logits(model, sequences[0])
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(
        -1, torch.tensor(sequences[0][1:])[:, None]
    )
    np.testing.assert_allclose(together[0][1:], expected.squeeze(-1).numpy(), atol=1e-5)


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ((),)}, "stop[0]"),
        ({"stop": ("",)}, "stop[0]"),
        ({"stop": ((1, -2),)}, "stop[0]"),
        ({"stop": "abc"}, "stop"),
    ],
)
def test_bad_params_are_rejected(options: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        SamplingParams(**options)  # type: ignore[arg-type]
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("prompts", "params", "field"),
    [
        ([(1, 2, VOCAB)], SamplingParams(), "prompts[0][2]"),
        ([(1,), (-1,)], SamplingParams(), "prompts[1][0]"),
        ([()], SamplingParams(), "prompts[0]"),
        ([(1, 2)], SamplingParams(stop=((5, VOCAB),)), "stop[0]"),
        ([(1, 2)], SamplingParams(max_tokens=63), "max_tokens"),
    ],
)
def test_bad_inputs_are_rejected(
    model: nn.Module, prompts: list[tuple[int, ...]], params: SamplingParams, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        sample(model, prompts, params)
    assert raised.value.field == field


def test_compute_logprobs_rejects_out_of_vocabulary(model: nn.Module) -> None:
    with pytest.raises(InvalidArgument) as raised:
        compute_logprobs(model, [[1, 2], [VOCAB]])
    assert raised.value.field == "sequences[1][0]"


def test_stop_accepts_bare_token_ids_and_lists() -> None:
    params = SamplingParams(stop=(5, [6, 7], "end"))
    assert params.stop == ((5,), (6, 7), "end")
    assert params.stop_token_sequences == ((5,), (6, 7))
    assert params.stop_strings == ("end",)
