"""The framing of every HE-LoRA object that crosses the wire.

SEAL's own serialisation header (magic ``0xA15E``, version, compression, size) does not
say *what* it holds: a secret key and a ciphertext look alike. Every blob the SDK sends
or the runtime returns is therefore framed as::

    magic  b"TSHE"   4 bytes
    version          1 byte   (FORMAT_VERSION)
    kind             1 byte   (WireKind)
    fingerprint     16 bytes  (SHA-256 prefix of the SEAL parameters it belongs to)
    payload                   (SEAL serialisation, or canonical JSON for PARAMETERS)

:class:`WireKind` has no member for a secret key, so no code path can frame one, and a
receiver (or a test) can check the kind of every blob it sees with :func:`wire_kind`.
The fingerprint lets the runtime tell "made under another parameter set" apart from
"malformed" before SEAL parses anything.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from tensafe.common.errors import InvalidArgument
from tensafe.helora.ckks import FINGERPRINT_BYTES

MAGIC = b"TSHE"
FORMAT_VERSION = 1
_HEADER = struct.Struct(f">4sBB{FINGERPRINT_BYTES}s")


class WireKind(enum.IntEnum):
    """What a framed blob holds. Only public material and ciphertexts exist here."""

    PARAMETERS = 1
    """Canonical JSON of a :class:`~tensafe.helora.params.CkksParams`."""
    GALOIS_KEYS = 2
    """SEAL ``GaloisKeys`` (public rotation keys) for exactly a plan's steps."""
    CIPHERTEXT = 3
    """One SEAL CKKS ``Ciphertext``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WireObject:
    """A parsed frame.

    Attributes:
        kind: What the payload is.
        fingerprint: The parameter-set fingerprint the sender stamped.
        payload: The SEAL (or JSON) bytes.
    """

    kind: WireKind
    fingerprint: bytes
    payload: bytes


def pack(kind: WireKind, fingerprint: bytes, payload: bytes) -> bytes:
    """Frame a payload.

    Args:
        kind: What the payload is.
        fingerprint: ``CkksContext.fingerprint`` of the parameter set.
        payload: The serialised object.

    Returns:
        The framed bytes.
    """
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise InvalidArgument("fingerprint", f"must be {FINGERPRINT_BYTES} bytes")
    return _HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), fingerprint) + payload


def unpack(blob: bytes, *, field: str, expected: WireKind) -> WireObject:
    """Parse a frame and check its kind.

    Args:
        blob: The framed bytes.
        field: Field path for errors (e.g. ``"ciphertexts[3]"``).
        expected: The kind the caller needs.

    Returns:
        The parsed frame.

    Raises:
        InvalidArgument: Not a TenSafe HE frame, unknown version or kind, the wrong
            kind, or an empty payload.
    """
    obj = _parse(blob, field=field)
    if obj.kind is not expected:
        raise InvalidArgument(field, f"holds {obj.kind.name}, expected {expected.name}")
    return obj


def wire_kind(blob: bytes) -> WireKind:
    """Return the kind of a framed blob (for audits and tests of what crosses the wire).

    Raises:
        InvalidArgument: The blob is not a valid frame.
    """
    return _parse(blob, field="blob").kind


def _parse(blob: bytes, *, field: str) -> WireObject:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise InvalidArgument(field, f"must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) <= _HEADER.size:
        raise InvalidArgument(field, "too short to be a TenSafe HE object")
    magic, version, kind, fingerprint = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidArgument(field, "not a TenSafe HE object (bad magic)")
    if version != FORMAT_VERSION:
        raise InvalidArgument(field, f"unsupported format version {version}")
    try:
        parsed_kind = WireKind(kind)
    except ValueError:
        raise InvalidArgument(field, f"unknown object kind {kind}") from None
    return WireObject(kind=parsed_kind, fingerprint=fingerprint, payload=data[_HEADER.size :])
