"""Build the tiny Llama-style model and tokenizer used by tests, demos and benches.

Usage: python scripts/build_tiny_model.py OUT_DIR [--seed 0] [--hidden-size 256] ...
Prints the directory and the sha256 digest of its weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensafe.client.tiny_model import build_tiny_model, weights_digest


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny Llama model + BPE tokenizer.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--max-position-embeddings", type=int, default=256)
    args = parser.parse_args()
    path = build_tiny_model(
        args.out_dir,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(f"{path}\nweights sha256 {weights_digest(path)}")


if __name__ == "__main__":
    main()
