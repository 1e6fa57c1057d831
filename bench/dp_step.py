"""DP-SGD step cost: book-keeping clipping vs a non-DP step vs Opacus hooks.

Builds the default tiny Llama (a few M parameters) with ``build_tiny_model``, adds a
LoRA adapter (r=8 on q/k/v/o) and times one full training step (forward, backward,
clipping, noise, AdamW) for each variant on the same batch, interleaved round-robin
(rotating the order every round) so that drifts in machine load hit every variant
alike. Reports medians of wall time and of process CPU time (with one torch thread the
CPU time is the steadier figure on a shared machine: it leaves out time the process
waited for a core), their ratios to the non-DP step, and each variant's peak live tensor
memory during one step (torch profiler memory timeline).

Variants:
  non_dp        LoraTrainingEngine(dp=None): plain backward + AdamW.
  dp_bookkeep   LoraTrainingEngine(dp=...), NormMethod.AUTO (direct norms for LoRA).
  dp_gram       the same with Gram-matrix (ghost) norms forced.
  opacus_hooks  Opacus GradSampleModule + DPOptimizer(AdamW) on the same peft model.

The dp_* rows draw their noise through the engine, i.e. with
``tensafe.trainer.domain.engine.noise.add_gaussian_noise_`` (AES-256-CTR, exact-tail float64
Box–Muller, snapped); ``bench/noise.py`` times that sampler alone against
``torch.randn`` on a 7B model's 16.8M LoRA coordinates. Opacus's row uses torch's
``normal`` (its secure_mode needs torchcsprng), so it is not the same noise.

Usage: python bench/dp_step.py [--batches 16 64] [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tensafe.client.tiny_model import build_tiny_model, tiny_corpus
from tensafe.trainer.domain.engine.config import (
    AdamConfig,
    DpConfig,
    EngineOptions,
    LoraConfig,
    LossConfig,
    NormMethod,
)
from tensafe.trainer.domain.engine.losses import (
    LossFn,
    per_token_loss,
    token_logprobs,
    validate_batch,
)
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

VARIANTS = ("non_dp", "dp_bookkeep", "dp_gram", "opacus_hooks")
LORA = LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
DP = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0)
ADAM = AdamConfig(learning_rate=1e-3)
MAX_TOKENS = 64


def make_sequences(model_dir: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = tiny_corpus()
    sequences = []
    for index in range(count):
        text = " ".join(lines[(3 * index + k) % len(lines)] for k in range(4))
        sequences.append(tokenizer(text).input_ids[: 24 + (index * 13) % (MAX_TOKENS - 23)])
    return sequences


def cross_entropy(
    sequences: list[list[int]],
) -> tuple[list[list[int]], list[dict[str, list[float] | list[int]]]]:
    batch = [s[:-1] for s in sequences]
    inputs: list[dict[str, list[float] | list[int]]] = [
        {"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)} for s in sequences
    ]
    return batch, inputs


def engine_step(engine: LoraTrainingEngine, sequences: list[list[int]]) -> Callable[[], None]:
    batch, inputs = cross_entropy(sequences)

    def step() -> None:
        engine.forward_backward(batch, "cross_entropy", inputs)
        engine.optim_step(ADAM)

    return step


def opacus_step(model_dir: Path, sequences: list[list[int]]) -> Callable[[], None]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # The same peft model the engine builds, then Opacus's hooks around it.
    # (The engine stays open: closing it removes its adapter from the shared base.)
    engine = LoraTrainingEngine(model_dir, lora=LORA, dp=None, seed=0)
    model = engine.model
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.AdamW(parameters, lr=ADAM.learning_rate),
        noise_multiplier=DP.noise_multiplier,
        max_grad_norm=DP.max_grad_norm,
        expected_batch_size=len(sequences),
        loss_reduction="sum",
    )
    batch, inputs = cross_entropy(sequences)
    padded = validate_batch(
        batch, LossFn.CROSS_ENTROPY, inputs, vocab_size=engine.vocab_size, max_length=10_000
    )
    loss_config = LossConfig()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = wrapped(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        logprobs = token_logprobs(logits, padded.target_tokens)
        loss = per_token_loss(LossFn.CROSS_ENTROPY, logprobs, padded, loss_config).sum()
        torch.autograd.backward(loss)
        optimizer.step()

    return step


def build_variant(name: str, model_dir: Path, sequences: list[list[int]]) -> Callable[[], None]:
    if name == "non_dp":
        return engine_step(LoraTrainingEngine(model_dir, lora=LORA, dp=None, seed=0), sequences)
    if name == "dp_bookkeep":
        return engine_step(LoraTrainingEngine(model_dir, lora=LORA, dp=DP, seed=0), sequences)
    if name == "dp_gram":
        options = EngineOptions(norm_method=NormMethod.GRAM)
        engine = LoraTrainingEngine(model_dir, lora=LORA, dp=DP, seed=0, options=options)
        return engine_step(engine, sequences)
    if name == "opacus_hooks":
        return opacus_step(model_dir, sequences)
    raise SystemExit(f"unknown variant {name}")


def peak_tensor_mib(step: Callable[[], None], workdir: Path) -> float:
    """Peak live CPU tensor memory during one step, from torch's memory profiler.

    tracemalloc cannot see torch's allocator and ru_maxrss is dominated by model loading,
    so the profiler's memory timeline (allocations and frees per tensor) is used.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as profiler:
        step()
    path = workdir / "memory_timeline.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        profiler.export_memory_timeline(str(path), device="cpu")
    sizes: list[list[float]] = json.loads(path.read_text())[1]
    return float(max(sum(per_category) for per_category in sizes)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is steadiest on a shared 2-core machine)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    if "non_dp" not in args.variants:
        parser.error("the non_dp baseline must be among --variants")

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", seed=0)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        parameter_count = sum(
            p.numel()
            for p in LoraTrainingEngine(model_dir, lora=LORA, dp=None, seed=0).model.parameters()
        )
        print(
            f"tiny llama: hidden {config.hidden_size}, layers {config.num_hidden_layers}, "
            f"vocab {config.vocab_size}, {parameter_count / 1e6:.2f} M parameters; "
            f"LoRA r={LORA.rank} on {','.join(LORA.target_modules)}; torch threads {args.threads}"
        )
        rows = []
        for batch_size in args.batches:
            sequences = make_sequences(model_dir, batch_size)
            tokens = sum(len(s) - 1 for s in sequences)
            steps = {name: build_variant(name, model_dir, sequences) for name in args.variants}
            for step in steps.values():  # warm-up
                step()
            wall: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            names = list(steps)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    wall_start, cpu_start = time.perf_counter(), time.process_time()
                    steps[name]()
                    cpu[name].append(time.process_time() - cpu_start)
                    wall[name].append(time.perf_counter() - wall_start)
            for name in names:
                wall_median = statistics.median(wall[name])
                cpu_median = statistics.median(cpu[name])
                wall_ratio = wall_median / statistics.median(wall["non_dp"])
                cpu_ratio = cpu_median / statistics.median(cpu["non_dp"])
                peak = float("nan") if args.no_memory else peak_tensor_mib(steps[name], Path(tmp))
                rows.append(
                    (batch_size, tokens, name, wall_median, wall_ratio, cpu_median, cpu_ratio, peak)
                )
        print()
        print(
            f"{'batch':>5} {'tokens':>6} {'variant':<13} {'wall ms':>8} {'ratio':>7} "
            f"{'cpu ms':>8} {'ratio':>7} {'peak tensor MiB':>15}"
        )
        for batch_size, tokens, name, wall_ms, wall_ratio, cpu_ms, cpu_ratio, peak in rows:
            print(
                f"{batch_size:>5} {tokens:>6} {name:<13} {wall_ms * 1e3:>8.1f} {wall_ratio:>6.3f}x "
                f"{cpu_ms * 1e3:>8.1f} {cpu_ratio:>6.3f}x {peak:>15.1f}"
            )
        print(f"\nmedian of {args.rounds} interleaved rounds after one warm-up step per variant")


if __name__ == "__main__":
    main()
