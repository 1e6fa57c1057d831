"""Configuration of the auth service."""

from __future__ import annotations

import base64
import binascii
import dataclasses

from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError


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

    def __post_init__(self) -> None:
        super().__post_init__()
        name = env_name("signing_key_encryption_key")
        if not self.signing_key_encryption_key:
            if not self.dev_mode:
                raise ConfigError(name, "required outside dev mode (TENSAFE_DEV_MODE=1)")
        else:
            try:
                key = base64.b64decode(self.signing_key_encryption_key, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(name, "must be base64") from None
            if len(key) != 32:
                raise ConfigError(name, f"must decode to 32 bytes, got {len(key)}")
        if not 60 <= self.token_ttl_seconds <= 3600:
            raise ConfigError(env_name("token_ttl_seconds"), "must be in 60..3600")
