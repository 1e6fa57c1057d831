"""Secrets of the auth service: API keys, their hashes, and token-signing keys.

Vocabulary: the **KEK** (key-encryption key) is the 32-byte
``TENSAFE_SIGNING_KEY_ENCRYPTION_KEY``; it encrypts each token-signing key's private half
with AES-256-GCM (NIST SP 800-38D) under a fresh 96-bit nonce, with the key id as
associated data so a ciphertext cannot be moved to another key's row.

API keys look like ``tsk_<prefix>_<secret>``: the prefix (10 base32 characters, public)
finds the stored row, the secret (32 random bytes, base64url) is checked against an
argon2id hash (RFC 9106). The whole key is hashed, so the prefix cannot be swapped.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets

import argon2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.common.errors import ConfigError, IntegrityError

API_KEY_SCHEME = "tsk"
PREFIX_LENGTH = 10
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_SECRET_BYTES = 32  # 256 bits: brute force is out of reach whatever the hash cost
_NONCE_BYTES = 12  # the GCM nonce length NIST SP 800-38D recommends


@dataclasses.dataclass(frozen=True)
class NewApiKey:
    """A freshly generated API key."""

    prefix: str
    secret: str
    """The whole key, shown to the caller once."""


def generate_api_key() -> NewApiKey:
    """A new random API key."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    body = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()
    return NewApiKey(prefix=prefix, secret=f"{API_KEY_SCHEME}_{prefix}_{body}")


def api_key_prefix(secret: str) -> str | None:
    """The lookup prefix of a presented key, or None if it is not shaped like a key."""
    scheme, _, rest = secret.partition("_")
    prefix, _, body = rest.partition("_")
    if scheme != API_KEY_SCHEME or len(prefix) != PREFIX_LENGTH or not body:
        return None
    if any(c not in _PREFIX_ALPHABET for c in prefix):
        return None
    return prefix


@dataclasses.dataclass(frozen=True, kw_only=True)
class HashParameters:
    """argon2id cost; defaults are RFC 9106 §4's second recommended option."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 4


class ApiKeyHasher:
    """argon2id hashing of API keys (constant-time comparison inside libargon2).

    Args:
        parameters: The cost parameters of new hashes (old hashes carry their own).
    """

    def __init__(self, parameters: HashParameters) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism,
            type=argon2.Type.ID,
        )
        # Verified when a prefix is unknown, so that a miss costs as long as a hit and
        # the response time does not reveal which prefixes exist.
        self._unknown_key_hash = self._hasher.hash(secrets.token_urlsafe(32))

    def hash(self, secret: str) -> str:
        """The PHC-format argon2id hash of ``secret``."""
        return str(self._hasher.hash(secret))

    def verify(self, secret_hash: str | None, secret: str) -> bool:
        """Whether ``secret`` matches ``secret_hash`` (None: no such key, still slow)."""
        try:
            self._hasher.verify(secret_hash or self._unknown_key_hash, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
        return secret_hash is not None


class SigningKeyCipher:
    """Encrypts and decrypts token-signing private keys under the KEK.

    Args:
        kek: 32 bytes.
    """

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ConfigError("TENSAFE_SIGNING_KEY_ENCRYPTION_KEY", "must be 32 bytes")
        self._aead = AESGCM(kek)

    def encrypt(self, kid: str, private_key: Ed25519PrivateKey) -> bytes:
        """Nonce || AES-256-GCM(raw private key), bound to ``kid``."""
        raw = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, raw, kid.encode())

    def decrypt(self, kid: str, blob: bytes) -> Ed25519PrivateKey:
        """Recover a private key.

        Raises:
            IntegrityError: Wrong KEK, or the stored ciphertext was altered.
        """
        nonce, ciphertext = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        try:
            raw = self._aead.decrypt(nonce, ciphertext, kid.encode())
        except InvalidTag:
            raise IntegrityError(
                f"signing key {kid} does not decrypt: wrong "
                "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY or altered ciphertext"
            ) from None
        return Ed25519PrivateKey.from_private_bytes(raw)


def public_bytes(public_key: Ed25519PublicKey) -> bytes:
    """Raw 32-byte form of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
