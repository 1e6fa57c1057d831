r"""The base models this deployment can fine-tune: the model folders of one directory.

The folders of ``TENSAFE_BASE_MODELS_DIR`` that hold a ``config.json`` are base models:
plain (``tiny-llama``), nested as on the Hugging Face Hub (``org/name``) or entries of
a hub cache (``models--org--name``, named ``org/name`` and resolved to the snapshot
``refs/main`` names); :mod:`tensafe.common.model_folders` defines the names, the
layouts, the weight files (the shards a ``model.safetensors.index.json`` names) and the
weights digest, which the SDK computes the same way. Workers load the resolved folder
with ``from_pretrained``. The API only reads the configuration: the linear layers LoRA
may target are listed by building the model on PyTorch's ``meta`` device (shapes only,
no memory, no weights read).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tensafe.common.errors import FailedPrecondition, NotFound
from tensafe.common.model_folders import (
    SHARD_INDEX,
    model_folder,
    model_names,
    weight_files,
    weights_digest,
)

_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """A registered base model."""

    name: str
    """``name`` or ``org/name``, used in CreateTrainingClient."""
    path: Path
    """The model folder (for a hub cache entry, its snapshot folder)."""
    weights_sha256: str
    """Digest of the weights (see the module docstring)."""
    vocab_size: int
    """Token ids must be below this."""
    max_context_length: int
    """Longest sequence the model accepts."""
    lora_target_modules: tuple[str, ...]
    """Names (last component) of the model's linear layers, sorted."""

    @property
    def default_target_modules(self) -> tuple[str, ...]:
        """The attention projections present in the model (the LoRA default)."""
        present = tuple(name for name in _ATTENTION_PROJECTIONS if name in self.lora_target_modules)
        return present or self.lora_target_modules


class BaseModelRegistry:
    """Reads base models from a directory; results are cached per folder modification.

    Args:
        root: The base models directory.
        recheck_seconds: How long a model read (or found unchanged) is served from the
            cache by :meth:`peek` without looking at the disk again.
    """

    def __init__(self, root: Path, *, recheck_seconds: float = 5.0) -> None:
        self._root = root
        self._recheck_seconds = recheck_seconds
        self._cache: dict[str, tuple[tuple[str | float, ...], BaseModelInfo]] = {}
        self._checked_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def peek(self, name: str) -> BaseModelInfo | None:
        """The model ``name`` if :meth:`get` read it (or found it unchanged) within the
        last ``recheck_seconds``, else ``None``: no disk access, so a caller on an
        event loop can answer from memory and call :meth:`get` in a thread otherwise.
        A model replaced on disk is seen at most ``recheck_seconds`` late here."""
        with self._lock:
            cached = self._cache.get(name)
            checked = self._checked_at.get(name)
        if cached is None or checked is None:
            return None
        if time.monotonic() - checked > self._recheck_seconds:
            return None
        return cached[1]

    def list(self) -> list[BaseModelInfo]:
        """Every base model, by name.

        Raises:
            FailedPrecondition: A folder with a config.json cannot be read as a model.
        """
        if not self._root.is_dir():
            raise FailedPrecondition(f"base models directory {self._root} does not exist")
        return [self.get(name) for name in model_names(self._root)]

    def _not_found(self, name: str) -> NotFound:
        # Naming what there is saves a user the second call (ListBaseModels lists the
        # same names to every caller, so nothing is disclosed).
        names = model_names(self._root)
        there = f"available: {', '.join(names)}" if names else "no base model is installed"
        return NotFound(f"base model {name!r} not found ({there})")

    def get(self, name: str) -> BaseModelInfo:
        """The base model called ``name``.

        Raises:
            InvalidArgument: ``name`` is not ``name`` or ``org/name`` of safe components.
            NotFound: No such base model.
            FailedPrecondition: The folder cannot be read as a model (a shard its index
                names is missing, a hub cache entry without a usable snapshot, ...).
        """
        path = model_folder(self._root, name)
        if path is None:
            raise self._not_found(name)
        config_file = path / "config.json"
        weights = weight_files(path, name)
        index = path / SHARD_INDEX
        # The path is part of the signature: a hub cache entry moves to a new snapshot
        # folder when refs/main changes.
        signature: tuple[str | float, ...] = (
            str(path),
            *(
                value
                for file in (config_file, *([index] if index.is_file() else []), *weights)
                for value in (file.stat().st_mtime, float(file.stat().st_size))
            ),
        )
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == signature:
                self._checked_at[name] = time.monotonic()
                return cached[1]
        info = _read_model(name, path, weights)
        with self._lock:
            self._cache[name] = (signature, info)
            self._checked_at[name] = time.monotonic()
        return info


def _read_model(name: str, path: Path, weights: list[Path]) -> BaseModelInfo:
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, KeyError) as error:
        raise FailedPrecondition(f"base model {name!r} cannot be read: {error}") from error
    linear_names = sorted(
        {
            module_name.rsplit(".", 1)[-1]
            for module_name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module_name
        }
    )
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if vocab_size <= 0 or context <= 0:
        raise FailedPrecondition(
            f"base model {name!r} config lacks vocab_size or max_position_embeddings"
        )
    return BaseModelInfo(
        name=name,
        path=path,
        weights_sha256=weights_digest(weights),
        vocab_size=vocab_size,
        max_context_length=context,
        # lm_head is a linear layer but not a LoRA target of the transformer blocks.
        lora_target_modules=tuple(n for n in linear_names if n != "lm_head"),
    )


TOKENIZER_FILE_NAMES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""What ``AutoTokenizer.from_pretrained`` may read from a model folder (config.json: the
tokenizer class of a model whose tokenizer_config.json does not name one). A fixed list,
not a glob, so that nothing else in the folder (weights, notes) is ever served."""

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
"""Refuse to serve a tokenizer larger than this (it travels in one gRPC message)."""


def tokenizer_files(info: BaseModelInfo) -> list[tuple[str, bytes]]:
    """The tokenizer files of a base model, by name, in :data:`TOKENIZER_FILE_NAMES` order.

    Args:
        info: The base model (from :meth:`BaseModelRegistry.get`).

    Returns:
        ``(file name, content)`` of each listed file present in the model folder.

    Raises:
        FailedPrecondition: The folder holds no tokenizer, or one too large to serve.
    """
    files: list[tuple[str, bytes]] = []
    total = 0
    for name in TOKENIZER_FILE_NAMES:
        path = info.path / name
        if path.is_file():
            total += path.stat().st_size
            if total > MAX_TOKENIZER_BYTES:
                raise FailedPrecondition(
                    f"the tokenizer of {info.name} is over {MAX_TOKENIZER_BYTES} bytes"
                )
            files.append((name, path.read_bytes()))
    if all(name == "config.json" for name, _ in files):
        raise FailedPrecondition(f"base model {info.name} has no tokenizer files")
    return files
