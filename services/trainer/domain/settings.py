"""A training client's stored settings: its DP configuration and its LoRA config.

Both are fixed when the client is created and stored as stable JSON on its row;
:mod:`tensafe.trainer.serde` converts them to and from the contract's messages.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.config import LoraConfig

ACCOUNTANTS = ("rdp", "pld")
"""The accountants a client may choose (``rdp`` when unspecified)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSettings:
    """The DP configuration a client runs with, noise multiplier resolved."""

    noise_multiplier: float
    """sigma, > 0."""
    max_grad_norm: float
    """Clipping norm C, > 0."""
    delta: float
    """delta in (0, 1)."""
    accountant: str
    """``rdp`` or ``pld``."""
    target_epsilon: float | None
    """The epsilon sigma was calibrated for, if the client asked for one."""
    planned_steps: int
    """Steps the calibration spread target_epsilon over (0 without a target)."""
    epsilon_budget: float | None
    """Steps that would take epsilon above this are refused; None: no budget."""

    def to_json(self) -> str:
        """Stable JSON for the database."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DpSettings:
        """Parse :meth:`to_json` output."""
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpRequest:
    """The DP part of a request as sent; :func:`check_dp` validates it."""

    noise: str | None
    """Which of sigma and a target was given: ``noise_multiplier``,
    ``target_epsilon`` or None (neither)."""
    noise_multiplier: float
    target_epsilon: float
    max_grad_norm: float
    delta: float
    accountant: str
    """``rdp`` (also when unspecified) or ``pld``; empty: an unknown value."""
    epsilon_budget: float
    """0: none given (a target, if any, is the budget)."""
    planned_steps: int


def _finite(value: float) -> bool:
    return math.isfinite(value)


def check_dp(request: DpRequest) -> tuple[DpSettings | None, float | None]:
    """Validate a DP request; returns settings without sigma when it must be calibrated.

    Returns:
        ``(settings, None)`` when sigma was given, or ``(None, target_epsilon)`` when it
        must be calibrated; in that case call :func:`dp_with_noise` afterwards.

    Raises:
        InvalidArgument: The offending field of ``dp``.
    """
    if not _finite(request.max_grad_norm) or request.max_grad_norm <= 0:
        raise InvalidArgument("dp.max_grad_norm", "must be positive and finite")
    if not _finite(request.delta) or not 0.0 < request.delta < 1.0:
        raise InvalidArgument("dp.delta", "must be in (0, 1)")
    if request.accountant not in ACCOUNTANTS:
        raise InvalidArgument("dp.accountant", "must be ACCOUNTANT_RDP or ACCOUNTANT_PLD")
    if not _finite(request.epsilon_budget) or request.epsilon_budget < 0:
        raise InvalidArgument("dp.epsilon_budget", "must be >= 0 and finite")
    if request.planned_steps < 0:
        raise InvalidArgument("dp.planned_steps", "must be >= 0")
    if request.noise is None:
        raise InvalidArgument("dp.noise", "set noise_multiplier or target_epsilon")
    if request.noise == "noise_multiplier":
        if not _finite(request.noise_multiplier) or request.noise_multiplier <= 0:
            raise InvalidArgument(
                "dp.noise_multiplier",
                "must be positive and finite (a non-private client leaves dp unset)",
            )
        return dp_with_noise(request, request.noise_multiplier), None
    if not _finite(request.target_epsilon) or request.target_epsilon <= 0:
        raise InvalidArgument("dp.target_epsilon", "must be positive and finite")
    if request.planned_steps < 1:
        raise InvalidArgument("dp.planned_steps", "must be >= 1 with target_epsilon")
    return None, request.target_epsilon


def dp_with_noise(request: DpRequest, noise_multiplier: float) -> DpSettings:
    """Settings of a validated DP request with sigma resolved."""
    target = request.target_epsilon if request.noise == "target_epsilon" else None
    if request.epsilon_budget > 0:
        budget: float | None = request.epsilon_budget
    else:
        budget = target
    return DpSettings(
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=request.max_grad_norm,
        delta=request.delta,
        accountant=request.accountant,
        target_epsilon=target,
        planned_steps=int(request.planned_steps) if target is not None else 0,
        epsilon_budget=budget,
    )


def lora_to_json(config: LoraConfig, seed: int) -> str:
    """Stable JSON of the applied LoRA config and its seed."""
    return json.dumps({**dataclasses.asdict(config), "seed": seed}, sort_keys=True)


def lora_from_json(text: str) -> tuple[LoraConfig, int]:
    """Parse :func:`lora_to_json` output."""
    data = json.loads(text)
    seed = int(data.pop("seed"))
    data["target_modules"] = tuple(data["target_modules"])
    return LoraConfig(**data), seed


def json_state(state: Mapping[str, Any]) -> str:
    """Stable JSON of an accountant state."""
    return json.dumps(state, sort_keys=True)
