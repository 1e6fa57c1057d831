"""Parsing and server-side tokenisation of uploaded JSONL datasets, and their payload.

Record formats (the contract's ``DatasetFormat``):

- ``text``: ``{"text": "..."}``. Tokens are ``tokenizer(text)`` (with the tokenizer's
  own special tokens, e.g. BOS) followed by EOS; every position is trained on.
- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``. Tokens are
  ``tokenizer(prompt)`` then ``tokenizer(completion, no special tokens)`` then EOS; the
  loss covers the completion (and its EOS) only: the targets predicting prompt tokens
  have weight 0.

A record becomes one Tinker-style cross-entropy datum: ``model_input = tokens[:-1]``,
``target_tokens = tokens[1:]``, ``weights[t] = 1`` from ``loss_start`` on. The model
sees ``len(tokens) - 1`` positions, which must fit the base model's context.

The stored payload (encrypted before it touches the disk) is a safetensors file with
three int64 tensors: ``tokens`` (all records concatenated), ``offsets`` (N + 1 record
boundaries) and ``loss_starts`` (per record). The raw JSONL is never stored.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tensafe.common.errors import IntegrityError, InvalidArgument


class RecordFormat(enum.Enum):
    """How the JSONL records of a dataset are shaped."""

    TEXT = "text"
    PROMPT_COMPLETION = "prompt_completion"


@dataclass(frozen=True)
class TokenizedDataset:
    """A dataset's records as token ids, ready to be sampled."""

    tokens: npt.NDArray[np.int64]
    """All records' tokens, concatenated."""
    offsets: npt.NDArray[np.int64]
    """Record ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""
    loss_starts: npt.NDArray[np.int64]
    """First target position (in ``tokens[1:]``) with weight 1, per record."""

    @property
    def records(self) -> int:
        """Number of records."""
        return int(self.loss_starts.shape[0])

    @property
    def total_tokens(self) -> int:
        """Number of tokens over all records."""
        return int(self.tokens.shape[0])

    def record(self, index: int) -> list[int]:
        """The tokens of record ``index``."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return [int(token) for token in self.tokens[start:end]]

    def datum(self, index: int) -> tuple[list[int], dict[str, list[float] | list[int]]]:
        """Record ``index`` as a cross-entropy datum: (model input, loss_fn_inputs)."""
        tokens = self.record(index)
        loss_start = int(self.loss_starts[index])
        targets = tokens[1:]
        weights = [0.0 if position < loss_start else 1.0 for position in range(len(targets))]
        return tokens[:-1], {"target_tokens": targets, "weights": weights}

    def to_bytes(self) -> bytes:
        """The plaintext payload (encrypt it before storing)."""
        return save_safetensors(
            {"tokens": self.tokens, "offsets": self.offsets, "loss_starts": self.loss_starts}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenizedDataset:
        """Parse :meth:`to_bytes` output.

        Raises:
            IntegrityError: The payload is not a dataset.
        """
        try:
            tensors = load_safetensors(data)
            dataset = cls(
                tokens=tensors["tokens"].astype(np.int64),
                offsets=tensors["offsets"].astype(np.int64),
                loss_starts=tensors["loss_starts"].astype(np.int64),
            )
        except (KeyError, ValueError, OSError) as error:
            raise IntegrityError(f"dataset payload is malformed: {error}") from error
        if dataset.offsets.shape[0] != dataset.records + 1:
            raise IntegrityError("dataset payload offsets do not match its records")
        return dataset


class Tokenizer:
    """The subset of a Hugging Face tokenizer used here (typed for mypy)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self._eos: int | None = int(eos) if eos is not None else None

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        ids = self._tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        return [int(token) for token in ids]

    @property
    def eos(self) -> list[int]:
        """The EOS token as a list (empty if the tokenizer has none)."""
        return [] if self._eos is None else [self._eos]


def _string_field(body: dict[str, Any], key: str, where: str, *, allow_empty: bool) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}.{key}", "must be a string")
    if not allow_empty and not value:
        raise InvalidArgument(f"{where}.{key}", "must not be empty")
    return value


def tokenize_jsonl(
    data: bytes,
    *,
    record_format: RecordFormat,
    tokenizer: Tokenizer,
    max_context_length: int,
) -> TokenizedDataset:
    """Parse and tokenise a whole JSONL upload; any bad record rejects the upload.

    Args:
        data: The uploaded bytes (UTF-8 JSONL; blank lines are skipped).
        record_format: The declared format.
        tokenizer: The base model's tokenizer.
        max_context_length: The base model's context; a record's model input
            (``len(tokens) - 1``) must fit it.

    Returns:
        The tokenised records.

    Raises:
        InvalidArgument: Field ``records[i]`` (``i`` is the 1-based line number) for a bad
            or too long record; ``chunk`` for bytes that are not UTF-8 or no records.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument("chunk", f"the upload is not UTF-8 ({error})") from error
    records: list[list[int]] = []
    loss_starts: list[int] = []
    expected = {"text"} if record_format is RecordFormat.TEXT else {"prompt", "completion"}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"records[{line_number}]"
        try:
            body = json.loads(line)
        except ValueError as error:
            raise InvalidArgument(where, f"is not JSON ({error})") from error
        if not isinstance(body, dict):
            raise InvalidArgument(where, "must be a JSON object")
        if set(body) != expected:
            raise InvalidArgument(
                where, f"must have exactly the keys {sorted(expected)}, got {sorted(body)}"
            )
        if record_format is RecordFormat.TEXT:
            tokens = tokenizer.encode(
                _string_field(body, "text", where, allow_empty=False), special_tokens=True
            )
            tokens += tokenizer.eos
            loss_start = 0
        else:
            prompt = tokenizer.encode(
                _string_field(body, "prompt", where, allow_empty=True), special_tokens=True
            )
            completion = tokenizer.encode(
                _string_field(body, "completion", where, allow_empty=False),
                special_tokens=False,
            )
            tokens = prompt + completion + tokenizer.eos
            # Targets are tokens[1:]; target t predicts tokens[t + 1]. The first
            # completion token sits at len(prompt), so its target index is len(prompt)-1.
            loss_start = max(len(prompt) - 1, 0)
        if len(tokens) < 2:
            raise InvalidArgument(where, "tokenises to fewer than 2 tokens")
        if len(tokens) - 1 > max_context_length:
            raise InvalidArgument(
                where,
                f"has {len(tokens)} tokens; the base model's context is {max_context_length}",
            )
        records.append(tokens)
        loss_starts.append(loss_start)
    if not records:
        raise InvalidArgument("chunk", "the dataset holds no records")
    return from_records(records, loss_starts)


def from_records(records: Sequence[Sequence[int]], loss_starts: Sequence[int]) -> TokenizedDataset:
    """A dataset of already tokenised records."""
    lengths = np.array([len(record) for record in records], dtype=np.int64)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(
        (token for record in records for token in record), dtype=np.int64, count=int(offsets[-1])
    )
    return TokenizedDataset(
        tokens=flat, offsets=offsets, loss_starts=np.asarray(loss_starts, dtype=np.int64)
    )
