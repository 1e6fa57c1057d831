r"""The TGSP container: write, inspect, verify, open and re-wrap packages (format 2; 1 read).

Byte layout (all integers big-endian; docs/tgsp.md is the full specification)::

    header      28 bytes   magic "\x89TGSP\r\n\x1a", u16 format_version (1 or 2),
                           u16 flags = 0, u32 manifest_length,
                           u32 wrapped_key_length, u64 ciphertext_length
    manifest    canonical JSON (RFC 8785), see tensafe.tgsp.manifest
    wrapped key canonical JSON, see tensafe.tgsp.kek.WrappedKey
    ciphertext  the safetensors payload, AES-256-GCM in chunks (below)
    trailer     192 bytes  signer key id (32), SHA-256 of manifest (32), of wrapped
                           key (32), of ciphertext (32), Ed25519 signature (64)

Payload encryption follows the STREAM construction (Hoang, Reyhanitabar, Rogaway and
Vizár, CRYPTO 2015, "Online Authenticated-Encryption and its Nonce-Reuse
Misuse-Resistance"): the plaintext is cut into ``chunk_size`` pieces (1 MiB by default);
chunk i is sealed with nonce ``0x00000000 || u64 i`` and associated data
``"tensafe.tgsp.v1.chunk\0" || u64 i || u8 final``. The DEK is fresh for every package,
so counter nonces never repeat under one key; the index stops reordering and the final
flag stops truncation at a chunk boundary. Chunks let a reader verify and decrypt with
memory bounded by one chunk, and tell which chunk failed.

Format version 1 signs ``"tensafe.tgsp.v1.signature\0" || trailer[0:128]``: the signer
and the three section digests. Format version 2 signs ``"tensafe.tgsp.v2.signature\0"
|| trailer[0:64] || trailer[96:128]``: the signer, the manifest digest and the
ciphertext digest, **not** the wrapped key's, which stays in the trailer as an unsigned
checksum. The wrapped key is authenticated instead by its own AEAD: the KEK provider
binds the tenant, the adapter id and version, the format version and the manifest's
digest as associated data (:func:`tensafe.tgsp.dek_aad`), so only a holder of the
tenant's KEK can make a wrapped key that opens this package, and the DEK it yields
must then pass every chunk's GCM tag under the signed ciphertext digest. What this
buys: :func:`rewrap_to` re-wraps the DEK under a new KEK version (rotation) without
touching the signature. A reader checks the signer and the signature first and then
each digest, naming the part that was altered.

Order of checks on reading (each failure raises and nothing is returned):
structure of header and lengths → trusted signer → signature → manifest digest →
wrapped-key digest → (``verify``: ciphertext digest) → manifest and wrapped-key
structure → tenant → unwrap the DEK → each chunk's tag, while the ciphertext is hashed
→ ciphertext digest → payload structure → each tensor's dtype, shape and SHA-256
against the manifest. ``open_package`` and ``decrypt_to_file`` read the trailer before
the ciphertext so that they unwrap only for an authentic manifest and then need a
single pass over the ciphertext.
"""

from __future__ import annotations

import abc
import builtins
import hashlib
import io
import os
import secrets
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.common.errors import FailedPrecondition, InvalidArgument
from tensafe.tgsp.kek import KEY_LENGTH, KekProvider, WrappedKey, dek_aad, integrity_failure
from tensafe.tgsp.manifest import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    AdapterRef,
    BaseModelRef,
    DPCertificate,
    LoraSpec,
    Manifest,
    PayloadInfo,
    Provenance,
    TensorInfo,
)
from tensafe.tgsp.payload import (
    SafetensorsLayout,
    StreamingTensorHasher,
    TensorLike,
    numpy_tensors,
    parse_layout,
    serialize_tensors,
    tensor_digests,
    torch_tensors,
)
from tensafe.tgsp.signing import SigningKey, VerifyingKey, trusted_key_map
from tensafe.tgsp.trust import TrustList

if TYPE_CHECKING:
    import torch

MAGIC = b"\x89TGSP\r\n\x1a"
"""First 8 bytes of every package. The high byte and CR LF / SUB catch 7-bit and
newline-translating transfers, as PNG's signature does."""

HEADER_LENGTH = 28
TRAILER_LENGTH = 192
GCM_TAG_LENGTH = 16
MAX_MANIFEST_LENGTH = 16 * 1024 * 1024
MAX_WRAPPED_KEY_LENGTH = 64 * 1024
SIGNATURE_DOMAINS = {
    1: b"tensafe.tgsp.v1.signature\x00",
    2: b"tensafe.tgsp.v2.signature\x00",
}
CHUNK_AAD_DOMAIN = b"tensafe.tgsp.v1.chunk\x00"

_HEADER = struct.Struct(">8sHHIIQ")
_CHUNK_INDEX = struct.Struct(">Q")
_STREAM_BLOCK = 1024 * 1024
_THREAD_MIN_BYTES = 4 * 1024 * 1024
# Largest ciphertext length a reader accepts: exact as an IEEE double, like every
# integer in the manifest (RFC 7493 §2.2).
_MAX_CIPHERTEXT_LENGTH = 2**53 - 1

PackageSource: TypeAlias = bytes | bytearray | memoryview | os.PathLike[str] | BinaryIO
"""A package in memory, a file path, or a binary stream positioned at its start."""

Weights: TypeAlias = Mapping[str, TensorLike] | bytes | bytearray | memoryview | os.PathLike[str]
"""Tensors by name (numpy or torch), the bytes of a safetensors file, or its path."""


@dataclass(frozen=True, kw_only=True)
class OpenedAdapter:
    """A package that passed every check, with its decrypted weights."""

    manifest: Manifest
    """The verified manifest."""
    signer_key_id: str
    """Key id of the trusted key that signed the package."""
    payload: memoryview
    """The decrypted safetensors file (read-only; ``bytes(payload)`` for a copy)."""
    layout: SafetensorsLayout
    """Where each tensor lies in ``payload``."""

    def numpy_tensors(self) -> dict[str, np.ndarray[Any, Any]]:
        """Return the tensors as read-only numpy views of the payload (no BF16/FP8)."""
        return numpy_tensors(self.payload, self.layout)

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        """Return the tensors as torch CPU tensors (needs the ``trainer`` extra)."""
        return torch_tensors(self.payload, self.layout)


# --------------------------------------------------------------------------- writing


