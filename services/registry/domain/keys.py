"""The registry's package-signing keys and its tenants' key-encryption keys.

Signing is **per deployment**: one Ed25519 key (``TENSAFE_REGISTRY_SIGNING_KEY_FILE``)
signs what this deployment's own tools seal, and publication accepts packages signed by
that key or by any key listed in ``TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES`` (e.g. a
trainer's publisher key). ``GetSigningKeys`` returns all of them, so a third party can
verify a downloaded package without the registry.

KEKs live in a :class:`~tensafe.tgsp.LocalFileKekProvider` folder. The registry never
creates one on its own: :func:`create_tenant_kek` is the explicit administrative path
(``python -m tensafe.registry.admin create-tenant-kek TENANT``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tensafe.common.config import env_name
from tensafe.common.errors import ConfigError, InvalidArgument
from tensafe.tgsp import EVERY_TENANT, SigningKey, TrustedSigner, TrustList, VerifyingKey

log = logging.getLogger(__name__)

DEV_SIGNING_KEY_FILE = "dev-registry-signing-key.pem"
"""File under ``data_dir`` holding the dev-mode signing key (dev mode only)."""


@dataclasses.dataclass(frozen=True)
class TrustedKey:
    """A public key whose package signatures the registry accepts.

    Attributes:
        verifying_key: The Ed25519 public key.
        create_time: When the key file was written (its modification time).
    """

    verifying_key: VerifyingKey
    create_time: datetime


@dataclasses.dataclass(frozen=True)
class SigningKeys:
    """The deployment's signing key and the set of trusted keys (which includes it).

    Attributes:
        signing_key: The registry's own key.
        trusted: Every accepted key, the registry's own first.
    """

    signing_key: SigningKey
    trusted: tuple[TrustedKey, ...]
    bound: tuple[TrustedSigner, ...] = ()

    @property
    def verifying_keys(self) -> list[VerifyingKey]:
        """The trusted public keys (every tenant's signers together)."""
        return [key.verifying_key for key in self.trusted]

    @property
    def trust_list(self) -> TrustList:
        """What packages are verified against: the registry's own key and the platform
        keys (``TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES``) for every tenant, the
        keys of ``TENSAFE_REGISTRY_TRUST_LIST_FILE`` for the tenants listed there."""
        bound_ids = {signer.key.key_id for signer in self.bound}
        platform = [
            TrustedSigner(key=key.verifying_key, tenants=frozenset({EVERY_TENANT}))
            for key in self.trusted
            if key.verifying_key.key_id not in bound_ids
        ]
        return TrustList([*platform, *self.bound])


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def _read_private(path: Path, setting_name: str) -> SigningKey:
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(setting_name, f"{path} must not be readable by group or others")
        return SigningKey.from_pem(path.read_bytes())
    except OSError as error:
        raise ConfigError(setting_name, f"cannot read {path}: {error}") from error
    except InvalidArgument as error:
        raise ConfigError(setting_name, f"{path}: {error.description}") from error


def create_dev_signing_key(data_dir: Path) -> Path:
    """Create (once) the dev-mode signing key in ``data_dir`` and return its path.

    Called only in explicit dev mode, when no key file is configured. The key is
    written with ``O_EXCL`` and mode 0600, so an existing key is kept.
    """
    path = data_dir / DEV_SIGNING_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(descriptor, "wb") as file:
        file.write(SigningKey.generate().to_pem())
        file.flush()
        os.fsync(file.fileno())
    return path


def load_signing_keys(
    *,
    signing_key_file: Path | None,
    trusted_key_files: Sequence[Path],
    dev_mode: bool,
    data_dir: Path,
    trust_list_file: Path | None = None,
) -> SigningKeys:
    """Load the registry's signing key and the trusted public keys.

    Args:
        signing_key_file: The configured private key, or ``None``.
        trusted_key_files: Further public keys (PEM).
        dev_mode: Whether explicit dev mode is on.
        data_dir: Where the dev-mode key lives.
        trust_list_file: Keys bound to tenants (:class:`tensafe.tgsp.TrustList` JSON).

    Returns:
        The keys.

    Raises:
        ConfigError: No key outside dev mode, or an unreadable or malformed key file.
    """
    setting_name = env_name("registry_signing_key_file")
    if signing_key_file is None:
        if not dev_mode:
            raise ConfigError(setting_name, "required outside dev mode (TENSAFE_DEV_MODE=1)")
        signing_key_file = create_dev_signing_key(data_dir)
        log.warning(
            "DEV MODE: packages are signed with a development-only key in %s; set %s in production",
            signing_key_file,
            setting_name,
        )
    signing_key = _read_private(signing_key_file, setting_name)
    trusted = [TrustedKey(signing_key.verifying_key, _mtime(signing_key_file))]
    trusted_setting = env_name("registry_trusted_signing_key_files")
    for path in trusted_key_files:
        try:
            key = VerifyingKey.from_pem(path.read_bytes())
        except OSError as error:
            raise ConfigError(trusted_setting, f"cannot read {path}: {error}") from error
        except InvalidArgument as error:
            raise ConfigError(trusted_setting, f"{path}: {error.description}") from error
        if all(key.key_id != known.verifying_key.key_id for known in trusted):
            trusted.append(TrustedKey(key, _mtime(path)))
    bound: tuple[TrustedSigner, ...] = ()
    if trust_list_file is not None:
        try:
            listed = TrustList.from_file(trust_list_file)
        except InvalidArgument as error:
            raise ConfigError(env_name("registry_trust_list_file"), error.message) from error
        own = signing_key.key_id
        bound = tuple(s for s in listed.signers if s.key.key_id != own)
        for signer in bound:
            if all(signer.key.key_id != known.verifying_key.key_id for known in trusted):
                trusted.append(TrustedKey(signer.key, _mtime(trust_list_file)))
    return SigningKeys(signing_key=signing_key, trusted=tuple(trusted), bound=bound)
