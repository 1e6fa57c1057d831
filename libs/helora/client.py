"""Client side of HE-LoRA: owns the CKKS secret key, encrypts and decrypts.

The client generates its keys locally and never serialises the secret key: the only
objects it produces for the wire are the parameter set, the Galois keys for exactly a
plan's rotation steps, and ciphertexts, each framed by :mod:`tensafe.helora.wire` with
its kind. No public key or relinearisation key is produced either: activations are
encrypted with the secret key (SEAL symmetric encryption, same security as public-key
encryption for the key holder and ~2x cheaper), and the runtime only multiplies by
plaintexts, which never needs relinearisation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import seal

from tensafe.common.errors import FailedPrecondition, InvalidArgument
from tensafe.helora import packing
from tensafe.helora.ckks import CkksContext
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import Plan
from tensafe.helora.wire import WireKind, pack, unpack


@dataclasses.dataclass(frozen=True, kw_only=True)
class PublicMaterial:
    """Everything a runtime needs to evaluate a plan for this client, as wire bytes.

    Attributes:
        parameters: Framed :data:`WireKind.PARAMETERS`.
        galois_keys: Framed :data:`WireKind.GALOIS_KEYS` for exactly the plan's
            rotation steps, or None when the plan needs no rotation (BATCH_FIRST).
        rotation_steps: The steps the Galois keys cover.
    """

    parameters: bytes
    galois_keys: bytes | None
    rotation_steps: tuple[int, ...]

    def blobs(self) -> list[bytes]:
        """Return every blob that crosses the wire, for audits and tests."""
        return [self.parameters] + ([self.galois_keys] if self.galois_keys is not None else [])


def parameters_blob(params: CkksParams, context: CkksContext) -> bytes:
    """Frame a parameter set as canonical JSON stamped with its SEAL fingerprint."""
    payload = json.dumps(params.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return pack(WireKind.PARAMETERS, context.fingerprint, payload)


class HeLoraClient:
    """Holds a CKKS key pair for one parameter set and speaks a plan's packing.

    Args:
        params: The parameter set (validated for 128-bit security on construction).

    Raises:
        InvalidArgument: SEAL refuses the parameters.
    """

    def __init__(self, params: CkksParams) -> None:
        self._context = CkksContext(params)
        keygen = seal.KeyGenerator(self._context.seal_context)
        self._keygen = keygen
        self._encryptor = seal.Encryptor(self._context.seal_context, keygen.secret_key())
        self._decryptor = seal.Decryptor(self._context.seal_context, keygen.secret_key())
        self._evaluator = seal.Evaluator(self._context.seal_context)

    @property
    def params(self) -> CkksParams:
        """The parameter set the keys belong to."""
        return self._context.params

    @property
    def fingerprint(self) -> bytes:
        """Fingerprint of the SEAL parameters (stamped on every blob)."""
        return self._context.fingerprint

    def parameters_blob(self) -> bytes:
        """Return the framed parameter set."""
        return parameters_blob(self._context.params, self._context)

    def public_material(self, plan: Plan) -> PublicMaterial:
        """Return the parameters and the Galois keys for exactly ``plan``'s steps.

        Raises:
            FailedPrecondition: The plan was compiled for another parameter set.
        """
        self._check_plan(plan)
        galois: bytes | None = None
        if plan.rotation_steps:
            keys = seal.GaloisKeys()
            self._keygen.create_galois_keys(list(plan.rotation_steps), keys)
            galois = pack(WireKind.GALOIS_KEYS, self._context.fingerprint, keys.to_string())
        return PublicMaterial(
            parameters=self.parameters_blob(),
            galois_keys=galois,
            rotation_steps=plan.rotation_steps,
        )

    def encrypt_activations(self, plan: Plan, activations: npt.ArrayLike) -> list[bytes]:
        """Encode and encrypt activations exactly as ``plan`` expects.

        Args:
            plan: The plan the runtime will run.
            activations: x, shape [plan.tokens, plan.hidden_size], |x| within the plan's
                activation bound.

        Returns:
            ``plan.input_ciphertexts`` framed ciphertexts, in plan order.

        Raises:
            InvalidArgument: Wrong shape, non-finite or out-of-bound activations.
            FailedPrecondition: The plan was compiled for another parameter set.
        """
        self._check_plan(plan)
        values = packing.check_activations(plan, activations)
        level = self._context.parms_id_for_primes(plan.input_primes)
        scale = 2.0**plan.input_scale_bits
        encoder = self._context.encoder
        blobs: list[bytes] = []
        for vector in packing.activation_slots(plan, values):
            if np.iscomplexobj(vector):
                plain = encoder.encode_complex(np.ascontiguousarray(vector), scale)
            else:
                plain = encoder.encode(np.ascontiguousarray(vector), scale)
            # SEAL encrypts a CKKS plaintext at the plaintext's level, so switching the
            # plaintext down first makes a smaller, cheaper ciphertext at the input level.
            self._evaluator.mod_switch_to_inplace(plain, list(level))
            ciphertext = self._encryptor.encrypt_symmetric(plain)
            blobs.append(
                pack(WireKind.CIPHERTEXT, self._context.fingerprint, ciphertext.to_string())
            )
        return blobs

    def decrypt_delta(self, plan: Plan, ciphertexts: Sequence[bytes]) -> npt.NDArray[np.float64]:
        """Decrypt the runtime's results into the LoRA delta, shape [tokens, d_out].

        Raises:
            InvalidArgument: Wrong count, malformed or wrong-kind blobs, or ciphertexts
                not at the plan's output level.
            FailedPrecondition: The plan or a blob belongs to another parameter set.
        """
        self._check_plan(plan)
        if len(ciphertexts) != plan.output_ciphertexts:
            raise InvalidArgument(
                "ciphertexts",
                f"got {len(ciphertexts)}, plan returns {plan.output_ciphertexts}",
            )
        expected_level = self._context.parms_id_for_primes(plan.output_primes)
        decoded: list[packing.SlotArray] = []
        for index, blob in enumerate(ciphertexts):
            field = f"ciphertexts[{index}]"
            frame = unpack(blob, field=field, expected=WireKind.CIPHERTEXT)
            if frame.fingerprint != self._context.fingerprint:
                raise FailedPrecondition(
                    f"{field} was made under another parameter set",
                    reason="PARAMETER_SET_MISMATCH",
                )
            ciphertext = seal.Ciphertext()
            try:
                ciphertext.load_bytes(self._context.seal_context, frame.payload)
            except (ValueError, RuntimeError) as error:
                raise InvalidArgument(field, f"not a valid ciphertext: {error}") from None
            if tuple(ciphertext.parms_id()) != expected_level or ciphertext.size() != 2:
                raise InvalidArgument(field, "not at the plan's output level")
            plain = self._decryptor.decrypt(ciphertext)
            if plan.complex_packing:
                decoded.append(self._context.encoder.decode_complex(plain))
            else:
                decoded.append(self._context.encoder.decode(plain))
        return packing.output_values(plan, decoded)

    def _check_plan(self, plan: Plan) -> None:
        if plan.params != self._context.params:
            raise FailedPrecondition(
                "the plan was compiled for another CKKS parameter set than this client's keys",
                reason="PARAMETER_SET_MISMATCH",
            )