def write(
    *,
    weights: Weights,
    adapter: AdapterRef,
    base_model: BaseModelRef,
    lora: LoraSpec,
    dp_certificate: DPCertificate,
    provenance: Provenance,
    kek_provider: KekProvider,
    signing_key: SigningKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    format_version: int = FORMAT_VERSION,
) -> bytes:
    """Seal an adapter into a TGSP package and return its bytes.

    Args:
        weights: The LoRA tensors, or a safetensors file's bytes or path (kept byte for
            byte; a path is read in blocks, twice, with bounded memory).
        adapter: Adapter id and version.
        base_model: Base model id and weights digest.
        lora: LoRA configuration.
        dp_certificate: The differential-privacy claim (or the statement that none is
            known).
        provenance: Tenant, training client, code version and creation time; the
            tenant's KEK wraps the data key.
        kek_provider: Provider holding the tenant's KEK.
        signing_key: Key that signs the package.
        chunk_size: Plaintext bytes per AEAD chunk.
        format_version: 2 (the default); 1 only for readers that know no other (a
            version-1 package's signature covers its wrapped key, so it cannot be
            re-wrapped when the tenant's KEK rotates).

    Returns:
        The package.

    Raises:
        InvalidArgument: Bad weights or manifest fields; the field names which.
        NotFound: The tenant has no KEK.
        FailedPrecondition: A weights file changed while it was being packaged.
    """
    buffer = io.BytesIO()
    write_to(
        buffer,
        weights=weights,
        adapter=adapter,
        base_model=base_model,
        lora=lora,
        dp_certificate=dp_certificate,
        provenance=provenance,
        kek_provider=kek_provider,
        signing_key=signing_key,
        chunk_size=chunk_size,
        format_version=format_version,
    )
    return buffer.getvalue()


def write_to(
    destination: BinaryIO | os.PathLike[str],
    *,
    weights: Weights,
    adapter: AdapterRef,
    base_model: BaseModelRef,
    lora: LoraSpec,
    dp_certificate: DPCertificate,
    provenance: Provenance,
    kek_provider: KekProvider,
    signing_key: SigningKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    durable: bool = True,
    format_version: int = FORMAT_VERSION,
) -> int:
    """Seal an adapter into a TGSP package written to a stream or file.

    The ciphertext is produced and written one chunk at a time. A path is written to a
    temporary file beside it and renamed into place only when complete.

    Args:
        destination: A writable binary stream, or the path of the file to create.
        weights: See :func:`write`; so are the other arguments.
        adapter: Adapter id and version.
        base_model: Base model id and weights digest.
        lora: LoRA configuration.
        dp_certificate: The differential-privacy claim.
        provenance: Tenant, training client, code version and creation time.
        kek_provider: Provider holding the tenant's KEK.
        signing_key: Key that signs the package.
        chunk_size: Plaintext bytes per AEAD chunk.
        durable: For a path, fsync the file before renaming it into place, so a package
            that exists survives a crash. Ignored for streams (the caller owns them).
        format_version: See :func:`write`.

    Returns:
        Number of bytes written.

    Raises:
        InvalidArgument: Bad weights or manifest fields; the field names which.
        NotFound: The tenant has no KEK.
        FailedPrecondition: A weights file changed while it was being packaged.
    """
    with _plaintext_input(weights) as plaintext:
        return _write_to(
            destination,
            plaintext=plaintext,
            adapter=adapter,
            base_model=base_model,
            lora=lora,
            dp_certificate=dp_certificate,
            provenance=provenance,
            kek_provider=kek_provider,
            signing_key=signing_key,
            chunk_size=chunk_size,
            durable=durable,
            format_version=format_version,
        )


def _write_to(
    destination: BinaryIO | os.PathLike[str],
    *,
    plaintext: _PlaintextInput,
    adapter: AdapterRef,
    base_model: BaseModelRef,
    lora: LoraSpec,
    dp_certificate: DPCertificate,
    provenance: Provenance,
    kek_provider: KekProvider,
    signing_key: SigningKey,
    chunk_size: int,
    durable: bool,
    format_version: int,
) -> int:
    layout, digests = plaintext.scan()
    manifest = Manifest(
        adapter=adapter,
        base_model=base_model,
        lora=lora,
        tensors={
            span.name: TensorInfo(dtype=span.dtype, shape=span.shape, sha256=digests[span.name])
            for span in layout.tensors
        },
        dp_certificate=dp_certificate,
        provenance=provenance,
        payload=PayloadInfo(chunk_size=chunk_size, plaintext_size=plaintext.size),
        format_version=format_version,
    )
    manifest_bytes = manifest.canonical_bytes()
    if len(manifest_bytes) > MAX_MANIFEST_LENGTH:
        raise InvalidArgument("weights", f"manifest over {MAX_MANIFEST_LENGTH} bytes")
    tenant_id = provenance.tenant_id
    dek = secrets.token_bytes(KEY_LENGTH)
    wrapped = kek_provider.wrap(tenant_id, dek, _dek_aad(manifest, manifest_bytes))
    if wrapped.tenant_id != tenant_id:
        raise integrity_failure("tenant mismatch", "the KEK provider wrapped for another tenant")
    wrapped_bytes = wrapped.canonical_bytes()
    if len(wrapped_bytes) > MAX_WRAPPED_KEY_LENGTH:
        raise InvalidArgument("kek_provider", "wrapped key over the format's 64 KiB limit")
    ciphertext_length = plaintext.size + GCM_TAG_LENGTH * manifest.payload.chunk_count
    header = _HEADER.pack(
        MAGIC, format_version, 0, len(manifest_bytes), len(wrapped_bytes), ciphertext_length
    )
    if isinstance(destination, os.PathLike):
        return _write_file_atomically(
            Path(destination),
            lambda stream: _emit(
                stream, header, manifest_bytes, wrapped_bytes, plaintext, manifest, dek, signing_key
            ),
            durable=durable,
        )
    return _emit(
        destination, header, manifest_bytes, wrapped_bytes, plaintext, manifest, dek, signing_key
    )


def _emit(
    stream: BinaryIO,
    header: bytes,
    manifest_bytes: bytes,
    wrapped_bytes: bytes,
    plaintext: _PlaintextInput,
    manifest: Manifest,
    dek: bytes,
    signing_key: SigningKey,
) -> int:
    written = 0
    for part in (header, manifest_bytes, wrapped_bytes):
        written += _write_all(stream, part)
    cipher = _ChunkCipher(dek)
    chunk_size = manifest.payload.chunk_size
    count = manifest.payload.chunk_count
    with _PipelinedSha256(total_bytes=plaintext.size) as ciphertext_hash:
        # Encrypt chunk i into a free slot while the helper thread hashes earlier ones.
        ring = _BufferRing(
            chunk_size + GCM_TAG_LENGTH, total_bytes=plaintext.size + GCM_TAG_LENGTH * count
        )
        for index, piece in enumerate(plaintext.chunks(chunk_size)):
            sealed = ring.next_slot()[: len(piece) + GCM_TAG_LENGTH]
            cipher.encrypt(index, index == count - 1, piece, sealed)
            ring.hold(ciphertext_hash.update(sealed))
            written += _write_all(stream, sealed)
        ciphertext_digest = ciphertext_hash.digest()
    plaintext.check_unchanged()
    body = (
        bytes.fromhex(signing_key.key_id)
        + hashlib.sha256(manifest_bytes).digest()
        + hashlib.sha256(wrapped_bytes).digest()
        + ciphertext_digest
    )
    signature = signing_key.sign(_signed_message(manifest.format_version, body))
    written += _write_all(stream, body + signature)
    return written


