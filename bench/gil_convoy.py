"""What the worker's event loop costs its engine: one DP step alone, with a busy asyncio
loop in the same process, and with the same load in another process.

The trainer worker runs its engine in a thread (``asyncio.to_thread``) of the process
whose event loop claims, commits and acks jobs. torch releases the GIL around each
kernel, so after every operation the engine thread must take the GIL back, and waits
whenever the loop is running Python: a convoy, which slows the engine by more than
the share of the GIL the loop holds. This bench measures it on the bench model
(``build_tiny_model``, LoRA r=8 on q/k/v/o, DP-SGD) with one torch thread:

  alone           the step with nothing else running;
  loop_thread     the step in a thread (``asyncio.to_thread``, as the worker runs its
                  engine) while this process's asyncio loop runs Python in
                  bursts of ``--burst-ms`` every ``--burst-ms + --idle-ms`` (as the
                  worker's loop does: short callbacks between waits);
  loop_process    the same loop load in another process (the step's process holds the
                  GIL alone: the cost of a worker whose engine has a process of its own).

Modes are interleaved round-robin (rotating the order each round); the table gives the
step's median wall and thread-CPU time and the wall-time ratio to ``alone``. On a
2-core machine ``loop_process`` also shows how much of the loop_thread slowdown is the
GIL rather than the core the load takes.

Usage: python bench/gil_convoy.py [--rows 16] [--rounds 7] [--burst-ms 1] [--idle-ms 2.7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tensafe.client.tiny_model import build_tiny_model
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

MODES = ("alone", "loop_thread", "loop_process")
LORA = LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def _burst(seconds: float) -> None:
    """Run Python (holding the GIL) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        json.dumps({"k": list(range(50))})


async def _loop_load(stop: Callable[[], bool], burst: float, idle: float) -> float:
    """An event loop's kind of work until ``stop()``: returns the share of time busy."""
    start, busy = time.perf_counter(), 0.0
    while not stop():
        await asyncio.sleep(idle)
        _burst(burst)
        busy += burst
    return busy / max(time.perf_counter() - start, 1e-9)


def _process_load(stop: Any, burst: float, idle: float) -> None:
    asyncio.run(_loop_load(stop.is_set, burst, idle))


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    step()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences per step")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--burst-ms", type=float, default=1.0)
    parser.add_argument("--idle-ms", type=float, default=2.7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    burst, idle = args.burst_ms / 1000, args.idle_ms / 1000

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", seed=0)
        dp = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0)
        engine = LoraTrainingEngine(model_dir, lora=LORA, dp=dp, seed=0)
        rng = random.Random(0)
        sequences = [
            [rng.randrange(3, engine.vocab_size) for _ in range(args.tokens + 1)]
            for _ in range(args.rows)
        ]
        batch = [s[:-1] for s in sequences]
        inputs = [{"target_tokens": s[1:], "weights": [1.0] * args.tokens} for s in sequences]

        def step() -> None:
            engine.forward_backward(batch, "cross_entropy", inputs)
            engine.optim_step(AdamConfig(learning_rate=1e-3))

        step()  # warm-up

        async def with_loop() -> tuple[float, float, float]:
            # The step in a thread of the loop's process, as the worker runs its engine.
            running = asyncio.ensure_future(asyncio.to_thread(_timed, step))
            share = await _loop_load(running.done, burst, idle)
            return (*await running, share)

        def with_process() -> tuple[float, float]:
            # fork: the child only runs the loop load (no torch), and starts at once.
            context = multiprocessing.get_context("fork")
            stop = context.Event()
            load = context.Process(target=_process_load, args=(stop, burst, idle))
            load.start()
            time.sleep(0.2)  # the load is running
            try:
                return _timed(step)
            finally:
                stop.set()
                load.join()

        wall: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        shares: list[float] = []
        for round_index in range(args.rounds):
            shift = round_index % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                if mode == "alone":
                    seconds, thread_cpu = _timed(step)
                elif mode == "loop_thread":
                    seconds, thread_cpu, share = asyncio.run(with_loop())
                    shares.append(share)
                else:
                    seconds, thread_cpu = with_process()
                wall[mode].append(seconds)
                cpu[mode].append(thread_cpu)

    print(
        f"DP step of {args.rows} x {args.tokens} tokens on the bench model, one torch "
        f"thread; loop load: {args.burst_ms:g} ms bursts every "
        f"{args.burst_ms + args.idle_ms:g} ms (measured busy share "
        f"{100 * statistics.median(shares):.0f} %); switch interval "
        f"{sys.getswitchinterval() * 1000:g} ms"
    )
    baseline = statistics.median(wall["alone"])
    print(f"{'mode':<13} {'wall ms':>8} {'cpu ms':>7} {'wall / alone':>13}")
    for mode in MODES:
        median = statistics.median(wall[mode])
        print(
            f"{mode:<13} {median * 1000:8.1f} {statistics.median(cpu[mode]) * 1000:7.1f} "
            f"{median / baseline:12.2f}x"
        )
    print(f"median of {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
