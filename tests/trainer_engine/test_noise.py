"""The DP noise sampler: exact tails, the CSPRNG seed path, snapping, and the engine's use.

Randomness in these tests comes from the sampler's own AES-CTR stream under fixed keys,
so every statistic below is a fixed number: a test either always passes or always
fails for a given program.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from tensafe.trainer.domain.engine import noise
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig
from tensafe.trainer.domain.engine.noise import (
    KEY_BYTES,
    AesCtrStream,
    WordSource,
    add_gaussian_noise_,
    normal_pairs_from_words,
    refined_log_uniform,
    snapping_grid,
)

from .conftest import EngineFactory, cross_entropy_batch, randomise_adapter

KEY = bytes(range(32))
# torch's CPU float32 randn/normal_ is Box–Muller on 24-bit uniforms: |z| <= 5.7681.
TORCH_FLOAT32_RANDN_CAP = 5.7681


class ListSource:
    """Refinement words from a list: lets a test force the rarest tail paths."""

    def __init__(self, words: list[int]) -> None:
        self.remaining = list(words)

    def words(self, count: int) -> list[int]:
        taken, self.remaining = self.remaining[:count], self.remaining[count:]
        assert len(taken) == count, "the transform drew more words than the test provided"
        return taken


def one(source: WordSource) -> Callable[[int], WordSource]:
    """Every pair refines from the same source, in order."""
    return lambda _pair: source


def signed(word: int) -> int:
    """The int64 (two's complement) spelling of an unsigned 64-bit word."""
    return word - (1 << 64) if word >= 1 << 63 else word


def words_tensor(words: list[int]) -> torch.Tensor:
    return torch.tensor([signed(w) for w in words], dtype=torch.int64)


def keystream_words(key: bytes, count: int) -> list[int]:
    """The AES-256-CTR keystream (zero nonce) as unsigned little-endian words."""
    data = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * count))
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]


