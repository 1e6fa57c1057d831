"""The HE-LoRA plan compiler.

A :class:`Plan` says exactly how the LoRA delta ``(alpha/r) * x @ A @ B`` of one adapted
layer is evaluated on CKKS-encrypted activations ``x`` ([tokens, d]) with the adapter
weights ``A`` ([d, r]) and ``B`` ([r, d_out]) in plaintext: how activations are packed
into slots, which rotations (hence which Galois keys) are needed, at which levels the
work happens, how many of each SEAL operation it performs, and what that should cost.
:func:`compile_plan` is a pure, deterministic function of its inputs; the SDK and the HE
runtime each compile (or receive and re-verify, :meth:`Plan.from_dict`) the same plan,
so the client encrypts exactly as the runtime evaluates. The runtime's executor counts
the operations it really performs and the tests check they equal :attr:`Plan.counts`.

Two packings:

``PER_TOKEN``
    One token's activation vector per ciphertext (two with ``complex_packing``: token
    2j in the real and 2j+1 in the imaginary part of the slots; the weights are real, so
    every step is complex-linear and both tokens ride along for free). The vector is
    zero-padded to ``L`` = next power of two >= d and tiled across all N/2 slots, so
    rotations act cyclically on each L-block. ``x·A`` uses the rank-aware diagonal
    method for an r x L matrix (Halevi & Shoup, "Algorithms in HElib", CRYPTO 2014,
    hybrid diagonals): r extended diagonals, evaluated baby-step/giant-step (n1 * n2 =
    r; the n1 - 1 baby-step rotations of the input are computed once and reused by every
    giant step, the sharing that hoisting exploits, cf. Halevi & Shoup, "Faster
    homomorphic linear transformations in HElib", CRYPTO 2018; SEAL's public API has no
    hoisted key switch, so each rotation is one full key switch), then log2(L/r)
    rotate-and-add steps fold the L/r partial sums. Because the input is tiled, the
    result ``u = x·A`` comes out replicated with period r across *all* slots, so ``u·B``
    needs only r more diagonals (again BSGS) and no replication step. Rotations per
    ciphertext: 2(n1 + n2 - 2) + log2(L/r), e.g. 20 for d = 4096, r = 16 (vs. ~d for
    the plain diagonal method). Depth 2: two rescales.

``BATCH_FIRST``
    Column packing: ciphertext (g, i) holds feature i of up to N/2 tokens (N with
    complex packing) of token group g, so ``x·A`` and ``·B`` are scalar
    multiply-accumulates across ciphertexts and need **no rotations and no Galois
    keys**. Activations are encrypted directly at the level with two data primes. For
    each of the r outputs of ``x·A``, d products with A encoded at the exact value of
    the prime being dropped are accumulated and rescaled **once** (not once per
    product); ``·B`` then runs at the lowest level (one prime) with B in fixed point,
    its scale chosen by the executor from the weights and :attr:`Plan.activation_bound`
    so that no slot can overflow. Costs r(d + d_out) multiply_plain per token group,
    independent of how many of the group's slots are used, so it wins for large batches.

Multiplicative depth counts ciphertext-by-plaintext products on the critical path;
``levels_used`` counts the rescales (primes consumed) along it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.common.errors import InvalidArgument
from tensafe.helora.params import CkksParams

#: Bumped whenever the compiler's output for the same inputs changes.
COMPILER_VERSION = 2

#: Default bound on |activation| the client promises (and checks) before encrypting.
#: Hidden states entering attention/MLP projections after RMSNorm are typically well
#: inside this; a larger bound costs fixed-point precision in BATCH_FIRST plans.
DEFAULT_ACTIVATION_BOUND = 64.0

#: Bits taken off half the first prime for the BATCH_FIRST activation scale (see
#: _batch_input_scale_bits).
_BATCH_SCALE_RESERVE_BITS = 2
#: Smallest activation scale (bits) a BATCH_FIRST plan accepts; below it the rescale
#: rounding noise (a few units) is no longer far below the 1e-3 accuracy target.
_MIN_BATCH_SCALE_BITS = 16
#: Bits taken off half the first prime for the activation scale of CLIENT_BABY_STEPS,
#: whose last product is not rescaled: the
#: first prime holds scale(x) * scale(weights) * |delta|, so a smaller activation scale
#: leaves more bits to the fixed-point weights (see _fixed_point_input_scale_bits).
_FIXED_POINT_SCALE_RESERVE_BITS = 5

#: Default largest relative error (max |error| / max |delta|) a plan may state; the
#: compiler only picks a variant whose stated bound is within it. 1e-3 is HE-LoRA's
#: accuracy target throughout (params.MIN_SCALE_BITS, executor.MIN_FIXED_POINT_BITS).
DEFAULT_MAX_RELATIVE_ERROR = 1e-3


class Variant(enum.StrEnum):
    """How a packing spends its levels and who makes the baby-step rotations.

    Each variant states a bound on the decoded relative error (:data:`ERROR_BOUNDS`),
    max |error| / max |delta|, for activations within the plan's bound and adapters the
    executor accepts (it refuses an adapter whose fixed-point precision is too low).
    """

    SERVER_BABY_STEPS = "SERVER_BABY_STEPS"
    """PER_TOKEN as in compiler version 1: one ciphertext per unit at three primes, the
    runtime rotates baby and giant steps of both products, both products rescaled."""
    CLIENT_BABY_STEPS = "CLIENT_BABY_STEPS"
    """PER_TOKEN: the client encrypts the n1 rotated copies of x the baby steps need
    (free in plaintext), at two primes; the runtime rotates only giant steps for x·A,
    rescales once, then folds and multiplies by B at the lowest level with B in fixed
    point (no second rescale, so every later rotation is at one prime)."""
    TWO_PRIMES = "TWO_PRIMES"
    """BATCH_FIRST: x·A at two primes, rescaled once per output, then ·B in fixed point
    at one prime. (ONE_PRIME keeps A in fixed point too; with the worst-case overflow
    bound at activation_bound 64 and d = 4096, A and B keep only 9 and 8 bits in one
    60-bit prime: docs/he.md section 4c.)"""
    ONE_PRIME = "ONE_PRIME"
    """BATCH_FIRST at the lowest level: x encrypted at one prime, A and B both in fixed
    point, no rescale. Its error bound is derived per plan (:func:`one_prime_layout`)
    from the first prime, d, r and the activation bound, relative to the plan's output
    range; the compiler compiles it only when forced and only where that bound is
    within the requested one (it never chooses it by itself: see compile_plan)."""


#: Stated bound on max |error| / max |delta| per variant. Measured with SEAL on LoRA-like
#: weights (kaiming-uniform A, B ~ N(0, 0.02), |x| ~ N(0, 2), d = 4096, r = 16): the
#: rescaled variants stay below 1e-6 / 3e-5, the fixed-point ones below 2e-4 (figures in
#: docs/he.md); the bounds keep a margin over those.
ERROR_BOUNDS: Mapping[Variant, float] = {
    Variant.SERVER_BABY_STEPS: 1e-5,
    Variant.CLIENT_BABY_STEPS: 1e-3,
    Variant.TWO_PRIMES: 1e-4,
}

_VARIANTS: Mapping[str, tuple[Variant, ...]] = {
    "PER_TOKEN": (Variant.CLIENT_BABY_STEPS, Variant.SERVER_BABY_STEPS),
    "BATCH_FIRST": (Variant.ONE_PRIME, Variant.TWO_PRIMES),
}

#: Standard deviation of SEAL's error distribution (``seal::util::global_variables::
#: noise_standard_deviation``), which the one-prime bound's fresh-noise term uses.
_SEAL_NOISE_STDDEV = 3.2
#: Standard deviations a slot's fresh noise is bounded by (a Gaussian exceeds 7 sigma
#: with probability 2.6e-12 per slot: ~1e-4 over 4096 slots x 8192 features).
_NOISE_TAIL_SIGMAS = 7.0
#: Bits kept free in the one prime: sign, noise, and one bit each for A's and B's
#: scales being rounded to powers of two (each may give its weights up to one more bit).
_ONE_PRIME_HEADROOM_BITS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnePrimeLayout:
    """Scales and the derived error bound of a BATCH_FIRST ONE_PRIME plan.

    Attributes:
        input_scale_bits: log2 of the activation scale.
        a_bits: Fixed-point bits A's largest entry keeps (at least).
        b_bits: Fixed-point bits (alpha/r)·B's largest entry keeps (at least).
        error_bound: Bound on max |error| / W, W = X·d·r·max|A|·max|(alpha/r)·B| with
            X = activation_bound·sqrt(2): the largest |delta| any activation within the
            bound can give with an adapter of these largest entries.
    """

    input_scale_bits: int
    a_bits: int
    b_bits: int
    error_bound: float


def one_prime_layout(
    params: CkksParams, *, hidden_size: int, rank: int, activation_bound: float
) -> OnePrimeLayout:
    """Derive the ONE_PRIME scales and error bound from the parameters and shapes.

    Everything lives in the first prime q0 (no rescale), so it must hold
    scale(x) · scale(A) · scale(B) · max|delta| with headroom. With the executor's
    scales (A's largest entry gets 2^a_bits..2^(a_bits+1) units, B's likewise) and
    max|delta| <= W = X·d·r·max|A|·max|B'| (X = bound·sqrt(2), complex packing or
    not), that is s + a + b + log2(X·d·r) <= q0 - 4. The error, per slot, over W:

    - A's quantisation (one unit of at most max|A|·2^-a per entry, zero entries moved
      to one unit): 2^-a; B's: 2^-b; their product: 2^-(a+b);
    - x's encoding and fresh symmetric-encryption noise, at most
      7·sqrt(N·(sigma^2 + 1/12)) units of 2^s per slot (sigma = 3.2), times
      (1 + 2^-a)(1 + 2^-b) over X;
    - decoding is exact to double precision (below all of these).

    The activation scale s is the one that minimises the sum, a and b split the rest
    (a gets the odd bit).

    Returns:
        The layout; its ``error_bound`` may be large (the compiler compares it with the
        requested bound).
    """
    activation = activation_bound * math.sqrt(2.0)
    range_bits = math.ceil(math.log2(activation * hidden_size * rank))
    budget = params.data_prime_bits[0] - _ONE_PRIME_HEADROOM_BITS - range_bits
    noise = _NOISE_TAIL_SIGMAS * math.sqrt(
        params.poly_modulus_degree * (_SEAL_NOISE_STDDEV**2 + 1.0 / 12.0)
    )
    best: OnePrimeLayout | None = None
    for scale_bits in range(_MIN_BATCH_SCALE_BITS, max(_MIN_BATCH_SCALE_BITS, budget) + 1):
        weight_bits = budget - scale_bits
        a_bits = (weight_bits + 1) // 2
        b_bits = weight_bits // 2
        quantisation = 2.0**-a_bits + 2.0**-b_bits + 2.0 ** -(a_bits + b_bits)
        encryption = noise / 2.0**scale_bits / activation * (1 + 2.0**-a_bits) * (1 + 2.0**-b_bits)
        layout = OnePrimeLayout(
            input_scale_bits=scale_bits,
            a_bits=a_bits,
            b_bits=b_bits,
            error_bound=quantisation + encryption,
        )
        if best is None or layout.error_bound < best.error_bound:
            best = layout
    assert best is not None  # the range has at least one scale
    return best


class Packing(enum.StrEnum):
    """How activations are laid out in CKKS slots."""

    PER_TOKEN = "PER_TOKEN"  # noqa: S105 (a packing name, not a credential)
    """One (or two, complex) token vectors per ciphertext; BSGS diagonals; rotations."""
    BATCH_FIRST = "BATCH_FIRST"
    """Tokens in slots, one ciphertext per feature; no rotations."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpCounts:
    """Counts of SEAL operations, as planned or as performed.

    Attributes:
        rotations: ``rotate_vector`` calls.
        key_switches: Key-switching operations (each rotation is exactly one, because
            a Galois key exists for every planned step; there is no relinearisation).
        multiply_plain: Ciphertext-by-plaintext products.
        rescales: ``rescale_to_next`` calls.
        additions: Ciphertext additions.
        plaintext_encodes: Plaintexts encoded during evaluation (BATCH_FIRST encodes its
            scalar weights on the fly; PER_TOKEN plaintexts are cached per adapter).
    """

    rotations: int = 0
    key_switches: int = 0
    multiply_plain: int = 0
    rescales: int = 0
    additions: int = 0
    plaintext_encodes: int = 0

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            **{
                field.name: getattr(self, field.name) + getattr(other, field.name)
                for field in dataclasses.fields(self)
            }
        )

    def times(self, factor: int) -> OpCounts:
        """Return every count multiplied by ``factor``."""
        return OpCounts(
            **{field.name: getattr(self, field.name) * factor for field in dataclasses.fields(self)}
        )

    def to_dict(self) -> dict[str, int]:
        """Return a JSON-able dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostModel:
    """Milliseconds per SEAL operation, used to estimate and compare plans.

    The defaults were measured with SEAL on this project's 2-core reference machine at
    N = 8192 with 3 data primes (docs: DESIGN.md section 7). An operation at a level
    with k data primes costs k/3 of that (all of them are linear in the number of RNS
    primes; measured: rotation 2.1 / 1.3 / 0.66 ms at 3 / 2 / 1 primes), and another
    ring degree scales by N log N.

    Attributes:
        rotate_ms: One rotation (key switch) at the reference level.
        multiply_plain_ms: One ciphertext-by-plaintext product.
        add_ms: One ciphertext addition.
        rescale_ms: One rescale.
        encrypt_ms: Encode and encrypt one ciphertext (client side).
        decrypt_ms: Decrypt and decode one ciphertext (client side).
        encode_scalar_ms: Encode one scalar plaintext and switch it to its level.
        reference_poly_modulus_degree: N the figures were measured at.
        reference_primes: Data primes the figures were measured at.
    """

    rotate_ms: float = 2.5
    multiply_plain_ms: float = 0.2
    add_ms: float = 0.05
    rescale_ms: float = 0.6
    encrypt_ms: float = 3.5
    decrypt_ms: float = 0.5
    encode_scalar_ms: float = 0.015
    reference_poly_modulus_degree: int = 8192
    reference_primes: int = 3

    def level_factor(self, poly_modulus_degree: int, primes: int) -> float:
        """Return the cost of an op at (N, primes) relative to the reference level."""
        reference = self.reference_poly_modulus_degree
        ring = (poly_modulus_degree * math.log2(poly_modulus_degree)) / (
            reference * math.log2(reference)
        )
        return ring * primes / self.reference_primes

    def server_ms(self, counts: OpCounts, *, poly_modulus_degree: int, primes: int) -> float:
        """Estimate the server time of ``counts`` performed at a level with ``primes``."""
        per_reference = (
            counts.rotations * self.rotate_ms
            + counts.multiply_plain * self.multiply_plain_ms
            + counts.additions * self.add_ms
            + counts.rescales * self.rescale_ms
            + counts.plaintext_encodes * self.encode_scalar_ms
        )
        return per_reference * self.level_factor(poly_modulus_degree, primes)

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-able dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """A compiled HE-LoRA evaluation plan. Build with :func:`compile_plan`.

    Attributes:
        compiler_version: :data:`COMPILER_VERSION` that produced it.
        packing: The slot layout.
        hidden_size: d, the width of x and the rows of A.
        output_size: d_out, the columns of B.
        rank: r, the LoRA rank.
        alpha: LoRA alpha; the delta is scaled by alpha / rank.
        tokens: Tokens in the request.
        params: The CKKS parameter set.
        activation_bound: The client guarantees max |x| <= this (checked before
            encryption); the executor sizes fixed-point scales from it so nothing
            overflows.
        complex_packing: Use the imaginary part of the slots for a second token set.
        cost_model: The cost model the estimates were computed with.
        slot_count: N / 2.
        padded_rank: PER_TOKEN: r rounded up to a power of two (A gets zero columns,
            B zero rows). BATCH_FIRST: r.
        block_length: PER_TOKEN: L, d rounded up to a power of two. BATCH_FIRST: 0.
        variant: How the packing spends levels and who rotates the baby steps.
        baby_steps: PER_TOKEN: n1 of the BSGS split of x·A's r diagonals. BATCH_FIRST: 0.
        giant_steps: PER_TOKEN: n2 = padded_rank / n1. BATCH_FIRST: 0.
        output_baby_steps: PER_TOKEN: n1 of the BSGS split of u·B's diagonals.
        output_giant_steps: PER_TOKEN: its n2.
        input_copies: Ciphertexts the client sends per unit: the n1 rotated copies of x
            (CLIENT_BABY_STEPS), 1 (SERVER_BABY_STEPS) or d (BATCH_FIRST).
        tokens_per_unit: Tokens per ciphertext (PER_TOKEN) or per ciphertext group
            (BATCH_FIRST).
        units: Ciphertexts (PER_TOKEN) or token groups (BATCH_FIRST) in the request.
        input_ciphertexts: Ciphertexts the client uploads.
        output_ciphertexts: Ciphertexts the runtime returns.
        input_primes: Data primes at the level the client encrypts at.
        output_primes: Data primes left on the results.
        input_scale_bits: log2 of the scale the client encodes activations at.
        depth: Multiplicative (ciphertext-by-plaintext) depth.
        levels_used: Rescales along the critical path.
        rotation_steps: Sorted distinct rotation steps = the Galois keys needed.
        counts_per_unit: Operations per unit.
        counts: Operations for the whole request.
        estimated_server_ms: Cost-model estimate of the runtime's evaluation.
        estimated_client_ms: Cost-model estimate of client encryption + decryption.
        error_bound: Stated bound on max |error| / max |delta| (:data:`ERROR_BOUNDS`);
            ONE_PRIME: on max |error| / W, W >= max |delta| the plan's output range
            (:class:`OnePrimeLayout`), derived per plan.
    """

    compiler_version: int
    packing: Packing
    hidden_size: int
    output_size: int
    rank: int
    alpha: float
    tokens: int
    params: CkksParams
    activation_bound: float
    complex_packing: bool
    cost_model: CostModel
    slot_count: int
    padded_rank: int
    block_length: int
    variant: Variant
    baby_steps: int
    giant_steps: int
    output_baby_steps: int
    output_giant_steps: int
    input_copies: int
    tokens_per_unit: int
    units: int
    input_ciphertexts: int
    output_ciphertexts: int
    input_primes: int
    output_primes: int
    input_scale_bits: int
    depth: int
    levels_used: int
    rotation_steps: tuple[int, ...]
    counts_per_unit: OpCounts
    counts: OpCounts
    estimated_server_ms: float
    estimated_client_ms: float
    error_bound: float

    @property
    def lora_scaling(self) -> float:
        """Alpha / rank, folded into B's plaintexts by the executor."""
        return self.alpha / self.rank

    @property
    def estimated_total_ms(self) -> float:
        """Server plus client estimate (what :func:`choose_plan` minimises)."""
        return self.estimated_server_ms + self.estimated_client_ms

    def estimated_wall_ms(self, cores: int) -> float:
        """Estimate the runtime's wall time for this plan with ``cores`` cores.

        The HE runtime's executor uses at most two processes per request (itself and
        one peer): several units are split half and half, and so is the work of one
        BATCH_FIRST token group (by features); one CLIENT_BABY_STEPS unit runs half of
        x·A's giant steps and half of u·B's baby steps (with their products) in the
        peer while the fold and u·B's giant rotations stay on the critical path. A
        single SERVER_BABY_STEPS unit runs on one core. Shipping ciphertexts
        between the processes (~0.03 ms to serialize 0.26 MiB) is not modelled.

        Args:
            cores: Cores the runtime may use for one request (its
                ``evaluation_cores``); the estimate is :attr:`estimated_server_ms` for 1.

        Raises:
            InvalidArgument: ``cores`` is not a positive integer.
        """
        cores = _positive_int(cores, "cores")
        if cores == 1:
            return self.estimated_server_ms
        if self.units >= 2:
            return self.estimated_server_ms * ((self.units + 1) // 2) / self.units
        if self.packing is Packing.BATCH_FIRST:
            return self.estimated_server_ms / 2
        if self.variant is not Variant.CLIENT_BABY_STEPS:
            return self.estimated_server_ms
        model, degree = self.cost_model, self.params.poly_modulus_degree
        top, bottom = self.input_primes, self.input_primes - 1

        def at(primes: int, **counts: int) -> float:
            return model.server_ms(OpCounts(**counts), poly_modulus_degree=degree, primes=primes)

        def giant_half(giants: range) -> float:
            # Each giant step: n1 products, n1 - 1 additions, a rotation unless g = 0.
            rotations = sum(1 for giant in giants if giant)
            return at(
                top,
                multiply_plain=len(giants) * self.baby_steps,
                additions=len(giants) * self.baby_steps,
                rotations=rotations,
            )

        def baby_half(babies: range) -> float:
            rotations = sum(1 for baby in babies if baby)
            return at(top, rotations=rotations, rescales=len(babies)) + at(
                bottom,
                multiply_plain=len(babies) * self.output_giant_steps,
                additions=len(babies) * self.output_giant_steps,
            )

        giants, babies = range(self.giant_steps), range(self.output_baby_steps)
        half_giants, half_babies = (len(giants) + 1) // 2, (len(babies) + 1) // 2
        fold = (self.block_length // self.padded_rank).bit_length() - 1
        return (
            max(giant_half(giants[:half_giants]), giant_half(giants[half_giants:]))
            + at(top, rotations=fold, additions=fold)
            + max(baby_half(babies[:half_babies]), baby_half(babies[half_babies:]))
            + at(
                bottom,
                rotations=self.output_giant_steps - 1,
                additions=2 * self.output_giant_steps - 1,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :meth:`from_dict` re-verifies it."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, CkksParams | OpCounts | CostModel):
                out[field.name] = value.to_dict()
            elif isinstance(value, enum.Enum):
                out[field.name] = value.value
            elif isinstance(value, tuple):
                out[field.name] = list(value)
            else:
                out[field.name] = value
        return out

    def to_json(self) -> str:
        """Return the canonical JSON text (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Return the SHA-256 hex digest of :meth:`to_json`."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encoding_key(self) -> str:
        """Return a digest of everything that determines the adapter's plaintexts.

        Plans that differ only in token count (or cost model) share encoded weights.
        """
        relevant = {
            "compiler_version": self.compiler_version,
            "packing": self.packing.value,
            "hidden_size": self.hidden_size,
            "output_size": self.output_size,
            "rank": self.rank,
            "alpha": self.alpha,
            "params": self.params.to_dict(),
            "activation_bound": self.activation_bound,
            "padded_rank": self.padded_rank,
            "block_length": self.block_length,
            "variant": self.variant.value,
            "baby_steps": self.baby_steps,
            "giant_steps": self.giant_steps,
            "output_baby_steps": self.output_baby_steps,
            "output_giant_steps": self.output_giant_steps,
            "input_primes": self.input_primes,
            "input_scale_bits": self.input_scale_bits,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output and verify it.

        The inputs are recompiled and every derived field must match, so a plan that
        was edited, or made by another compiler version, is refused rather than run.

        Raises:
            InvalidArgument: A field is missing or malformed, or the plan does not match
                what this compiler produces for its inputs.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument("plan", "must be an object")
        try:
            version = data["compiler_version"]
            if version != COMPILER_VERSION:
                raise InvalidArgument(
                    "plan.compiler_version",
                    f"plan was compiled by version {version}; this runtime compiles "
                    f"version {COMPILER_VERSION}",
                )
            try:
                packing = Packing(data["packing"])
            except ValueError:
                raise InvalidArgument(
                    "plan.packing", f"unknown packing {data['packing']!r}"
                ) from None
            try:
                variant = Variant(data["variant"])
            except ValueError:
                raise InvalidArgument(
                    "plan.variant", f"unknown variant {data['variant']!r}"
                ) from None
            cost = data["cost_model"]
            if not isinstance(cost, Mapping):
                raise InvalidArgument("plan.cost_model", "must be an object")
            try:
                cost_model = CostModel(**cost)
            except TypeError as error:
                raise InvalidArgument("plan.cost_model", str(error)) from None
            plan = compile_plan(
                hidden_size=data["hidden_size"],
                output_size=data["output_size"],
                rank=data["rank"],
                alpha=data["alpha"],
                tokens=data["tokens"],
                params=CkksParams.from_dict(data["params"], field_prefix="plan.params."),
                packing=packing,
                complex_packing=data["complex_packing"],
                activation_bound=data["activation_bound"],
                cost_model=cost_model,
                variant=variant,
                # The plan's own stated bound: a forced variant compiled under a looser
                # request than the default (ONE_PRIME) recompiles to itself.
                max_relative_error=data["error_bound"],
            )
        except KeyError as missing:
            raise InvalidArgument(f"plan.{missing.args[0]}", "is required") from None
        except InvalidArgument as error:
            if error.field.startswith("plan."):
                raise
            raise InvalidArgument(f"plan.{error.field}", error.description) from None
        recompiled = plan.to_dict()
        for key, value in data.items():
            if key not in recompiled:
                raise InvalidArgument(f"plan.{key}", "is not a plan field")
            if recompiled[key] != value:
                raise InvalidArgument(
                    f"plan.{key}",
                    f"does not match the compiler's output for the plan's inputs "
                    f"({value!r} != {recompiled[key]!r})",
                )
        if set(recompiled) != set(data):
            missing_fields = sorted(set(recompiled) - set(data))
            raise InvalidArgument(f"plan.{missing_fields[0]}", "is required")
        return plan


def _next_power_of_two(value: int) -> int:
    return 1 << (value - 1).bit_length()


def _positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(field, f"must be a positive integer, got {value!r}")
    return value


def _positive_float(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field, f"must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise InvalidArgument(field, f"must be finite and positive, got {value!r}")
    return number


def _bsgs_split(padded_rank: int) -> tuple[int, int]:
    # n1 * n2 = padded_rank with n1 = 2^ceil(log2(r)/2) minimises n1 + n2 - 2 rotations
    # for powers of two (ties go to the larger baby step, whose rotations are shared).
    log_rank = padded_rank.bit_length() - 1
    baby = 1 << ((log_rank + 1) // 2)
    return baby, padded_rank // baby


def _batch_input_scale_bits(params: CkksParams) -> int:
    # After x·A is rescaled, the first prime q0 must hold scale(x) * scale(B) * |y|.
    # Half of q0 (minus a reserve) goes to the activation scale, the rest to B's
    # fixed-point scale and the output range. Two error sources trade off here: the
    # rescale's rounding noise (~2^10 units, so relative 2^(10 - scale bits)) and B's
    # quantisation. Measured with SEAL, q0 = 60 bits, d = d_out = 256, r = 16, |x| ~ 3:
    # max relative error 7e-5 / 2e-5 / 7e-6 / 2.5e-5 at 2^24 / 2^26 / 2^28 / 2^30, so
    # the scale is q0/2 - 2 bits (2^28).
    return params.data_prime_bits[0] // 2 - _BATCH_SCALE_RESERVE_BITS


def _fixed_point_input_scale_bits(params: CkksParams) -> int:
    # CLIENT_BABY_STEPS ends with a product that is not rescaled, so q0 holds
    # scale(x) * scale(B) * |delta|: the activations get
    # fewer bits than in TWO_PRIMES (2^25 for q0 = 60) and the weights the rest. Two
    # errors trade off: a rescale's rounding noise (~2^11 units at N = 8192, so
    # ~2^(11 - scale bits) of the value) and the encoding error of B's fixed-point
    # diagonals (~sqrt(N/12) units of B's scale, which gets what the activations leave).
    # Measured (d = 256 / 4096, r = 4 / 16, LoRA-like weights): see ERROR_BOUNDS.
    return params.data_prime_bits[0] // 2 - _FIXED_POINT_SCALE_RESERVE_BITS


def compile_plan(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    tokens: int,
    params: CkksParams,
    packing: Packing,
    complex_packing: bool = True,
    activation_bound: float = DEFAULT_ACTIVATION_BOUND,
    cost_model: CostModel | None = None,
    variant: Variant | None = None,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> Plan:
    """Compile the plan for one adapted layer and one request.

    Args:
        hidden_size: d, width of the activations and rows of A.
        output_size: d_out, columns of B.
        rank: LoRA rank r.
        alpha: LoRA alpha (the delta is scaled by alpha / rank).
        tokens: Tokens in the request.
        params: CKKS parameter set (already validated for 128-bit security).
        packing: Which packing to compile.
        complex_packing: Pack a second set of tokens into the imaginary parts.
        activation_bound: Bound on |x| the client checks before encrypting.
        cost_model: Per-operation costs; :class:`CostModel` defaults if None.
        variant: Force a variant of the packing; None: the cheapest (by
            :attr:`Plan.estimated_total_ms`) whose error bound is within
            ``max_relative_error`` and whose levels the parameters have.
        max_relative_error: The precision bound the plan must state at most.

    Returns:
        The plan. Same inputs, same plan, always.

    Raises:
        InvalidArgument: An input is out of range, or the packing cannot serve these
            shapes with these parameters (the field says which input to change).
    """
    hidden_size = _positive_int(hidden_size, "hidden_size")
    output_size = _positive_int(output_size, "output_size")
    rank = _positive_int(rank, "rank")
    tokens = _positive_int(tokens, "tokens")
    alpha = _positive_float(alpha, "alpha")
    activation_bound = _positive_float(activation_bound, "activation_bound")
    max_relative_error = _positive_float(max_relative_error, "max_relative_error")
    if not isinstance(params, CkksParams):
        raise InvalidArgument("params", "must be a CkksParams")
    if not isinstance(complex_packing, bool):
        raise InvalidArgument("complex_packing", "must be a boolean")
    if not isinstance(packing, Packing):
        raise InvalidArgument("packing", f"must be one of {[p.value for p in Packing]}")
    if rank > hidden_size:
        raise InvalidArgument("rank", f"rank {rank} exceeds hidden_size {hidden_size}")
    cost_model = cost_model if cost_model is not None else CostModel()
    allowed = _VARIANTS[packing.value]
    if variant is not None:
        if variant not in allowed:
            raise InvalidArgument(
                "variant",
                f"{variant.value} is not a variant of {packing.value} "
                f"(one of {[v.value for v in allowed]})",
            )
        candidates: tuple[Variant, ...] = (variant,)
    else:
        # ONE_PRIME only when forced: its derived bound is relative to the output range
        # W, and on LoRA-like inputs (d = 64) max |delta| is ~1000x below W, so its
        # error was 1.6e-3 of max |delta|, over the 1e-3 the other variants state
        # relative to max |delta| (docs/he.md section 4c).
        candidates = tuple(v for v in allowed if v is not Variant.ONE_PRIME)
    plans: list[Plan] = []
    errors: list[InvalidArgument] = []
    for candidate in candidates:
        if candidate in ERROR_BOUNDS and ERROR_BOUNDS[candidate] > max_relative_error:
            errors.append(
                InvalidArgument(
                    "max_relative_error",
                    f"{candidate.value} states a relative error bound of "
                    f"{ERROR_BOUNDS[candidate]:g}, over the requested {max_relative_error:g}",
                )
            )
            continue
        if candidate is Variant.ONE_PRIME:
            layout = one_prime_layout(
                params, hidden_size=hidden_size, rank=rank, activation_bound=activation_bound
            )
            if layout.error_bound > max_relative_error or min(layout.a_bits, layout.b_bits) < 1:
                errors.append(
                    InvalidArgument(
                        "max_relative_error",
                        f"ONE_PRIME's derived relative error bound for d = {hidden_size}, "
                        f"r = {rank}, activation_bound {activation_bound:g} and a "
                        f"{params.data_prime_bits[0]}-bit first prime is "
                        f"{layout.error_bound:.3g}, over the requested {max_relative_error:g}",
                    )
                )
                continue
        compile_variant = (
            _compile_per_token if packing is Packing.PER_TOKEN else _compile_batch_first
        )
        try:
            plans.append(
                compile_variant(
                    hidden_size=hidden_size,
                    output_size=output_size,
                    rank=rank,
                    alpha=alpha,
                    tokens=tokens,
                    params=params,
                    complex_packing=complex_packing,
                    activation_bound=activation_bound,
                    cost_model=cost_model,
                    variant=candidate,
                )
            )
        except InvalidArgument as error:
            errors.append(error)
    if not plans:
        # The error of the most capable variant says what to change.
        raise errors[-1]
    # Ties go to the first candidate (the newer variant, listed first).
    return min(plans, key=lambda plan: plan.estimated_total_ms)


def _compile_per_token(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    tokens: int,
    params: CkksParams,
    complex_packing: bool,
    activation_bound: float,
    cost_model: CostModel,
    variant: Variant,
) -> Plan:
    slots = params.slot_count
    if hidden_size > slots:
        raise InvalidArgument(
            "hidden_size",
            f"PER_TOKEN packing needs hidden_size <= slot count {slots}, got {hidden_size}; "
            "use a larger poly_modulus_degree or BATCH_FIRST",
        )
    if output_size > slots:
        raise InvalidArgument(
            "output_size",
            f"PER_TOKEN packing needs output_size <= slot count {slots}, got {output_size}",
        )
    client_baby = variant is Variant.CLIENT_BABY_STEPS
    depth = 2
    # SERVER_BABY_STEPS rescales both products; CLIENT_BABY_STEPS only x·A.
    rescales = 1 if client_baby else 2
    if params.max_depth < rescales:
        raise InvalidArgument(
            "params.coeff_modulus_bits",
            f"{variant.value} PER_TOKEN packing needs {rescales} rescales ({rescales + 1} "
            f"data primes), the parameter set has {params.max_depth}",
        )
    block = _next_power_of_two(hidden_size)
    padded_rank = _next_power_of_two(rank)
    if padded_rank > block:
        raise InvalidArgument(
            "rank", f"rank {rank} rounded up to {padded_rank} exceeds the block length {block}"
        )
    input_primes = rescales + 1
    degree = params.poly_modulus_degree
    if client_baby:
        input_scale_bits = _fixed_point_input_scale_bits(params)
        if input_scale_bits < _MIN_BATCH_SCALE_BITS:
            raise InvalidArgument(
                "params.coeff_modulus_bits",
                f"the first prime ({params.data_prime_bits[0]} bits) is too small for "
                f"{variant.value}, which needs an activation scale of at least "
                f"2^{_MIN_BATCH_SCALE_BITS}",
            )
        baby, giant = _client_bsgs_split(padded_rank, cost_model, degree, input_primes)
    else:
        input_scale_bits = params.scale_bits
        baby, giant = _bsgs_split(padded_rank)
    out_baby, out_giant = _bsgs_split(padded_rank)
    fold_rotations = (block // padded_rank).bit_length() - 1
    steps: set[int] = set()
    if not client_baby:
        steps.update(range(1, baby))
    steps.update(baby * g for g in range(1, giant))
    steps.update(padded_rank << i for i in range(fold_rotations))
    steps.update(range(1, out_baby))
    steps.update(out_baby * g for g in range(1, out_giant))
    fold = OpCounts(rotations=fold_rotations, key_switches=fold_rotations, additions=fold_rotations)
    if client_baby:
        # Key switching adds ~2^14.5 units of noise per rotation at one prime (the
        # digit is as large as the special prime), far too much at this plan's small
        # activation scale, so every rotation before the fixed-point product stays at
        # two primes: x·A's giant steps, the fold and u·B's baby steps; then each baby
        # copy is rescaled and the products and giant steps run at one prime, where the
        # scale is scale(x) * scale(B) and the noise is negligible.
        top_rotations = (giant - 1) + fold_rotations + (out_baby - 1)
        top = OpCounts(
            rotations=top_rotations,
            key_switches=top_rotations,
            multiply_plain=padded_rank,
            additions=padded_rank - 1 + fold_rotations,
            rescales=out_baby,
        )
        middle = OpCounts(
            rotations=out_giant - 1,
            key_switches=out_giant - 1,
            multiply_plain=padded_rank,
            additions=padded_rank - 1,
        )
    else:
        # x·A at the input level: baby and giant rotations, r products, r - 1
        # additions, one rescale. Then, one prime lower, the fold and u·B.
        top_rotations = (giant - 1) + (baby - 1)
        top = OpCounts(
            rotations=top_rotations,
            key_switches=top_rotations,
            multiply_plain=padded_rank,
            additions=padded_rank - 1,
            rescales=1,
        )
        middle_rotations = (out_baby - 1) + (out_giant - 1)
        middle = fold + OpCounts(
            rotations=middle_rotations,
            key_switches=middle_rotations,
            multiply_plain=padded_rank,
            additions=padded_rank - 1,
            rescales=1,
        )
    tokens_per_unit = 2 if complex_packing else 1
    units = -(-tokens // tokens_per_unit)
    copies = baby if client_baby else 1
    server_ms = units * (
        cost_model.server_ms(top, poly_modulus_degree=degree, primes=input_primes)
        + cost_model.server_ms(middle, poly_modulus_degree=degree, primes=input_primes - 1)
    )
    client_ms = units * (
        copies * cost_model.encrypt_ms * cost_model.level_factor(degree, input_primes)
        + cost_model.decrypt_ms * cost_model.level_factor(degree, input_primes - rescales)
    )
    per_unit = top + middle
    return Plan(
        compiler_version=COMPILER_VERSION,
        packing=Packing.PER_TOKEN,
        hidden_size=hidden_size,
        output_size=output_size,
        rank=rank,
        alpha=alpha,
        tokens=tokens,
        params=params,
        activation_bound=activation_bound,
        complex_packing=complex_packing,
        cost_model=cost_model,
        slot_count=slots,
        padded_rank=padded_rank,
        block_length=block,
        variant=variant,
        baby_steps=baby,
        giant_steps=giant,
        output_baby_steps=out_baby,
        output_giant_steps=out_giant,
        input_copies=copies,
        tokens_per_unit=tokens_per_unit,
        units=units,
        input_ciphertexts=units * copies,
        output_ciphertexts=units,
        input_primes=input_primes,
        output_primes=input_primes - rescales,
        input_scale_bits=input_scale_bits,
        depth=depth,
        levels_used=rescales,
        rotation_steps=tuple(sorted(steps)),
        counts_per_unit=per_unit,
        counts=per_unit.times(units),
        estimated_server_ms=server_ms,
        estimated_client_ms=client_ms,
        error_bound=ERROR_BOUNDS[variant],
    )


def _client_bsgs_split(
    padded_rank: int, cost_model: CostModel, degree: int, input_primes: int
) -> tuple[int, int]:
    # With client-side baby steps a baby step costs the client one more encryption
    # (and upload) and a giant step costs the runtime one rotation; pick the power-of-two
    # split with the lowest total estimate (ties: the larger baby step, less server work).
    # Depends only on the rank and the level, so every layer of a session shares it (and
    # the Galois keys of the largest layer cover every smaller one).
    factor = cost_model.level_factor(degree, input_primes)
    best: tuple[float, int] | None = None
    baby = padded_rank
    while baby >= 1:
        giant = padded_rank // baby
        cost = factor * (baby * cost_model.encrypt_ms + (giant - 1) * cost_model.rotate_ms)
        if best is None or cost < best[0]:
            best = (cost, baby)
        baby //= 2
    assert best is not None
    return best[1], padded_rank // best[1]


def _compile_batch_first(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    tokens: int,
    params: CkksParams,
    complex_packing: bool,
    activation_bound: float,
    cost_model: CostModel,
    variant: Variant,
) -> Plan:
    if variant is Variant.ONE_PRIME:
        # x·A and ·B at the one prime, both in fixed point: no rescale at all.
        layout = one_prime_layout(
            params, hidden_size=hidden_size, rank=rank, activation_bound=activation_bound
        )
        scale_bits = layout.input_scale_bits
        input_primes = 1
        error_bound = layout.error_bound
    else:
        if params.max_depth < 1:
            raise InvalidArgument(
                "params.coeff_modulus_bits",
                "BATCH_FIRST packing needs one rescale (two data primes)",
            )
        scale_bits = _batch_input_scale_bits(params)
        if scale_bits < _MIN_BATCH_SCALE_BITS:
            raise InvalidArgument(
                "params.coeff_modulus_bits",
                f"the first prime ({params.data_prime_bits[0]} bits) is too small for "
                f"BATCH_FIRST packing, which needs an activation scale of at least "
                f"2^{_MIN_BATCH_SCALE_BITS}",
            )
        input_primes = 2
        error_bound = ERROR_BOUNDS[variant]
    slots = params.slot_count
    tokens_per_unit = 2 * slots if complex_packing else slots
    units = -(-tokens // tokens_per_unit)
    # x·A: per output j, d products, d - 1 additions, one rescale (TWO_PRIMES).
    upper = OpCounts(
        multiply_plain=hidden_size * rank,
        additions=(hidden_size - 1) * rank,
        rescales=rank if input_primes == 2 else 0,
        plaintext_encodes=hidden_size * rank,
    )
    # u·B at one prime: per output o, r products and r - 1 additions.
    lower = OpCounts(
        multiply_plain=rank * output_size,
        additions=(rank - 1) * output_size,
        plaintext_encodes=rank * output_size,
    )
    degree = params.poly_modulus_degree
    server_ms = units * (
        cost_model.server_ms(upper, poly_modulus_degree=degree, primes=input_primes)
        + cost_model.server_ms(lower, poly_modulus_degree=degree, primes=1)
    )
    client_ms = units * (
        hidden_size * cost_model.encrypt_ms * cost_model.level_factor(degree, input_primes)
        + output_size * cost_model.decrypt_ms * cost_model.level_factor(degree, 1)
    )
    per_unit = upper + lower
    return Plan(
        compiler_version=COMPILER_VERSION,
        packing=Packing.BATCH_FIRST,
        hidden_size=hidden_size,
        output_size=output_size,
        rank=rank,
        alpha=alpha,
        tokens=tokens,
        params=params,
        activation_bound=activation_bound,
        complex_packing=complex_packing,
        cost_model=cost_model,
        slot_count=slots,
        padded_rank=rank,
        block_length=0,
        variant=variant,
        baby_steps=0,
        giant_steps=0,
        output_baby_steps=0,
        output_giant_steps=0,
        input_copies=hidden_size,
        tokens_per_unit=tokens_per_unit,
        units=units,
        input_ciphertexts=units * hidden_size,
        output_ciphertexts=units * output_size,
        input_primes=input_primes,
        output_primes=1,
        input_scale_bits=scale_bits,
        depth=2,
        levels_used=input_primes - 1,
        rotation_steps=(),
        counts_per_unit=per_unit,
        counts=per_unit.times(units),
        estimated_server_ms=server_ms,
        estimated_client_ms=client_ms,
        error_bound=error_bound,
    )


def shared_input_offsets(plan: Plan, output_sizes: Sequence[int]) -> tuple[int, ...] | None:
    """Where several layers that read one input put their outputs in one ciphertext.

    A PER_TOKEN input is tiled with period L across all N/2 slots, so nothing forces
    every slot to use the same weights: layer l can own a region of W_l = d_out_l + L - 1
    consecutive slots, its x·A diagonals there and its u·B diagonals on its outputs (the
    region's first d_out_l slots). The fold sums the L/r slots i, i + r, ..., i + L - r,
    which lie inside the region for every slot u·B reads (i + k, k < r, for an output i),
    so each layer's delta comes out exact in its own slots, and the whole group costs
    the operations of one layer (x·A, fold and u·B run once on the shared ciphertexts).

    Args:
        plan: A plan of one of the layers (its packing, L and slot count decide).
        output_sizes: d_out of each layer, in request order.

    Returns:
        Each layer's first output slot, or None when the plan is not PER_TOKEN, there are
        fewer than two layers, or the regions do not fit the slots (L near N/2: no room).
    """
    if plan.packing is not Packing.PER_TOKEN or len(output_sizes) < 2:
        return None
    offsets: list[int] = []
    start = 0
    for size in output_sizes:
        offsets.append(start)
        start += size + plan.block_length - 1
    return tuple(offsets) if start <= plan.slot_count else None


def choose_plan(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    tokens: int,
    params: CkksParams,
    complex_packing: bool = True,
    activation_bound: float = DEFAULT_ACTIVATION_BOUND,
    cost_model: CostModel | None = None,
) -> tuple[Plan, str]:
    """Compile every packing that fits and return the cheapest, with the reason.

    The criterion is :attr:`Plan.estimated_total_ms` (runtime evaluation plus client
    encryption and decryption); ties go to PER_TOKEN, which uploads fewer ciphertexts.

    Returns:
        ``(plan, reason)``; the reason names both estimates, or why a packing was not
        possible.

    Raises:
        InvalidArgument: No packing can serve the request (the first packing's error).
    """
    candidates: list[Plan] = []
    refusals: list[str] = []
    errors: list[InvalidArgument] = []
    for packing in (Packing.PER_TOKEN, Packing.BATCH_FIRST):
        try:
            candidates.append(
                compile_plan(
                    hidden_size=hidden_size,
                    output_size=output_size,
                    rank=rank,
                    alpha=alpha,
                    tokens=tokens,
                    params=params,
                    packing=packing,
                    complex_packing=complex_packing,
                    activation_bound=activation_bound,
                    cost_model=cost_model,
                )
            )
        except InvalidArgument as error:
            errors.append(error)
            refusals.append(f"{packing.value} not possible ({error.message})")
    if not candidates:
        raise errors[0]
    best = min(candidates, key=lambda plan: plan.estimated_total_ms)
    others = [plan for plan in candidates if plan is not best]
    parts = [f"{best.packing.value}: {_describe(best)}"]
    parts.extend(f"vs {plan.packing.value}: {_describe(plan)}" for plan in others)
    parts.extend(refusals)
    return best, "; ".join(parts)


def _describe(plan: Plan) -> str:
    per_token = plan.estimated_total_ms / plan.tokens
    return (
        f"est. {plan.estimated_total_ms:.1f} ms for {plan.tokens} tokens "
        f"({per_token:.2f} ms/token, {plan.counts.rotations} rotations, "
        f"{len(plan.rotation_steps)} Galois keys)"
    )


def break_even_tokens(
    *,
    hidden_size: int,
    output_size: int,
    rank: int,
    alpha: float,
    params: CkksParams,
    complex_packing: bool = True,
    cost_model: CostModel | None = None,
) -> int | None:
    """Return the smallest token count at which BATCH_FIRST is estimated cheaper.

    Within one token group the batch cost is constant and the per-token cost grows with
    the tokens, so the first crossing is found by bisection over one group.

    Returns:
        The token count, or None if PER_TOKEN stays cheaper for a full group (or is not
        possible, in which case BATCH_FIRST is the only choice and None is returned
        too).
    """

    def totals(tokens: int) -> tuple[float, float]:
        plans = [
            compile_plan(
                hidden_size=hidden_size,
                output_size=output_size,
                rank=rank,
                alpha=alpha,
                tokens=tokens,
                params=params,
                packing=packing,
                complex_packing=complex_packing,
                cost_model=cost_model,
            )
            for packing in (Packing.PER_TOKEN, Packing.BATCH_FIRST)
        ]
        return plans[0].estimated_total_ms, plans[1].estimated_total_ms

    try:
        group = 2 * params.slot_count if complex_packing else params.slot_count
        per_token, batch = totals(group)
    except InvalidArgument:
        return None
    if batch >= per_token:
        return None
    low, high = 1, group
    while low < high:
        middle = (low + high) // 2
        per_token, batch = totals(middle)
        if batch < per_token:
            high = middle
        else:
            low = middle + 1
    return low