class _PlaintextInput(abc.ABC):
    """The safetensors plaintext a package is written from."""

    size: int

    def __enter__(self) -> _PlaintextInput:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the input opened."""

    @abc.abstractmethod
    def scan(self) -> tuple[SafetensorsLayout, dict[str, str]]:
        """Check the safetensors structure and hash every tensor."""

    @abc.abstractmethod
    def chunks(self, chunk_size: int) -> Iterator[memoryview]:
        """Yield the plaintext in consecutive pieces of ``chunk_size`` bytes (the last
        may be shorter; an empty plaintext yields one empty piece)."""

    @abc.abstractmethod
    def check_unchanged(self) -> None:
        """Refuse an input that changed while it was being packaged."""


class _MemoryPlaintext(_PlaintextInput):
    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.size = len(view)

    def close(self) -> None:
        """Nothing to release: the caller owns the memory."""

    def scan(self) -> tuple[SafetensorsLayout, dict[str, str]]:
        layout = parse_layout(self._view, total_size=self.size, field="weights")
        return layout, tensor_digests(self._view, layout)

    def chunks(self, chunk_size: int) -> Iterator[memoryview]:
        for start in range(0, max(self.size, 1), chunk_size):
            yield self._view[start : start + chunk_size]

    def check_unchanged(self) -> None:
        """Memory the caller handed over is assumed stable for the call."""


class _FilePlaintext(_PlaintextInput):
    """A safetensors file read twice, in blocks: once to hash tensors, once to encrypt.

    Memory stays bounded by a few blocks whatever the adapter's size, and reading from
    the page cache into reused buffers costs less than loading the file into one new
    buffer. The file's identity, size and modification time are compared after the
    second pass; a file rewritten in between is refused (and a package made from it
    would fail its tensor checks on opening anyway).
    """

    def __init__(self, path: os.PathLike[str]) -> None:
        try:
            self._stream = builtins.open(os.fspath(path), "rb")  # noqa: SIM115
        except FileNotFoundError as exc:
            raise InvalidArgument("weights", f"no such file: {os.fspath(path)}") from exc
        self._stamp = self._identity()
        self.size = self._stamp[2]

    def _identity(self) -> tuple[int, int, int, int]:
        info = os.fstat(self._stream.fileno())
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def close(self) -> None:
        """Close the file."""
        self._stream.close()

    def scan(self) -> tuple[SafetensorsLayout, dict[str, str]]:
        tensors = StreamingTensorHasher(total_size=self.size, field="weights")
        ring = _BufferRing(_STREAM_BLOCK, total_bytes=self.size)
        self._stream.seek(0)
        with _InOrderWorker(name="tgsp-tensors", total_bytes=self.size) as worker:
            for start in range(0, self.size, _STREAM_BLOCK):
                block = ring.next_slot()[: min(_STREAM_BLOCK, self.size - start)]
                self._fill(block)
                ring.hold(worker.submit(tensors.update, block))
            worker.drain()
        return tensors.finish()

    def chunks(self, chunk_size: int) -> Iterator[memoryview]:
        buffer = memoryview(bytearray(chunk_size))
        self._stream.seek(0)
        for start in range(0, max(self.size, 1), chunk_size):
            piece = buffer[: min(chunk_size, self.size - start)]
            self._fill(piece)
            yield piece

    def _fill(self, block: memoryview) -> None:
        filled = 0
        while filled < len(block):
            count = self._stream.readinto(block[filled:])
            if not count:
                raise FailedPrecondition("the weights file shrank while it was being packaged")
            filled += count

    def check_unchanged(self) -> None:
        if self._identity() != self._stamp:
            raise FailedPrecondition("the weights file changed while it was being packaged")


def _plaintext_input(weights: Weights) -> _PlaintextInput:
    if isinstance(weights, os.PathLike):
        return _FilePlaintext(weights)
    if isinstance(weights, bytes | bytearray | memoryview):
        view = memoryview(weights)
        return _MemoryPlaintext(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
    if not isinstance(weights, Mapping):
        raise InvalidArgument(
            "weights", "must be a mapping of tensors, safetensors bytes or a safetensors path"
        )
    return _MemoryPlaintext(memoryview(serialize_tensors(weights)))


def _write_all(stream: BinaryIO, data: bytes | memoryview) -> int:
    view = memoryview(data)
    while view:
        count = stream.write(view)
        if count is None or count <= 0:
            raise OSError("the destination stream accepted no bytes")
        view = view[count:]
    return len(data)


def _write_file_atomically(path: Path, produce: Callable[[BinaryIO], int], *, durable: bool) -> int:
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            written = produce(stream)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written


# --------------------------------------------------------------------------- reading


def inspect(source: PackageSource) -> Manifest:
    """Read a package's manifest without any key.

    Checks the structure (header, section lengths, manifest and wrapped-key encoding)
    and that the manifest and wrapped key match the digests the trailer states; it does
    not check the signature or the ciphertext, so the result is a claim, not a verified
    fact: use :func:`verify` before trusting it.

    Args:
        source: The package (bytes, path or binary stream).

    Returns:
        The manifest.

    Raises:
        InvalidArgument: The package is malformed; the field names what.
        IntegrityError: ``manifest digest`` or ``wrapped key digest``.
    """
    with _source(source) as reader:
        sections = _read_sections(reader, hash_ciphertext=False)
    _check_digest("manifest digest", sections.manifest_bytes, sections.trailer.manifest_sha256)
    _check_digest(
        "wrapped key digest", sections.wrapped_key_bytes, sections.trailer.wrapped_key_sha256
    )
    manifest, _ = _parse_contents(sections)
    return manifest


def signer_key_id(source: PackageSource) -> str:
    """Return the key id a package claims it was signed with (not verified).

    Useful to pick or report the key; :func:`verify` decides whether it is trusted.

    Raises:
        InvalidArgument: The package is malformed.
    """
    with _source(source) as reader:
        sections = _read_sections(reader, hash_ciphertext=False)
    return sections.trailer.signer_key_id.hex()


def verify(
    source: PackageSource,
    *,
    trusted_keys: Iterable[VerifyingKey],
    expected_tenant: str | None = None,
) -> Manifest:
    """Verify a package's signature, digests and structure, without decrypting it.

    A path or stream is read once, in 1 MiB blocks, with memory bounded by the manifest.

    Args:
        source: The package (bytes, path or binary stream).
        trusted_keys: Public keys whose signatures are accepted, or a
            :class:`~tensafe.tgsp.trust.TrustList` that also binds each key to the
            tenants it may sign for.
        expected_tenant: If given, the tenant the package must belong to.

    Returns:
        The verified manifest.

    Raises:
        InvalidArgument: The package is malformed, or ``trusted_keys`` is empty.
        IntegrityError: ``unknown signer``, ``signature``, ``manifest digest``,
            ``wrapped key digest``, ``ciphertext digest`` or ``tenant mismatch``.
    """
    trusted = trusted_key_map(trusted_keys)
    with _source(source) as reader:
        sections = _read_sections(reader, hash_ciphertext=True)
    signer = _check_authenticity(sections, trusted)
    manifest, _ = _parse_contents(sections)
    _check_signer_binding(trusted_keys, signer, manifest)
    if expected_tenant is not None:
        _check_tenant(manifest, expected_tenant)
    return manifest


def open_package(
    source: PackageSource,
    *,
    trusted_keys: Iterable[VerifyingKey],
    kek_provider: KekProvider,
    tenant_id: str,
) -> OpenedAdapter:
    """Verify a package, unwrap its data key for ``tenant_id`` and decrypt the weights.

    The signer, the signature, the manifest and wrapped-key digests, the structure and
    the tenant are checked before the DEK is unwrapped; the ciphertext is then read
    once, decrypted chunk by chunk (each tag checked) while a helper thread hashes it,
    and its digest compared with the signed one; finally every tensor's dtype, shape and
    SHA-256 is compared with the manifest. Only then is anything returned. The
    plaintext is held in memory (the ciphertext is not, for a path or seekable stream);
    see :func:`decrypt_to_file` for bounded memory.

    Args:
        source: The package (bytes, path or binary stream).
        trusted_keys: Public keys whose signatures are accepted.
        kek_provider: Provider holding the tenant's KEK.
        tenant_id: The tenant the caller acts for; must own the package.

    Returns:
        The manifest and the decrypted, checked weights.

    Raises:
        InvalidArgument: The package is malformed.
        IntegrityError: Any failed check, named: ``unknown signer``, ``signature``,
            ``manifest digest``, ``wrapped key digest``, ``tenant mismatch``, ``wrapped
            key``, ``ciphertext chunk N tag``, ``ciphertext digest``, ``tensor set``,
            ``tensor 'name' sha256`` (or ``dtype``/``shape``).
        NotFound: The tenant has no KEK.
    """
    trusted = trusted_key_map(trusted_keys)
    with _seekable_source(source) as reader:
        prefix = _authenticate_prefix(reader, trusted)
        manifest, wrapped = _parse_contents(prefix)
        _check_signer_binding(trusted_keys, prefix.signer_key_id, manifest)
        _check_tenant(manifest, tenant_id)
        dek = _unwrap(kek_provider, tenant_id, wrapped, manifest, prefix.manifest_bytes)
        info = manifest.payload
        plaintext = _uninitialised(info.plaintext_size)
        cipher = _ChunkCipher(dek)

        def decrypt(index: int, sealed: memoryview | bytes) -> None:
            begin = index * info.chunk_size
            end = begin + len(sealed) - GCM_TAG_LENGTH
            cipher.decrypt(index, index == info.chunk_count - 1, sealed, plaintext[begin:end])

        _stream_ciphertext(reader, info, prefix.trailer, decrypt)
    payload = plaintext.toreadonly()
    layout = parse_layout(payload, total_size=len(payload), field="payload")
    _check_tensors(manifest, layout, tensor_digests(payload, layout))
    return OpenedAdapter(
        manifest=manifest, signer_key_id=prefix.signer_key_id, payload=payload, layout=layout
    )


def decrypt_to_file(
    source: os.PathLike[str] | BinaryIO,
    destination: os.PathLike[str],
    *,
    trusted_keys: Iterable[VerifyingKey],
    kek_provider: KekProvider,
    tenant_id: str,
    durable: bool = True,
) -> Manifest:
    """Verify a package and decrypt its safetensors payload to a file, in bounded memory.

    The same checks as :func:`open_package`, in one pass over the ciphertext with memory
    bounded by a few chunks: each chunk is decrypted into a temporary file (mode 0600)
    beside ``destination`` while the ciphertext and each tensor are hashed. Only when
    every check passed is the temporary file renamed to ``destination``; on any failure
    it is deleted.

    Args:
        source: A path, or a seekable binary stream positioned at the package's start
            (the trailer is read first).
        destination: Path of the safetensors file to create (replaced if it exists).
        trusted_keys: Public keys whose signatures are accepted.
        kek_provider: Provider holding the tenant's KEK.
        tenant_id: The tenant the caller acts for; must own the package.
        durable: fsync the file before renaming it into place.

    Returns:
        The verified manifest.

    Raises:
        InvalidArgument: The package is malformed or the stream is not seekable.
        IntegrityError: As for :func:`open_package`.
        NotFound: The tenant has no KEK.
    """
    trusted = trusted_key_map(trusted_keys)
    with _source(source) as reader:
        if not reader.seekable:
            raise InvalidArgument("source", "must be a path or a seekable stream")
        prefix = _authenticate_prefix(reader, trusted)
        manifest, wrapped = _parse_contents(prefix)
        _check_signer_binding(trusted_keys, prefix.signer_key_id, manifest)
        _check_tenant(manifest, tenant_id)
        dek = _unwrap(kek_provider, tenant_id, wrapped, manifest, prefix.manifest_bytes)
        info = manifest.payload

        def produce(out: BinaryIO) -> int:
            cipher = _ChunkCipher(dek)
            tensors = StreamingTensorHasher(total_size=info.plaintext_size, field="payload")
            ring = _BufferRing(info.chunk_size, total_bytes=info.plaintext_size)
            with _InOrderWorker(
                name="tgsp-tensors", total_bytes=info.plaintext_size
            ) as tensor_worker:

                def decrypt(index: int, sealed: memoryview | bytes) -> None:
                    plain = ring.next_slot()[: len(sealed) - GCM_TAG_LENGTH]
                    cipher.decrypt(index, index == info.chunk_count - 1, sealed, plain)
                    ring.hold(tensor_worker.submit(tensors.update, plain))
                    _write_all(out, plain)

                _stream_ciphertext(reader, info, prefix.trailer, decrypt)
                tensor_worker.drain()
            layout, digests = tensors.finish()
            _check_tensors(manifest, layout, digests)
            return info.plaintext_size

        _write_file_atomically(Path(destination), produce, durable=durable)
    return manifest


# --------------------------------------------------------------------------- re-wrapping


@dataclass(frozen=True)
class Envelope:
    """A package's format version and wrapped key, as stated (not verified)."""

    format_version: int
    """1 or 2; only version 2 can be re-wrapped."""
    wrapped_key: WrappedKey
    """Which provider and KEK version wrapped the DEK."""


