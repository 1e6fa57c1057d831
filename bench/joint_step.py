"""Multi-client ForwardBackward on one shared base: one joint pass vs one call each.

Builds the bench model (``build_tiny_model``: hidden 256, 4 layers), puts N DP training
clients (r=8 on q/k/v/o, LoRA dropout 0) on one :class:`SharedBase` and times, for
the same N batches (``--batch`` random sequences of ``--tokens`` tokens per client):

  separate   N ``forward_backward`` calls, one per client (what the worker does today);
  joint      one ``forward_backward_jointly`` over all N clients' rows, each row through
             its own adapter (peft mixed-adapter batch), clipped per client.

Rounds alternate the order of the two; medians of wall and process CPU time per
round and the ratio joint / separate are printed per N. One torch thread by default
(the 2-core machine is shared). The worker runs clients' jobs one at a time; this
bench is the evidence for whether batching clients would pay (docs/trainer.md).

Usage: python bench/joint_step.py [--clients 2 4 8] [--rounds 7] [--batch 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tensafe.client.tiny_model import build_tiny_model
from tensafe.trainer.domain.engine.base import SharedBase
from tensafe.trainer.domain.engine.config import DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import (
    ForwardBackwardCall,
    LoraTrainingEngine,
    forward_backward_jointly,
)

LORA = LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
DP = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0)


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as root:
        model_dir = build_tiny_model(Path(root) / "model", seed=0, hidden_size=256, num_layers=4)
        base = SharedBase(model_dir)
        print(
            f"bench model hidden 256, 4 layers; LoRA r=8 q/k/v/o; DP; per client "
            f"{args.batch} x {args.tokens} tokens; {args.threads} torch thread(s)"
        )
        print(f"{'clients':>8}{'separate ms':>13}{'joint ms':>10}{'ratio':>7}{'cpu ratio':>11}")
        for count in args.clients:
            engines = [
                LoraTrainingEngine(base, lora=LORA, dp=DP, seed=index) for index in range(count)
            ]
            calls = []
            for _ in engines:
                batch = [
                    [rng.randrange(1, base.vocab_size) for _ in range(args.tokens)]
                    for _ in range(args.batch)
                ]
                inputs = [{"target_tokens": [*s[1:], 1], "weights": [1.0] * len(s)} for s in batch]
                calls.append(
                    ForwardBackwardCall(batch, "cross_entropy", inputs, refuse_duplicates=False)
                )

            def separate(
                engines: list[LoraTrainingEngine] = engines,
                calls: list[ForwardBackwardCall] = calls,
            ) -> None:
                for engine, call in zip(engines, calls, strict=True):
                    engine.forward_backward(
                        call.batch, call.loss_fn, call.loss_fn_inputs, refuse_duplicates=False
                    )

            def joint(
                engines: list[LoraTrainingEngine] = engines,
                calls: list[ForwardBackwardCall] = calls,
            ) -> None:
                forward_backward_jointly(list(zip(engines, calls, strict=True)))

            timings: dict[str, list[tuple[float, float]]] = {"separate": [], "joint": []}
            joint()  # warm-up
            separate()
            for index in range(args.rounds):
                order = [("separate", separate), ("joint", joint)]
                for name, run in order if index % 2 == 0 else order[::-1]:
                    timings[name].append(_timed(run))
            wall = {k: statistics.median(w for w, _ in v) for k, v in timings.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in timings.items()}
            print(
                f"{count:>8}{wall['separate'] * 1e3:>13.0f}{wall['joint'] * 1e3:>10.0f}"
                f"{wall['joint'] / wall['separate']:>7.2f}{cpu['joint'] / cpu['separate']:>11.2f}"
            )
            for engine in engines:
                engine.close()


if __name__ == "__main__":
    main()
