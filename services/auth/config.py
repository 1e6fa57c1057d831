"""Configuration of the auth service."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
from pathlib import Path

from tensafe.auth.domain.ratelimit import rate_limit_problem
from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError

log = logging.getLogger(__name__)

DEV_KEK_FILE = "dev-signing-key-encryption.key"
"""File under ``data_dir`` holding the dev-mode key-encryption key (dev mode only)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthConfig(ServiceConfig):
    """Settings of the auth service."""

    signing_key_encryption_key: str = setting(
        "Base64 of 32 random bytes: encrypts the token-signing keys at rest "
        "(AES-256-GCM). Required outside dev mode; never generated silently.",
        default="",
        secret=True,
    )
    token_ttl_seconds: int = setting("Lifetime of access tokens, seconds.", default=900)
    api_key_hash_time_cost: int = setting(
        "argon2id passes for API-key hashes (RFC 9106 §4 recommends 3 at 64 MiB).", default=3
    )
    api_key_hash_memory_kib: int = setting(
        "argon2id memory for API-key hashes, KiB.", default=64 * 1024
    )
    api_key_hash_parallelism: int = setting("argon2id lanes for API-key hashes.", default=4)
    exchange_api_key_rate_per_minute: int = setting(
        "ExchangeApiKey calls admitted per minute per API key (by its public prefix; "
        "failed attempts count too), shared by every auth replica through the database. "
        "Past it: RESOURCE_EXHAUSTED, reason RATE_LIMITED, with retry_after_seconds. "
        "At most 60000000 (one call per microsecond, the limiter's resolution).",
        default=60,
    )
    exchange_api_key_burst: int = setting(
        "ExchangeApiKey calls a rested API key may make back to back before the per-minute "
        "rate applies. burst x 60 s / rate must be at most 2**62 microseconds.",
        default=60,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = env_name("signing_key_encryption_key")
        if not self.signing_key_encryption_key:
            if not self.dev_mode:
                raise ConfigError(name, "required outside dev mode (TENSAFE_DEV_MODE=1)")
        else:
            _decode_kek(name, self.signing_key_encryption_key)
        if not 60 <= self.token_ttl_seconds <= 3600:
            raise ConfigError(env_name("token_ttl_seconds"), "must be in 60..3600")
        if self.api_key_hash_time_cost < 1:
            raise ConfigError(env_name("api_key_hash_time_cost"), "must be >= 1")
        if self.api_key_hash_parallelism < 1:
            raise ConfigError(env_name("api_key_hash_parallelism"), "must be >= 1")
        problem = rate_limit_problem(
            self.exchange_api_key_rate_per_minute, self.exchange_api_key_burst
        )
        if problem is not None:
            field, reason = problem
            name = f"exchange_api_key_{'rate_per_minute' if field == 'per_minute' else 'burst'}"
            raise ConfigError(env_name(name), reason)
        if self.api_key_hash_memory_kib < 8 * self.api_key_hash_parallelism:
            # libargon2's floor: 8 KiB per lane.
            raise ConfigError(env_name("api_key_hash_memory_kib"), "must be >= 8 x parallelism")


def _decode_kek(name: str, text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(name, "must be base64") from None
    if len(key) != 32:
        raise ConfigError(name, f"must decode to 32 bytes, got {len(key)}")
    return key


def signing_key_encryption_key(config: AuthConfig) -> bytes:
    """The KEK for token-signing keys.

    Production: ``TENSAFE_SIGNING_KEY_ENCRYPTION_KEY``. Dev mode without it: a key kept
    in ``data_dir/dev-signing-key-encryption.key`` (created once, mode 0600), with a
    warning on every start that it is for development only.

    Raises:
        ConfigError: No key outside dev mode, or an unreadable dev key file.
    """
    name = env_name("signing_key_encryption_key")
    if config.signing_key_encryption_key:
        return _decode_kek(name, config.signing_key_encryption_key)
    if not config.dev_mode:
        raise ConfigError(name, "required outside dev mode (TENSAFE_DEV_MODE=1)")
    path = Path(config.data_dir) / DEV_KEK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(descriptor, "w") as file:
            file.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    log.warning(
        "DEV MODE: token-signing keys are encrypted under a development-only key stored "
        "in %s; set %s in production",
        path,
        name,
    )
    return _decode_kek(f"{path}", path.read_text().strip())
