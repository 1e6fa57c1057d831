"""Checking HE-LoRA results when the client holds the adapter (its owning tenant).

The HE runtime could return anything of the right shape: the SDK's format checks (count,
level and size of the result ciphertexts) and the server-*reported* operation counts
prove nothing about the values (a server that returns the client's own input,
mod-switched to the output level, passes all of them). A client of the adapter's owning
tenant can do better: it may open the adapter's TGSP package itself
(``tensafe.client.registry.RegistryClient.open``, an audited unwrap) and check each
decrypted delta with Freivalds' randomized test (R. Freivalds, "Probabilistic machines
can use less running time", IFIP 1977): for a random vector ``v`` of length ``d_out``,

    delta · v  ==  s · x · Aᵀ · (Bᵀ · v)      (s = alpha / r, PEFT orientation)

per token, up to the CKKS error. The right side costs ``O(r·(d + d_out) + T·d)`` per
probe and needs no HE. (For a low-rank ΔW recomputing the delta costs
``O(T·r·(d + d_out))``, the same order: the check is a sampled spot audit of the hosted
service by a client of the owning tenant, not a saving over doing the work locally.) With ``v``
standard normal, a wrong row ``e = delta_t − expected_t`` passes one probe only if
``|e · v|`` falls below the tolerance, which for ``‖e‖`` well above the CKKS error has
probability about ``tolerance / ‖e‖`` (the projection is a normal variable of standard
deviation ``‖e‖``). ``sample_rate`` checks a random fraction of calls: a server that
cheats on ``n`` calls escapes with probability ``(1 − sample_rate)^n``.

A client **without** the adapter cannot run this check: it can detect malformed
results, not wrong ones (docs/he.md §7).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from tensafe import tgsp
from tensafe.common import errors

_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class VerifierStats:
    """How many calls were checked and skipped (sampling)."""

    checked: int = 0
    skipped: int = 0


class DeltaVerifier:
    """Freivalds checks of decrypted deltas against the plaintext adapter.

    Args:
        layers: Adapted module name → (lora_A ``[r, d]``, lora_B ``[d_out, r]``), PEFT's
            orientation.
        scaling: The LoRA scaling ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
        sample_rate: Fraction of calls checked, in (0, 1].
        probes: Random vectors per checked call (each multiplies the escape probability).
        rtol: Relative tolerance on each token's projection.
        atol: Absolute tolerance per unit of ``‖v‖₁`` (CKKS adds about 1e-6 per element
            at the default parameters; 1e-4 leaves a wide margin).
        rng: Randomness of the sampling and the probes (a fresh OS-seeded generator by
            default: the server must not predict ``v``).

    Raises:
        InvalidArgument: A bad rate, probe count or layer.
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
        *,
        scaling: float,
        sample_rate: float = 1.0,
        probes: int = 2,
        rtol: float = 1e-4,
        atol: float = 1e-4,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise errors.InvalidArgument("sample_rate", "must be in (0, 1]")
        if probes < 1:
            raise errors.InvalidArgument("probes", "must be at least 1")
        self._layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (lora_a, lora_b) in layers.items():
            a = np.asarray(lora_a, dtype=np.float64)
            b = np.asarray(lora_b, dtype=np.float64)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise errors.InvalidArgument("layers", f"{name}: A [r, d] and B [d_out, r]")
            self._layers[name] = (a, b)
        self._scaling = float(scaling)
        self._rate = sample_rate
        self._probes = probes
        self._rtol = rtol
        self._atol = atol
        self._rng = rng or np.random.default_rng()
        self.stats = VerifierStats()

    @classmethod
    def from_opened(cls, opened: tgsp.OpenedAdapter, **options: Any) -> DeltaVerifier:
        """A verifier for an adapter opened from its TGSP package (the owning tenant's
        ``RegistryClient.open``); the scaling comes from the sealed PEFT config."""
        config = json.loads(tgsp.peft_adapter_config_text(opened.manifest))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        return cls(peft_layers(opened.numpy_tensors()), scaling=scaling, **options)

    def check(self, layer: str, activations: npt.ArrayLike, delta: npt.ArrayLike) -> bool:
        """Check one call's delta (or skip it, by the sampling rate).

        Args:
            layer: The adapted module.
            activations: x, ``[T, d]``.
            delta: The decrypted delta, ``[T, d_out]``.

        Returns:
            True if checked, False if skipped.

        Raises:
            IntegrityError: ``he result``: the delta is not ``s · x · Aᵀ · Bᵀ``.
            InvalidArgument: An unknown layer or mismatched shapes.
        """
        if self._rate < 1.0 and self._rng.random() >= self._rate:
            self.stats.skipped += 1
            return False
        if layer not in self._layers:
            raise errors.InvalidArgument("layer", f"{layer!r} is not in the verifier's adapter")
        lora_a, lora_b = self._layers[layer]
        x = np.asarray(activations, dtype=np.float64)
        result = np.asarray(delta, dtype=np.float64)
        if x.shape[1:] != (lora_a.shape[1],) or result.shape != (x.shape[0], lora_b.shape[0]):
            raise errors.InvalidArgument("delta", f"shapes {x.shape} and {result.shape}")
        for _ in range(self._probes):
            v = self._rng.standard_normal(lora_b.shape[0])
            got = result @ v
            expected = self._scaling * (x @ (lora_a.T @ (lora_b.T @ v)))
            bound = self._atol * np.sum(np.abs(v)) + self._rtol * (np.abs(expected) + np.abs(got))
            worst = np.abs(got - expected) - bound
            if np.any(worst > 0):
                token = int(np.argmax(worst))
                raise errors.IntegrityError(
                    f"he result: the delta of {layer!r} fails a random projection check at "
                    f"token {token} (|Δ·v − s·x·Aᵀ·Bᵀ·v| = {abs(got[token] - expected[token]):.3g},"
                    f" tolerance {bound[token]:.3g}): the runtime returned a wrong result",
                    metadata={"check": "he result"},
                )
        self.stats.checked += 1
        return True


def peft_layers(tensors: Mapping[str, npt.ArrayLike]) -> dict[str, tuple[Any, Any]]:
    """PEFT tensors (``base_model.model.<module>.lora_A.weight`` ...) → module → (A, B)."""
    layers: dict[str, tuple[Any, Any]] = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            layers[module] = (value, tensors[key.replace(".lora_A.", ".lora_B.")])
    return layers


__all__ = ["DeltaVerifier", "VerifierStats", "peft_layers"]
