"""Cost of a DP training step as more clients' adapters share one base model.

A worker keeps every resident client as one peft adapter on a shared base (DESIGN §9)
and switches the active adapter before each job. This bench puts N adapters on the
tiny bench model (hidden 256, 4 layers, LoRA r=8 on q/k/v/o) and times ForwardBackward +
OptimStep (DP-SGD, 4 sequences x 32 tokens, one torch thread) rotating over the last
four clients, so that every step switches the adapter, for N = 1, 8, 32, 64 in one
process; the table reports medians and each N's ratio to N = 1 measured in the same run,
plus, at that N, the time to add one more client's engine and to close it (its adapter
removed), and one switch of the model between training and evaluation mode (a joint
pass of several clients runs in evaluation mode between training passes).

Run: ``python bench/adapter_switch.py [--adapters 1,8,32,64] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tensafe.client.tiny_model import build_tiny_model
from tensafe.trainer.domain.engine.base import SharedBase
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

LORA = LoraConfig(rank=8, alpha=16.0)
DP = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0)
ADAM = AdamConfig(learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-12)


def _step(engine: LoraTrainingEngine, generator: torch.Generator) -> float:
    """One DP step on fresh random sequences; returns its seconds."""
    sequences = [torch.randint(3, 700, (33,), generator=generator).tolist() for _ in range(4)]
    inputs = [{"target_tokens": s[1:], "weights": [1.0] * 32} for s in sequences]
    started = time.perf_counter()
    engine.forward_backward([s[:-1] for s in sequences], "cross_entropy", inputs)
    engine.optim_step(ADAM)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,8,32,64", help="adapter counts, ascending")
    parser.add_argument("--rounds", type=int, default=5, help="steps per client per count")
    args = parser.parse_args()
    counts = [int(n) for n in args.adapters.split(",")]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tensafe-switch-") as root:
        base = SharedBase(build_tiny_model(Path(root) / "model", seed=0))
        engines: list[LoraTrainingEngine] = []
        rows: list[tuple[int, float, float, float, float]] = []
        try:
            for count in counts:
                while len(engines) < count:
                    engines.append(LoraTrainingEngine(base, lora=LORA, dp=DP, seed=len(engines)))
                builds, closes = [], []
                for _ in range(3):
                    started = time.perf_counter()
                    extra = LoraTrainingEngine(base, lora=LORA, dp=DP, seed=10_000)
                    builds.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    extra.close()
                    closes.append(time.perf_counter() - started)
                steps = [
                    _step(engine, generator) for _ in range(args.rounds) for engine in engines[-4:]
                ]
                flips = []
                for training in (False, True) * 5:
                    started = time.perf_counter()
                    base.set_training(training)
                    flips.append(time.perf_counter() - started)
                rows.append(
                    (
                        count,
                        statistics.median(steps),
                        statistics.median(builds),
                        statistics.median(closes),
                        statistics.median(flips),
                    )
                )
        finally:
            for engine in engines:
                engine.close()
    baseline = rows[0][1]
    print("DP step (ForwardBackward + OptimStep) on one shared base, switching adapters")
    print(
        f"{'adapters':>9} {'step ms':>9} {'ratio to first':>15} {'add a client ms':>16}"
        f" {'close it ms':>12} {'mode switch ms':>15}"
    )
    for count, step, build, close, flip in rows:
        print(
            f"{count:>9} {step * 1e3:>9.1f} {step / baseline:>15.2f} {build * 1e3:>16.1f}"
            f" {close * 1e3:>12.1f} {flip * 1e3:>15.2f}"
        )


if __name__ == "__main__":
    main()
