"""Configuration of the HE runtime service."""

from __future__ import annotations

import dataclasses

from tensafe.common.config import ServiceConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeRuntimeConfig(ServiceConfig):
    """Settings of the HE runtime service."""
