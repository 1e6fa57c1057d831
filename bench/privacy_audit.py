"""Time and tightness of the one-run privacy audit on the tiny model.

Builds the tiny Llama used by the tests (``build_tiny_model``), then for each claimed
epsilon in {1, 4, 8} runs the white-box audit (m = 1000 canaries, k = 100 per side,
client batches) on the production engine, and the same audit on two deliberately broken
mechanisms: an engine that adds a tenth of the noise the accountant is told about, and
(epsilon 1 only) the production engine with its per-example clipping disabled (the clip
factor replaced by 1 inside this process only, as the audit tests do). The canaries are
data through the production clipping (see ``tensafe.trainer.domain.audit.run``). The baseline is
the same shadow run without canaries (filler batches only, same steps), measured
interleaved in the same process; the table reports medians and the audit/baseline ratio.

Run: ``python bench/privacy_audit.py [--steps 100] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from tensafe.client.tiny_model import build_tiny_model
from tensafe.trainer.domain.audit.run import (
    SEQUENCE_LENGTH,
    SHADOW_LEARNING_RATE,
    AuditConfig,
    run_privacy_audit,
)
from tensafe.trainer.domain.engine import clipping
from tensafe.trainer.domain.engine.accounting import BatchSampling, calibrate_noise_multiplier
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

DELTA = 1e-5
CANARIES = 1000
GUESSES_PER_SIDE = 100
BATCH_SIZE = 8


def _engine(model_dir: Path, sigma: float) -> LoraTrainingEngine:
    return LoraTrainingEngine(
        model_dir,
        lora=LoraConfig(rank=8, alpha=16.0),
        dp=DpConfig(noise_multiplier=sigma, max_grad_norm=1.0),
        seed=0,
    )


@contextlib.contextmanager
def _clipping(enabled: bool) -> Iterator[None]:
    """BENCH ONLY: with ``enabled`` False, every clip factor is 1 inside the block."""
    production = clipping.clip_factors_of
    if not enabled:
        clipping.clip_factors_of = lambda norms, *, max_grad_norm: torch.ones_like(norms)
    try:
        yield
    finally:
        clipping.clip_factors_of = production


def _baseline(model_dir: Path, sigma: float, steps: int) -> float:
    engine = _engine(model_dir, sigma)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(
            0, engine.vocab_size, (BATCH_SIZE, SEQUENCE_LENGTH), generator=generator
        )
        inputs = [{"target_tokens": r[1:], "weights": torch.ones(r.numel() - 1)} for r in rows]
        engine.forward_backward([r[:-1] for r in rows], "cross_entropy", inputs)
        engine.optim_step(AdamConfig(learning_rate=SHADOW_LEARNING_RATE))
    elapsed = time.perf_counter() - start
    engine.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = Path(folder) / "tiny-llama"
        build_tiny_model(model_dir, seed=0)
        print(
            f"white-box audit, m={CANARIES}, k={GUESSES_PER_SIDE}, steps={args.steps}, "
            f"batch {BATCH_SIZE} + included canaries, client batches, delta={DELTA}"
        )
        print(
            f"{'claimed eps':>11} {'engine':>8} {'bound':>7} {'correct':>9} "
            f"{'audit s':>8} {'base s':>7} {'ratio':>6}"
        )
        for epsilon in (1.0, 4.0, 8.0):
            sigma = calibrate_noise_multiplier(
                target_epsilon=epsilon,
                delta=DELTA,
                steps=args.steps,
                sampling=BatchSampling.CLIENT_BATCHES,
            )
            config = AuditConfig(
                canaries=CANARIES,
                guesses_per_side=GUESSES_PER_SIDE,
                steps=args.steps,
                batch_size=BATCH_SIZE,
                noise_multiplier=sigma,
                delta=DELTA,
            )
            mechanisms = [("correct", sigma, True), ("sigma/10", sigma / 10, True)]
            if epsilon == 1.0:
                mechanisms.append(("no clip", sigma, False))
            for label, engine_sigma, clipped in mechanisms:
                audit_times, base_times, bounds, corrects = [], [], [], []
                claimed = 0.0
                for repeat in range(args.repeats):
                    with _clipping(clipped):
                        base_times.append(_baseline(model_dir, engine_sigma, args.steps))
                        engine = _engine(model_dir, engine_sigma)
                        start = time.perf_counter()
                        report = run_privacy_audit(engine, config, seed=repeat)
                        audit_times.append(time.perf_counter() - start)
                        engine.close()
                    bounds.append(report.epsilon_lower_bound)
                    corrects.append(report.correct_guesses)
                    claimed = report.claimed_epsilon
                audit, base = statistics.median(audit_times), statistics.median(base_times)
                print(
                    f"{claimed:>11.3f} {label:>8} {max(bounds):>7.3f} "
                    f"{min(corrects):>4}-{max(corrects):<4} {audit:>8.2f} {base:>7.2f} "
                    f"{audit / base:>6.2f}"
                )


if __name__ == "__main__":
    main()
