"""Conversions between ``tensafe.he.v1`` messages and the HE runtime's domain types.

Every check of a message's own shape happens here (unknown enum values, missing
sub-messages), with errors naming the field path in the request.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from tensafe.common.errors import InvalidArgument
from tensafe.he_runtime.domain.plans import PlanRequest
from tensafe.he_runtime.domain.sessions import Session, SessionHeader
from tensafe.helora.params import CkksParams
from tensafe.helora.plan import OpCounts, Packing, Plan, Variant
from tensafe.proto.he.v1 import he_service_pb2 as pb

PACKING_TO_PROTO: dict[Packing, pb.Packing.ValueType] = {
    Packing.PER_TOKEN: pb.PACKING_PER_TOKEN,
    Packing.BATCH_FIRST: pb.PACKING_BATCH_FIRST,
}
PACKING_FROM_PROTO: dict[int, Packing] = {int(v): k for k, v in PACKING_TO_PROTO.items()}
VARIANT_TO_PROTO: dict[Variant, pb.PlanVariant.ValueType] = {
    Variant.SERVER_BABY_STEPS: pb.PLAN_VARIANT_SERVER_BABY_STEPS,
    Variant.CLIENT_BABY_STEPS: pb.PLAN_VARIANT_CLIENT_BABY_STEPS,
    Variant.TWO_PRIMES: pb.PLAN_VARIANT_TWO_PRIMES,
    Variant.ONE_PRIME: pb.PLAN_VARIANT_ONE_PRIME,
}
VARIANT_FROM_PROTO: dict[int, Variant] = {int(v): k for k, v in VARIANT_TO_PROTO.items()}


def variant_from_proto(value: int, *, field: str) -> Variant | None:
    """Map the contract's plan variant; UNSPECIFIED is None (the compiler chooses).

    Raises:
        InvalidArgument: An unknown enum value.
    """
    if value == pb.PLAN_VARIANT_UNSPECIFIED:
        return None
    try:
        return VARIANT_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(
            field,
            f"unknown plan variant {value}; use one of "
            f"{', '.join(pb.PlanVariant.Name(v) for v in VARIANT_TO_PROTO.values())} or "
            "PLAN_VARIANT_UNSPECIFIED",
        ) from None


def params_from_proto(message: pb.CkksParameters, *, field: str) -> CkksParams:
    """Build a validated (128-bit secure) parameter set.

    Raises:
        InvalidArgument: Missing or insecure parameters, naming ``field`` + the sub-field.
    """
    try:
        return CkksParams(
            poly_modulus_degree=int(message.poly_modulus_degree),
            coeff_modulus_bits=tuple(int(bits) for bits in message.coeff_modulus_bits),
            scale_bits=int(message.scale_bits),
        )
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}.{error.field}", error.description) from None


def params_to_proto(params: CkksParams) -> pb.CkksParameters:
    """The contract's CkksParameters of a parameter set."""
    return pb.CkksParameters(
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_modulus_bits=list(params.coeff_modulus_bits),
        scale_bits=params.scale_bits,
    )


def packing_from_proto(value: int, *, field: str) -> Packing | None:
    """Map the contract's packing; UNSPECIFIED is None (the compiler chooses).

    Raises:
        InvalidArgument: An unknown enum value.
    """
    if value == pb.PACKING_UNSPECIFIED:
        return None
    try:
        return PACKING_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(
            field,
            f"unknown packing {value}; use PACKING_PER_TOKEN, PACKING_BATCH_FIRST or "
            "PACKING_UNSPECIFIED",
        ) from None


def spec_from_proto(spec: pb.PlanSpec, *, field: str) -> PlanRequest:
    """Check a PlanSpec and return the domain request.

    Raises:
        InvalidArgument: Missing parameters, bad shapes, unknown packing, insecure
            parameters; the field path starts with ``field``.
    """
    if not spec.HasField("parameters"):
        raise InvalidArgument(f"{field}.parameters", "is required")
    for name in ("hidden_size", "output_size", "rank", "tokens"):
        value = getattr(spec, name)
        if value < 1:
            raise InvalidArgument(f"{field}.{name}", f"must be a positive integer, got {value}")
    if not spec.alpha > 0:
        raise InvalidArgument(f"{field}.alpha", f"must be positive, got {spec.alpha}")
    return PlanRequest(
        hidden_size=int(spec.hidden_size),
        output_size=int(spec.output_size),
        rank=int(spec.rank),
        alpha=float(spec.alpha),
        tokens=int(spec.tokens),
        params=params_from_proto(spec.parameters, field=f"{field}.parameters"),
        packing=packing_from_proto(int(spec.packing), field=f"{field}.packing"),
        variant=variant_from_proto(int(spec.variant), field=f"{field}.variant"),
    )


def plan_to_proto(plan: Plan, reason: str) -> pb.Plan:
    """The contract's Plan: the counts, the rotation steps and the canonical JSON."""
    return pb.Plan(
        plan_id=plan.fingerprint(),
        packing=PACKING_TO_PROTO[plan.packing],
        reason=reason,
        rotation_steps=list(plan.rotation_steps),
        depth=plan.depth,
        rotations=plan.counts.rotations,
        key_switches=plan.counts.key_switches,
        plaintext_multiplies=plan.counts.multiply_plain,
        rescales=plan.counts.rescales,
        estimated_ms=plan.estimated_server_ms,
        input_ciphertexts=plan.input_ciphertexts,
        output_ciphertexts=plan.output_ciphertexts,
        plan_json=plan.to_json(),
    )


def header_from_proto(header: pb.CreateSessionHeader) -> SessionHeader:
    """Check the first message of CreateSession.

    Raises:
        InvalidArgument: A field is missing or malformed.
    """
    if not header.adapter_name:
        raise InvalidArgument("header.adapter_name", "is required")
    if header.adapter_version < 0:
        raise InvalidArgument("header.adapter_version", "must be >= 0")
    if not header.HasField("spec"):
        raise InvalidArgument("header.spec", "is required")
    if not header.seal_parameters:
        raise InvalidArgument(
            "header.seal_parameters", "is required (the framed CKKS parameter set)"
        )
    if len(header.request_id) > 128:
        raise InvalidArgument("header.request_id", "must be at most 128 characters")
    return SessionHeader(
        adapter_name=header.adapter_name,
        adapter_version=int(header.adapter_version),
        spec=spec_from_proto(header.spec, field="header.spec"),
        parameters=bytes(header.seal_parameters),
        galois_keys_size=int(header.galois_keys_size),
        request_id=header.request_id,
    )


def session_to_proto(session: Session, *, expire_time: float) -> pb.Session:
    """The contract's Session."""
    expires = timestamp_pb2.Timestamp()
    expires.FromNanoseconds(int(expire_time * 1e9))
    return pb.Session(
        id=session.id,
        plan=plan_to_proto(session.plan, session.reason),
        layers=session.layers,
        expire_time=expires,
        key_bytes=session.key_bytes,
    )


def counts_to_proto(counts: OpCounts) -> pb.OperationCounts:
    """The contract's OperationCounts of performed operations."""
    return pb.OperationCounts(
        rotations=counts.rotations,
        key_switches=counts.key_switches,
        plaintext_multiplies=counts.multiply_plain,
        rescales=counts.rescales,
        additions=counts.additions,
    )
