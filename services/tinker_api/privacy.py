"""The DP-SGD settings of a Tinker-created training client: DP by default.

The defaults are the service's configuration (``TENSAFE_TINKER_DP_*``); each may be
overridden per training client through ``user_metadata`` keys ``tensafe.dp.*``
(docs/tinker.md lists them). A bad value is an ``InvalidArgument`` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tensafe.common.errors import InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker_api.config import ACCOUNTANTS, TinkerApiConfig

PREFIX = "tensafe.dp"
KEYS = (
    PREFIX,
    f"{PREFIX}.target_epsilon",
    f"{PREFIX}.planned_steps",
    f"{PREFIX}.noise_multiplier",
    f"{PREFIX}.max_grad_norm",
    f"{PREFIX}.delta",
    f"{PREFIX}.epsilon_budget",
    f"{PREFIX}.accountant",
)
_ACCOUNTANT = {"rdp": pb.ACCOUNTANT_RDP, "pld": pb.ACCOUNTANT_PLD}


def _number(metadata: Mapping[str, Any], key: str, default: float) -> float:
    value = _optional(metadata, key)
    return default if value is None else value


def _optional(metadata: Mapping[str, Any], key: str) -> float | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidArgument(f"user_metadata.{key}", f"must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"user_metadata.{key}", "must be a finite number > 0")
    return value


def dp_config(
    config: TinkerApiConfig, user_metadata: Mapping[str, Any] | None
) -> pb.DpConfig | None:
    """The ``DpConfig`` of a new training client; ``None`` only when the user asked for an
    explicitly non-private client (``tensafe.dp: off``).

    Raises:
        InvalidArgument: A ``tensafe.dp.*`` key is unknown or its value is bad.
    """
    metadata = dict(user_metadata or {})
    for key in metadata:
        if key.startswith(PREFIX) and key not in KEYS:
            raise InvalidArgument(
                f"user_metadata.{key}", f"unknown DP setting; known: {', '.join(KEYS)}"
            )
    switch = str(metadata.get(PREFIX, "on")).lower()
    if switch not in ("on", "off"):
        raise InvalidArgument(f"user_metadata.{PREFIX}", "must be on or off")
    if switch == "off":
        return None
    delta = _number(metadata, f"{PREFIX}.delta", config.tinker_dp_delta)
    if not delta < 1:
        raise InvalidArgument(f"user_metadata.{PREFIX}.delta", "must be in (0, 1)")
    accountant = str(metadata.get(f"{PREFIX}.accountant", config.tinker_dp_accountant)).lower()
    if accountant not in ACCOUNTANTS:
        raise InvalidArgument(f"user_metadata.{PREFIX}.accountant", "must be rdp or pld")
    dp = pb.DpConfig(
        max_grad_norm=_number(metadata, f"{PREFIX}.max_grad_norm", config.tinker_dp_max_grad_norm),
        delta=delta,
        accountant=_ACCOUNTANT[accountant],
        epsilon_budget=_optional(metadata, f"{PREFIX}.epsilon_budget") or 0.0,
    )
    sigma = _optional(metadata, f"{PREFIX}.noise_multiplier")
    if sigma is not None:
        if f"{PREFIX}.target_epsilon" in metadata:
            raise InvalidArgument(
                f"user_metadata.{PREFIX}.noise_multiplier",
                "give either noise_multiplier or target_epsilon, not both",
            )
        dp.noise_multiplier = sigma
        return dp
    dp.target_epsilon = _number(
        metadata, f"{PREFIX}.target_epsilon", config.tinker_dp_target_epsilon
    )
    steps = _number(metadata, f"{PREFIX}.planned_steps", float(config.tinker_dp_planned_steps))
    if steps != int(steps):
        raise InvalidArgument(f"user_metadata.{PREFIX}.planned_steps", "must be an integer")
    dp.planned_steps = int(steps)
    return dp
