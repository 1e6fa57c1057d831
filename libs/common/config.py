"""Configuration as data: frozen dataclasses loaded once from the environment.

Every setting is a dataclass field whose ``metadata["help"]`` documents it; the
environment variable is ``TENSAFE_`` + the field name in upper case. A TOML file named
by ``TENSAFE_CONFIG_FILE`` may supply the same keys (lower-case field names); the
environment wins over the file. Loading validates everything at start-up and raises
:class:`~tensafe.common.errors.ConfigError` naming the setting, so a service either
starts with a coherent configuration or exits with one clear line.

There are no hidden defaults for secrets: a secret field has no default, and only an
explicit ``TENSAFE_DEV_MODE=1`` lets a service run without one (and it says so).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from tensafe.common import tls
from tensafe.common.errors import ConfigError

ENV_PREFIX = "TENSAFE_"

C = TypeVar("C")


def setting(help: str, **kwargs: Any) -> Any:
    """Declare a config field with its documentation.

    Args:
        help: What the setting does; shown in errors and in the generated reference.
        **kwargs: Passed to :func:`dataclasses.field` (``default``, ``default_factory``).

    Returns:
        A dataclass field.
    """
    metadata = {"help": help, "secret": bool(kwargs.pop("secret", False))}
    return dataclasses.field(metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """Settings every TenSafe service process has."""

    host: str = setting("Interface the gRPC server binds.", default="127.0.0.1")
    port: int = setting("gRPC port; 0 picks a free one.", default=0)
    database_url: str = setting(
        "SQLAlchemy async URL of the service's database, e.g. "
        "sqlite+aiosqlite:///state.db or postgresql+asyncpg://user@host/db."
    )
    data_dir: Path = setting("Folder for local objects (checkpoints, packages, keys).")
    dev_mode: bool = setting(
        "Explicit development mode: allows running without production secrets.",
        default=False,
    )
    max_message_bytes: int = setting(
        "Largest gRPC message accepted or sent, bytes. Large payloads stream in chunks.",
        default=16 * 1024 * 1024,
    )
    shutdown_grace_seconds: float = setting(
        "How long SIGTERM waits for in-flight RPCs before cancelling them.", default=10.0
    )
    log_level: str = setting("Logging level: DEBUG, INFO, WARNING, ERROR.", default="INFO")
    log_format: str = setting("Log format: json or text.", default="json")
    otel_exporter: str = setting(
        "Trace exporter: none, console or otlp (OTLP/gRPC to otel_endpoint).", default="none"
    )
    otel_endpoint: str = setting("OTLP collector endpoint (host:port).", default="")
    auth_url: str = setting(
        "host:port of the auth service. Every other service fetches the token-verification "
        "keys (JWKS) and the revocation list from it; required by all but auth itself.",
        default="",
    )
    service_api_key: str = setting(
        "API key of this service's service account (`tensafe admin bootstrap "
        "--service-account NAME`); authenticates the service to auth. Required by all but "
        "auth itself.",
        default="",
        secret=True,
    )
    nats_url: str = setting(
        "NATS server with JetStream, e.g. nats://127.0.0.1:4222. Services publish security "
        "audit events to it and auth consumes them into its hash chain.",
        default="",
    )
    metrics_port: int = setting(
        "Port of the Prometheus /metrics listener (on TENSAFE_HOST, separate from gRPC); "
        "0 picks a free one (reported in the ready file); -1 serves no metrics.",
        default=-1,
    )
    metrics_sample_seconds: float = setting(
        "How often gauges kept in the database (steps and epsilon per training client, "
        "queued jobs, audit chain length) are re-read for /metrics, seconds.",
        default=15.0,
    )
    revocation_bound_seconds: float = setting(
        "Revocation bound: a cached token-revocation list older than this is refreshed "
        "from auth before a call is admitted, so a revoked API key, a disabled principal or "
        "a revoked token is refused on this service within this many seconds, idle or busy "
        "(at most 5).",
        default=5.0,
    )
    revocation_outage_seconds: float = setting(
        "Fail-closed bound: while the revocation list cannot be refreshed (auth "
        "unreachable), calls are admitted on the last list until it is this old, then "
        "refused with UNAVAILABLE.",
        default=30.0,
    )
    ready_file: str = setting(
        'If set, the process writes {"port": N} here once it serves (used by `tensafe up`).',
        default="",
    )
    tls_cert_file: Path | None = setting(
        "PEM certificate (chain) the gRPC server presents. Set with tls_key_file, the "
        "listener speaks TLS only.",
        default=None,
    )
    tls_key_file: Path | None = setting(
        "PEM private key of tls_cert_file (unencrypted; mount it from a secret).",
        default=None,
    )
    tls_client_ca_file: Path | None = setting(
        "PEM CA bundle client certificates must chain to. Set, the listener is mutual TLS: "
        "a client without a valid certificate is refused in the handshake.",
        default=None,
    )
    tls_ca_file: Path | None = setting(
        "PEM CA bundle that verifies the servers this service calls (auth, registry) and "
        "the NATS server on tls:// URLs. Set, every outgoing channel is TLS.",
        default=None,
    )
    tls_client_cert_file: Path | None = setting(
        "PEM certificate this service presents when it calls another (mTLS). Default: "
        "tls_cert_file (one certificate with serverAuth and clientAuth usages).",
        default=None,
    )
    tls_client_key_file: Path | None = setting(
        "PEM private key of tls_client_cert_file.", default=None
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(env_name("port"), f"must be in 0..65535, got {self.port}")
        if not self.database_url.strip():
            raise ConfigError(env_name("database_url"), "must not be empty")
        if "+" not in self.database_url.split(":", 1)[0]:
            raise ConfigError(
                env_name("database_url"),
                "must name an async driver (sqlite+aiosqlite:// or postgresql+asyncpg://)",
            )
        if self.max_message_bytes < 1024 * 1024:
            raise ConfigError(env_name("max_message_bytes"), "must be at least 1 MiB")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError(env_name("shutdown_grace_seconds"), "must be >= 0")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(env_name("log_level"), f"unknown level {self.log_level!r}")
        if self.log_format not in {"json", "text"}:
            raise ConfigError(env_name("log_format"), "must be json or text")
        if self.otel_exporter not in {"none", "console", "otlp"}:
            raise ConfigError(env_name("otel_exporter"), "must be none, console or otlp")
        if self.nats_url and not self.nats_url.startswith(("nats://", "tls://")):
            raise ConfigError(env_name("nats_url"), "must start with nats:// or tls://")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(env_name("metrics_port"), "must be -1 (off) or in 0..65535")
        if self.metrics_port > 0 and self.metrics_port == self.port:
            raise ConfigError(env_name("metrics_port"), "must differ from TENSAFE_PORT")
        if self.metrics_sample_seconds <= 0:
            raise ConfigError(env_name("metrics_sample_seconds"), "must be > 0")
        if not 0 < self.revocation_bound_seconds <= 5:
            raise ConfigError(env_name("revocation_bound_seconds"), "must be in (0, 5]")
        if not self.revocation_bound_seconds <= self.revocation_outage_seconds <= 300:
            raise ConfigError(
                env_name("revocation_outage_seconds"),
                "must be between revocation_bound_seconds and 300",
            )
        if self.otel_exporter == "otlp" and not self.otel_endpoint:
            raise ConfigError(env_name("otel_endpoint"), "required when otel_exporter=otlp")
        tls.validate(self)


def env_name(field_name: str) -> str:
    """The environment variable of a config field."""
    return ENV_PREFIX + field_name.upper()


def load_config(cls: type[C], environ: Mapping[str, str] | None = None) -> C:
    """Build a config dataclass from ``TENSAFE_*`` variables (and an optional TOML file).

    Args:
        cls: A frozen dataclass whose fields are declared with :func:`setting`.
        environ: The environment; ``os.environ`` when omitted.

    Returns:
        The validated config.

    Raises:
        ConfigError: A setting is missing, malformed or invalid; the error names it.
    """
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_file = env.get(ENV_PREFIX + "CONFIG_FILE", "")
    if config_file:
        try:
            with open(config_file, "rb") as f:
                file_values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(ENV_PREFIX + "CONFIG_FILE", f"cannot read: {exc}") from exc
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in file_values:
        if key not in known:
            raise ConfigError(f"{config_file}:{key}", "unknown setting")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = env_name(field.name)
        raw: Any
        if name in env:
            raw = env[name]
        elif field.name in file_values:
            raw = file_values[field.name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(name, f"required setting is missing ({field.metadata['help']})")
        else:
            continue
        values[field.name] = _coerce(name, hints[field.name], raw)
    return cls(**values)


def _coerce(name: str, annotation: Any, raw: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw in ("", None):
            return None
        return _coerce(name, args[0], raw)
    if origin is tuple:
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s.strip()]
        return tuple(_coerce(name, typing.get_args(annotation)[0], i) for i in items)
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(name, f"expected a boolean (1/0/true/false), got {raw!r}")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected {annotation.__name__}, got {raw!r}") from None
    if annotation is Path:
        return Path(str(raw)).expanduser()
    if annotation is str:
        return str(raw)
    raise TypeError(f"unsupported config type {annotation!r} for {name}")


def describe(cls: type[Any]) -> list[tuple[str, str, str]]:
    """List (environment variable, default, help) for each setting of a config class.

    Used to generate the configuration reference in docs/operations.md.
    """
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((env_name(field.name), default, str(field.metadata.get("help", ""))))
    return rows
