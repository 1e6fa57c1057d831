"""A training client's stored settings: its DP configuration and its LoRA config.

Both are fixed when the client is created and stored as stable JSON on its row;
:mod:`tensafe.trainer.serde` converts them to and from the contract's messages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

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
    """A validated DP request whose noise multiplier may still need calibrating."""

    noise_multiplier: float | None
    """sigma as given; None when it is calibrated for :attr:`target_epsilon`."""
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float | None
    planned_steps: int
    """Steps the target is spread over (as requested)."""
    epsilon_budget: float
    """The requested budget; 0: none given (the target, if any, is the budget)."""

    def resolved(self, noise_multiplier: float) -> DpSettings:
        """The settings with sigma resolved (given or calibrated)."""
        target = self.target_epsilon
        budget: float | None = self.epsilon_budget if self.epsilon_budget > 0 else target
        return DpSettings(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=self.max_grad_norm,
            delta=self.delta,
            accountant=self.accountant,
            target_epsilon=target,
            planned_steps=int(self.planned_steps) if target is not None else 0,
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