def reference_normals(key: bytes, count: int) -> torch.Tensor:
    """The unsnapped N(0, 1) values the sampler adds to ``count`` coordinates: pair p
    (coordinates 2p, 2p + 1) is made from keystream block p, i.e. words 2p (radius) and
    2p + 1 (angle), and refines from counter 2^127 + p·2^64."""
    pairs = (count + 1) // 2
    words = keystream_words(key, 2 * pairs)
    z1, z2 = normal_pairs_from_words(
        words_tensor(words[0::2]),
        words_tensor(words[1::2]),
        lambda pair: AesCtrStream(key, counter=(1 << 127) + (pair << 64)),
    )
    values = torch.empty(count, dtype=torch.float64)
    values[0::2] = z1
    values[1::2] = z2[: count // 2]
    return values


# ------------------------------------------------------------------ the transform


def test_attainable_radius_is_far_beyond_the_24_bit_cap() -> None:
    angle_zero = words_tensor([0])  # θ = π·2^-53: cos θ = 1 to 1e-31
    # k = 1: U in (2^-64, 2^-63) after refinement, radius in (9.34, 9.42).
    z1, _ = normal_pairs_from_words(words_tensor([1]), angle_zero, one(AesCtrStream(KEY)))
    assert 9.34 < float(z1[0]) < 9.42
    # k = 0 with the real stream: U < 2^-64, radius > sqrt(128 ln 2) = 9.42.
    z1, _ = normal_pairs_from_words(words_tensor([0]), angle_zero, one(AesCtrStream(KEY)))
    assert float(z1[0]) > math.sqrt(128 * math.log(2))
    # k = 0 followed by two zero words and 2^60: U = (2^60 + ½)·2^-256, the refinement
    # recursed three times; radius sqrt(2·196·ln 2) = 16.48, never reached by a 64-bit
    # uniform (9.42 max) nor by torch's float32 randn (5.77 max).
    source = ListSource([0, 0, 1 << 60])
    z1, z2 = normal_pairs_from_words(words_tensor([0]), angle_zero, one(source))
    assert source.remaining == []
    expected = math.sqrt(-2 * (math.log(2 * (1 << 60) + 1) - 257 * math.log(2)))
    assert float(z1[0]) == pytest.approx(expected, rel=1e-14)
    assert float(z1[0]) > 16 > TORCH_FLOAT32_RANDN_CAP
    assert abs(float(z2[0])) < 1e-14
    # The angle word sets the sign: j' = -2^52 gives θ = -π(1 - 2^-53): z1 = -radius.
    z1, _ = normal_pairs_from_words(
        words_tensor([0]), torch.tensor([-(1 << 63)]), one(ListSource([0, 0, 1 << 60]))
    )
    assert float(z1[0]) == pytest.approx(-expected, rel=1e-14)


def test_small_radii_keep_their_precision_near_u_equal_one() -> None:
    # k = 2^64 - 1 then a refinement word 2^62: 1 - U = (2^62 + ½)·2^-128, so E = 2^-66
    # to 1e-19 relative and the radius is 2^-32.5. A plain log of U rounded to float64
    # (1.0) would give radius 0; 64 bits alone would stop at 2^-32.
    source = ListSource([1 << 62])
    z1, _ = normal_pairs_from_words(words_tensor([(1 << 64) - 1]), words_tensor([0]), one(source))
    assert source.remaining == []
    assert float(z1[0]) == pytest.approx(2.0**-32.5, rel=1e-12)
    # k = 2^64 - 2^45 (not refined): E = -log1p(-(2^45 - ½)·2^-64).
    z1, _ = normal_pairs_from_words(
        words_tensor([(1 << 64) - (1 << 45)]), words_tensor([0]), one(ListSource([]))
    )
    expected = math.sqrt(-2 * math.log1p(-(2**45 - 0.5) * 2.0**-64))
    assert float(z1[0]) == pytest.approx(expected, rel=1e-14)


def test_transform_matches_box_muller_computed_exactly_in_python() -> None:
    raw = keystream_words(KEY, 2000)
    # Spread radius words over every magnitude (including the refined tail) and both
    # halves of (0, 1), where ln U takes different code paths.
    radius_words = [
        w >> (i % 64) if i % 2 else (1 << 64) - 1 - (w >> (i % 64))
        for i, w in enumerate(raw[:1000])
    ]
    angle_words = raw[1000:]
    stream = AesCtrStream(b"\x07" * 32)
    z1, z2 = normal_pairs_from_words(
        words_tensor(radius_words), words_tensor(angle_words), one(stream)
    )
    # The sampler refines the tail words first, then the words next to U = 1, each in
    # order, drawing further words from the source it is given.
    replay = AesCtrStream(b"\x07" * 32)
    log_u = {i: refined_log_uniform(k, replay) for i, k in enumerate(radius_words) if k < 1 << 44}
    for i, k in enumerate(radius_words):
        if k >= (1 << 64) - (1 << 44):
            complement = math.exp(refined_log_uniform((1 << 64) - 1 - k, replay))
            log_u[i] = math.log1p(-complement)
        elif k >= 1 << 63:
            log_u[i] = math.log1p(-((1 << 64) - k - 0.5) * 2.0**-64)
        elif k >= 1 << 44:
            log_u[i] = math.log(k + 0.5) - 64 * math.log(2)
    for index, (k, j) in enumerate(zip(radius_words, angle_words, strict=True)):
        radius = math.sqrt(-2 * log_u[index])
        theta = 2 * math.pi * ((signed(j) >> 11) + 0.5) * 2.0**-53
        for got, want in (
            (z1[index], radius * math.cos(theta)),
            (z2[index], radius * math.sin(theta)),
        ):
            # Relative to the radius: small radii (down to 2^-32 here) must be exact too.
            assert abs(float(got) - want) <= 1e-14 * radius, (index, k, j)


def test_conditional_tail_beyond_six_sigma_is_exponential() -> None:
    # Radius words below 2^38 (U < 2^-26, radius > sqrt(52 ln 2) = 6.004): given that,
    # r² - 52 ln 2 = 2(E - 26 ln 2) is Exp(rate ½) by memorylessness. This checks the
    # tail's shape beyond 6σ with 20,000 draws instead of ~10^13 unconditional ones.
    count = 20_000
    raw = keystream_words(b"\x11" * 32, 2 * count)
    radius_words = words_tensor([w >> 26 for w in raw[:count]])
    z1, z2 = normal_pairs_from_words(
        radius_words, words_tensor(raw[count:]), one(AesCtrStream(KEY))
    )
    excess = (z1.square() + z2.square() - 52 * math.log(2)).numpy()
    assert excess.min() > 0
    result = stats.kstest(excess, "expon", args=(0.0, 2.0))
    assert result.pvalue > 1e-3, result
    assert abs(excess.mean() - 2.0) < 5 * 2.0 / math.sqrt(count)


def test_bulk_is_standard_normal() -> None:
    count = 1_000_000
    values = torch.zeros(count, dtype=torch.float64)
    add_gaussian_noise_([values], 1.0, key=KEY)
    z = values.numpy()
    assert abs(z.mean()) < 5 / math.sqrt(count)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / count)
    kurtosis = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / count)
    result = stats.kstest(z, "norm")
    assert result.statistic < 1.63 / math.sqrt(count) and result.pvalue > 0.01, result
    # Tail mass beyond 4σ: 63.3 expected; and the sampler is not symmetric by accident.
    assert 35 < int((abs(z) > 4).sum()) < 95
    assert 0.49 < float((z > 0).mean()) < 0.51


