"""Build the built-in base model shipped in the package (``tensafe.client.base_models``).

    python scripts/build_base_model.py [--out DIR] [--steps N]

Pretrains the tiny Llama-style model on the built-in public corpus
(:func:`tensafe.client.tiny_model.pretrain_tiny_model`) with one torch thread and a fixed
seed, so a rebuild with the same torch version gives the same weights (one thread:
several threads may sum in a different order, and on a shared 2-core machine they
also run 10x slower, 92 s against 8 s for 30 steps, measured). Writes into the package
folder by default and prints the weights' sha256, which goes into
``BUILTIN_WEIGHTS_SHA256``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tensafe.client.tiny_model import pretrain_tiny_model, weights_digest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "clients" / "python" / "tensafe_client" / "builtin_models" / "tiny-llama"
STEPS = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        built = pretrain_tiny_model(Path(scratch) / "model", steps=args.steps, seed=0)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        for file in sorted(built.iterdir()):
            shutil.copyfile(file, args.out / file.name)
    print(f"{args.out}: {time.perf_counter() - started:.1f} s")
    for file in sorted(args.out.iterdir()):
        print(f"  {file.name}  {file.stat().st_size} bytes")
    print(f"weights sha256 {weights_digest(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
