"""Configuration of the registry service."""

from __future__ import annotations

import dataclasses

from tensafe.common.config import ServiceConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistryConfig(ServiceConfig):
    """Settings of the registry service."""
