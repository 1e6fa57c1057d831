"""The Microsoft SEAL context behind a :class:`~tensafe.helora.params.CkksParams`.

Both sides of the wire build the same :class:`CkksContext` from the same parameter set:
the client to encrypt and decrypt, the HE runtime to evaluate. It owns the SEAL objects
that hold no secret (context, encoder) and answers the questions both sides ask: which
``parms_id`` is the level with k data primes, what is the value of the prime a rescale
drops there, which Galois element implements a rotation by k slots.

SEAL (and seal-python) hold the GIL for the whole of every call, so threads do not run
two homomorphic operations at once; parallelism needs processes, each with its own
context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import seal

from tensafe.common.errors import InvalidArgument
from tensafe.helora.params import CkksParams

#: Bytes of the SHA-256 digest of the serialised SEAL parameters kept as the fingerprint.
FINGERPRINT_BYTES = 16

ParmsId = tuple[int, int, int, int]


def build_encryption_parameters(params: CkksParams) -> seal.EncryptionParameters:
    """Return SEAL CKKS encryption parameters for a parameter set.

    SEAL's ``CoeffModulus.Create`` picks, for each requested bit size, the largest
    primes below ``2^bits`` that are 1 mod 2N; it is deterministic, so client and
    server derive identical primes (the fingerprint checks that they did).

    Raises:
        InvalidArgument: SEAL cannot find primes of the requested sizes for this N.
    """
    parms = seal.EncryptionParameters(seal.scheme_type.ckks)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        primes = seal.CoeffModulus.Create(
            params.poly_modulus_degree, list(params.coeff_modulus_bits)
        )
    except (ValueError, RuntimeError) as error:
        raise InvalidArgument(
            "coeff_modulus_bits", f"SEAL cannot build this coefficient modulus: {error}"
        ) from None
    parms.set_coeff_modulus(primes)
    return parms


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """Return the Galois element SEAL uses for a CKKS rotation by ``step`` slots.

    Mirrors ``GaloisTool::get_elt_from_step``: a left rotation by k is the automorphism
    ``X -> X^(3^k mod 2N)``; a right rotation by k is the left rotation by N/2 - k.

    Args:
        step: Non-zero rotation step, ``|step| < N/2``.
        poly_modulus_degree: Ring degree N.

    Returns:
        The odd Galois element in ``[1, 2N)``.

    Raises:
        InvalidArgument: ``step`` is zero or out of range.
    """
    slots = poly_modulus_degree // 2
    if step == 0 or abs(step) >= slots:
        raise InvalidArgument("rotation_steps", f"step {step} is outside (-{slots}, {slots})")
    exponent = step if step > 0 else slots + step
    return pow(3, exponent, 2 * poly_modulus_degree)


class CkksContext:
    """A validated SEAL context for one parameter set, plus its level bookkeeping.

    Args:
        params: The parameter set. SEAL validates it again for 128-bit security
            (``sec_level_type.tc128``), which is the same table as our own check.

    Raises:
        InvalidArgument: SEAL refuses the parameters.
    """

    def __init__(self, params: CkksParams) -> None:
        self.params = params
        self.encryption_parameters = build_encryption_parameters(params)
        self.seal_context = seal.SEALContext(
            self.encryption_parameters, True, seal.sec_level_type.tc128
        )
        if not self.seal_context.parameters_set():
            raise InvalidArgument(
                "coeff_modulus_bits",
                f"SEAL rejects the parameters: {self.seal_context.parameter_error_message()}",
            )
        self.encoder = seal.CKKSEncoder(self.seal_context)
        self.slot_count: int = self.encoder.slot_count()
        digest = hashlib.sha256(self.encryption_parameters.to_bytes()).digest()
        self.fingerprint: bytes = digest[:FINGERPRINT_BYTES]
        # Level chain from the top data level down: entry k-1 is the level with k data
        # primes. ``data_primes`` are the prime values in SEAL order.
        self._parms_ids_by_primes: dict[int, ParmsId] = {}
        context_data = self.seal_context.first_context_data()
        while context_data is not None:
            primes = len(context_data.parms().coeff_modulus())
            self._parms_ids_by_primes[primes] = tuple(context_data.parms_id())
            context_data = context_data.next_context_data()
        self.data_primes: tuple[int, ...] = tuple(
            modulus.value() for modulus in self.encryption_parameters.coeff_modulus()[:-1]
        )

    def parms_id_for_primes(self, primes: int) -> ParmsId:
        """Return the ``parms_id`` of the level that still has ``primes`` data primes.

        Raises:
            InvalidArgument: The chain has no such level.
        """
        try:
            return self._parms_ids_by_primes[primes]
        except KeyError:
            raise InvalidArgument(
                "params.coeff_modulus_bits",
                f"the modulus chain has no level with {primes} data primes",
            ) from None

    def primes_at(self, parms_id: Sequence[int]) -> int | None:
        """Return the number of data primes at ``parms_id``, or None if not in the chain."""
        wanted = tuple(parms_id)
        for primes, candidate in self._parms_ids_by_primes.items():
            if candidate == wanted:
                return primes
        return None

    def rescale_prime(self, primes: int) -> int:
        """Return the prime a rescale drops at the level with ``primes`` data primes.

        Encoding a plaintext at exactly this value as its scale makes the product's
        scale return to the ciphertext's scale after the rescale, with no drift.
        """
        return self.data_primes[primes - 1]

    def galois_element(self, step: int) -> int:
        """Return the Galois element for a rotation by ``step`` slots in this ring."""
        return galois_element(step, self.params.poly_modulus_degree)