def read_envelope(source: PackageSource) -> Envelope:
    """Return a package's format version and wrapped key without any key or check of
    the signature: enough to tell which KEK version a stored package needs.

    Raises:
        InvalidArgument: The package is malformed.
        IntegrityError: ``wrapped key digest`` (the trailer's checksum).
    """
    with _source(source) as reader:
        sections = _read_sections(reader, hash_ciphertext=False)
    _check_digest(
        "wrapped key digest", sections.wrapped_key_bytes, sections.trailer.wrapped_key_sha256
    )
    return Envelope(
        format_version=sections.header.version,
        wrapped_key=WrappedKey.from_canonical_bytes(sections.wrapped_key_bytes),
    )


def rewrap_to(
    source: os.PathLike[str] | BinaryIO,
    destination: BinaryIO,
    *,
    trusted_keys: Iterable[VerifyingKey],
    kek_provider: KekProvider,
    tenant_id: str,
) -> WrappedKey:
    """Copy a version-2 package with its DEK re-wrapped under the tenant's current KEK.

    The signer, the signature, the manifest digest, the structure and the tenant are
    checked, the DEK is unwrapped with the KEK version that wrapped it and wrapped again
    under the current one (same associated data), and the package is written with the
    new wrapped-key section and the trailer's wrapped-key checksum updated. The
    manifest, the ciphertext and the signature are copied unchanged (the signature
    does not cover the wrapped key in version 2), and the ciphertext is hashed on the
    way and compared with the signed digest, so a damaged copy is never propagated.
    Memory is bounded by one block.

    Args:
        source: A path, or a seekable binary stream at the package's start.
        destination: Where the re-wrapped package is written (the caller commits it).
        trusted_keys: Public keys whose signatures are accepted.
        kek_provider: Holds the tenant's KEK versions (the old one must still exist).
        tenant_id: The owning tenant.

    Returns:
        The new wrapped key (its ``kek_id`` is the current KEK version).

    Raises:
        FailedPrecondition: A version-1 package (its signature covers the wrapped key:
            re-wrapping it would void the signature; the old KEK must stay until it is
            re-published), or a source that is not seekable.
        IntegrityError: As for :func:`open_package`, up to the ciphertext digest.
        NotFound: The tenant has no KEK.
    """
    trusted = trusted_key_map(trusted_keys)
    with _source(source) as reader:
        if not reader.seekable:
            raise InvalidArgument("source", "must be a path or a seekable stream")
        prefix = _authenticate_prefix(reader, trusted)
        if prefix.header.version == 1:
            raise FailedPrecondition(
                "format version 1 signs the wrapped key: re-wrapping would void the "
                "signature; the package keeps its KEK version until it is re-published",
                reason="TGSP_V1_NOT_REWRAPPABLE",
            )
        manifest, wrapped = _parse_contents(prefix)
        _check_signer_binding(trusted_keys, prefix.signer_key_id, manifest)
        _check_tenant(manifest, tenant_id)
        dek = _unwrap(kek_provider, tenant_id, wrapped, manifest, prefix.manifest_bytes)
        rewrapped = kek_provider.wrap(tenant_id, dek, _dek_aad(manifest, prefix.manifest_bytes))
        if rewrapped.tenant_id != tenant_id:
            raise integrity_failure(
                "tenant mismatch", "the KEK provider wrapped for another tenant"
            )
        wrapped_bytes = rewrapped.canonical_bytes()
        if len(wrapped_bytes) > MAX_WRAPPED_KEY_LENGTH:
            raise InvalidArgument("kek_provider", "wrapped key over the format's 64 KiB limit")
        length = prefix.header.ciphertext_length
        header = _HEADER.pack(
            MAGIC, prefix.header.version, 0, len(prefix.manifest_bytes), len(wrapped_bytes), length
        )
        for part in (header, prefix.manifest_bytes, wrapped_bytes):
            _write_all(destination, part)
        hasher = hashlib.sha256()
        for start in range(0, length, _STREAM_BLOCK):
            block = reader.read(min(_STREAM_BLOCK, length - start), "ciphertext")
            hasher.update(block)
            _write_all(destination, block)
        if hasher.digest() != prefix.trailer.ciphertext_sha256:
            raise integrity_failure("ciphertext digest", "SHA-256 differs from the signed digest")
        raw = prefix.trailer.raw
        _write_all(destination, raw[:64] + hashlib.sha256(wrapped_bytes).digest() + raw[96:])
    return rewrapped


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Header:
    raw: bytes
    version: int
    manifest_length: int
    wrapped_key_length: int
    ciphertext_length: int


