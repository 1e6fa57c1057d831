r"""The base models this deployment can fine-tune: the sub-folders of one directory.

Each sub-folder of ``TENSAFE_BASE_MODELS_DIR`` that holds a ``config.json`` is a base
model named after the folder, loaded by workers with ``from_pretrained``. The API only
reads the configuration: the linear layers LoRA may target are listed by building the
model on PyTorch's ``meta`` device (shapes only, no memory, no weights read).

The weights digest is the sha256 of the single ``*.safetensors`` file, or for sharded
weights the sha256 of the lines ``"<sha256>  <file name>\n"`` of every shard sorted by
name (the ``sha256sum`` listing); the SDK's ``tiny_model.weights_digest`` computes the
same value, so a TGSP manifest can name the base model's weights either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tensafe.common.errors import FailedPrecondition, InvalidArgument, NotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WEIGHT_SUFFIX = ".safetensors"
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """A registered base model."""

    name: str
    """Folder name, used in CreateTrainingClient."""
    path: Path
    """The model directory."""
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
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._cache: dict[str, tuple[tuple[float, ...], BaseModelInfo]] = {}
        self._lock = threading.Lock()

    def list(self) -> list[BaseModelInfo]:
        """Every base model, by name.

        Raises:
            FailedPrecondition: A folder with a config.json cannot be read as a model.
        """
        if not self._root.is_dir():
            raise FailedPrecondition(f"base models directory {self._root} does not exist")
        return [self.get(name) for name in _model_names(self._root)]

    def _not_found(self, name: str) -> NotFound:
        # Naming what there is saves a user the second call (ListBaseModels lists the
        # same names to every caller, so nothing is disclosed).
        names = _model_names(self._root)
        there = f"available: {', '.join(names)}" if names else "no base model is installed"
        return NotFound(f"base model {name!r} not found ({there})")

    def get(self, name: str) -> BaseModelInfo:
        """The base model called ``name``.

        Raises:
            InvalidArgument: ``name`` is empty or not a folder name.
            NotFound: No such base model.
            FailedPrecondition: The folder cannot be read as a model.
        """
        if not name:
            raise InvalidArgument("base_model", "must not be empty")
        if not _NAME.match(name):
            raise self._not_found(name)
        path = self._root / name
        config_file = path / "config.json"
        if not config_file.is_file():
            raise self._not_found(name)
        weights = sorted(path.glob(f"*{_WEIGHT_SUFFIX}"))
        signature = tuple(
            value
            for file in (config_file, *weights)
            for value in (file.stat().st_mtime, float(file.stat().st_size))
        )
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == signature:
                return cached[1]
        info = _read_model(name, path, weights)
        with self._lock:
            self._cache[name] = (signature, info)
        return info


def _model_names(root: Path) -> list[str]:
    """The folder names under ``root`` that hold a config.json (nothing is loaded)."""
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and (entry / "config.json").is_file() and _NAME.match(entry.name)
    )


def _read_model(name: str, path: Path, weights: list[Path]) -> BaseModelInfo:
    if not weights:
        raise FailedPrecondition(f"base model {name!r} has no {_WEIGHT_SUFFIX} weights")
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
        weights_sha256=_weights_digest(weights),
        vocab_size=vocab_size,
        max_context_length=context,
        # lm_head is a linear layer but not a LoRA target of the transformer blocks.
        lora_target_modules=tuple(n for n in linear_names if n != "lm_head"),
    )


def _weights_digest(files: list[Path]) -> str:
    digests = [(_file_sha256(file), file.name) for file in files]
    if len(digests) == 1:
        return digests[0][0]
    listing = "".join(f"{digest}  {name}\n" for digest, name in digests)
    return hashlib.sha256(listing.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
