"""Gaussian noise for DP-SGD: the accountant's distribution, tails included, from a CSPRNG.

The accountant (dp-accounting's RDP and PLD) assumes each coordinate of a step's clipped
gradient sum receives independent N(0, std²) noise. This module produces that noise so
that the assumption holds in the tails too, and hardens the floating-point output in the
sense of Mironov (2012). docs/privacy.md ("Noise") states what that does and does not
guarantee.

Randomness. One 32-byte AES-256 key per call is read from the OS CSPRNG
(:func:`fresh_key`, ``os.urandom``, i.e. getrandom(2)); the noise is a deterministic
function of that key and the key is never stored. The stream is the AES-256-CTR
keystream (NIST SP 800-38A) of that key, the encryption of an all-zero plaintext read as
little-endian 64-bit words; pair p of the output (coordinates 2p, 2p + 1) takes block
p and, in the rare case it needs more words, the blocks from counter ``2¹²⁷ + p·2⁶⁴``.
These ranges are disjoint and every key is fresh, so no counter block is ever encrypted twice under
one key; starting at a zero counter is therefore safe. This is the generate function of
CTR_DRBG (NIST SP 800-90A Rev. 1, §10.2.1) without its reseed and update steps, which
matter only for a long-lived state: here every call is seeded anew from the OS and one
call is far below the 2^48 requests × 2^19 bits a CTR_DRBG instance may produce between
reseeds. Its security is computational (AES-256 as a pseudorandom function).

Transform. Box–Muller (Box and Muller, 1958) in float64 on 64-bit words, with an exact
tail. A pair of words (k, j) gives

- ``U = (k + ½)·2⁻⁶⁴``, the midpoint of one of 2⁶⁴ equal cells of (0, 1), and
  ``E = -ln U ~ Exp(1)``. ``ln U`` equals ``log1p(-(2⁶⁴ - k - ½)·2⁻⁶⁴)`` for
  ``k ≥ 2⁶³`` to float64 precision (one ``log`` of U rounded to float64 plus its exact
  rounding error, see ``_polar``), so it keeps float64's relative precision at both
  ends (near U = 1 a plain ``log`` of the rounded U would lose the small radii).
- The tail: for ``k < 2⁴⁴`` (``U < 2⁻²⁰``, radius > 5.27; probability 2⁻²⁰ per pair, a
  few pairs per step of a 7B model's adapter) the cell is refined with further words,
  ``U = (N + ½)·2⁻⁶⁴ⁿ`` with ``N = k·2⁶⁴⁽ⁿ⁻¹⁾ + …`` until N has 53 significant bits,
  in exact integer arithmetic (:func:`refined_log_uniform`). U thus has float64's
  relative precision everywhere, and the attainable radius has no bound but float64's
  range (a radius word of 0, n zero words and then w ≥ 2⁵³ give the radius
  √(2·(64·(n+2)·ln 2 − ln(w + ½)))). torch's float32 ``randn`` (Box–Muller on 24-bit
  uniforms) stops at 5.77; 64-bit words without refinement would stop at 9.42 and put
  the radii above 6.7 on a grid 2⁻³⁴ to 0.05 wide. The same refinement applies to
  ``1 − U < 2⁻²⁰`` (``k ≥ 2⁶⁴ − 2⁴⁴``, radius < 2⁻⁹·⁵), where 64 bits alone would space
  the smallest radii 2⁻³² apart. After both, a draw z is within ~2⁻⁴⁴·max(1, |z|) of the
  exact N(0, 1) value of a continuous (U, θ) in the same cells (a coupling), far below
  the snapping grid.
- ``θ = 2π·(j' + ½)·2⁻⁵³`` from the top 53 bits ``j'`` of the second word (signed, so
  θ ∈ (-π, π)), and ``z₁ = √(2E)·cos θ``, ``z₂ = √(2E)·sin θ``: two independent N(0, 1).

Floating-point mitigation (Mironov 2012, "On significance of the least significant bits
for differential privacy", the snapping mechanism). The noise is scaled and added in
float64 to a float64 copy of each value, and the sum is rounded to the fixed grid
``Λ = 2^⌊log2(std·2⁻²⁰)⌋`` (:func:`snapping_grid`) before it is converted back to the
tensor's dtype. Λ is far coarser than the spacing of the float64 values ``x + std·z``
can take (for |x| < 2²⁰·std), so every grid point in range is reachable from every
input: the set of outputs no longer depends on the input, which is what Mironov's attack
reads. The rounding error is at most Λ/2 ≤ 2⁻²¹·std. The conversion to the tensor's
dtype is a function of the snapped value alone (post-processing).

Speed. The transform runs over fixed-size chunks with preallocated scratch buffers and
``out=`` torch ops (fresh allocations of large temporaries cost more than the
arithmetic). By default one Python thread walks large chunks and torch parallelises each
op over its intra-op threads: on a quiet 2-core machine 213 ms for 16.8M coordinates
against 115 ms for ``torch.randn`` (1.85x), where ``threads=2`` worker threads on small
serial chunks took 412 ms (the GIL between thousands of small ops). On a machine so
loaded that OpenMP barriers wait for descheduled threads the balance turns (37x against
1.4x measured at load 17), so ``threads=`` is kept as a knob.
``bench/noise.py`` times it against ``torch.randn``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
"""AES-256 key size; :func:`fresh_key` reads this many bytes from ``os.urandom``."""

GRID_BITS = 20
"""The snapping grid is the largest power of two <= ``std · 2^-GRID_BITS``."""

# Normal pairs per chunk with several worker threads: every op then works on fewer than
# torch's intra-op grain of 32,768 elements (serial, no OpenMP barrier); with one thread
# larger chunks cost less Python per coordinate (bench/noise.py).
_SERIAL_CHUNK_PAIRS = 16_000
_LARGE_CHUNK_PAIRS = 1 << 16

_WORD_BYTES = 8
_BLOCK_BYTES = 16
_TWO_PI = 2.0 * math.pi
_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)
# Radius words k below this (U < 2^-20, radius > 5.27) and above 2^64 minus this
# (1 - U < 2^-20, radius < 2^-9.5) are refined exactly; see the module docstring.
_REFINE_WORDS = 1 << 44
# Chunks whose E = -ln U all lie within these bounds have no word to refine (loose
# bounds; the exact test on the integer words follows).
_REFINE_ABOVE = 19.0 * _LN2
_REFINE_BELOW = 2.0**-19
# Refinement stops once the cell index has float64's 53 significant bits.
_FULL_PRECISION = 1 << 53
_ANGLE_SHIFT = 11  # keep the top 53 bits of the angle word
_ANGLE_STEP = _TWO_PI * 2.0**-53
_U_STEP = 2.0**-64


def fresh_key() -> bytes:
    """The only source of the noise's randomness: 32 bytes from the OS CSPRNG.

    ``os.urandom`` is getrandom(2) on Linux, which blocks until the kernel pool is
    seeded and never returns short.

    Returns:
        A fresh AES-256 key.
    """
    return os.urandom(KEY_BYTES)


class WordSource(Protocol):
    """A source of further uniform 64-bit words (for the tail refinement)."""

    def words(self, count: int) -> list[int]:
        """The next ``count`` words, as unsigned integers in [0, 2**64)."""
        ...


class AesCtrStream:
    """The AES-256-CTR keystream under one key, as 64-bit words.

    Args:
        key: 32 bytes; :func:`fresh_key` in production.
        counter: The initial 128-bit counter block (big-endian): the number of 16-byte
            blocks of the key's stream to skip. Users of one key take disjoint ranges.

    Raises:
        ValueError: The key is not 32 bytes.
    """

    def __init__(self, key: bytes, *, counter: int = 0) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
        initial_block = counter.to_bytes(_BLOCK_BYTES, "big")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(initial_block)).encryptor()

    def keystream_into(self, zeros: memoryview, out: bytearray) -> None:
        """Write the next ``len(zeros)`` keystream bytes to the start of ``out`` (which
        must have 15 bytes more): the encryption of ``zeros``, which must be zero."""
        self._encryptor.update_into(zeros, out)

    def words(self, count: int) -> list[int]:
        """The next ``count`` words as unsigned integers (see :class:`WordSource`)."""
        data = self._encryptor.update(bytes(count * _WORD_BYTES))
        return [
            int.from_bytes(data[i : i + _WORD_BYTES], "little")
            for i in range(0, len(data), _WORD_BYTES)
        ]


def snapping_grid(std: float) -> float:
    """The grid the noised values are rounded to: ``2^⌊log2(std·2^-GRID_BITS)⌋``.

    Args:
        std: The noise standard deviation (positive, finite).

    Returns:
        A power of two in (std·2^-21, std·2^-20].
    """
    _, exponent = math.frexp(std)  # std = m·2^exponent, m in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 - GRID_BITS)


def refined_log_uniform(word: int, source: WordSource) -> float:
    """``ln U`` for a radius word in the tail, refined to float64 precision.

    ``U = (N + ½)·2^(-64n)`` where ``N`` is ``word`` followed by ``n - 1`` further words
    of ``source``, the fewest that give N at least 53 significant bits. This is the
    midpoint of an exact uniform cell of width 2^(-64n) inside the cell ``word`` names.

    Args:
        word: The radius word, unsigned, below 2**44 (anything in [0, 2**64) works).
        source: Where further words come from.

    Returns:
        ln U, accurate to float64 precision (computed from the exact integer).
    """
    numerator, words = word, 1
    while numerator < _FULL_PRECISION:
        numerator = (numerator << 64) | source.words(1)[0]
        words += 1
    # math.log of a Python integer is exact to rounding at any size.
    return math.log(2 * numerator + 1) - (64 * words + 1) * _LN2


class _Scratch:
    """Preallocated float64 buffers for one chunk of ``pairs`` normal pairs."""

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self.values = torch.empty(2 * pairs, dtype=torch.float64)
        self.exponential = torch.empty(pairs, dtype=torch.float64)
        self.other = torch.empty(pairs, dtype=torch.float64)
        self.angle = torch.empty(pairs, dtype=torch.float64)
        self.cosine = torch.empty(pairs, dtype=torch.float64)
        self.half_u_step = torch.tensor(0.5 * _U_STEP, dtype=torch.float64)
        self.half_angle_step = torch.tensor(0.5 * _ANGLE_STEP, dtype=torch.float64)
        self._zeros = bytes(2 * pairs * _WORD_BYTES)
        # update_into wants block size - 1 spare bytes after the output.
        self._raw = bytearray(2 * pairs * _WORD_BYTES + _BLOCK_BYTES - 1)
        self._words = torch.frombuffer(self._raw, dtype=torch.int64, count=2 * pairs)

    def keystream(self, stream: AesCtrStream, count: int) -> torch.Tensor:
        """The next ``count`` words of ``stream`` as int64, in this scratch's buffer."""
        stream.keystream_into(memoryview(self._zeros)[: count * _WORD_BYTES], self._raw)
        return self._words[:count]


