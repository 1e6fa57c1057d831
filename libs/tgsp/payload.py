"""The plaintext payload: one safetensors file, parsed strictly and hashed per tensor.

safetensors (https://github.com/huggingface/safetensors, "Format") is an 8-byte
little-endian header length N, N bytes of JSON header (optionally right-padded with
spaces), then the tensors' data: each tensor's ``data_offsets`` [begin, end) index the
data region, which they must cover exactly, without gaps or overlaps. This module reads
that layout itself, without torch, so the registry and verifiers can check tensors with
the base install and hash each tensor's bytes in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from tensafe.common.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    import torch

    TensorLike: TypeAlias = np.ndarray[Any, Any] | torch.Tensor
else:
    TensorLike: TypeAlias = Any

DTYPE_SIZES: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E4M3FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
"""Bytes per element of every safetensors dtype TGSP v1 accepts (whole-byte dtypes)."""

MAX_HEADER_LENGTH = 16 * 1024 * 1024
"""Longest safetensors JSON header accepted (bounds the memory of a streaming reader)."""

PEFT_METADATA: Mapping[str, str] = {"format": "pt"}
"""safetensors metadata written with serialised tensors, as PEFT's own files carry."""

_NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
    "C64": "<c8",
}

# Hashing large buffers in parallel pays off only above a few MiB (thread hand-off).
_PARALLEL_HASH_MIN_BYTES = 4 * 1024 * 1024
_MAX_HASH_THREADS = 4


@dataclass(frozen=True, kw_only=True)
class TensorSpan:
    """Where one tensor's data lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Offset of the first data byte from the start of the file."""
    end: int
    """Offset one past the last data byte from the start of the file."""


@dataclass(frozen=True, kw_only=True)
class SafetensorsLayout:
    """The parsed header of a safetensors file."""

    data_start: int
    """Offset of the data region: 8 + the header length."""
    tensors: tuple[TensorSpan, ...]
    """Tensors in data order (by begin offset)."""
    metadata: Mapping[str, str]
    """The header's ``__metadata__`` map (empty if absent)."""
    total_size: int
    """Length of the whole file."""


def header_extent(prefix: bytes | bytearray | memoryview, *, field: str) -> int:
    """Return 8 + N, the length of a safetensors file's header section.

    Args:
        prefix: At least the first 8 bytes of the file.
        field: Name for error messages.

    Returns:
        Offset of the data region.

    Raises:
        InvalidArgument: The header length is zero or over :data:`MAX_HEADER_LENGTH`.
    """
    if len(prefix) < 8:
        raise InvalidArgument(field, "safetensors data shorter than its 8-byte header length")
    header_length = int.from_bytes(prefix[:8], "little")
    if header_length < 2 or header_length > MAX_HEADER_LENGTH:
        raise InvalidArgument(
            field, f"safetensors header length {header_length} outside [2, {MAX_HEADER_LENGTH}]"
        )
    return 8 + header_length