# ------------------------------------------------------------------ randomness source


def test_key_comes_from_os_urandom_32_bytes_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    returned: list[bytes] = []
    real_urandom = os.urandom

    def recording_urandom(size: int) -> bytes:
        calls.append(size)
        returned.append(real_urandom(size))
        return returned[-1]

    monkeypatch.setattr(noise.os, "urandom", recording_urandom)
    first, second = torch.zeros(1000), torch.zeros(1000)
    add_gaussian_noise_([first], 1.0)
    add_gaussian_noise_([second], 1.0)
    assert calls == [KEY_BYTES, KEY_BYTES]
    assert returned[0] != returned[1]
    assert not torch.equal(first, second)
    # The noise is exactly the fixed-key construction under the key os.urandom gave.
    replay = torch.zeros(1000)
    add_gaussian_noise_([replay], 1.0, key=returned[0])
    assert torch.equal(replay, first)


def test_noise_is_the_aes_ctr_keystream_through_the_transform() -> None:
    count, std = 10, 0.5
    values = torch.zeros(count, dtype=torch.float64)
    add_gaussian_noise_([values], std, key=KEY)
    again = torch.zeros(count, dtype=torch.float64)
    add_gaussian_noise_([again], std, key=KEY)
    assert torch.equal(values, again)  # deterministic given the key
    grid = snapping_grid(std)
    expected = torch.round(reference_normals(KEY, count) * std / grid) * grid
    assert torch.equal(values, expected)


def test_a_different_key_gives_independent_noise() -> None:
    first, second = torch.zeros(100_000), torch.zeros(100_000)
    add_gaussian_noise_([first], 1.0, key=KEY)
    add_gaussian_noise_([second], 1.0, key=b"\x01" + KEY[1:])
    correlation = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(100_000)


# ------------------------------------------------------------------ snapping and layout


def test_output_is_snapped_to_the_grid_within_half_a_step() -> None:
    std = 0.37
    grid = snapping_grid(std)
    assert grid == 2.0**-22 and std * 2.0**-21 < grid <= std * 2.0**-20
    clean = torch.linspace(-3.0, 5.0, 4001, dtype=torch.float64) * math.pi  # off the grid
    noised = clean.clone()
    add_gaussian_noise_([noised], std, key=KEY)
    steps = noised / grid
    assert torch.equal(steps, torch.round(steps))
    # Against the unsnapped float64 mechanism x + std·z from the same key:
    z = reference_normals(KEY, clean.numel())
    error = (noised - (clean + std * z)).abs().max()
    assert float(error) <= grid / 2 * (1 + 1e-9)
    assert float(error) > grid / 4  # it really rounds (not a no-op)
    # float32 tensors keep grid values (conversion of a multiple of Λ is one too).
    single = clean.float()
    add_gaussian_noise_([single], std, key=KEY)
    single_steps = single.double() / grid
    assert torch.equal(single_steps, torch.round(single_steps))


