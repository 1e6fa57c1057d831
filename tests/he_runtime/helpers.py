"""Shared steps of the HE runtime tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tensafe.common.errors import TenSafeError

from .conftest import ADAPTER, ALPHA, RANK


def adapter_layers(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT's own tensors, read independently of the runtime: module -> (lora_A [r, d],
    lora_B [d_out, r])."""
    tensors = load_file(str(data_dir / "adapters" / ADAPTER / "adapter_model.safetensors"))
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b_key = key.replace("lora_A", "lora_B")
            layers[module] = (tensors[key].astype(np.float64), tensors[b_key].astype(np.float64))
    return layers


def reference(data_dir: Path, layer: str, x: np.ndarray) -> np.ndarray:
    """(alpha/r) · x · A^T · B^T in float64 from the PEFT tensors."""
    lora_a, lora_b = adapter_layers(data_dir)[layer]
    return (ALPHA / RANK) * (x @ lora_a.T) @ lora_b.T


def activations(tokens: int, *, seed: int, width: int = 64) -> np.ndarray:
    """Activations of RMSNorm-output magnitude."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (tokens, width))


def raises(kind: type[TenSafeError], call: object, *args: object, **kwargs: object) -> TenSafeError:
    """Run ``call`` and return the typed error it must raise."""
    assert callable(call)
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    return info.value