def parse_layout(
    prefix: bytes | bytearray | memoryview, *, total_size: int, field: str
) -> SafetensorsLayout:
    """Parse and check a safetensors header.

    Args:
        prefix: The file's first :func:`header_extent` bytes (or more).
        total_size: Length of the whole file.
        field: Name for error messages (``weights`` when writing, ``payload`` when opening).

    Returns:
        The layout, every check passed: known dtypes, byte sizes matching shapes, data
        offsets covering the data region exactly and the file ending with the last tensor.

    Raises:
        InvalidArgument: The header breaks the safetensors format or uses a dtype TGSP v1
            does not accept.
    """
    data_start = header_extent(prefix, field=field)
    if len(prefix) < data_start or total_size < data_start:
        raise InvalidArgument(field, "safetensors data ends inside its JSON header")
    header_bytes = bytes(prefix[8:data_start]).rstrip(b" ")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_unique_members)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateName) as exc:
        raise InvalidArgument(field, f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(field, "safetensors header is not a JSON object")
    metadata_value = header.pop("__metadata__", {})
    if not isinstance(metadata_value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_value.items()
    ):
        raise InvalidArgument(field, "safetensors __metadata__ must map strings to strings")
    spans: list[TensorSpan] = []
    for name, entry in header.items():
        spans.append(_span(name, entry, data_start, field))
    if not spans:
        raise InvalidArgument(field, "safetensors data holds no tensors")
    spans.sort(key=lambda s: (s.begin, s.end))
    position = data_start
    for span in spans:
        if span.begin != position:
            raise InvalidArgument(
                field, f"tensor {span.name!r} data does not start where the previous one ends"
            )
        position = span.end
    if position != total_size:
        raise InvalidArgument(
            field, f"safetensors data region ends at {position} but the file has {total_size} bytes"
        )
    return SafetensorsLayout(
        data_start=data_start,
        tensors=tuple(spans),
        metadata=dict(metadata_value),
        total_size=total_size,
    )


def _span(name: str, entry: object, data_start: int, field: str) -> TensorSpan:
    if not name:
        raise InvalidArgument(field, "safetensors tensor with an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidArgument(
            field, f"tensor {name!r} must have exactly dtype, shape and data_offsets"
        )
    dtype = entry["dtype"]
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InvalidArgument(field, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidArgument(field, f"tensor {name!r} shape must be non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidArgument(field, f"tensor {name!r} data_offsets must be [begin, end]")
    elements = 1
    for dim in shape:
        elements *= dim
    if offsets[1] - offsets[0] != elements * DTYPE_SIZES[dtype]:
        raise InvalidArgument(field, f"tensor {name!r} byte length does not match its shape")
    return TensorSpan(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


class _DuplicateName(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateName(f"duplicate name {name!r}")
        result[name] = value
    return result


def serialize_tensors(tensors: Mapping[str, TensorLike]) -> bytes:
    """Serialise tensors to safetensors bytes, with PEFT's ``{"format": "pt"}`` metadata.

    Args:
        tensors: Name to tensor; all numpy arrays or all torch tensors (any device; they
            are copied to the CPU and made contiguous).

    Returns:
        The safetensors file bytes.

    Raises:
        InvalidArgument: No tensors, a mix of numpy and torch, or a tensor safetensors
            cannot store.
    """
    if not tensors:
        raise InvalidArgument("weights", "no tensors given")
    kinds = {_tensor_kind(name, t) for name, t in tensors.items()}
    if len(kinds) != 1:
        raise InvalidArgument("weights", "mixes numpy arrays and torch tensors; use one kind")
    try:
        if kinds == {"numpy"}:
            from safetensors.numpy import save as save_numpy

            arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
            return bytes(save_numpy(arrays, metadata=dict(PEFT_METADATA)))
        from safetensors.torch import save as save_torch

        prepared = {
            name: t.detach().to("cpu").contiguous()
            for name, t in tensors.items()
            if not isinstance(t, np.ndarray)  # all torch here; the check narrows the type
        }
        return bytes(save_torch(prepared, metadata=dict(PEFT_METADATA)))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidArgument("weights", f"safetensors cannot store these tensors: {exc}") from exc


def _tensor_kind(name: str, tensor: object) -> str:
    if isinstance(tensor, np.ndarray):
        return "numpy"
    if type(tensor).__module__.split(".")[0] == "torch" and hasattr(tensor, "detach"):
        return "torch"
    raise InvalidArgument(
        f"weights.{name}", f"must be a numpy array or torch tensor, not {type(tensor).__name__}"
    )


def tensor_digests(data: memoryview, layout: SafetensorsLayout) -> dict[str, str]:
    """Hash each tensor's data bytes with SHA-256, in parallel threads for large payloads.

    hashlib releases the GIL while hashing large buffers, so threads use several cores.

    Args:
        data: The whole safetensors file.
        layout: Its parsed layout.

    Returns:
        Tensor name to hex SHA-256 of its data bytes.
    """
    spans = list(layout.tensors)
    total = sum(span.end - span.begin for span in spans)
    threads = min(_MAX_HASH_THREADS, _usable_cpus(), len(spans))
    if threads <= 1 or total < _PARALLEL_HASH_MIN_BYTES:
        return _hash_group(data, spans)
    # Balance the groups by bytes, largest tensors first (greedy LPT scheduling).
    groups: list[list[TensorSpan]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for span in sorted(spans, key=lambda s: s.end - s.begin, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(span)
        loads[lightest] += span.end - span.begin
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tgsp-hash") as pool:
        for result in pool.map(lambda group: _hash_group(data, group), groups):
            digests.update(result)
    return digests


def _usable_cpus() -> int:
    # sched_getaffinity honours CPU pinning (containers, taskset) but is Linux-only.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _hash_group(data: memoryview, spans: Iterable[TensorSpan]) -> dict[str, str]:
    return {span.name: hashlib.sha256(data[span.begin : span.end]).hexdigest() for span in spans}


class StreamingTensorHasher:
    """Hashes each tensor of a safetensors file fed in consecutive pieces.

    Memory stays bounded by the header plus one piece, which is what lets
    ``decrypt_to_file`` check tensors of an adapter larger than memory.

    Args:
        total_size: Length of the whole file.
        field: Name for error messages.
    """

    def __init__(self, *, total_size: int, field: str) -> None:
        self._total_size = total_size
        self._field = field
        self._position = 0
        self._head = bytearray()
        self._layout: SafetensorsLayout | None = None
        self._next = 0
        self._hasher: Any = None
        self._digests: dict[str, str] = {}

    def update(self, piece: bytes | memoryview) -> None:
        """Feed the next piece of the file.

        Raises:
            InvalidArgument: The header, once complete, is not valid safetensors.
        """
        view = memoryview(piece)
        start = self._position
        self._position += len(view)
        if self._layout is None:
            self._head += view
            if len(self._head) >= 8:
                extent = header_extent(self._head, field=self._field)
                if len(self._head) >= extent:
                    self._layout = parse_layout(
                        self._head, total_size=self._total_size, field=self._field
                    )
                    self._feed(self._layout, memoryview(self._head)[extent:], extent)
                    self._head = bytearray()
            return
        self._feed(self._layout, view, start)

    def _feed(self, layout: SafetensorsLayout, view: memoryview, start: int) -> None:
        spans = layout.tensors
        stop = start + len(view)
        while self._next < len(spans):
            span = spans[self._next]
            if span.begin > stop or (span.begin == stop and span.end > stop):
                return
            if self._hasher is None:
                self._hasher = hashlib.sha256()
            low = max(span.begin, start)
            high = min(span.end, stop)
            if high > low:
                self._hasher.update(view[low - start : high - start])
            if span.end > stop:
                return
            self._digests[span.name] = self._hasher.hexdigest()
            self._hasher = None
            self._next += 1

    def finish(self) -> tuple[SafetensorsLayout, dict[str, str]]:
        """Return the layout and every tensor's digest once the whole file was fed.

        Raises:
            InvalidArgument: The file was shorter than ``total_size`` or its header never
                completed.
        """
        if self._layout is None or self._position != self._total_size:
            raise InvalidArgument(self._field, "safetensors data ended early")
        if self._next != len(self._layout.tensors):
            raise InvalidArgument(self._field, "safetensors data ended inside a tensor")
        return self._layout, dict(self._digests)


def numpy_tensors(data: memoryview, layout: SafetensorsLayout) -> dict[str, np.ndarray[Any, Any]]:
    """Return numpy views (read-only, zero-copy) of every tensor.

    Args:
        data: The whole safetensors file.
        layout: Its parsed layout.

    Raises:
        InvalidArgument: A tensor has a dtype numpy cannot represent (BF16, FP8); use
            torch tensors for those.
    """
    result: dict[str, np.ndarray[Any, Any]] = {}
    for span in layout.tensors:
        code = _NUMPY_DTYPES.get(span.dtype)
        if code is None:
            raise InvalidArgument(
                f"tensors.{span.name}", f"dtype {span.dtype} has no numpy equivalent; use torch"
            )
        dtype = np.dtype(code)
        count = (span.end - span.begin) // dtype.itemsize
        array = np.frombuffer(data, dtype=dtype, count=count, offset=span.begin)
        result[span.name] = array.reshape(span.shape)
    return result


def torch_tensors(data: memoryview, layout: SafetensorsLayout) -> dict[str, torch.Tensor]:
    """Return torch tensors (each its own copy, CPU) of every tensor.

    Args:
        data: The whole safetensors file.
        layout: Its parsed layout.

    Raises:
        ImportError: torch is not installed (it comes with the ``trainer`` extra).
        FailedPrecondition: The host is big-endian (safetensors data is little-endian).
    """
    import torch

    if sys.byteorder != "little":
        raise FailedPrecondition("torch tensors from safetensors need a little-endian host")
    dtypes: dict[str, torch.dtype] = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F64": torch.float64,
        "C64": torch.complex64,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
        "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    }
    result: dict[str, torch.Tensor] = {}
    for span in layout.tensors:
        dtype = dtypes[span.dtype]
        if span.end == span.begin:
            result[span.name] = torch.empty(span.shape, dtype=dtype)
            continue
        # bytearray: torch.frombuffer wants a writable buffer, and the copy detaches the
        # tensor from the package's plaintext buffer.
        buffer = bytearray(data[span.begin : span.end])
        result[span.name] = torch.frombuffer(buffer, dtype=dtype).reshape(span.shape)
    return result
