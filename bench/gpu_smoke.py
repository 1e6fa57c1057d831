"""One DP-SGD step of the trainer engine on a GPU, timed: a smoke test for a GPU machine.

Loads a real Hugging Face model directory into ``LoraTrainingEngine`` (the engine the
trainer worker runs), adds a LoRA adapter on the attention projections and runs
``--steps`` DP steps (forward/backward with per-example clipping, Gaussian noise, AdamW)
on a batch of random token ids on ``--device``, printing the load time and each step's
wall time (the first includes CUDA kernel warm-up; the median of the rest is the figure).

The engine is built as the worker builds it: a shared base in ``--dtype`` on ``--device``
(``TENSAFE_BASE_DTYPE`` / ``TENSAFE_DEVICE``) with the client's adapter on it; the
script checks that every parameter landed on that device and says so when they
did not, rather than timing a CPU step under a GPU label.

Without CUDA it stops with a message naming what is missing. On a CPU-only machine it
runs as a smoke run with ``--device cpu``; ``--tiny`` builds the tiny test model instead
of reading a directory:

    python bench/gpu_smoke.py /models/meta-llama/Llama-3.2-1B          # cuda
    python bench/gpu_smoke.py /models/Qwen2.5-0.5B --device cuda:1 --batch 16
    python bench/gpu_smoke.py --tiny --device cpu                       # smoke run here
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tensafe.client.tiny_model import build_tiny_model
from tensafe.trainer.domain.engine.base import BaseDtype, BasePlacement, SharedBase
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, help="HF model directory")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=[dtype.value for dtype in BaseDtype],
        help="dtype of the base weights, as TENSAFE_BASE_DTYPE (default fp32)",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="DP steps to time")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = parser.parse_args(argv)
    if (args.model_dir is None) == (not args.tiny):
        parser.error("give a model directory or --tiny (not both)")
    if args.batch < 1 or args.tokens < 2 or args.steps < 1:
        parser.error("--batch and --steps must be positive, --tokens at least 2")
    return args


def require_device(name: str) -> torch.device:
    """The device ``name``, or exit with a message saying why it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r} is not a torch device: {error}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU build of torch)"
            raise SystemExit(
                f"no CUDA device: torch {torch.__version__} (CUDA {built}) sees no GPU. "
                "Run on a GPU machine with a CUDA build of torch (the image's "
                "TORCH_VARIANT=cu128 variant), or pass --device cpu for a smoke run."
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise SystemExit(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise SystemExit(f"--device {name!r}: only cpu and cuda devices are supported")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0) if args.tiny else args.model_dir
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"{model_dir} is not a Hugging Face model directory (no config.json)")

        started = time.perf_counter()
        # The worker's path: one shared base in the configured placement, the
        # client's adapter on it (TENSAFE_DEVICE / TENSAFE_BASE_DTYPE).
        base = SharedBase(model_dir, BasePlacement(dtype=BaseDtype(args.dtype), device=device))
        engine = LoraTrainingEngine(
            base,
            lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank, target_modules=ATTENTION),
            dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0),
            seed=0,
        )
        synchronize(device)
        load_seconds = time.perf_counter() - started
        placed = {parameter.device for parameter in engine.model.parameters()}
        if placed != {device}:
            raise SystemExit(
                f"the engine placed the model on {sorted(map(str, placed))}, not {device}"
            )

        generator = torch.Generator().manual_seed(0)
        length = min(args.tokens, engine.max_sequence_length)
        sequences = torch.randint(
            0, engine.vocab_size, (args.batch, length + 1), generator=generator
        ).tolist()
        batch = [sequence[:-1] for sequence in sequences]
        inputs = [
            {"target_tokens": sequence[1:], "weights": [1.0] * length} for sequence in sequences
        ]
        adam = AdamConfig(learning_rate=1e-4)
        parameters = sum(p.numel() for p in engine.model.parameters())
        print(
            f"model {model_dir.name}: {parameters / 1e6:.1f}M parameters on {device}"
            f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}),"
            f" loaded in {load_seconds:.2f} s; batch {args.batch} x {length} tokens,"
            f" LoRA r={args.rank} on {', '.join(ATTENTION)}"
        )
        timings = []
        for index in range(args.steps):
            synchronize(device)
            started = time.perf_counter()
            result = engine.forward_backward(batch, "cross_entropy", inputs)
            engine.optim_step(adam)
            synchronize(device)
            timings.append(time.perf_counter() - started)
            loss = result.metrics["loss:sum"] / result.metrics["tokens:sum"]
            print(f"step {index + 1}: {timings[-1] * 1000:.1f} ms (loss per token {loss:.3f})")
        steady = timings[1:] or timings
        print(
            f"DP step on {device}: median {statistics.median(steady) * 1000:.1f} ms"
            f" over {len(steady)} step(s) after warm-up"
        )
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"peak CUDA memory allocated: {peak:.0f} MiB")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