@dataclass(frozen=True)
class _Trailer:
    raw: bytes
    signer_key_id: bytes
    manifest_sha256: bytes
    wrapped_key_sha256: bytes
    ciphertext_sha256: bytes
    signature: bytes


@dataclass(frozen=True)
class _Prefix:
    """The authenticated parts read before the ciphertext; the reader sits at it."""

    header: _Header
    manifest_bytes: bytes
    wrapped_key_bytes: bytes
    trailer: _Trailer
    signer_key_id: str


@dataclass(frozen=True)
class _Sections:
    header: _Header
    manifest_bytes: bytes
    wrapped_key_bytes: bytes
    ciphertext_sha256: bytes | None
    trailer: _Trailer


class _Source(abc.ABC):
    """Sequential reads of a package, naming the section a truncation cut into."""

    size: int | None
    """Bytes from the start of the package to the end of the source, if known."""
    seekable: bool

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the source opened itself."""

    @abc.abstractmethod
    def read(self, length: int, what: str) -> memoryview | bytes:
        """Return exactly ``length`` bytes or raise a truncation error naming ``what``."""

    @abc.abstractmethod
    def readinto(self, buffer: memoryview, what: str) -> None:
        """Fill ``buffer`` completely or raise a truncation error naming ``what``."""

    @abc.abstractmethod
    def read_rest(self) -> bytes | memoryview:
        """Return everything up to the end of the source."""

    @abc.abstractmethod
    def skip(self, length: int, what: str) -> None:
        """Move past ``length`` bytes."""

    @abc.abstractmethod
    def ensure_end(self) -> None:
        """Refuse bytes after the trailer."""

    @abc.abstractmethod
    def rewind(self, offset: int) -> None:
        """Go to ``offset`` bytes from the start of the package."""

    def blocks(self, length: int, what: str) -> Iterator[memoryview | bytes]:
        """Yield ``length`` bytes in pieces of at most 1 MiB."""
        remaining = length
        while remaining:
            size = min(remaining, _STREAM_BLOCK)
            yield self.read(size, what)
            remaining -= size


class _MemorySource(_Source):
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self._offset = 0
        self.size = len(self._view)
        self.seekable = True

    def close(self) -> None:
        """Nothing to release: the caller owns the memory."""

    def read(self, length: int, what: str) -> memoryview:
        end = self._offset + length
        if end > len(self._view):
            raise _truncated(what)
        piece = self._view[self._offset : end]
        self._offset = end
        return piece

    def readinto(self, buffer: memoryview, what: str) -> None:
        buffer[:] = self.read(len(buffer), what)

    def read_rest(self) -> memoryview:
        rest = self._view[self._offset :]
        self._offset = len(self._view)
        return rest

    def skip(self, length: int, what: str) -> None:
        self.read(length, what)

    def ensure_end(self) -> None:
        if self._offset != len(self._view):
            raise InvalidArgument("package.length", "bytes follow the trailer")

    def rewind(self, offset: int) -> None:
        self._offset = offset


class _StreamSource(_Source):
    def __init__(self, stream: BinaryIO, *, owned: bool) -> None:
        self._stream = stream
        self._owned = owned
        self._start = 0
        self.size = None
        self.seekable = stream.seekable()
        if self.seekable:
            self._start = stream.tell()
            end = stream.seek(0, io.SEEK_END)
            stream.seek(self._start)
            self.size = end - self._start

    def close(self) -> None:
        if self._owned:
            self._stream.close()

    def read(self, length: int, what: str) -> bytes:
        data = self._stream.read(length)
        if len(data) == length:
            return data
        parts = [data]
        missing = length - len(data)
        while missing:
            more = self._stream.read(missing)
            if not more:
                raise _truncated(what)
            parts.append(more)
            missing -= len(more)
        return b"".join(parts)

    def readinto(self, buffer: memoryview, what: str) -> None:
        readinto = getattr(self._stream, "readinto", None)
        if readinto is None:  # a stream with read() only: copy what it returns
            buffer[:] = self.read(len(buffer), what)
            return
        filled = 0
        while filled < len(buffer):
            count = readinto(buffer[filled:])
            if not count:
                raise _truncated(what)
            filled += count

    def read_rest(self) -> bytes:
        return self._stream.read()

    def skip(self, length: int, what: str) -> None:
        if self.size is None:
            for _ in self.blocks(length, what):
                pass
            return
        position = self._stream.tell() + length
        if position - self._start > self.size:
            raise _truncated(what)
        self._stream.seek(position)

    def ensure_end(self) -> None:
        if self.size is not None:
            if self._stream.tell() - self._start != self.size:
                raise InvalidArgument("package.length", "bytes follow the trailer")
        elif self._stream.read(1):
            raise InvalidArgument("package.length", "bytes follow the trailer")

    def rewind(self, offset: int) -> None:
        self._stream.seek(self._start + offset)


def _source(source: PackageSource) -> _Source:
    if isinstance(source, bytes | bytearray | memoryview):
        return _MemorySource(source)
    if isinstance(source, os.PathLike):
        try:
            return _StreamSource(builtins.open(os.fspath(source), "rb"), owned=True)
        except FileNotFoundError as exc:
            raise InvalidArgument("source", f"no such file: {os.fspath(source)}") from exc
    return _StreamSource(source, owned=False)


def _uninitialised(length: int) -> memoryview:
    """A writable byte buffer whose memory is not zeroed first.

    ``bytearray(n)`` writes n zeros before the data is written over them; for a
    100 MiB payload that extra pass costs as much as a hash pass. Callers overwrite every
    byte before reading any.
    """
    return np.empty(length, dtype=np.uint8).data


def _truncated(what: str) -> InvalidArgument:
    return InvalidArgument("package.length", f"truncated: the package ends inside the {what}")


def _parse_header(raw: bytes, total_size: int | None) -> _Header:
    magic, version, flags, manifest_length, wrapped_length, ciphertext_length = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise InvalidArgument("header.magic", "not a TGSP package")
    if version not in READABLE_FORMAT_VERSIONS:
        raise InvalidArgument(
            "header.format_version",
            f"unsupported format version {version}; this reader supports "
            f"{READABLE_FORMAT_VERSIONS}",
        )
    if flags != 0:
        raise InvalidArgument("header.flags", f"reserved flags must be 0, found {flags:#06x}")
    if not 1 <= manifest_length <= MAX_MANIFEST_LENGTH:
        raise InvalidArgument(
            "header.manifest_length", f"{manifest_length} outside [1, {MAX_MANIFEST_LENGTH}]"
        )
    if not 1 <= wrapped_length <= MAX_WRAPPED_KEY_LENGTH:
        raise InvalidArgument(
            "header.wrapped_key_length", f"{wrapped_length} outside [1, {MAX_WRAPPED_KEY_LENGTH}]"
        )
    if not GCM_TAG_LENGTH <= ciphertext_length <= _MAX_CIPHERTEXT_LENGTH:
        raise InvalidArgument(
            "header.ciphertext_length", f"{ciphertext_length} outside [16, 2**53 - 1]"
        )
    total = HEADER_LENGTH + manifest_length + wrapped_length + ciphertext_length + TRAILER_LENGTH
    if total_size is not None and total != total_size:
        raise InvalidArgument(
            "package.length",
            f"the header's section lengths add up to {total} bytes but the package has "
            f"{total_size} (truncated, extended or a corrupted header)",
        )
    return _Header(raw, version, manifest_length, wrapped_length, ciphertext_length)


def _read_sections(reader: _Source, *, hash_ciphertext: bool) -> _Sections:
    """Read every section in order, hashing the ciphertext in blocks or skipping it."""
    if reader.size is not None and reader.size < HEADER_LENGTH:
        raise _truncated("header")
    header = _parse_header(bytes(reader.read(HEADER_LENGTH, "header")), reader.size)
    manifest_bytes = bytes(reader.read(header.manifest_length, "manifest"))
    wrapped_bytes = bytes(reader.read(header.wrapped_key_length, "wrapped key"))
    length = header.ciphertext_length
    digest: bytes | None = None
    if not hash_ciphertext:
        reader.skip(length, "ciphertext")
    elif isinstance(reader, _MemorySource):
        digest = hashlib.sha256(reader.read(length, "ciphertext")).digest()
    else:
        # Blocks of bounded memory; the helper thread hashes one while the next is read.
        ring = _BufferRing(_STREAM_BLOCK, total_bytes=length)
        with _PipelinedSha256(total_bytes=length) as hasher:
            for start in range(0, length, _STREAM_BLOCK):
                block = ring.next_slot()[: min(_STREAM_BLOCK, length - start)]
                reader.readinto(block, "ciphertext")
                ring.hold(hasher.update(block))
            digest = hasher.digest()
    trailer = _parse_trailer(bytes(reader.read(TRAILER_LENGTH, "trailer")))
    reader.ensure_end()
    return _Sections(header, manifest_bytes, wrapped_bytes, digest, trailer)


def _seekable_source(source: PackageSource) -> _Source:
    """A source that can be read out of order: one-way streams are read into memory."""
    reader = _source(source)
    if reader.seekable:
        return reader
    with reader:
        data = reader.read_rest()
    return _MemorySource(data)


def _authenticate_prefix(reader: _Source, trusted: Mapping[str, VerifyingKey]) -> _Prefix:
    """Check structure, signer, signature and the manifest and wrapped-key digests.

    Reads the trailer before the ciphertext (the source is seekable), so that the DEK is
    unwrapped only for a package whose manifest and wrapped key are authentic, and the
    ciphertext can then be decrypted and hashed in the same pass. Leaves the reader at
    the start of the ciphertext.
    """
    if reader.size is None or reader.size < HEADER_LENGTH:
        raise _truncated("header")
    header = _parse_header(bytes(reader.read(HEADER_LENGTH, "header")), reader.size)
    manifest_bytes = bytes(reader.read(header.manifest_length, "manifest"))
    wrapped_bytes = bytes(reader.read(header.wrapped_key_length, "wrapped key"))
    ciphertext_offset = HEADER_LENGTH + header.manifest_length + header.wrapped_key_length
    reader.rewind(ciphertext_offset + header.ciphertext_length)
    trailer = _parse_trailer(bytes(reader.read(TRAILER_LENGTH, "trailer")))
    reader.ensure_end()
    signer = _check_signature(trailer, trusted, header.version)
    _check_digest("manifest digest", manifest_bytes, trailer.manifest_sha256)
    _check_digest("wrapped key digest", wrapped_bytes, trailer.wrapped_key_sha256)
    reader.rewind(ciphertext_offset)
    return _Prefix(header, manifest_bytes, wrapped_bytes, trailer, signer)


def _stream_ciphertext(
    reader: _Source,
    info: PayloadInfo,
    trailer: _Trailer,
    consume: Callable[[int, memoryview | bytes], None],
) -> None:
    """Hand each sealed chunk to ``consume`` while a helper thread hashes the ciphertext;
    then require the digest the trailer signs."""
    count = info.chunk_count
    in_memory = isinstance(reader, _MemorySource)
    ring = (
        None
        if in_memory
        else _BufferRing(
            info.chunk_size + GCM_TAG_LENGTH,
            total_bytes=info.plaintext_size + GCM_TAG_LENGTH * count,
        )
    )
    with _PipelinedSha256(total_bytes=info.plaintext_size) as hasher:
        for index in range(count):
            plain_length = min(info.chunk_size, info.plaintext_size - index * info.chunk_size)
            sealed_length = plain_length + GCM_TAG_LENGTH
            if ring is None:
                sealed = memoryview(reader.read(sealed_length, "ciphertext"))
                hasher.update(sealed)
            else:
                sealed = ring.next_slot()[:sealed_length]
                reader.readinto(sealed, "ciphertext")
                ring.hold(hasher.update(sealed))
            consume(index, sealed)
        digest = hasher.digest()
    if digest != trailer.ciphertext_sha256:
        raise integrity_failure("ciphertext digest", "SHA-256 differs from the signed digest")


class _InOrderWorker:
    """Runs calls one after another on a helper thread, in submission order.

    hashlib releases the GIL while it hashes a large buffer, so hashing a block here
    overlaps the caller reading, decrypting or writing the next one: on two cores a
    package costs about one hash pass less wall time. At most ``max_pending`` calls
    wait, which bounds memory; callers must not change a buffer a pending call reads.
    """

    def __init__(self, *, name: str, total_bytes: int, max_pending: int = 4) -> None:
        # Below a few MiB a thread costs more than it saves: run the calls inline.
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            if total_bytes >= _THREAD_MIN_BYTES
            else None
        )
        self._pending: deque[Future[None]] = deque()
        self._max_pending = max_pending

    def __enter__(self) -> _InOrderWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, call: Callable[[memoryview], object], data: memoryview) -> Future[None]:
        """Queue ``call(data)``; returns a future done when it has run."""
        if self._pool is None:
            call(data)
            done: Future[None] = Future()
            done.set_result(None)
            return done
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        future: Future[None] = self._pool.submit(_discard_result, call, data)
        self._pending.append(future)
        return future

    def drain(self) -> None:
        """Wait for every queued call; re-raise the first one's error."""
        while self._pending:
            self._pending.popleft().result()


