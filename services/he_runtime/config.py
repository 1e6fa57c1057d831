"""Configuration of the HE runtime service."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeRuntimeConfig(ServiceConfig):
    """Settings of the HE runtime service.

    Sessions are rows of ``he_sessions`` plus Galois-key files under
    ``data_dir/he_runtime/keys``, with their executors cached in memory; these limits
    bound what one session and one tenant may hold.
    """

    max_session_key_bytes: int = setting(
        "Largest total of Galois-key bytes one session may upload. A per-token plan at "
        "d=4096, r=16, N=8192 needs 14 keys (~21 MiB); 256 MiB leaves room for N=16384.",
        default=256 * _MIB,
    )
    max_sessions_per_tenant: int = setting(
        "Most open HE sessions one tenant may hold at once (sessions being created "
        "count); one more CreateSession fails with RESOURCE_EXHAUSTED (reason "
        "QUOTA_EXCEEDED).",
        default=16,
    )
    max_key_bytes_per_tenant: int = setting(
        "Most Galois-key bytes all of one tenant's open sessions may hold together.",
        default=1024 * _MIB,
    )
    session_idle_ttl_seconds: float = setting(
        "A session not used for this long expires and its keys are deleted.", default=900.0
    )
    max_apply_bytes: int = setting(
        "Largest total of ciphertext bytes one ApplyLora request may stream in.",
        default=512 * _MIB,
    )
    registry_url: str = setting(
        "host:port of the registry. Set: sessions load adapters from it as verified TGSP "
        "packages, acting for the session's tenant (the registry must list this service's "
        "principal in TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS). Unset: only explicit dev "
        "mode serves adapters, from unverified PEFT folders under data_dir/adapters.",
        default="",
    )
    trust_list_file: Path | None = setting(
        "JSON trust list (tensafe.tgsp.TrustList) of the keys that may sign packages, each "
        "bound to the tenants it may sign for, pinned here rather than taken from the "
        "registry (docs/he.md §7). Required with registry_url outside dev mode; in dev "
        "mode, when unset, the registry's published keys are trusted for every tenant.",
        default=None,
    )
    evaluation_threads: int = setting(
        "Threads that run SEAL work off the event loop. seal-python holds the GIL during "
        "each SEAL call, so more threads add concurrency between sessions, not speed.",
        default=2,
    )
    evaluation_cores: int = setting(
        "Cores one request's SEAL work may use: the serving process plus "
        "evaluation_cores - 1 long-lived peer processes that hold each session's keys and "
        "adapter plaintexts too and take the independent part of every request (other "
        "units; for one token, half of x·A's giant steps and of u·B's baby steps). "
        "0: one per core (os.cpu_count()); 1: no peer process.",
        default=0,
    )

    @property
    def cores(self) -> int:
        """:attr:`evaluation_cores` with 0 resolved to the machine's core count."""
        return self.evaluation_cores or os.cpu_count() or 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "max_session_key_bytes",
            "max_sessions_per_tenant",
            "max_key_bytes_per_tenant",
            "max_apply_bytes",
            "evaluation_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(env_name(name), "must be at least 1")
        if self.evaluation_cores < 0:
            raise ConfigError(env_name("evaluation_cores"), "must be 0 (one per core) or more")
        if self.max_key_bytes_per_tenant < self.max_session_key_bytes:
            raise ConfigError(
                env_name("max_key_bytes_per_tenant"),
                "must be at least max_session_key_bytes (else no session of maximal size fits)",
            )
        if self.registry_url and self.trust_list_file is None and not self.dev_mode:
            raise ConfigError(
                env_name("trust_list_file"),
                "required with TENSAFE_REGISTRY_URL outside dev mode: the runtime verifies "
                "packages against a pinned trust list, not the registry's own word",
            )
        if self.session_idle_ttl_seconds <= 0:
            raise ConfigError(env_name("session_idle_ttl_seconds"), "must be positive")
