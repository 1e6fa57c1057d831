"""Plan requests: what a client asks the compiler for, checked, and the plan it gets.

The compiler itself is :mod:`tensafe.helora.plan`, shared with the SDK. This module
turns a request (shapes, token count, parameters, an optional forced packing) into a
plan with a reason, and renames the compiler's error fields to the request's field
paths (``spec.hidden_size``, ``spec.parameters.coeff_modulus_bits``), so a caller
learns which field of *its* message to change.

The activation bound, complex packing and cost model are the compiler's defaults on
both sides: the contract has no fields for them, and the SDK compiles with the same
defaults, so both derive the identical plan.
"""

from __future__ import annotations

import dataclasses

from tensafe.common.errors import InvalidArgument
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import Packing, Plan, Variant, choose_plan, compile_plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """A checked plan specification.

    Attributes:
        hidden_size: Input width d.
        output_size: Output width d_out.
        rank: LoRA rank r.
        alpha: LoRA alpha.
        tokens: Tokens per request.
        params: The CKKS parameter set (128-bit secure by construction).
        packing: A forced packing, or None to let the compiler choose.
        variant: A forced variant of the packing, or None to let the compiler choose.
    """

    hidden_size: int
    output_size: int
    rank: int
    alpha: float
    tokens: int
    params: CkksParams
    packing: Packing | None
    variant: Variant | None = None


def rename_field(error: InvalidArgument, prefix: str) -> InvalidArgument:
    """Return ``error`` with its field moved under ``prefix`` (compiler names mapped).

    The compiler calls the parameter set ``params``; the contract calls it
    ``parameters``.
    """
    field = error.field
    if field.startswith("params."):
        field = "parameters." + field.removeprefix("params.")
    elif field == "params":
        field = "parameters"
    return InvalidArgument(f"{prefix}{field}", error.description, reason=error.reason)


def compile_for(request: PlanRequest, *, field_prefix: str = "spec.") -> tuple[Plan, str]:
    """Compile the plan a request asks for.

    Args:
        request: The checked request.
        field_prefix: Prefix of the request's fields in errors.

    Returns:
        The plan and why its packing was chosen.

    Raises:
        InvalidArgument: The shapes cannot be served (the field says which to change).
    """
    try:
        if request.packing is None:
            if request.variant is not None:
                raise InvalidArgument(
                    "variant", "a variant needs its packing (spec.packing) to be given"
                )
            return choose_plan(
                hidden_size=request.hidden_size,
                output_size=request.output_size,
                rank=request.rank,
                alpha=request.alpha,
                tokens=request.tokens,
                params=request.params,
            )
        plan = compile_plan(
            hidden_size=request.hidden_size,
            output_size=request.output_size,
            rank=request.rank,
            alpha=request.alpha,
            tokens=request.tokens,
            params=request.params,
            packing=request.packing,
            variant=request.variant,
        )
    except InvalidArgument as error:
        raise rename_field(error, field_prefix) from None
    if request.variant is not None:
        return plan, (f"{request.packing.value} {request.variant.value} requested by the client")
    return plan, f"{request.packing.value} ({plan.variant.value}) requested by the client"


def plan_for_units(template: Plan, *, hidden_size: int, output_size: int, units: int) -> Plan:
    """Compile ``template``'s packing and parameters for one layer and ``units`` units.

    A unit is one ciphertext (PER_TOKEN) or one token group (BATCH_FIRST); every unit
    is evaluated independently, so the plan for ``units`` full units evaluates any
    request whose client plan has that many units, and their counts agree.
    """
    return compile_plan(
        hidden_size=hidden_size,
        output_size=output_size,
        rank=template.rank,
        alpha=template.alpha,
        tokens=units * template.tokens_per_unit,
        params=template.params,
        packing=template.packing,
        complex_packing=template.complex_packing,
        activation_bound=template.activation_bound,
        cost_model=template.cost_model,
        variant=template.variant,
    )
