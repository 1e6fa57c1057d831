"""Ed25519 signing keys and the public keys that verify TGSP packages.

Ed25519 (RFC 8032) through the ``cryptography`` library. A key is identified by its
*key id*: the lower-case hex SHA-256 of the 32-byte raw public key. A package stores the
signer's key id; a verifier holds a set of trusted public keys and refuses a package
whose key id is not among them. Public keys export as raw bytes or PEM
(SubjectPublicKeyInfo), so a third party can verify a package without the registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tensafe.common.errors import InvalidArgument

PUBLIC_KEY_LENGTH = 32
"""Length of a raw Ed25519 public key (RFC 8032 §5.1.5)."""

SIGNATURE_LENGTH = 64
"""Length of an Ed25519 signature (RFC 8032 §5.1.6)."""


def key_id_for(raw_public_key: bytes) -> str:
    """Return the key id of a raw Ed25519 public key: hex SHA-256 of its 32 bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()


class VerifyingKey:
    """An Ed25519 public key that verifies package signatures.

    Args:
        public_key: The ``cryptography`` public key.
    """

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._public_key = public_key
        self._raw = public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyingKey:
        """Load a key from its 32 raw bytes.

        Raises:
            InvalidArgument: Not 32 bytes or not a valid Ed25519 point.
        """
        if len(raw) != PUBLIC_KEY_LENGTH:
            raise InvalidArgument(
                "public_key", f"raw Ed25519 key must be {PUBLIC_KEY_LENGTH} bytes"
            )
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise InvalidArgument("public_key", "not a valid Ed25519 public key") from exc

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyingKey:
        """Load a key from PEM (SubjectPublicKeyInfo).

        Raises:
            InvalidArgument: Not a PEM Ed25519 public key.
        """
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise InvalidArgument("public_key", "not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument("public_key", "PEM key is not an Ed25519 key")
        return cls(key)

    def to_raw(self) -> bytes:
        """Return the 32 raw public key bytes."""
        return self._raw

    def to_pem(self) -> bytes:
        """Return the key as PEM (SubjectPublicKeyInfo)."""
        return self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        """Hex SHA-256 of the raw public key."""
        return key_id_for(self._raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return whether ``signature`` is this key's valid signature of ``message``."""
        try:
            self._public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyingKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyingKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key that signs packages.

    Keep it out of logs and reprs; export it only as (preferably encrypted) PKCS#8 PEM.

    Args:
        private_key: The ``cryptography`` private key.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._verifying_key = VerifyingKey(private_key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """Generate a new key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, *, password: bytes | None = None) -> SigningKey:
        """Load a key from PKCS#8 PEM, decrypting it with ``password`` if it is encrypted.

        Raises:
            InvalidArgument: Not an Ed25519 PKCS#8 PEM key, or a wrong password.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("signing_key", f"cannot load the PEM key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidArgument("signing_key", "PEM key is not an Ed25519 key")
        return cls(key)

    def to_pem(self, *, password: bytes | None = None) -> bytes:
        """Return the key as PKCS#8 PEM, encrypted under ``password`` when one is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @property
    def verifying_key(self) -> VerifyingKey:
        """The matching public key."""
        return self._verifying_key

    @property
    def key_id(self) -> str:
        """Key id of the matching public key."""
        return self._verifying_key.key_id

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``."""
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def trusted_key_map(trusted_keys: Iterable[VerifyingKey]) -> dict[str, VerifyingKey]:
    """Index trusted keys by key id.

    Raises:
        InvalidArgument: The set is empty (nothing could ever verify) or holds something
            other than :class:`VerifyingKey`.
    """
    keys: dict[str, VerifyingKey] = {}
    for key in trusted_keys:
        if not isinstance(key, VerifyingKey):
            raise InvalidArgument("trusted_keys", "must hold VerifyingKey objects")
        keys[key.key_id] = key
    if not keys:
        raise InvalidArgument("trusted_keys", "no trusted keys given")
    return keys
