"""AuditPrivacy in the audit domain: validate, run, report.

The trainer API validates a request's command with :func:`audit_plan` before it admits
the job (bad input is INVALID_ARGUMENT at once); the worker runs :func:`execute_audit`
in a thread. Neither touches a training client, its ledger or its budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.base_models import BaseModelInfo
from tensafe.trainer.domain.commands import AuditPrivacy
from tensafe.trainer.domain.engine.accounting import calibrate_noise_multiplier
from tensafe.trainer.domain.engine.config import DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.domain.settings import check_dp

from .bound import DEFAULT_CONFIDENCE
from .run import AuditConfig, AuditReport, run_privacy_audit

# LoRA seed of every shadow run: the initialisation is public and not what is audited.
_SHADOW_LORA_SEED = 0


@dataclass(frozen=True)
class AuditPlan:
    """A validated AuditPrivacy request, sigma not yet calibrated."""

    lora: LoraConfig
    """The shadow adapter."""
    max_grad_norm: float
    """Clipping norm C."""
    noise_multiplier: float | None
    """sigma, or None when it is calibrated from ``target_epsilon``."""
    target_epsilon: float | None
    """The epsilon sigma is calibrated for."""
    config: AuditConfig
    """The audit (its noise multiplier is a stand-in until calibration)."""


def audit_plan(command: AuditPrivacy, info: BaseModelInfo) -> AuditPlan:
    """Validate an AuditPrivacy request against its base model.

    Args:
        command: The request.
        info: Its base model.

    Returns:
        The plan.

    Raises:
        InvalidArgument: The offending field (``canaries``, ``guesses_per_side``,
            ``confidence``, ``steps``, ``batch_size``, ``dp.*``, ``lora.*``, ...).
    """
    if command.lora is None:
        raise InvalidArgument("lora", "is required")
    if command.dp is None:
        raise InvalidArgument("dp", "is required: an audit tests a DP configuration")
    lora = command.lora.config(info.default_target_modules)
    unknown = [m for m in lora.target_modules if m not in info.lora_target_modules]
    if unknown:
        raise InvalidArgument("lora.target_modules", f"no layer {', '.join(unknown)}")
    if command.canary_kind is None:
        raise InvalidArgument("canary_kind", "unknown canary kind")
    if command.sampling is None:
        raise InvalidArgument("sampling", "unknown sampling")
    dp = command.dp
    if dp.noise == "target_epsilon" and dp.planned_steps not in (0, command.steps):
        raise InvalidArgument("dp.planned_steps", "must be 0 or equal to steps in an audit")
    checked = dp
    if checked.noise == "target_epsilon":
        checked = dataclasses.replace(checked, planned_steps=max(1, int(command.steps)))
    settings, target = check_dp(checked)
    config = AuditConfig(
        canaries=int(command.canaries),
        guesses_per_side=int(command.guesses_per_side),
        confidence=command.confidence if command.confidence != 0 else DEFAULT_CONFIDENCE,
        canary_kind=command.canary_kind,
        steps=int(command.steps),
        batch_size=int(command.batch_size),
        sampling=command.sampling,
        noise_multiplier=settings.noise_multiplier if settings is not None else 1.0,
        delta=dp.delta,
        accountant=dp.accountant or "rdp",
    )
    return AuditPlan(
        lora=lora,
        max_grad_norm=dp.max_grad_norm,
        noise_multiplier=settings.noise_multiplier if settings is not None else None,
        target_epsilon=target,
        config=config,
    )


def execute_audit(command: AuditPrivacy, info: BaseModelInfo) -> AuditReport:
    """Run the audit a request describes on a fresh shadow engine (blocking).

    Args:
        command: The request (validated again here).
        info: Its base model.

    Returns:
        The audit's report.
    """
    plan = audit_plan(command, info)
    config = plan.config
    sigma = plan.noise_multiplier
    if sigma is None:
        assert plan.target_epsilon is not None
        sigma = calibrate_noise_multiplier(
            target_epsilon=plan.target_epsilon,
            delta=config.delta,
            steps=config.steps,
            sampling=config.sampling,
            sampling_probability=config.sampling_probability,
            accountant=config.accountant,
        )
        config = AuditConfig(
            canaries=config.canaries,
            guesses_per_side=config.guesses_per_side,
            confidence=config.confidence,
            canary_kind=config.canary_kind,
            steps=config.steps,
            batch_size=config.batch_size,
            sampling=config.sampling,
            noise_multiplier=sigma,
            delta=config.delta,
            accountant=config.accountant,
        )
    engine = LoraTrainingEngine(
        Path(info.path),
        lora=plan.lora,
        dp=DpConfig(noise_multiplier=sigma, max_grad_norm=plan.max_grad_norm),
        seed=_SHADOW_LORA_SEED,
    )
    try:
        report = run_privacy_audit(engine, config)
    finally:
        engine.close()
    return report
