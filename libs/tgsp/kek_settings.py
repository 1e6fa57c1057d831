"""Which KEK provider a service uses: one set of settings for every service that wraps
or unwraps TGSP data keys (the registry and the trainer's publisher).

:class:`KekSettings` is a config mixin (``class RegistryConfig(KekSettings,
ServiceConfig)``), so the variables are the same in every service:

* ``TENSAFE_KEK_PROVIDER``: ``pkcs11`` (production) or ``local-file`` (dev mode only).
* ``TENSAFE_KEK_PKCS11_MODULE``, ``TENSAFE_KEK_PKCS11_TOKEN_LABEL``,
  ``TENSAFE_KEK_PKCS11_PIN``: the token (the Helm chart takes all three from one
  Secret).

The local-file provider keeps KEKs in the clear on a volume; outside explicit dev mode
it is refused at start-up with an error naming ``TENSAFE_KEK_PROVIDER``. The HE runtime
holds no KEK at all: it asks the registry to unwrap one package's data key for the
session's tenant (an audited call, DESIGN.md §8), so it has no such setting.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tensafe.common.config import env_name, setting
from tensafe.common.errors import ConfigError
from tensafe.tgsp.kek import KekProvider, LocalFileKekProvider

PROVIDERS = ("local-file", "pkcs11")
"""Values of ``TENSAFE_KEK_PROVIDER``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KekSettings:
    """Config mixin: the KEK provider of a service (see the module docstring)."""

    kek_provider: str = setting(
        "Where tenants' key-encryption keys live: pkcs11 (a PKCS#11 token, e.g. an HSM; "
        "required outside dev mode) or local-file (plain key files in a folder; accepted "
        "only with TENSAFE_DEV_MODE=1).",
        default="local-file",
    )
    kek_pkcs11_module: Path | None = setting(
        "Path of the PKCS#11 module (the token vendor's library, e.g. "
        "/usr/lib/softhsm/libsofthsm2.so). Required with kek_provider=pkcs11.",
        default=None,
    )
    kek_pkcs11_token_label: str = setting(
        "Label of the PKCS#11 token holding the KEKs. Required with kek_provider=pkcs11.",
        default="",
    )
    kek_pkcs11_pin: str = setting(
        "User PIN of the PKCS#11 token. Required with kek_provider=pkcs11.",
        default="",
        secret=True,
    )

    def check_kek_settings(self, *, dev_mode: bool) -> None:
        """Validate the provider settings; called by the service's ``__post_init__``.

        Raises:
            ConfigError: Unknown provider, local-file outside dev mode, or a missing
                PKCS#11 setting; the error names the setting.
        """
        if self.kek_provider not in PROVIDERS:
            raise ConfigError(env_name("kek_provider"), f"must be one of {', '.join(PROVIDERS)}")
        if self.kek_provider == "local-file" and not dev_mode:
            raise ConfigError(
                env_name("kek_provider"),
                "local-file keeps key-encryption keys in plain files and is accepted only in "
                "dev mode (TENSAFE_DEV_MODE=1); set it to pkcs11 with "
                f"{env_name('kek_pkcs11_module')}, {env_name('kek_pkcs11_token_label')} and "
                f"{env_name('kek_pkcs11_pin')}",
            )
        if self.kek_provider == "pkcs11":
            if self.kek_pkcs11_module is None:
                raise ConfigError(
                    env_name("kek_pkcs11_module"), "required with kek_provider=pkcs11"
                )
            if not self.kek_pkcs11_token_label:
                raise ConfigError(
                    env_name("kek_pkcs11_token_label"), "required with kek_provider=pkcs11"
                )
            if not self.kek_pkcs11_pin:
                raise ConfigError(env_name("kek_pkcs11_pin"), "required with kek_provider=pkcs11")

    def open_kek_provider(self, local_dir: Path) -> KekProvider:
        """Open the configured provider (at start-up).

        Args:
            local_dir: The local-file provider's folder (created 0700 if missing).

        Raises:
            ConfigError: The token cannot be opened; the error names the setting.
        """
        if self.kek_provider == "pkcs11":
            from tensafe.tgsp.hsm import Pkcs11KekProvider  # loads the PKCS#11 binding

            assert self.kek_pkcs11_module is not None  # checked by check_kek_settings
            return Pkcs11KekProvider(
                module=self.kek_pkcs11_module,
                token_label=self.kek_pkcs11_token_label,
                pin=self.kek_pkcs11_pin,
                setting_names=(
                    env_name("kek_pkcs11_module"),
                    env_name("kek_pkcs11_token_label"),
                    env_name("kek_pkcs11_pin"),
                ),
            )
        local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return LocalFileKekProvider(local_dir)


__all__ = ["PROVIDERS", "KekSettings"]
