"""Configuration of the registry service."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError
from tensafe.tgsp.kek_settings import KekSettings

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistryConfig(KekSettings, ServiceConfig):
    """Settings of the registry service (the KEK provider's settings come from
    :class:`~tensafe.tgsp.kek_settings.KekSettings`)."""

    registry_signing_key_file: Path | None = setting(
        "PEM file (PKCS#8) of this deployment's Ed25519 package-signing key. Required "
        "outside dev mode; in dev mode a development-only key is created in "
        "data_dir/dev-registry-signing-key.pem (and logged as such) when unset.",
        default=None,
    )
    registry_trusted_signing_key_files: tuple[Path, ...] = setting(
        "Comma-separated PEM files of further Ed25519 public keys (SubjectPublicKeyInfo) "
        "whose package signatures the registry accepts, e.g. the trainer's publisher key.",
        default=(),
    )
    registry_trust_list_file: Path | None = setting(
        "JSON trust list binding further signing keys to the tenants they may sign "
        "packages for (docs/tgsp.md §13, tensafe.tgsp.TrustList); a package signed by a "
        "key not bound to its tenant is refused. The registry's own key and the keys of "
        "registry_trusted_signing_key_files may sign for every tenant.",
        default=None,
    )
    registry_kek_dir: Path | None = setting(
        "Folder of the local-file KEK provider (kek_provider=local-file, dev mode only; one "
        "<tenant>.kek per tenant, mode 0600); default data_dir/keks.",
        default=None,
    )
    registry_object_dir: Path | None = setting(
        "Folder of the content-addressed package store; default data_dir/objects.",
        default=None,
    )
    registry_max_package_bytes: int = setting(
        "Largest package PublishAdapter accepts, bytes (larger: RESOURCE_EXHAUSTED).",
        default=1024 * MIB,
    )
    registry_max_storage_bytes_per_tenant: int = setting(
        "Most package bytes one tenant's adapter versions may hold together (each "
        "version counts its package size); a PublishAdapter that would pass it fails "
        "with RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED) before its bytes are read.",
        default=10 * 1024 * MIB,
    )
    registry_chunk_bytes: int = setting("Bytes per DownloadAdapter message.", default=1 * MIB)
    registry_acting_service_principals: tuple[str, ...] = setting(
        "Comma-separated principal ids of platform service accounts (e.g. the HE "
        "runtime's) that may name the tenant they act for in the x-tensafe-acting-tenant "
        "call metadata of UnwrapDataKey, DownloadAdapter and the read RPCs. Empty: nobody.",
        default=(),
    )
    registry_platform_tenant_id: str = setting(
        "Tenant id of the platform tenant; the acting service principals must belong to it. "
        "Required when registry_acting_service_principals is set.",
        default="",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.registry_signing_key_file is None and not self.dev_mode:
            raise ConfigError(
                env_name("registry_signing_key_file"),
                "required outside dev mode (TENSAFE_DEV_MODE=1): the registry's "
                "package-signing key is never generated silently",
            )
        self.check_kek_settings(dev_mode=self.dev_mode)
        if self.registry_max_package_bytes < 1024:
            raise ConfigError(env_name("registry_max_package_bytes"), "must be >= 1024")
        if self.registry_max_storage_bytes_per_tenant < 1:
            raise ConfigError(env_name("registry_max_storage_bytes_per_tenant"), "must be positive")
        if not 4096 <= self.registry_chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError(
                env_name("registry_chunk_bytes"), "must be in 4096..max_message_bytes/2"
            )
        if self.registry_acting_service_principals and not self.registry_platform_tenant_id:
            raise ConfigError(
                env_name("registry_platform_tenant_id"),
                "required when TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS is set",
            )

    @property
    def kek_dir(self) -> Path:
        """Folder of the local-file KEK provider."""
        return self.registry_kek_dir or Path(self.data_dir) / "keks"

    @property
    def object_dir(self) -> Path:
        """Folder of the object store."""
        return self.registry_object_dir or Path(self.data_dir) / "objects"