def _discard_result(call: Callable[[memoryview], object], data: memoryview) -> None:
    call(data)


class _PipelinedSha256:
    """SHA-256 of blocks given in order, computed on an :class:`_InOrderWorker`."""

    def __init__(self, *, total_bytes: int) -> None:
        self._hash = hashlib.sha256()
        self._worker = _InOrderWorker(name="tgsp-sha256", total_bytes=total_bytes)

    def __enter__(self) -> _PipelinedSha256:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._worker.__exit__(*exc_info)

    def update(self, data: memoryview) -> Future[None]:
        return self._worker.submit(self._hash.update, data)

    def digest(self) -> bytes:
        self._worker.drain()
        return self._hash.digest()


class _BufferRing:
    """Reusable block buffers; a slot is handed out again only once the helper-thread
    call reading it (:meth:`hold`) is done.

    Args:
        block_size: Largest block a slot must hold.
        total_bytes: Bytes that will pass through; small inputs get one small slot
            (their calls run inline, see :class:`_InOrderWorker`).
    """

    def __init__(self, block_size: int, *, total_bytes: int) -> None:
        threaded = total_bytes >= _THREAD_MIN_BYTES
        self._block_size = min(block_size, max(total_bytes, 1))
        self._slots: list[memoryview | None] = [None] * (6 if threaded else 1)
        self._holds: list[Future[None] | None] = [None] * len(self._slots)
        self._next = 0

    def next_slot(self) -> memoryview:
        index = self._next
        hold = self._holds[index]
        if hold is not None:
            hold.result()
            self._holds[index] = None
        slot = self._slots[index]
        if slot is None:
            slot = self._slots[index] = memoryview(bytearray(self._block_size))
        return slot

    def hold(self, future: Future[None]) -> None:
        self._holds[self._next] = future
        self._next = (self._next + 1) % len(self._slots)


