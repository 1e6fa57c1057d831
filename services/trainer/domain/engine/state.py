"""Engine checkpoints as safetensors bytes with string metadata.

safetensors (not ``torch.save``) because a checkpoint is read back from a database or
object store: safetensors holds only tensors and a JSON header, so loading it cannot run
code, whereas unpickling a ``torch.save`` file can. The format is a little-endian u64
header length, a JSON header (tensor dtypes, shapes, offsets and a ``__metadata__``
string map) and the raw tensor bytes (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save as save_numpy_safetensors
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tensafe.common.errors import InvalidArgument

STATE_FORMAT = "tensafe.trainer.engine.state/1"
"""Value of the ``format`` field; bumped on any incompatible change."""

# The whole metadata map is one JSON string under this single safetensors metadata key.
# safetensors writes its metadata map in hash order, so two or more keys would make the
# bytes of identical states differ; with one key (and sorted JSON) they are identical.
_METADATA_KEY = "tensafe"

_HEADER_LENGTH = struct.Struct("<Q")

# safetensors rejects headers above 100 MB; so do we, before allocating anything.
_MAX_HEADER_BYTES = 100_000_000

# dtypes with a numpy equivalent that safetensors stores under the same name.
_NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


def encode_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors and metadata to safetensors bytes.

    Tensors whose dtype numpy has (every state tensor of an fp32 adapter) go through
    ``safetensors.numpy``, which writes the same bytes as ``safetensors.torch`` with less
    per-tensor work (the tiny model's 128-tensor state: 2.8-3.2 vs 5.6-6.5 ms, medians,
    ``bench/state_encoding.py``); a state with a bfloat16 tensor goes through
    ``safetensors.torch``.

    Args:
        tensors: Name to tensor; read (not kept) as contiguous CPU memory.
        metadata: String key/values stored in the header; ``format`` is added.

    Returns:
        The safetensors file content; identical inputs give identical bytes.
    """
    document = json.dumps({**metadata, "format": STATE_FORMAT}, sort_keys=True)
    header = {_METADATA_KEY: document}
    prepared = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    if all(tensor.dtype in _NUMPY_DTYPES for tensor in prepared.values()):
        # Views of the tensors' memory; save copies them into the file's bytes.
        arrays: dict[str, np.ndarray] = {name: tensor.numpy() for name, tensor in prepared.items()}
        return save_numpy_safetensors(arrays, metadata=header)
    # Clones: safetensors.torch refuses tensors that share memory.
    cloned = {name: tensor.clone() for name, tensor in prepared.items()}
    return bytes(save_safetensors(cloned, metadata=header))


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes written by :func:`encode_state`.

    Args:
        data: The checkpoint bytes.

    Returns:
        The tensors and the metadata.

    Raises:
        InvalidArgument: ``state`` is not a safetensors file of this format.
    """
    if len(data) < _HEADER_LENGTH.size:
        raise InvalidArgument("state", "too short to be a checkpoint")
    (header_length,) = _HEADER_LENGTH.unpack_from(data)
    if header_length > min(_MAX_HEADER_BYTES, len(data) - _HEADER_LENGTH.size):
        raise InvalidArgument("state", "header length is out of range")
    header_bytes = data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + header_length]
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument("state", f"header is not JSON ({error})") from error
    stored = header.get("__metadata__") if isinstance(header, dict) else None
    document = stored.get(_METADATA_KEY) if isinstance(stored, dict) else None
    try:
        metadata = json.loads(document) if isinstance(document, str) else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT:
        raise InvalidArgument("state", f"not a {STATE_FORMAT} checkpoint")
    try:
        tensors = load_safetensors(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise InvalidArgument("state", f"tensor data is corrupt ({error})") from error
    return dict(tensors), {str(key): str(value) for key, value in metadata.items()}
