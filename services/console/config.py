"""Configuration of the web console.

The console keeps no state (no database, no data folder, no secret of its own): it is a
client of the trainer, the registry and auth, and a signed-in user's session is the
access token auth gave for their API key, held in an HttpOnly cookie. Its settings are
where those services are, how to reach them and how it serves HTTP.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tensafe.common import tls
from tensafe.common.config import env_name, setting
from tensafe.common.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConsoleConfig:
    """Settings of the console service."""

    host: str = setting("Interface the HTTP server binds.", default="127.0.0.1")
    port: int = setting("HTTP port; 0 picks a free one.", default=0)
    trainer_url: str = setting("host:port of the trainer's gRPC endpoint.")
    auth_url: str = setting("host:port of the auth service (API key sign-in, audit log).")
    registry_url: str = setting("host:port of the registry (adapters and their packages).")
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
        "speaks HTTPS only (and the session cookie is Secure).",
        default=None,
    )
    tls_key_file: Path | None = setting("PEM private key of tls_cert_file.", default=None)
    tls_ca_file: Path | None = setting(
        "PEM CA bundle that verifies the trainer, registry and auth; set, the gRPC "
        "channels are TLS.",
        default=None,
    )
    tls_client_cert_file: Path | None = setting(
        "PEM certificate presented to the trainer, registry and auth (mutual TLS).",
        default=None,
    )
    tls_client_key_file: Path | None = setting(
        "PEM private key of tls_client_cert_file.", default=None
    )
    console_secure_cookie: bool = setting(
        "Mark the session cookie Secure although this listener is plain HTTP: set it "
        "when a TLS-terminating Ingress or proxy fronts the console. Always on with "
        "tls_cert_file.",
        default=False,
    )
    console_call_timeout_seconds: float = setting(
        "Deadline of each gRPC call the console makes.", default=15.0
    )
    console_poll_seconds: float = setting(
        "How often a run page asks for the run's progress while it is open.", default=2.0
    )

    @property
    def secure_cookie(self) -> bool:
        """Whether the session cookie carries the Secure attribute."""
        return self.console_secure_cookie or self.tls_cert_file is not None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(env_name("port"), f"must be in 0..65535, got {self.port}")
        for name in ("trainer_url", "auth_url", "registry_url"):
            value = getattr(self, name)
            if ":" not in value or value.startswith(("http://", "https://")):
                raise ConfigError(env_name(name), f"must be host:port, got {value!r}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(env_name("log_level"), f"unknown level {self.log_level!r}")
        if self.log_format not in {"json", "text"}:
            raise ConfigError(env_name("log_format"), "must be json or text")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError(env_name("shutdown_grace_seconds"), "must be >= 0")
        tls.validate(self)
        if self.console_call_timeout_seconds <= 0:
            raise ConfigError(env_name("console_call_timeout_seconds"), "must be > 0")
        if not 0.2 <= self.console_poll_seconds <= 60:
            raise ConfigError(env_name("console_poll_seconds"), "must be in [0.2, 60]")