def _parse_trailer(raw: bytes) -> _Trailer:
    return _Trailer(
        raw=raw,
        signer_key_id=raw[0:32],
        manifest_sha256=raw[32:64],
        wrapped_key_sha256=raw[64:96],
        ciphertext_sha256=raw[96:128],
        signature=raw[128:192],
    )


def _signed_message(version: int, trailer_body: bytes) -> bytes:
    """What the signature covers (module docstring): in version 2 not the wrapped-key
    digest, trailer bytes 64..96."""
    if version == 1:
        return SIGNATURE_DOMAINS[1] + trailer_body[:128]
    return SIGNATURE_DOMAINS[version] + trailer_body[:64] + trailer_body[96:128]


def _check_signature(trailer: _Trailer, trusted: Mapping[str, VerifyingKey], version: int) -> str:
    key_id = trailer.signer_key_id.hex()
    key = trusted.get(key_id)
    if key is None:
        raise integrity_failure(
            "unknown signer", f"key id {key_id} is not among the {len(trusted)} trusted keys"
        )
    if not key.verify(trailer.signature, _signed_message(version, trailer.raw)):
        raise integrity_failure("signature", f"Ed25519 signature by {key_id} does not verify")
    return key_id


def _check_authenticity(sections: _Sections, trusted: Mapping[str, VerifyingKey]) -> str:
    trailer = sections.trailer
    key_id = _check_signature(trailer, trusted, sections.header.version)
    _check_digest("manifest digest", sections.manifest_bytes, trailer.manifest_sha256)
    _check_digest("wrapped key digest", sections.wrapped_key_bytes, trailer.wrapped_key_sha256)
    if sections.ciphertext_sha256 != trailer.ciphertext_sha256:
        raise integrity_failure("ciphertext digest", "SHA-256 differs from the signed digest")
    return key_id


