"""DP noise cost: the CSPRNG exact-tail sampler vs ``torch.randn`` on the same tensor.

Times, interleaved round-robin (rotating the order every round), adding N(0, std²)
noise to one float32 tensor of ``--elements`` coordinates (default 16,777,216: a 7B
model's r=16 LoRA on q/k/v/o) with

  randn   ``tensor.add_(torch.randn(shape), alpha=std)`` — the baseline (torch's
          float32 Box–Muller on 24-bit uniforms, MT19937; NOT fit for DP noise);
  sampler ``add_gaussian_noise_`` (AES-256-CTR keyed from os.urandom, float64
          Box–Muller with the exact tail, snapped to the 2^-20·std grid);
  aes     the AES-256-CTR keystream alone (one 64-bit word per coordinate), for reference.

Reports medians of wall time and of process CPU time and their ratios to randn. The
issue's target is sampler ≤ 2× randn. On a shared machine the CPU time with one thread
is the steadier figure (it leaves out time spent waiting for a core).

Usage: python bench/noise.py [--elements 16777216] [--rounds 7] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tensafe.trainer.domain.engine.noise import add_gaussian_noise_

STD = 1.0


def variants(elements: int) -> dict[str, Callable[[], None]]:
    """The timed closures, each on its own preallocated tensor."""
    randn_target = torch.zeros(elements)
    sampler_target = torch.zeros(elements)
    zeros = bytes(8 * elements)
    keystream = bytearray(8 * elements + 15)

    def randn() -> None:
        randn_target.add_(torch.randn(randn_target.shape), alpha=STD)

    def sampler() -> None:
        add_gaussian_noise_([sampler_target], STD)

    def aes() -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16)))
        cipher.encryptor().update_into(zeros, keystream)

    return {"randn": randn, "sampler": sampler, "aes": aes}


def measure(threads: int, elements: int, rounds: int) -> list[tuple[str, float, float]]:
    """Median wall and CPU seconds per variant at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    steps = variants(elements)
    for step in steps.values():  # warm-up
        step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return [(name, statistics.median(wall[name]), statistics.median(cpu[name])) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=16_777_216)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"{args.elements:,} float32 coordinates; median of {args.rounds} interleaved rounds")
    print(f"{'threads':>7} {'variant':<8} {'wall ms':>8} {'ratio':>7} {'cpu ms':>8} {'ratio':>7}")
    for threads in args.threads:
        rows = measure(threads, args.elements, args.rounds)
        base_wall, base_cpu = rows[0][1], rows[0][2]
        for name, wall, cpu in rows:
            print(
                f"{threads:>7} {name:<8} {wall * 1e3:>8.1f} {wall / base_wall:>6.2f}x "
                f"{cpu * 1e3:>8.1f} {cpu / base_cpu:>6.2f}x"
            )


if __name__ == "__main__":
    main()
