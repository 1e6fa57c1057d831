"""HE-LoRA core shared by the SDK and the HE runtime.

The LoRA delta ``(alpha/r) * x @ A @ B`` of an adapted layer, computed on CKKS-encrypted
activations with the adapter weights in plaintext (Microsoft SEAL via seal-python):

- :mod:`tensafe.helora.params`: CKKS parameter sets, refused below 128-bit security.
- :mod:`tensafe.helora.plan`: the deterministic plan compiler (packing, rotation steps,
  depth, operation counts, cost estimate) and :func:`~tensafe.helora.plan.choose_plan`.
- :mod:`tensafe.helora.packing`: where every number sits in the slots.
- :mod:`tensafe.helora.client`: key generation, encryption and decryption (client side).
- :mod:`tensafe.helora.wire`: the typed framing of every blob that crosses the wire.

The server side (applying a plan with public keys only) lives in
``tensafe.he_runtime.domain.executor``.
"""

from tensafe.helora.params import (
    MAX_COEFF_MODULUS_BITS_128,
    CkksParams,
    compact_params,
    default_params,
)
from tensafe.helora.plan import (
    CostModel,
    OpCounts,
    Packing,
    Plan,
    break_even_tokens,
    choose_plan,
    compile_plan,
)

__all__ = [
    "MAX_COEFF_MODULUS_BITS_128",
    "CkksParams",
    "CostModel",
    "OpCounts",
    "Packing",
    "Plan",
    "break_even_tokens",
    "choose_plan",
    "compact_params",
    "compile_plan",
    "default_params",
]