def _check_digest(check: str, data: bytes, expected: bytes) -> None:
    if hashlib.sha256(data).digest() != expected:
        raise integrity_failure(check, "SHA-256 differs from the signed digest")


def _parse_contents(sections: _Sections | _Prefix) -> tuple[Manifest, WrappedKey]:
    manifest = Manifest.from_canonical_bytes(sections.manifest_bytes)
    if manifest.format_version != sections.header.version:
        raise InvalidArgument(
            "manifest.format_version",
            f"is {manifest.format_version}; the header says {sections.header.version}",
        )
    wrapped = WrappedKey.from_canonical_bytes(sections.wrapped_key_bytes)
    if wrapped.tenant_id != manifest.tenant_id:
        raise integrity_failure(
            "tenant mismatch",
            f"the wrapped key is for tenant {wrapped.tenant_id!r}, the manifest names "
            f"{manifest.tenant_id!r}",
        )
    info = manifest.payload
    expected = info.plaintext_size + GCM_TAG_LENGTH * info.chunk_count
    if sections.header.ciphertext_length != expected:
        raise InvalidArgument(
            "header.ciphertext_length",
            f"is {sections.header.ciphertext_length}; the manifest's payload needs {expected}",
        )
    return manifest, wrapped


def _check_signer_binding(
    trusted_keys: Iterable[VerifyingKey], signer_key_id: str, manifest: Manifest
) -> None:
    """With a :class:`~tensafe.tgsp.trust.TrustList`, the signer must be bound to the
    package's tenant (a plain set of keys binds every key to every tenant)."""
    if isinstance(trusted_keys, TrustList):
        trusted_keys.check(signer_key_id, manifest.tenant_id)


def _check_tenant(manifest: Manifest, tenant_id: str) -> None:
    if manifest.tenant_id != tenant_id:
        raise integrity_failure(
            "tenant mismatch",
            f"the package belongs to tenant {manifest.tenant_id!r}, not {tenant_id!r}",
        )


def _dek_aad(manifest: Manifest, manifest_bytes: bytes) -> bytes:
    return dek_aad(
        tenant_id=manifest.tenant_id,
        adapter_id=manifest.adapter.adapter_id,
        adapter_version=manifest.adapter.version,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        format_version=manifest.format_version,
    )


def _unwrap(
    provider: KekProvider,
    tenant_id: str,
    wrapped: WrappedKey,
    manifest: Manifest,
    manifest_bytes: bytes,
) -> bytes:
    dek = provider.unwrap(tenant_id, wrapped, _dek_aad(manifest, manifest_bytes))
    if len(dek) != KEY_LENGTH:
        raise integrity_failure("wrapped key", f"unwrapped to {len(dek)} bytes, not {KEY_LENGTH}")
    return dek


class _ChunkCipher:
    """AES-256-GCM over payload chunks with counter nonces (module docstring)."""

    def __init__(self, dek: bytes) -> None:
        self._aead = AESGCM(dek)

    @staticmethod
    def nonce(index: int) -> bytes:
        return b"\x00\x00\x00\x00" + _CHUNK_INDEX.pack(index)

    @staticmethod
    def aad(index: int, final: bool) -> bytes:
        return CHUNK_AAD_DOMAIN + _CHUNK_INDEX.pack(index) + (b"\x01" if final else b"\x00")

    def encrypt(self, index: int, final: bool, plain: memoryview, out: memoryview) -> None:
        self._aead.encrypt_into(self.nonce(index), plain, self.aad(index, final), out)

    def decrypt(self, index: int, final: bool, sealed: memoryview | bytes, out: memoryview) -> None:
        try:
            self._aead.decrypt_into(self.nonce(index), sealed, self.aad(index, final), out)
        except InvalidTag as exc:
            raise integrity_failure(
                f"ciphertext chunk {index} tag", "AES-GCM authentication failed"
            ) from exc


def _check_tensors(
    manifest: Manifest, layout: SafetensorsLayout, digests: Mapping[str, str]
) -> None:
    in_payload = {span.name for span in layout.tensors}
    listed = set(manifest.tensors)
    if in_payload != listed:
        extra = sorted(in_payload - listed)
        missing = sorted(listed - in_payload)
        raise integrity_failure(
            "tensor set", f"payload has unlisted tensors {extra} and lacks listed {missing}"
        )
    for span in layout.tensors:
        info = manifest.tensors[span.name]
        if info.dtype != span.dtype:
            raise integrity_failure(
                f"tensor {span.name!r} dtype", f"payload has {span.dtype}, manifest {info.dtype}"
            )
        if info.shape != span.shape:
            raise integrity_failure(
                f"tensor {span.name!r} shape", f"payload has {span.shape}, manifest {info.shape}"
            )
        if digests[span.name] != info.sha256:
            raise integrity_failure(
                f"tensor {span.name!r} sha256", "the decrypted data differs from the manifest"
            )


__all__ = [
    "MAGIC",
    "Envelope",
    "OpenedAdapter",
    "PackageSource",
    "Weights",
    "decrypt_to_file",
    "inspect",
    "open_package",
    "read_envelope",
    "rewrap_to",
    "signer_key_id",
    "verify",
    "write",
    "write_to",
]
