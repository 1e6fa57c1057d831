"""Cost of encoding a training client's state, which the worker does after every
state-changing job (the state object each commit references).

The state of a DP client of the tiny bench model (hidden 256, 4 layers, LoRA r=8 on
q/k/v/o) is 128 fp32 tensors: adapter, gradient accumulator and the two AdamW moments.
This bench encodes it with ``encode_state`` (safetensors.numpy for numpy dtypes) and with
``safetensors.torch.save``, the encoder it replaced, interleaved in one process, checks
that both give the same bytes, and reports medians and their ratio.

Run: ``python bench/state_encoding.py [--rounds 200] [--rank 8]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from safetensors.torch import save as save_safetensors

from tensafe.trainer.domain.engine.state import STATE_FORMAT, encode_state


def _state(rank: int, hidden: int, layers: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module in "qkvo":
            for part, shape in (("lora_A", (rank, hidden)), ("lora_B", (hidden, rank))):
                name = f"model.layers.{layer}.self_attn.{module}_proj.{part}.weight"
                for prefix in ("lora.", "accumulator.", "exp_avg.", "exp_avg_sq."):
                    tensors[prefix + name] = torch.randn(shape, generator=generator)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tensors = _state(args.rank, args.hidden, args.layers)
    metadata = {"step": "1"}
    header = {"tensafe": json.dumps({**metadata, "format": STATE_FORMAT}, sort_keys=True)}

    def torch_save() -> bytes:
        return save_safetensors(tensors, metadata=header)

    def ours() -> bytes:
        return encode_state(tensors, metadata)

    if ours() != torch_save():
        raise SystemExit("encode_state and safetensors.torch.save wrote different bytes")
    times: dict[str, list[float]] = {"safetensors.torch.save": [], "encode_state": []}
    for _ in range(args.rounds):
        for label, encode in (("safetensors.torch.save", torch_save), ("encode_state", ours)):
            started = time.perf_counter()
            encode()
            times[label].append(time.perf_counter() - started)
    size = len(ours())
    print(f"{len(tensors)} fp32 tensors, {size / 1e6:.2f} MB; {args.rounds} interleaved rounds")
    print(f"{'encoder':<26} {'median ms':>10}")
    for label, values in times.items():
        print(f"{label:<26} {statistics.median(values) * 1e3:>10.2f}")
    ratio = statistics.median(times["safetensors.torch.save"]) / statistics.median(
        times["encode_state"]
    )
    print(f"{'speed-up (same bytes)':<26} {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
