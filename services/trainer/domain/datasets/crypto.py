"""Encryption at rest of server-held datasets (envelope encryption, AES-256-GCM).

Vocabulary used in this module:

- **KEK** (key-encryption key): one 256-bit key of the trainer deployment, read from
  the file ``TENSAFE_DATASET_KEK_FILE`` (64 hex digits). It never encrypts data; it only
  wraps data keys. Its id is the first 16 hex digits of ``sha256(KEK)``, stored next to
  every wrapped key so that a replaced KEK is detected instead of producing garbage.
- **DEK** (data-encryption key): one random 256-bit key per tenant, stored in the
  database only wrapped by the KEK (``trainer_dataset_keys``). Every dataset object of the
  tenant is encrypted under it.

Both layers use AES-256-GCM (NIST SP 800-38D) with a fresh random 96-bit nonce per
encryption; with one DEK per tenant the number of encryptions per key stays far below
SP 800-38D's 2**32 bound for random nonces. The associated data binds each ciphertext to
its context (tenant and key id for a wrapped DEK; tenant, dataset id and key id for a
dataset), so a file or a wrapped key moved to another tenant or dataset fails to decrypt
with :class:`~tensafe.common.errors.IntegrityError`.

Dev mode: without a configured KEK file, :func:`keyring_from_settings` creates one at
``<data_dir>/trainer/keys/dataset.kek`` (exclusive create, mode 0600) and logs a
warning; outside dev mode a missing KEK file is a start-up error
(:class:`~tensafe.trainer.config.TrainerConfig`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.common.errors import ConfigError, FailedPrecondition, IntegrityError

log = logging.getLogger(__name__)

KEY_BYTES = 32
"""AES-256 keys."""

NONCE_BYTES = 12
"""96-bit GCM nonces (SP 800-38D §8.2.2, random construction)."""

_DEK_CONTEXT = b"tensafe.trainer.dataset-dek.v1"
_DATA_CONTEXT = b"tensafe.trainer.dataset.v1"
_OBJECT_MAGIC = b"TSDS\x01"

DEV_KEK_RELATIVE = Path("trainer") / "keys" / "dataset.kek"
"""Where dev mode keeps the KEK it creates, relative to ``data_dir``."""


def _aad(*parts: str | bytes) -> bytes:
    encoded = [part.encode() if isinstance(part, str) else part for part in parts]
    # Length-prefixed, so no two different tuples give the same bytes.
    return b"".join(len(part).to_bytes(4, "big") + part for part in encoded)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_BYTES + 16:
        raise IntegrityError(f"{what} is truncated")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag as error:
        raise IntegrityError(f"{what} failed authentication (tampered or wrong key)") from error


@dataclass(frozen=True)
class WrappedKey:
    """A tenant's DEK as stored in the database."""

    key_id: str
    """Random id of the DEK (bound into every ciphertext under it)."""
    kek_id: str
    """Id of the KEK that wrapped it."""
    wrapped: bytes
    """nonce || AES-256-GCM(KEK, DEK)."""


class DatasetKeyring:
    """The KEK, and the wrapping and use of tenant DEKs.

    Args:
        kek: The 32-byte key-encryption key.
    """

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEY_BYTES:
            raise ValueError("the dataset KEK must be 32 bytes")
        self._kek = kek
        self._kek_id = hashlib.sha256(kek).hexdigest()[:16]

    @property
    def kek_id(self) -> str:
        """Public id of the KEK (a digest prefix, not the key)."""
        return self._kek_id

    @classmethod
    def from_file(cls, path: Path) -> DatasetKeyring:
        """Read a KEK file (64 hex digits).

        Raises:
            ConfigError: Missing, unreadable or malformed file.
        """
        try:
            text = path.read_text().strip()
            kek = bytes.fromhex(text)
        except (OSError, ValueError) as error:
            raise ConfigError(
                "TENSAFE_DATASET_KEK_FILE", f"cannot read a hex KEK from {path}: {error}"
            ) from error
        if len(kek) != KEY_BYTES:
            raise ConfigError(
                "TENSAFE_DATASET_KEK_FILE", f"{path} must hold 64 hex digits (256 bits)"
            )
        return cls(kek)

    @classmethod
    def create_file(cls, path: Path) -> DatasetKeyring:
        """Create a new KEK file (exclusive, mode 0600) or read it if it exists.

        Used by dev mode only; two processes racing to create it agree on one key.
        """
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.from_file(path)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        keyring = cls.from_file(path)
        log.warning(
            "dev mode: created a dataset key-encryption key %s at %s; "
            "set TENSAFE_DATASET_KEK_FILE in production",
            keyring.kek_id,
            path,
        )
        return keyring

    def new_tenant_key(self, tenant: str) -> tuple[WrappedKey, bytes]:
        """A fresh DEK for ``tenant``: its wrapped form and the key itself."""
        dek = secrets.token_bytes(KEY_BYTES)
        key_id = secrets.token_hex(16)
        wrapped = _seal(self._kek, dek, _aad(_DEK_CONTEXT, tenant, key_id))
        return WrappedKey(key_id=key_id, kek_id=self._kek_id, wrapped=wrapped), dek

    def unwrap(self, tenant: str, key: WrappedKey) -> bytes:
        """The DEK of a stored wrapped key.

        Raises:
            FailedPrecondition: It was wrapped by another KEK than the configured one.
            IntegrityError: The wrapped key was tampered with or belongs elsewhere.
        """
        if key.kek_id != self._kek_id:
            raise FailedPrecondition(
                f"the dataset key of this tenant is wrapped by KEK {key.kek_id}, but the "
                f"configured KEK is {self._kek_id}"
            )
        return _open(self._kek, key.wrapped, _aad(_DEK_CONTEXT, tenant, key.key_id), "data key")


def encrypt_dataset(
    dek: bytes, plaintext: bytes, *, tenant: str, dataset_id: str, key_id: str
) -> bytes:
    """The object bytes of a dataset: magic || nonce || AES-256-GCM ciphertext."""
    return _OBJECT_MAGIC + _seal(dek, plaintext, _aad(_DATA_CONTEXT, tenant, dataset_id, key_id))


def decrypt_dataset(
    dek: bytes, sealed: bytes, *, tenant: str, dataset_id: str, key_id: str
) -> bytes:
    """Inverse of :func:`encrypt_dataset`.

    Raises:
        IntegrityError: Not a dataset object, tampered, or of another tenant or dataset.
    """
    if not sealed.startswith(_OBJECT_MAGIC):
        raise IntegrityError(f"dataset {dataset_id} object has an unknown format")
    return _open(
        dek,
        sealed[len(_OBJECT_MAGIC) :],
        _aad(_DATA_CONTEXT, tenant, dataset_id, key_id),
        f"dataset {dataset_id}",
    )


def keyring_from_settings(
    *, kek_file: Path | None, dev_mode: bool, data_dir: Path
) -> DatasetKeyring:
    """The deployment's keyring.

    Args:
        kek_file: ``TENSAFE_DATASET_KEK_FILE``.
        dev_mode: ``TENSAFE_DEV_MODE``.
        data_dir: ``TENSAFE_DATA_DIR``.

    Returns:
        The keyring of ``kek_file``; in dev mode without one, a local KEK created once.

    Raises:
        ConfigError: The configured KEK file is unusable, or there is none outside dev
            mode.
    """
    if kek_file is not None:
        return DatasetKeyring.from_file(kek_file)
    if dev_mode:
        return DatasetKeyring.create_file(Path(data_dir) / DEV_KEK_RELATIVE)
    raise ConfigError("TENSAFE_DATASET_KEK_FILE", "required outside dev mode")
