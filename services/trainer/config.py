"""Configuration of the trainer API and its workers."""

from __future__ import annotations

import dataclasses

from tensafe.common.config import ServiceConfig, env_name, setting
from tensafe.common.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig(ServiceConfig):
    """Settings of the trainer API and workers."""

    nats_url: str = setting("NATS server with JetStream, e.g. nats://127.0.0.1:4222.")
    jobs_stream: str = setting("JetStream stream of training jobs.", default="TENSAFE_TRAINER")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nats_url.startswith(("nats://", "tls://")):
            raise ConfigError(env_name("nats_url"), "must start with nats:// or tls://")
