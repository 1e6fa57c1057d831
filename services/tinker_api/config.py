"""Configuration of the Tinker API service.

The service keeps no state (no database, no data folder): it is a client of the trainer
and auth, so its settings are where those are, how to reach them, how it serves HTTP and
the DP defaults of the training clients it creates.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from tensafe.common.config import env_name, setting
from tensafe.common.errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinkerApiConfig:
    """Settings of the Tinker API service."""

    host: str = setting("Interface the HTTP server binds.", default="127.0.0.1")
    port: int = setting("HTTP port; 0 picks a free one.", default=0)
    trainer_url: str = setting("host:port of the trainer's gRPC endpoint.")
    auth_url: str = setting(
        "host:port of the auth service (for /api/v1/auth/token with an API key)."
    )
    public_trainer_url: str = setting(
        "host:port of the trainer's gRPC endpoint as clients outside reach it, announced "
        "at GET /api/v1/tensafe/endpoints (empty: trainer_url).",
        default="",
    )
    public_auth_url: str = setting(
        "host:port of auth as clients outside reach it, announced at GET "
        "/api/v1/tensafe/endpoints (empty: auth_url).",
        default="",
    )
    dev_mode: bool = setting("Explicit development mode (logged as such).", default=False)
    log_level: str = setting("Logging level: DEBUG, INFO, WARNING, ERROR.", default="INFO")
    log_format: str = setting("Log format: json or text.", default="json")
    ready_file: str = setting(
        'If set, the process writes {"port": N} here once it serves (used by `tensafe up`).',
        default="",
    )
    shutdown_grace_seconds: float = setting(
        "How long SIGTERM waits for in-flight HTTP requests before closing them.",
        default=10.0,
    )
    tls_cert_file: Path | None = setting(
        "PEM certificate (chain) of the HTTPS listener; with tls_key_file the listener "
        "speaks HTTPS only.",
        default=None,
    )
    tls_key_file: Path | None = setting("PEM private key of tls_cert_file.", default=None)
    tls_ca_file: Path | None = setting(
        "PEM CA bundle that verifies the trainer and auth; set, the gRPC channels are TLS.",
        default=None,
    )
    tls_client_cert_file: Path | None = setting(
        "PEM certificate presented to the trainer and auth (mutual TLS).", default=None
    )
    tls_client_key_file: Path | None = setting(
        "PEM private key of tls_client_cert_file.", default=None
    )
    tinker_retrieve_wait_seconds: float = setting(
        "How long one /api/v1/retrieve_future waits on a pending future before answering "
        "408 try-again; under the SDK's 45 s request timeout.",
        default=20.0,
    )
    tinker_call_timeout_seconds: float = setting(
        "Deadline of each gRPC call to the trainer or auth (WaitFuture gets the retrieve "
        "wait on top).",
        default=60.0,
    )
    tinker_max_request_bytes: int = setting(
        "Largest request body accepted, after zstd decompression, bytes (larger: 413).",
        default=64 * 1024 * 1024,
    )
    tinker_zstd_requests: bool = setting(
        "Ask the SDK (client/config proto_compress_fwdbwd) to zstd-compress "
        "forward_backward bodies.",
        default=True,
    )
    tinker_dp_target_epsilon: float = setting(
        "Default target epsilon of a Tinker-created training client (user_metadata "
        "tensafe.dp.target_epsilon overrides).",
        default=8.0,
    )
    tinker_dp_planned_steps: int = setting(
        "Default steps the target epsilon is spread over (tensafe.dp.planned_steps).",
        default=1000,
    )
    tinker_dp_max_grad_norm: float = setting(
        "Default per-example clipping norm C (tensafe.dp.max_grad_norm).", default=1.0
    )
    tinker_dp_delta: float = setting("Default delta (tensafe.dp.delta).", default=1e-5)
    tinker_dp_accountant: str = setting(
        "Default accountant, rdp or pld (tensafe.dp.accountant).", default="rdp"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(env_name("port"), f"must be in 0..65535, got {self.port}")
        for name in ("trainer_url", "auth_url", "public_trainer_url", "public_auth_url"):
            value = getattr(self, name)
            if name.startswith("public_") and not value:
                continue
            if ":" not in value or value.startswith(("http://", "https://")):
                raise ConfigError(env_name(name), f"must be host:port, got {value!r}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(env_name("log_level"), f"unknown level {self.log_level!r}")
        if self.log_format not in {"json", "text"}:
            raise ConfigError(env_name("log_format"), "must be json or text")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError(env_name("shutdown_grace_seconds"), "must be >= 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                env_name("tls_key_file"), "tls_cert_file and tls_key_file go together"
            )
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ConfigError(
                env_name("tls_client_key_file"),
                "tls_client_cert_file and tls_client_key_file go together",
            )
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            raise ConfigError(env_name("tls_ca_file"), "required with TENSAFE_TLS_CLIENT_CERT_FILE")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_client_cert_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(env_name(name), f"{path} is not a readable file")
        if not 1.0 <= self.tinker_retrieve_wait_seconds <= 40.0:
            raise ConfigError(
                env_name("tinker_retrieve_wait_seconds"),
                "must be in [1, 40] (the SDK gives up on a request after 45 s)",
            )
        if self.tinker_call_timeout_seconds <= 0:
            raise ConfigError(env_name("tinker_call_timeout_seconds"), "must be > 0")
        if self.tinker_max_request_bytes < 1024 * 1024:
            raise ConfigError(env_name("tinker_max_request_bytes"), "must be at least 1 MiB")
        if not (math.isfinite(self.tinker_dp_target_epsilon) and self.tinker_dp_target_epsilon > 0):
            raise ConfigError(env_name("tinker_dp_target_epsilon"), "must be > 0")
        if self.tinker_dp_planned_steps < 1:
            raise ConfigError(env_name("tinker_dp_planned_steps"), "must be >= 1")
        if not self.tinker_dp_max_grad_norm > 0:
            raise ConfigError(env_name("tinker_dp_max_grad_norm"), "must be > 0")
        if not 0 < self.tinker_dp_delta < 1:
            raise ConfigError(env_name("tinker_dp_delta"), "must be in (0, 1)")
        if self.tinker_dp_accountant not in ACCOUNTANTS:
            raise ConfigError(env_name("tinker_dp_accountant"), "must be rdp or pld")
