"""End to end from the SDK: greedy generation on the tiny model with every LoRA delta
computed by the HE runtime on encrypted activations equals plaintext LoRA (peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensafe.client.he import HeLoraModel

from .conftest import ADAPTER, ALPHA, RANK, TARGET_MODULES, Runtime, new_tenant
from .helpers import reference

NEW_TOKENS = 8
PROMPT = "The river ran past the old"


def greedy(model: Any, input_ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, input_ids.shape[1] :]]


@pytest.mark.slow
def test_he_lora_generation_equals_plaintext_lora(
    runtime: Runtime, base_model_dir: Path, data_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    base_tokens = greedy(base, input_ids)
    lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model_dir), data_dir / "adapters" / ADAPTER
    ).eval()
    lora_tokens = greedy(lora, input_ids)
    assert lora_tokens != base_tokens  # the adapter matters, so a zero delta would fail

    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    he_model = HeLoraModel.create(
        model,
        runtime.rpc(new_tenant()),
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGET_MODULES,
    )
    # Observe each adapted layer after the HE hook: the HE delta is the output minus the
    # base layer's own output; compare with the float64 delta from peft's tensors.
    errors: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def observe(layer: str) -> Any:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().to(torch.float64)
            base_out = nn.functional.linear(x, module.weight.to(torch.float64))
            he_delta = (output.to(torch.float64) - base_out).reshape(-1, module.out_features)
            expected = reference(data_dir, layer, x.reshape(-1, module.in_features).numpy())
            errors[layer] = max(
                errors.get(layer, 0.0), float(np.max(np.abs(he_delta.numpy() - expected)))
            )
            peaks[layer] = max(peaks.get(layer, 0.0), float(np.max(np.abs(expected))))

        return hook

    handles = [
        model.get_submodule(layer).register_forward_hook(observe(layer))
        for layer in he_model.session.layers
    ]
    try:
        he_tokens = greedy(he_model.model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
        he_model.close()

    assert he_tokens == lora_tokens
    assert sorted(errors) == he_model.session.layers and len(errors) == 8
    for layer, error in errors.items():
        # float32 outputs bound the observable error at ~1e-6 of the output; the HE
        # error itself is far below the 1e-3 relative target.
        assert error <= 1e-3 * peaks[layer], (layer, error, peaks[layer])
    stats = he_model.session.stats
    assert sum(s.calls for s in stats.values()) == 8 * NEW_TOKENS
    # k_proj and v_proj read q_proj's input: their calls re-send its ciphertexts, and
    # after the first forward pass (where the SDK learns that) all three go in one
    # request (per generated token: 2 layers x (1 + 1) requests instead of 2 x 4).
    for layer, layer_stats in stats.items():
        shared = layer.endswith(("k_proj", "v_proj"))
        assert layer_stats.reused_inputs == (layer_stats.calls if shared else 0), layer
        grouped = layer.endswith(("q_proj", "k_proj", "v_proj"))
        assert layer_stats.grouped_calls == (layer_stats.calls - 1 if grouped else 0), layer
    print()
    print(f"prompt tokens {input_ids.shape[1]}, generated {he_tokens}")
    header = ("layer", "max|err|", "max|delta|", "calls", "server ms", "rt ms")
    print("{:38} {:>10} {:>10} {:>5} {:>9} {:>7}".format(*header))
    for layer in sorted(errors):
        s = stats[layer]
        print(
            f"{layer:38} {errors[layer]:10.2e} {peaks[layer]:10.3f} {s.calls:5d} "
            f"{s.server_ms / s.calls:9.2f} {s.round_trip_ms / s.calls:7.2f}"
        )
