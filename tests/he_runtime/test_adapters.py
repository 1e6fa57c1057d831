"""The adapter source: PEFT directories are read exactly, unsupported variants refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tensafe.he_runtime.domain.adapters import LocalPeftAdapterSource, parse_peft_adapter

from .conftest import ADAPTER, ALPHA, RANK
from .helpers import adapter_layers

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def weights(rank: int = 4, d: int = 6, d_out: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"{PREFIX}.lora_A.weight": rng.normal(size=(rank, d)).astype(np.float32),
        f"{PREFIX}.lora_B.weight": rng.normal(size=(d_out, rank)).astype(np.float32),
    }


def config(**changes: object) -> dict[str, object]:
    values: dict[str, object] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none"}
    values.update(changes)
    return values


async def test_the_peft_directory_is_read_in_the_deltas_orientation(data_dir: Path) -> None:
    adapter = await LocalPeftAdapterSource(data_dir / "adapters").load(
        tenant_id="t", name=ADAPTER, version=0
    )
    assert (adapter.rank, adapter.alpha) == (RANK, ALPHA)
    expected = adapter_layers(data_dir)
    assert sorted(adapter.layers) == sorted(expected)
    for layer, (lora_a, lora_b) in expected.items():
        np.testing.assert_array_equal(adapter.layers[layer].lora_a, lora_a.T)
        np.testing.assert_array_equal(adapter.layers[layer].lora_b, lora_b.T)
    assert adapter.shape("model.layers.0.self_attn.k_proj").output_size == 32
    assert (adapter.max_input_size, adapter.max_output_size) == (64, 64)


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    adapter = parse_peft_adapter(
        name="a", version=0, config=config(use_rslora=True), weights=save(weights())
    )
    assert adapter.alpha / adapter.rank == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize(
    "changes",
    [
        {"use_dora": True},
        {"fan_in_fan_out": True},
        {"rank_pattern": {"q_proj": 2}},
        {"alpha_pattern": {"q_proj": 2}},
        {"bias": "all"},
        {"peft_type": "IA3"},
        {"r": 0},
        {"lora_alpha": -1},
    ],
)
def test_unsupported_variants_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_peft_adapter(name="a", version=0, config=config(**changes), weights=save(weights()))
    assert info.value.reason == "ADAPTER_UNSUPPORTED"


def test_malformed_weights_are_refused() -> None:
    cases = [
        b"not safetensors",
        save({f"{PREFIX}.lora_A.weight": weights()[f"{PREFIX}.lora_A.weight"]}),  # no B
        save(weights(rank=3)),  # rank differs from the config
        save({**weights(), "model.embed_tokens.weight": np.zeros((2, 2), np.float32)}),
        save({k: np.full_like(v, np.nan) for k, v in weights().items()}),
        save({}),
    ]
    for blob in cases:
        with pytest.raises(FailedPrecondition):
            parse_peft_adapter(name="a", version=0, config=config(), weights=blob)


async def test_names_and_versions_of_the_local_source(data_dir: Path, tmp_path: Path) -> None:
    source = LocalPeftAdapterSource(tmp_path)
    for name in ("..", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(InvalidArgument):
            await source.load(tenant_id="t", name=name, version=0)
    with pytest.raises(NotFound):
        await source.load(tenant_id="t", name="absent", version=0)
    shutil.copytree(data_dir / "adapters" / ADAPTER, tmp_path / "copy")
    with pytest.raises(InvalidArgument):
        await source.load(tenant_id="t", name="copy", version=3)
    (tmp_path / "copy" / "adapter_config.json").write_text("{not json")
    with pytest.raises(FailedPrecondition):
        await source.load(tenant_id="t", name="copy", version=0)
    assert (
        json.loads((data_dir / "adapters" / ADAPTER / "adapter_config.json").read_text())["r"]
        == RANK
    )