def _polar(
    radius_words: torch.Tensor,
    angle_words: torch.Tensor,
    sources: Callable[[int], WordSource],
    scratch: _Scratch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``√E = radius/√2``, cos θ and sin θ of Box–Muller pairs, in scratch buffers.

    The caller multiplies by √2 (folded into its scale). ``angle_words`` is shifted in
    place. Returns views of ``scratch`` valid until its next use.
    """
    count = radius_words.numel()
    exponential = scratch.exponential[:count]
    shifted = scratch.other[:count]
    uniform = scratch.cosine[:count]  # free until the angle step
    # A signed word s is k - 2^64·[k >= 2^63], so v = (s + ½)·2^-64 is U for k < 2^63
    # and U - 1 above. U = v - floor(v) rounds once, and that rounding error is exact:
    # floor(v) is 0 or -1, U + floor(v) is exact (Sterbenz), so e = v - (U + floor(v)).
    # Then ln U_exact = ln(U + e) = ln U + e/U + O(2^-106). e is 0 below ½; above, using
    # e for e/U errs by |e|·(1 - U)/U <= 2·|e|·|ln U| <= 2^-53·|ln U|. So E = -ln U keeps
    # float64's relative precision at both ends with one log and no branch (log1p of
    # the complement would cost a second transcendental and a select: measured 3x).
    exponential.copy_(radius_words)  # int64 -> float64 (rounds |s| >= 2^53 to 53 bits)
    torch.add(scratch.half_u_step, exponential, alpha=_U_STEP, out=exponential)  # v
    torch.floor(exponential, out=shifted)
    torch.sub(exponential, shifted, out=uniform)  # U
    shifted.add_(uniform)
    shifted.sub_(exponential)  # -e
    torch.log(uniform, out=exponential)
    torch.sub(shifted, exponential, out=exponential)  # E = -e - ln U

    smallest, largest = (float(bound) for bound in torch.aminmax(exponential))
    if largest > _REFINE_ABOVE:  # U < 2^-20: the tail
        tail = torch.nonzero((radius_words >= 0) & (radius_words < _REFINE_WORDS)).flatten()
        for index in tail.tolist():
            exponential[index] = -refined_log_uniform(int(radius_words[index]), sources(index))
    if smallest < _REFINE_BELOW:  # 1 - U < 2^-20: the smallest radii, refined alike
        near_one = torch.nonzero((radius_words < 0) & (radius_words >= -_REFINE_WORDS)).flatten()
        for index in near_one.tolist():
            word = -int(radius_words[index]) - 1
            complement = math.exp(refined_log_uniform(word, sources(index)))
            exponential[index] = -math.log1p(-complement)

    root = exponential.sqrt_()
    angle = scratch.angle[:count]
    torch.bitwise_right_shift(angle_words, _ANGLE_SHIFT, out=angle_words)
    angle.copy_(angle_words)
    torch.add(scratch.half_angle_step, angle, alpha=_ANGLE_STEP, out=angle)
    cosine = torch.cos(angle, out=scratch.cosine[:count])
    sine = angle.sin_()
    return root, cosine, sine


def normal_pairs_from_words(
    radius_words: torch.Tensor,
    angle_words: torch.Tensor,
    sources: Callable[[int], WordSource],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform alone: Box–Muller with the exact tail on given words.

    The same code as the production path (:func:`add_gaussian_noise_`), exposed so that
    tests can feed it the extreme words.

    Args:
        radius_words: int64 words k (two's complement of the unsigned word).
        angle_words: int64 words j, as many as ``radius_words``; not modified.
        sources: The source of further words for pair i's refinement, if it needs one
            (the sampler gives each pair its own range of the key's stream).

    Returns:
        ``(z1, z2)``: new float64 tensors of the same length.
    """
    if radius_words.shape != angle_words.shape or radius_words.dim() != 1:
        raise ValueError("radius_words and angle_words must be 1-D of the same length")
    scratch = _Scratch(max(1, radius_words.numel()))
    root, cosine, sine = _polar(
        radius_words.to(torch.int64), angle_words.to(torch.int64).clone(), sources, scratch
    )
    return root * cosine * _SQRT2, root * sine * _SQRT2


def add_gaussian_noise_(
    tensors: Sequence[torch.Tensor],
    std: float,
    *,
    key: bytes | None = None,
    chunk_pairs: int | None = None,
    threads: int | None = None,
) -> None:
    """Add independent N(0, std²) noise to every coordinate of each tensor, in place.

    Each value x becomes ``round((x + std·z) / Λ)·Λ`` computed in float64
    (:func:`snapping_grid`), then converted to the tensor's dtype.

    Args:
        tensors: Contiguous floating-point CPU tensors; their coordinates are taken in
            order, as one vector.
        std: The standard deviation; positive and finite.
        key: The AES-256 key of the stream. ``None`` (production) reads a fresh one with
            :func:`fresh_key`; a fixed key makes the output reproducible (tests).
        chunk_pairs: Normal pairs per chunk (a speed knob: the output does not depend on
            it nor on ``threads``). ``None``: with several threads, chunks small enough
            that every torch op runs serially on its worker (below torch's intra-op
            grain of 32,768 elements, so no OpenMP barrier); with one, larger chunks
            (less Python overhead).
        threads: Worker threads, each noising its own chunks (torch releases the GIL
            in its kernels); ``None``: one (torch's intra-op threads parallelise each
            op; see the module docstring).

    Raises:
        ValueError: A tensor is not a contiguous floating-point CPU tensor, ``std`` is
            not positive and finite, or the key is not 32 bytes.
    """
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be positive and finite, got {std!r}")
    flats: list[torch.Tensor] = []
    for tensor in tensors:
        if not (tensor.is_floating_point() and tensor.is_contiguous()) or tensor.is_cuda:
            raise ValueError("noise is added to contiguous floating-point CPU tensors only")
        if tensor.numel():
            flats.append(tensor.view(-1))
    total = sum(flat.numel() for flat in flats)
    if total == 0:
        return
    secret = fresh_key() if key is None else key
    if len(secret) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(secret)}")
    workers = 1 if threads is None else threads
    if chunk_pairs is None:
        chunk_pairs = _SERIAL_CHUNK_PAIRS if workers > 1 else _LARGE_CHUNK_PAIRS
    pairs = min(chunk_pairs, (total + 1) // 2)
    chunks = _chunks(flats, 2 * pairs)
    noiser = _ChunkNoiser(secret, pairs, std)
    workers = min(workers, len(chunks))
    if workers <= 1:
        scratch = _Scratch(pairs)
        for index, pieces in enumerate(chunks):
            noiser.run(index, pieces, scratch)
        return

    def work(first: int) -> None:
        scratch = _Scratch(pairs)
        for index in range(first, len(chunks), workers):
            noiser.run(index, chunks[index], scratch)

    with ThreadPoolExecutor(workers, thread_name_prefix="dp-noise") as pool:
        for done in [pool.submit(work, first) for first in range(workers)]:
            done.result()


_Piece = tuple[torch.Tensor, int, int, int]  # (flat tensor, its offset, chunk offset, length)


def _chunks(flats: list[torch.Tensor], chunk: int) -> list[list[_Piece]]:
    """Cut the tensors, taken as one vector, into chunks of ``chunk`` coordinates."""
    chunks: list[list[_Piece]] = []
    pieces: list[_Piece] = []
    filled = 0
    for flat in flats:
        offset = 0
        while offset < flat.numel():
            take = min(chunk - filled, flat.numel() - offset)
            pieces.append((flat, offset, filled, take))
            filled += take
            offset += take
            if filled == chunk:
                chunks.append(pieces)
                pieces, filled = [], 0
    if pieces:
        chunks.append(pieces)
    return chunks


class _ChunkNoiser:
    """Noises one chunk; chunks are independent, so threads may run them in any order.

    Pair p (coordinates 2p and 2p + 1 of the vector) is made from keystream block p (its
    radius and angle words) and, if it needs refining, from the stream at counter
    ``2^127 + p·2^64``: disjoint ranges of one key's CTR stream, so the output depends
    on the key alone, not on the chunking or the threads.
    """

    def __init__(self, key: bytes, pairs: int, std: float) -> None:
        self._key = key
        self._pairs = pairs
        self._grid = snapping_grid(std)
        self._scale = std * _SQRT2  # z = √2·√E·cos θ

    def run(self, index: int, pieces: list[_Piece], scratch: _Scratch) -> None:
        length = sum(piece[3] for piece in pieces)
        values = scratch.values[:length]
        for flat, source_at, at, take in pieces:
            values[at : at + take].copy_(flat[source_at : source_at + take])
        pairs = (length + 1) // 2
        first_pair = index * self._pairs
        words = scratch.keystream(AesCtrStream(self._key, counter=first_pair), 2 * pairs)

        def sources(pair: int) -> WordSource:
            return AesCtrStream(self._key, counter=(1 << 127) + ((first_pair + pair) << 64))

        root, cosine, sine = _polar(words[0::2], words[1::2], sources, scratch)
        even, odd = values[0::2], values[1::2]
        torch.addcmul(even, root, cosine, value=self._scale, out=even)
        rest = length // 2
        torch.addcmul(odd, root[:rest], sine[:rest], value=self._scale, out=odd)
        # Snap to the grid: scaling by a power of two is exact, so this rounds once.
        values.mul_(1.0 / self._grid).round_().mul_(self._grid)
        for flat, source_at, at, take in pieces:
            flat[source_at : source_at + take].copy_(values[at : at + take])
