"""CompilePlan through the real gRPC service: plans equal the shared compiler's, and
every malformed or insecure spec is INVALID_ARGUMENT naming its field."""

from __future__ import annotations

import json

import pytest

from tensafe.client.he import plan_spec
from tensafe.common.errors import InvalidArgument, Unauthenticated
from tensafe.helora import CkksParams, Packing, Plan, choose_plan, compile_plan, default_params
from tensafe.helora.plan import Variant
from tensafe.proto.he.v1 import he_service_pb2 as pb

from .conftest import Runtime, new_tenant
from .helpers import raises

PARAMS = default_params()


def spec(**overrides: object) -> pb.PlanSpec:
    values: dict[str, object] = {
        "hidden_size": 64,
        "output_size": 32,
        "rank": 8,
        "alpha": 16.0,
        "tokens": 1,
        "params": PARAMS,
        "packing": None,
    }
    values.update(overrides)
    return plan_spec(**values)  # type: ignore[arg-type]


def test_unspecified_packing_is_the_compilers_choice_with_its_counts(runtime: Runtime) -> None:
    rpc = runtime.rpc(new_tenant())
    plan = rpc.compile_plan(spec())
    expected, reason = choose_plan(
        hidden_size=64, output_size=32, rank=8, alpha=16.0, tokens=1, params=PARAMS
    )
    assert Plan.from_dict(json.loads(plan.plan_json)) == expected
    assert plan.packing == pb.PACKING_PER_TOKEN
    assert plan.reason == reason and "BATCH_FIRST" in plan.reason
    # CLIENT_BABY_STEPS: the client sends x rotated by 0 and 1; the runtime rotates
    # x·A's giant steps 2, 4, 6, the fold 8, 16, 32, and u·B's steps 1, 2, 3 and 4.
    assert list(plan.rotation_steps) == [1, 2, 3, 4, 6, 8, 16, 32]
    assert plan.plan_id == expected.fingerprint()
    assert (plan.rotations, plan.key_switches, plan.plaintext_multiplies, plan.rescales) == (
        10,
        10,
        16,
        4,
    )
    assert (plan.depth, plan.input_ciphertexts, plan.output_ciphertexts) == (2, 2, 1)


def test_forced_batch_first_needs_no_rotation(runtime: Runtime) -> None:
    rpc = runtime.rpc(new_tenant())
    plan = rpc.compile_plan(spec(packing=Packing.BATCH_FIRST, tokens=300))
    expected = compile_plan(
        hidden_size=64,
        output_size=32,
        rank=8,
        alpha=16.0,
        tokens=300,
        params=PARAMS,
        packing=Packing.BATCH_FIRST,
    )
    assert Plan.from_dict(json.loads(plan.plan_json)) == expected
    assert plan.packing == pb.PACKING_BATCH_FIRST
    assert list(plan.rotation_steps) == [] and plan.rotations == 0
    assert plan.plaintext_multiplies == 8 * (64 + 32)
    assert plan.input_ciphertexts == 64 and plan.output_ciphertexts == 32


INSECURE = pb.CkksParameters(poly_modulus_degree=8192, coeff_modulus_bits=[60, 60, 60, 60])


def _bad(field: str, **changes: object) -> tuple[str, pb.PlanSpec]:
    message = spec()
    for name, value in changes.items():
        if name == "parameters":
            message.parameters.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "clear":
            message.ClearField(str(value))
        else:
            setattr(message, name, value)
    return field, message


@pytest.mark.parametrize(
    ("field", "message"),
    [
        _bad("spec.packing", packing=99),
        _bad("spec.hidden_size", hidden_size=0),
        _bad("spec.rank", rank=-3),
        _bad("spec.rank", rank=128),
        _bad("spec.alpha", alpha=0.0),
        _bad("spec.tokens", tokens=0),
        _bad("spec.parameters", clear="parameters"),
        _bad("spec.parameters.coeff_modulus_bits", parameters=INSECURE),
        _bad(
            "spec.parameters.poly_modulus_degree",
            parameters=pb.CkksParameters(
                poly_modulus_degree=3000, coeff_modulus_bits=[30, 30], scale_bits=25
            ),
        ),
        _bad(
            "spec.parameters.scale_bits",
            parameters=pb.CkksParameters(
                poly_modulus_degree=8192, coeff_modulus_bits=[60, 40, 40, 60], scale_bits=61
            ),
        ),
        _bad("spec.hidden_size", hidden_size=8192, packing=pb.PACKING_PER_TOKEN),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_spec_is_invalid_argument_naming_the_field(
    runtime: Runtime, field: str, message: pb.PlanSpec
) -> None:
    rpc = runtime.rpc(new_tenant())
    error = raises(InvalidArgument, rpc.compile_plan, message)
    assert isinstance(error, InvalidArgument)
    assert error.field == field, error.message
    # The runtime keeps serving.
    assert rpc.compile_plan(spec()).packing == pb.PACKING_PER_TOKEN


def test_insecure_parameters_name_the_security_bound(runtime: Runtime) -> None:
    error = raises(
        InvalidArgument, runtime.rpc(new_tenant()).compile_plan, _bad("", parameters=INSECURE)[1]
    )
    assert "218" in error.message and "128-bit" in error.message


def test_calls_without_a_token_are_unauthenticated(runtime: Runtime) -> None:
    raises(Unauthenticated, runtime.rpc(None).compile_plan, spec())


def test_other_parameter_sets_compile(runtime: Runtime) -> None:
    params = CkksParams(
        poly_modulus_degree=16384, coeff_modulus_bits=(60, 40, 40, 60), scale_bits=40
    )
    plan = runtime.rpc(new_tenant()).compile_plan(spec(params=params, hidden_size=4096, rank=16))
    assert Plan.from_dict(json.loads(plan.plan_json)).params == params


def test_forced_one_prime_compiles_only_where_its_derived_bound_holds(runtime: Runtime) -> None:
    rpc = runtime.rpc(new_tenant())
    forced = {"packing": Packing.BATCH_FIRST, "tokens": 300, "variant": Variant.ONE_PRIME}
    plan = rpc.compile_plan(spec(**forced))
    decoded = Plan.from_dict(json.loads(plan.plan_json))
    assert decoded.variant is Variant.ONE_PRIME and decoded.error_bound < 1e-3
    assert plan.rescales == 0 and plan.plaintext_multiplies == 8 * (64 + 32)
    # d = 4096: the bound (6e-3 at r = 8) is over the contract's 1e-3.
    error = raises(InvalidArgument, rpc.compile_plan, spec(hidden_size=4096, **forced))
    assert isinstance(error, InvalidArgument)
    assert error.field.endswith("max_relative_error") and "ONE_PRIME" in error.message
    # Unforced, BATCH_FIRST stays TWO_PRIMES.
    unforced = rpc.compile_plan(spec(packing=Packing.BATCH_FIRST, tokens=300))
    assert Plan.from_dict(json.loads(unforced.plan_json)).variant is Variant.TWO_PRIMES