def test_several_tensors_are_one_vector_and_odd_lengths_work() -> None:
    parts = [torch.zeros(3), torch.zeros(0), torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64)]
    add_gaussian_noise_(parts, 1.0, key=KEY, chunk_pairs=2)
    whole = torch.zeros(13, dtype=torch.float64)
    add_gaussian_noise_([whole], 1.0, key=KEY, chunk_pairs=2)
    joined = torch.cat([p.double().flatten() for p in parts])
    # The float32 parts were rounded to float32; the float64 part is exact.
    assert torch.allclose(joined, whole, rtol=1e-7, atol=0)
    assert torch.equal(parts[3], whole[9:])
    assert bool((whole != 0).all())


def test_output_depends_on_the_key_alone_not_on_chunks_or_threads() -> None:
    # Pair p uses keystream block p whatever chunk it falls in, so worker threads may
    # run chunks in any order and the chunk size is only a speed knob.
    reference = torch.zeros(75)
    add_gaussian_noise_([reference], 1.0, key=KEY, threads=1)
    for chunk_pairs, threads in ((8, 1), (8, 3), (5, 2), (1, 1)):
        other = torch.zeros(75)
        add_gaussian_noise_([other], 1.0, key=KEY, chunk_pairs=chunk_pairs, threads=threads)
        assert torch.equal(reference, other), (chunk_pairs, threads)


@pytest.mark.parametrize(
    ("tensors", "std", "key", "message"),
    [
        ([torch.zeros(4)], 0.0, None, "std"),
        ([torch.zeros(4)], float("nan"), None, "std"),
        ([torch.zeros(4, 4).t()], 1.0, None, "contiguous"),
        ([torch.zeros(4, dtype=torch.int64)], 1.0, None, "floating-point"),
        ([torch.zeros(4)], 1.0, b"short", "32 bytes"),
    ],
)
def test_bad_arguments_are_refused(
    tensors: list[torch.Tensor], std: float, key: bytes | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        add_gaussian_noise_(tensors, std, key=key)


# ------------------------------------------------------------------ the engine


def test_engine_step_adds_snapped_noise_of_the_configured_std(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    noise_multiplier, max_grad_norm = 1.3, 0.7
    engine = make_engine(
        dp=DpConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    )
    randomise_adapter(engine, seed=5)
    batch, inputs = cross_entropy_batch(corpus_sequences[:6])
    engine.forward_backward(batch, "cross_entropy", inputs)
    clean = engine.pending_gradient_sum()
    observed: dict[str, torch.Tensor] = {}
    engine.optim_step(
        AdamConfig(learning_rate=1e-3),
        noisy_sum_observer=lambda sums: observed.update({n: t.clone() for n, t in sums.items()}),
    )
    std = noise_multiplier * max_grad_norm
    noised = torch.cat([observed[n].double().flatten() for n in engine.parameter_names])
    residual = noised - torch.cat([clean[n].double().flatten() for n in engine.parameter_names])
    assert residual.numel() > 4000
    # The standard error of the std estimate is < 1.1 %; 6 % is > 5 standard errors.
    assert abs(float(residual.std()) / std - 1) < 0.06
    assert abs(float(residual.mean())) < 6 * std / math.sqrt(residual.numel())
    # Every noised coordinate lies on the snapping grid of this std: the engine uses the
    # sampler (torch.randn noise would not), and the clean sum is not on that grid.
    steps = noised / snapping_grid(std)
    assert torch.equal(steps, torch.round(steps))
    clean_steps = (noised - residual) / snapping_grid(std)
    assert not torch.equal(clean_steps, torch.round(clean_steps))
