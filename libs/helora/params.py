"""CKKS parameter sets for HE-LoRA, validated against the HE security standard.

A parameter set is the ring degree ``N`` (``poly_modulus_degree``), the bit sizes of the
RNS primes of the coefficient modulus (the last one is SEAL's *special* prime, used only
for key switching) and the scale of fresh activations. Validation happens in
``__post_init__``, so an insecure :class:`CkksParams` cannot exist: every constructor path
(SDK, JSON from the wire, the plan compiler) goes through it.

Security bound: Albrecht et al., *Homomorphic Encryption Security Standard*,
HomomorphicEncryption.org, November 2018, Table 1 (ternary secret, error width 3.2,
classical 128-bit security): the largest total coefficient modulus ``log2 q`` per ``N``.
Microsoft SEAL enforces the same table for ``sec_level_type.tc128``
(``CoeffModulus::MaxBitCount``); the tests check that the two agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tensafe.common.errors import InvalidArgument

#: Largest total coefficient-modulus bit count for 128-bit classical security, per ring
#: degree N (HomomorphicEncryption.org security standard, 2018, Table 1).
MAX_COEFF_MODULUS_BITS_128: Mapping[int, int] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
)

#: SEAL represents every RNS prime in at most 60 bits (``SEAL_USER_MOD_BIT_COUNT_MAX``).
MAX_PRIME_BITS = 60
#: Primes below this are too small to carry a useful CKKS scale and make SEAL's prime
#: search (p = 1 mod 2N) fail for large N.
MIN_PRIME_BITS = 20
#: Below this a fresh activation keeps fewer than ~6 significant decimal digits after
#: encoding and the 1e-3 relative accuracy target of HE-LoRA is not reachable.
MIN_SCALE_BITS = 20


def _require_int(value: object, field: str) -> int:
    # bool is an int subclass; ``True`` as a ring degree is a caller bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class CkksParams:
    """One CKKS parameter set (SEAL ``EncryptionParameters`` plus the activation scale).

    Attributes:
        poly_modulus_degree: Ring degree N, a power of two in 1024..32768. A ciphertext
            has N/2 complex slots.
        coeff_modulus_bits: Bit size of each RNS prime, in SEAL order: data primes first
            (the first one holds the final result), the special key-switching prime
            last. Each rescale drops the last remaining data prime.
        scale_bits: log2 of the scale at which activations are encoded.
    """

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        degree = _require_int(self.poly_modulus_degree, "poly_modulus_degree")
        if degree not in MAX_COEFF_MODULUS_BITS_128:
            raise InvalidArgument(
                "poly_modulus_degree",
                f"must be one of {sorted(MAX_COEFF_MODULUS_BITS_128)} (a power of two for "
                f"which the HE security standard gives a 128-bit bound), got {degree}",
            )
        if not isinstance(self.coeff_modulus_bits, tuple):
            raise InvalidArgument("coeff_modulus_bits", "must be a tuple of prime bit sizes")
        bits = [_require_int(b, "coeff_modulus_bits") for b in self.coeff_modulus_bits]
        if len(bits) < 2:
            raise InvalidArgument(
                "coeff_modulus_bits",
                "needs at least two primes: one or more data primes and the special prime",
            )
        for size in bits:
            if not MIN_PRIME_BITS <= size <= MAX_PRIME_BITS:
                raise InvalidArgument(
                    "coeff_modulus_bits",
                    f"each prime must have {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits, got {size}",
                )
        total = sum(bits)
        bound = MAX_COEFF_MODULUS_BITS_128[degree]
        if total > bound:
            raise InvalidArgument(
                "coeff_modulus_bits",
                f"total {total} bits exceeds {bound}, the 128-bit security bound for "
                f"poly_modulus_degree {degree} (HomomorphicEncryption.org standard, Table 1)",
            )
        if bits[-1] < max(bits[:-1]):
            # Key-switching noise is scaled down by the special prime; a special prime
            # smaller than a data prime lets rotation noise swamp the message.
            raise InvalidArgument(
                "coeff_modulus_bits",
                "the last (special) prime must be at least as large as every data prime",
            )
        scale = _require_int(self.scale_bits, "scale_bits")
        if not MIN_SCALE_BITS <= scale < bits[0]:
            raise InvalidArgument(
                "scale_bits",
                f"must be in {MIN_SCALE_BITS}..{bits[0] - 1} (below the first prime, which "
                f"must hold the result with headroom), got {scale}",
            )

    @property
    def slot_count(self) -> int:
        """Number of CKKS slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_prime_bits(self) -> tuple[int, ...]:
        """Bit sizes of the data primes (every prime but the special one)."""
        return self.coeff_modulus_bits[:-1]

    @property
    def total_bits(self) -> int:
        """Total coefficient modulus bits, the quantity the security standard bounds."""
        return sum(self.coeff_modulus_bits)

    @property
    def max_depth(self) -> int:
        """Number of rescales available (data primes minus the one holding the result)."""
        return len(self.coeff_modulus_bits) - 2

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :meth:`from_dict` inverts it."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, field_prefix: str = "") -> CkksParams:
        """Build and validate a parameter set from :meth:`to_dict` output.

        Args:
            data: The dict, typically parsed from JSON.
            field_prefix: Prepended to field names in errors (e.g. ``"params."``), so
                a nested dict reports ``params.coeff_modulus_bits``.

        Returns:
            The validated parameter set.

        Raises:
            InvalidArgument: A field is missing, has the wrong type or is insecure.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(field_prefix.rstrip(".") or "params", "must be an object")
        try:
            bits = data["coeff_modulus_bits"]
            if not isinstance(bits, list | tuple):
                raise InvalidArgument(f"{field_prefix}coeff_modulus_bits", "must be a list")
            return cls(
                poly_modulus_degree=data["poly_modulus_degree"],
                coeff_modulus_bits=tuple(bits),
                scale_bits=data["scale_bits"],
            )
        except KeyError as missing:
            raise InvalidArgument(f"{field_prefix}{missing.args[0]}", "is required") from None
        except InvalidArgument as error:
            if error.field.startswith(field_prefix):
                raise
            raise InvalidArgument(f"{field_prefix}{error.field}", error.description) from None


def default_params() -> CkksParams:
    """Return the default set: N=8192, primes [60, 40, 40, 60], scale 2^40.

    Why these numbers: the per-token plan has multiplicative depth 2 (x·A then ·B, both
    ciphertext-by-plaintext), so it needs two 40-bit primes to rescale by, plus a 60-bit
    first prime that holds the result at scale 2^40 with 2^19 of headroom, plus a
    60-bit special prime for key switching. Total 200 bits, under the 218-bit bound for
    N=8192. The 4096 slots fit a 4096-wide hidden state in one ciphertext.
    """
    return CkksParams(poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 40, 60), scale_bits=40)


def compact_params() -> CkksParams:
    """Return the SDK's default set: N=8192, primes [60, 40, 60], scale 2^40.

    Enough for compiler version 2's default plans, which need only two data primes:
    PER_TOKEN ``CLIENT_BABY_STEPS`` (one rescale; u·B in fixed point at the last prime)
    and BATCH_FIRST (one rescale). Against :func:`default_params`, dropping the unused
    third prime halves every Galois key (SEAL's key for one step holds one key-switching
    key per data prime, each over all primes: 2 x 3 instead of 3 x 4 RNS polynomials
    pairs; measured 10.6 vs 21.1 MiB for the d = 4096, r = 16 plan) and makes the
    client's encryption cheaper, with the same error (2.9e-4 vs 2.8e-4). 160 bits, far
    under the 218-bit 128-bit bound for N=8192. The compiler-version-1 PER_TOKEN layout
    (SERVER_BABY_STEPS, two rescales) needs :func:`default_params`.
    """
    return CkksParams(poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 60), scale_bits=40)
