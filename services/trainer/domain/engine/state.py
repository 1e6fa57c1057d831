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

import torch
from safetensors import SafetensorError
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


def encode_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors and metadata to safetensors bytes.

    Args:
        tensors: Name to tensor; copied to contiguous CPU memory first.
        metadata: String key/values stored in the header; ``format`` is added.

    Returns:
        The safetensors file content; identical inputs give identical bytes.
    """
    prepared = {
        name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()
    }
    document = json.dumps({**metadata, "format": STATE_FORMAT}, sort_keys=True)
    return bytes(save_safetensors(prepared, metadata={_METADATA_KEY: document}))


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
