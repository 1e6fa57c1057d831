"""AuditPrivacy between the contract and the audit domain: validate, run, report.

The trainer API validates a request with :func:`audit_plan` before it admits the job
(bad input is INVALID_ARGUMENT at once); the worker runs :func:`execute_audit` in a
thread. Neither touches a training client, its ledger or its budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensafe.common.errors import InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer import serde
from tensafe.trainer.base_models import BaseModelInfo
from tensafe.trainer.domain.engine.accounting import BatchSampling, calibrate_noise_multiplier
from tensafe.trainer.domain.engine.config import DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine

from .bound import DEFAULT_CONFIDENCE
from .run import AuditConfig, AuditReport, CanaryKind, run_privacy_audit

_CANARY_KINDS = {
    pb.CANARY_KIND_UNSPECIFIED: CanaryKind.WHITE_BOX,
    pb.CANARY_KIND_WHITE_BOX: CanaryKind.WHITE_BOX,
    pb.CANARY_KIND_BLACK_BOX: CanaryKind.BLACK_BOX,
}
_SAMPLINGS = {
    pb.SAMPLING_UNSPECIFIED: BatchSampling.CLIENT_BATCHES,
    pb.SAMPLING_CLIENT_BATCHES: BatchSampling.CLIENT_BATCHES,
    pb.SAMPLING_POISSON: BatchSampling.POISSON,
}

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


def audit_plan(request: pb.AuditPrivacyRequest, info: BaseModelInfo) -> AuditPlan:
    """Validate an AuditPrivacy request against its base model.

    Args:
        request: The request.
        info: Its base model.

    Returns:
        The plan.

    Raises:
        InvalidArgument: The offending field (``canaries``, ``guesses_per_side``,
            ``confidence``, ``steps``, ``batch_size``, ``dp.*``, ``lora.*``, ...).
    """
    if not request.HasField("lora"):
        raise InvalidArgument("lora", "is required")
    if not request.HasField("dp"):
        raise InvalidArgument("dp", "is required: an audit tests a DP configuration")
    lora = serde.lora_config(request.lora, info.default_target_modules)
    unknown = [m for m in lora.target_modules if m not in info.lora_target_modules]
    if unknown:
        raise InvalidArgument("lora.target_modules", f"no layer {', '.join(unknown)}")
    if request.canary_kind not in _CANARY_KINDS:
        raise InvalidArgument("canary_kind", "unknown canary kind")
    if request.sampling not in _SAMPLINGS:
        raise InvalidArgument("sampling", "unknown sampling")
    dp = request.dp
    if dp.WhichOneof("noise") == "target_epsilon" and dp.planned_steps not in (0, request.steps):
        raise InvalidArgument("dp.planned_steps", "must be 0 or equal to steps in an audit")
    checked = pb.DpConfig()
    checked.CopyFrom(dp)
    if checked.WhichOneof("noise") == "target_epsilon":
        checked.planned_steps = max(1, int(request.steps))
    settings, target = serde.dp_request(checked)
    config = AuditConfig(
        canaries=int(request.canaries),
        guesses_per_side=int(request.guesses_per_side),
        confidence=request.confidence if request.confidence != 0 else DEFAULT_CONFIDENCE,
        canary_kind=_CANARY_KINDS[request.canary_kind],
        steps=int(request.steps),
        batch_size=int(request.batch_size),
        sampling=_SAMPLINGS[request.sampling],
        noise_multiplier=settings.noise_multiplier if settings is not None else 1.0,
        delta=dp.delta,
        accountant=serde.accountant_name(dp),
    )
    return AuditPlan(
        lora=lora,
        max_grad_norm=dp.max_grad_norm,
        noise_multiplier=settings.noise_multiplier if settings is not None else None,
        target_epsilon=target,
        config=config,
    )


def execute_audit(request: pb.AuditPrivacyRequest, info: BaseModelInfo) -> pb.AuditPrivacyResult:
    """Run the audit a request describes on a fresh shadow engine (blocking).

    Args:
        request: The request (validated again here).
        info: Its base model.

    Returns:
        The contract's result.
    """
    plan = audit_plan(request, info)
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
    return report_to_proto(report)


def report_to_proto(report: AuditReport) -> pb.AuditPrivacyResult:
    """The contract's AuditPrivacyResult of a report."""
    return pb.AuditPrivacyResult(
        claimed_epsilon=report.claimed_epsilon,
        epsilon_lower_bound=report.epsilon_lower_bound,
        canaries=report.canaries,
        guesses=report.guesses,
        correct_guesses=report.correct_guesses,
        confidence=report.confidence,
        delta=report.delta,
    )
