"""The tiny real Llama the trainer, SDK and HE runtime tests run on, and torch on one
thread while they do.

Every package builds the same model (seed 0, vocabulary 512, hidden 64, 2 layers, 4
heads, 2 KV heads); only the context length differs between packages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from tensafe.client.tiny_model import build_tiny_model

BASE_MODEL = "tiny-llama"


def build_tiny_llama(path: Path, *, context: int = 128) -> Path:
    """Build the test model with its tokenizer into ``path``.

    Args:
        path: The model folder to create.
        context: ``max_position_embeddings``, the longest sequence the model takes.

    Returns:
        ``path``.
    """
    return build_tiny_model(
        path,
        seed=0,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=context,
    )


def build_base_models(root: Path, *, context: int = 128) -> Path:
    """A base models folder (a service's ``base_models_dir``) holding the test model.

    Args:
        root: The folder to fill; the model goes to ``root / BASE_MODEL``.
        context: ``max_position_embeddings`` of the model.

    Returns:
        ``root``.
    """
    build_tiny_llama(root / BASE_MODEL, context=context)
    return root


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the count afterwards.

    The API, the worker and the test share two cores: OpenMP threads that wait at
    barriers for a core another process holds make steps many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_as_hub_cache(model: Path, root: Path, repo_id: str, revision: str) -> Path:
    """Lay a model folder out as a Hugging Face hub cache entry under ``root``.

    Writes ``models--<org>--<name>/blobs/<sha256>`` (the file contents),
    ``snapshots/<revision>/<file>`` (relative symlinks to the blobs) and ``refs/main``
    (``revision``), the layout ``huggingface_hub`` writes.

    Returns:
        The snapshot folder.
    """
    import hashlib

    entry = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / revision
    (entry / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(model.iterdir()):
        data = file.read_bytes()
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    return snapshot


def save_sharded(model: Path, out: Path, *, max_shard_size: str) -> Path:
    """Re-save a model folder with sharded safetensors (``save_pretrained``'s
    ``max_shard_size``), its tokenizer files copied beside the shards.

    Returns:
        ``out``.
    """
    import shutil

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model)
    loaded.save_pretrained(out, max_shard_size=max_shard_size)
    for file in model.iterdir():
        if not file.name.endswith(".safetensors") and not (out / file.name).exists():
            shutil.copyfile(file, out / file.name)
    return out
