"""Parameter validation and the plan compiler (no encryption here; see test_helora_seal)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import seal
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.common.errors import InvalidArgument
from tensafe.helora import (
    MAX_COEFF_MODULUS_BITS_128,
    CkksParams,
    Packing,
    Plan,
    break_even_tokens,
    choose_plan,
    compact_params,
    compile_plan,
    default_params,
)
from tensafe.helora import packing as slots
from tensafe.helora.plan import ERROR_BOUNDS, Variant, one_prime_layout, shared_input_offsets

DEFAULT = default_params()


def per_token_plan(**overrides: object) -> Plan:
    args: dict[str, object] = dict(
        hidden_size=4096,
        output_size=4096,
        rank=16,
        alpha=32.0,
        tokens=1,
        params=DEFAULT,
        packing=Packing.PER_TOKEN,
    )
    args.update(overrides)
    return compile_plan(**args)  # type: ignore[arg-type]


# -- parameters ---------------------------------------------------------------------


def test_security_table_is_the_one_seal_enforces() -> None:
    for degree, bits in MAX_COEFF_MODULUS_BITS_128.items():
        assert seal.CoeffModulus.MaxBitCount(degree, seal.sec_level_type.tc128) == bits


def test_default_params_are_secure_and_deep_enough() -> None:
    assert DEFAULT.total_bits <= MAX_COEFF_MODULUS_BITS_128[DEFAULT.poly_modulus_degree]
    assert DEFAULT.max_depth == 2
    assert DEFAULT.slot_count == 4096


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        # 200 bits at N=4096 is above the 109-bit bound: ~60-bit security, refused.
        (
            dict(poly_modulus_degree=4096, coeff_modulus_bits=(60, 40, 40, 60), scale_bits=40),
            "coeff_modulus_bits",
        ),
        # 219 bits at N=8192: one bit over the bound.
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 59, 60), scale_bits=40),
            "coeff_modulus_bits",
        ),
        (
            dict(poly_modulus_degree=512, coeff_modulus_bits=(20, 20), scale_bits=20),
            "poly_modulus_degree",
        ),
        (
            dict(poly_modulus_degree=6000, coeff_modulus_bits=(60, 60), scale_bits=40),
            "poly_modulus_degree",
        ),
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 40, 61), scale_bits=40),
            "coeff_modulus_bits",
        ),
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=(60,), scale_bits=40),
            "coeff_modulus_bits",
        ),
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 40, 40), scale_bits=40),
            "coeff_modulus_bits",
        ),
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=(40, 40, 40, 60), scale_bits=40),
            "scale_bits",
        ),
        (
            dict(poly_modulus_degree=True, coeff_modulus_bits=(60, 60), scale_bits=40),
            "poly_modulus_degree",
        ),
        (
            dict(poly_modulus_degree=8192, coeff_modulus_bits=[60, 60], scale_bits=40),
            "coeff_modulus_bits",
        ),
    ],
)
def test_weak_or_malformed_params_are_refused_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CkksParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_params_dict_round_trip_and_prefixed_errors() -> None:
    assert CkksParams.from_dict(json.loads(json.dumps(DEFAULT.to_dict()))) == DEFAULT
    insecure = {**DEFAULT.to_dict(), "poly_modulus_degree": 4096}
    with pytest.raises(InvalidArgument) as caught:
        CkksParams.from_dict(insecure, field_prefix="params.")
    assert caught.value.field == "params.coeff_modulus_bits"
    with pytest.raises(InvalidArgument) as caught:
        CkksParams.from_dict({"poly_modulus_degree": 8192}, field_prefix="params.")
    assert caught.value.field == "params.coeff_modulus_bits"


# -- plans --------------------------------------------------------------------------


def test_per_token_client_baby_steps_plan_for_4096_rank_16() -> None:
    plan = per_token_plan(tokens=1)
    # The compiler's default: the client sends the baby-step copies of x.
    assert plan.variant is Variant.CLIENT_BABY_STEPS
    assert (plan.baby_steps, plan.giant_steps, plan.input_copies) == (4, 4, 4)
    assert plan.input_ciphertexts == 4 and plan.output_ciphertexts == 1
    # The runtime: x·A's giant steps 4, 8, 12, the fold 16..2048 and u·B's baby steps
    # 1, 2, 3 at two primes, then u·B's giant steps at one prime. x·A's baby steps are
    # the client's.
    per_unit = plan.counts_per_unit
    assert per_unit.rotations == 3 + 8 + 3 + 3 == per_unit.key_switches
    assert (per_unit.multiply_plain, per_unit.rescales) == (32, 4)
    assert (plan.input_primes, plan.output_primes, plan.levels_used) == (2, 1, 1)
    assert plan.input_scale_bits == 25
    assert plan.error_bound == ERROR_BOUNDS[Variant.CLIENT_BABY_STEPS] <= 1e-3
    assert (
        plan.estimated_server_ms
        < per_token_plan(variant=Variant.SERVER_BABY_STEPS).estimated_server_ms
    )
    # Two tokens per complex unit: 5 tokens are 3 units of 4 copies.
    assert per_token_plan(tokens=5).input_ciphertexts == 12


def test_wall_time_estimate_follows_the_two_process_schedule() -> None:
    one = per_token_plan(tokens=1)
    assert one.estimated_wall_ms(1) == one.estimated_server_ms
    # One unit: the fold (8 rotations at two primes) and u·B's giant rotations stay on
    # the critical path, so a second core saves less than half.
    assert one.estimated_server_ms / 2 < one.estimated_wall_ms(2) < one.estimated_server_ms
    # More cores do not help one request (it uses one peer).
    assert one.estimated_wall_ms(8) == one.estimated_wall_ms(2)
    # Units split half and half (3 units: 2 + 1).
    three = per_token_plan(tokens=5)
    assert three.estimated_wall_ms(2) == pytest.approx(three.estimated_server_ms * 2 / 3)
    old = per_token_plan(tokens=1, variant=Variant.SERVER_BABY_STEPS)
    assert old.estimated_wall_ms(2) == old.estimated_server_ms  # one v1 unit: one core
    batch = per_token_plan(tokens=100, packing=Packing.BATCH_FIRST, hidden_size=256)
    assert batch.estimated_wall_ms(2) == pytest.approx(batch.estimated_server_ms / 2)
    with pytest.raises(InvalidArgument) as error:
        one.estimated_wall_ms(0)
    assert error.value.field == "cores"


def test_client_baby_steps_copies_are_rotations_of_the_tiled_vector() -> None:
    plan = per_token_plan(hidden_size=8, output_size=8, rank=4, tokens=2)
    x = np.arange(16, dtype=np.float64).reshape(2, 8) + 1
    vectors = slots.activation_slots(plan, x)
    assert len(vectors) == plan.input_ciphertexts == plan.input_copies
    base = vectors[0]
    assert base[:8] == pytest.approx(x[0] + 1j * x[1]) and base[8:16] == pytest.approx(base[:8])
    for step, vector in enumerate(vectors):
        np.testing.assert_array_equal(vector, np.roll(base, -step))


def test_a_stricter_precision_bound_picks_the_rescaled_variant() -> None:
    plan = per_token_plan(max_relative_error=1e-4)
    assert plan.variant is Variant.SERVER_BABY_STEPS and plan.error_bound <= 1e-4
    with pytest.raises(InvalidArgument) as caught:
        per_token_plan(max_relative_error=1e-7)
    assert caught.value.field == "max_relative_error"
    with pytest.raises(InvalidArgument) as caught:
        per_token_plan(variant=Variant.TWO_PRIMES)
    assert caught.value.field == "variant"


def test_per_token_plan_for_4096_rank_16_needs_20_rotations() -> None:
    plan = per_token_plan(tokens=1, variant=Variant.SERVER_BABY_STEPS)
    # Baby steps 1..3, giant steps 4, 8, 12, fold steps 16..2048.
    assert plan.rotation_steps == (1, 2, 3, 4, 8, 12, 16, 32, 64, 128, 256, 512, 1024, 2048)
    assert plan.counts_per_unit.rotations == 20
    assert plan.counts_per_unit.key_switches == 20
    assert plan.counts_per_unit.multiply_plain == 32
    assert plan.counts_per_unit.rescales == 2
    assert plan.counts_per_unit.plaintext_encodes == 0
    assert (plan.depth, plan.levels_used, plan.input_primes, plan.output_primes) == (2, 2, 3, 1)
    assert (plan.baby_steps, plan.giant_steps, plan.block_length) == (4, 4, 4096)
    # Complex packing: two tokens share one ciphertext.
    legacy = Variant.SERVER_BABY_STEPS
    assert per_token_plan(tokens=5, variant=legacy).units == 3
    assert per_token_plan(tokens=5, complex_packing=False, variant=legacy).units == 5
    assert per_token_plan(tokens=5, variant=legacy).counts == plan.counts_per_unit.times(3)


def test_per_token_pads_rank_and_hidden_size_to_powers_of_two() -> None:
    plan = per_token_plan(
        hidden_size=300, output_size=200, rank=5, variant=Variant.SERVER_BABY_STEPS
    )
    assert (plan.padded_rank, plan.block_length) == (8, 512)
    assert plan.rotation_steps == (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)
    assert plan.counts_per_unit.rotations == 2 * (3 + 1) + 6


def test_batch_first_plan_has_no_rotations_and_rescales_once_per_output() -> None:
    plan = compile_plan(
        hidden_size=4096,
        output_size=4096,
        rank=16,
        alpha=32,
        tokens=10_000,
        params=DEFAULT,
        packing=Packing.BATCH_FIRST,
    )
    assert plan.rotation_steps == ()
    assert plan.tokens_per_unit == 8192 and plan.units == 2
    assert plan.input_ciphertexts == 2 * 4096 and plan.output_ciphertexts == 2 * 4096
    per_group = plan.counts_per_unit
    assert per_group.rotations == 0 and per_group.key_switches == 0
    assert per_group.multiply_plain == 16 * (4096 + 4096)
    assert per_group.rescales == 16
    assert per_group.additions == 16 * 4095 + 4096 * 15
    assert (plan.input_primes, plan.output_primes, plan.input_scale_bits) == (2, 1, 28)


def test_compile_is_deterministic_and_json_round_trips() -> None:
    first = per_token_plan(tokens=7, alpha=16)
    second = per_token_plan(tokens=7, alpha=16)
    assert first == second and first.fingerprint() == second.fingerprint()
    text = json.dumps(first.to_dict())
    restored = Plan.from_dict(json.loads(text))
    assert restored == first
    assert restored.to_json() == first.to_json()
    # Token count does not change the adapter encoding; rank does.
    assert per_token_plan(tokens=1).encoding_key() == per_token_plan(tokens=9).encoding_key()
    assert per_token_plan(rank=8).encoding_key() != per_token_plan(rank=16).encoding_key()


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("rotation_steps", [1, 2, 3], "plan.rotation_steps"),
        ("counts", {"rotations": 1}, "plan.counts"),
        ("compiler_version", 0, "plan.compiler_version"),
        ("packing", "DIAGONAL", "plan.packing"),
        ("hidden_size", 0, "plan.hidden_size"),
        (
            "params",
            {**DEFAULT.to_dict(), "poly_modulus_degree": 4096},
            "plan.params.coeff_modulus_bits",
        ),
        ("surprise", 1, "plan.surprise"),
    ],
)
def test_tampered_plan_dicts_are_refused(key: str, value: object, field: str) -> None:
    data = per_token_plan().to_dict()
    data[key] = value
    with pytest.raises(InvalidArgument) as caught:
        Plan.from_dict(data)
    assert caught.value.field == field


def test_plan_dict_missing_field_is_refused() -> None:
    data = per_token_plan().to_dict()
    del data["units"]
    with pytest.raises(InvalidArgument) as caught:
        Plan.from_dict(data)
    assert caught.value.field == "plan.units"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=17, hidden_size=16, output_size=16), "rank"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(tokens=0), "tokens"),
        (dict(activation_bound=-1.0), "activation_bound"),
        (dict(hidden_size=4097), "hidden_size"),
        (dict(output_size=5000), "output_size"),
        (
            dict(
                params=CkksParams(
                    poly_modulus_degree=8192, coeff_modulus_bits=(60, 60), scale_bits=40
                )
            ),
            "params.coeff_modulus_bits",
        ),
        (
            dict(
                params=CkksParams(
                    poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 60), scale_bits=40
                ),
                variant=Variant.SERVER_BABY_STEPS,
            ),
            "params.coeff_modulus_bits",
        ),
        (dict(max_relative_error=0.0), "max_relative_error"),
    ],
)
def test_compile_refuses_bad_inputs_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        per_token_plan(**overrides)
    assert caught.value.field == field


def test_choose_plan_prefers_per_token_for_one_token_and_batch_for_many() -> None:
    shapes = dict(hidden_size=4096, output_size=4096, rank=16, alpha=32.0, params=DEFAULT)
    single, reason = choose_plan(tokens=1, **shapes)  # type: ignore[arg-type]
    assert single.packing is Packing.PER_TOKEN
    assert reason.startswith("PER_TOKEN:") and "vs BATCH_FIRST" in reason
    batch, reason = choose_plan(tokens=8192, **shapes)  # type: ignore[arg-type]
    assert batch.packing is Packing.BATCH_FIRST
    assert batch.estimated_total_ms < per_token_plan(tokens=8192).estimated_total_ms
    wide, reason = choose_plan(tokens=1, **{**shapes, "hidden_size": 5120})  # type: ignore[arg-type]
    assert wide.packing is Packing.BATCH_FIRST
    assert "PER_TOKEN not possible" in reason and "hidden_size" in reason


def test_break_even_is_the_first_token_count_where_batch_is_cheaper() -> None:
    shapes = dict(hidden_size=4096, output_size=4096, rank=16, alpha=32.0, params=DEFAULT)
    tokens = break_even_tokens(**shapes)  # type: ignore[arg-type]
    assert tokens is not None and 1 < tokens <= 8192

    def totals(count: int) -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            compile_plan(tokens=count, packing=p, **shapes).estimated_total_ms  # type: ignore[arg-type]
            for p in (Packing.PER_TOKEN, Packing.BATCH_FIRST)
        )

    per_token, batch = totals(tokens)
    assert batch < per_token
    per_token, batch = totals(tokens - 1)
    assert batch >= per_token


# -- packing math, simulated in numpy with SEAL's rotation convention ------------------


def simulate(plan: Plan, x: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray):  # type: ignore[no-untyped-def]
    """Run the executor's algorithm on plain slot vectors; return (delta, op counts)."""
    counts: collections.Counter[str] = collections.Counter()

    def rotate(vector: np.ndarray, step: int) -> np.ndarray:
        counts["rotations"] += 1
        return np.roll(vector, -step)

    def bsgs(rotated: list[np.ndarray], diagonals: list[list[np.ndarray]], baby: int) -> np.ndarray:
        total = None
        for giant, row in enumerate(diagonals):
            partial = sum(rotated[b] * row[b] for b in range(baby))
            counts["multiply_plain"] += baby
            if giant:
                partial = rotate(partial, giant * baby)
            total = partial if total is None else total + partial
        return total  # type: ignore[return-value]

    def baby_steps(vector: np.ndarray, baby: int) -> list[np.ndarray]:
        return [vector] + [rotate(vector, b) for b in range(1, baby)]

    outputs = []
    if plan.packing is Packing.PER_TOKEN:
        inner_diagonals = slots.input_diagonals(plan, lora_a)
        outer_diagonals = slots.output_diagonals(plan, lora_b * plan.lora_scaling)
        vectors = slots.activation_slots(plan, x)
        copies = plan.input_copies
        for unit in range(plan.units):
            sent = vectors[unit * copies : (unit + 1) * copies]
            if plan.variant is not Variant.CLIENT_BABY_STEPS:
                sent = baby_steps(sent[0], plan.baby_steps)
            inner = bsgs(sent, inner_diagonals, plan.baby_steps)
            step = plan.padded_rank
            while step < plan.block_length:
                inner = inner + rotate(inner, step)
                step *= 2
            outputs.append(
                bsgs(
                    baby_steps(inner, plan.output_baby_steps),
                    outer_diagonals,
                    plan.output_baby_steps,
                )
            )
    else:
        vectors = slots.activation_slots(plan, x)
        for group in range(plan.units):
            columns = np.array(vectors[group * plan.hidden_size : (group + 1) * plan.hidden_size])
            inner = lora_a.T @ columns
            outputs.extend(list((lora_b * plan.lora_scaling).T @ inner))
    return slots.output_values(plan, outputs), counts


@settings(max_examples=40, deadline=None)
@given(
    hidden_size=st.integers(1, 300),
    output_size=st.integers(1, 300),
    rank=st.integers(1, 20),
    tokens=st.integers(1, 5),
    complex_packing=st.booleans(),
    variant=st.sampled_from([Variant.CLIENT_BABY_STEPS, Variant.SERVER_BABY_STEPS]),
    seed=st.integers(0, 2**32 - 1),
)
def test_per_token_layout_computes_the_lora_delta(
    hidden_size: int,
    output_size: int,
    rank: int,
    tokens: int,
    complex_packing: bool,
    variant: Variant,
    seed: int,
) -> None:
    rank = min(rank, hidden_size)
    plan = per_token_plan(
        hidden_size=hidden_size,
        output_size=output_size,
        rank=rank,
        alpha=2.0 * rank,
        tokens=tokens,
        complex_packing=complex_packing,
        variant=variant,
    )
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (tokens, hidden_size))
    lora_a = rng.normal(size=(hidden_size, rank))
    lora_b = rng.normal(size=(rank, output_size))
    delta, counts = simulate(plan, x, lora_a, lora_b)
    expected = slots.reference_delta(x, lora_a, lora_b, scaling=plan.lora_scaling)
    np.testing.assert_allclose(delta, expected, rtol=1e-9, atol=1e-9 * np.max(np.abs(expected)))
    assert counts["rotations"] == plan.counts.rotations
    assert counts["multiply_plain"] == plan.counts.multiply_plain


def test_batch_layout_spans_token_groups_in_real_and_imaginary_parts() -> None:
    plan = compile_plan(
        hidden_size=3,
        output_size=2,
        rank=2,
        alpha=4.0,
        tokens=2 * 8192 + 5,
        params=DEFAULT,
        packing=Packing.BATCH_FIRST,
    )
    assert plan.units == 3
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (plan.tokens, 3))
    lora_a, lora_b = rng.normal(size=(3, 2)), rng.normal(size=(2, 2))
    delta, _ = simulate(plan, x, lora_a, lora_b)
    np.testing.assert_allclose(delta, slots.reference_delta(x, lora_a, lora_b, scaling=2.0))
    # Token 4096 + 7 of group 0 sits in the imaginary part of slot 7 of feature 1.
    vectors = slots.activation_slots(plan, x)
    assert vectors[1][7] == pytest.approx(x[7, 1] + 1j * x[4096 + 7, 1])


def one_prime_plan(hidden_size: int, **overrides: object) -> Plan:
    arguments: dict[str, object] = {
        "hidden_size": hidden_size,
        "output_size": hidden_size,
        "rank": 8,
        "alpha": 16,
        "tokens": 300,
        "params": DEFAULT,
        "packing": Packing.BATCH_FIRST,
        "variant": Variant.ONE_PRIME,
    }
    arguments.update(overrides)
    return compile_plan(**arguments)  # type: ignore[arg-type]


def test_one_prime_batch_plan_states_its_derived_bound_and_counts() -> None:
    plan = one_prime_plan(64)
    layout = one_prime_layout(DEFAULT, hidden_size=64, rank=8, activation_bound=64.0)
    # q0 = 60: 4 headroom bits, ceil(log2(64 * sqrt 2 * 64 * 8)) = 16 range bits; the
    # remaining 40 split 16 (activations) + 12 (A) + 12 (B).
    assert (layout.input_scale_bits, layout.a_bits, layout.b_bits) == (16, 12, 12)
    assert plan.error_bound == layout.error_bound
    assert 2.0**-11 < plan.error_bound < 1e-3
    assert (plan.input_primes, plan.output_primes, plan.levels_used) == (1, 1, 0)
    assert plan.input_scale_bits == 16
    per_group = plan.counts_per_unit
    assert per_group.rescales == 0 and per_group.rotations == 0
    assert per_group.multiply_plain == 8 * (64 + 64)
    assert per_group.additions == 8 * 63 + 64 * 7
    # Cheaper than TWO_PRIMES (one prime throughout, no rescales).
    two = one_prime_plan(64, variant=Variant.TWO_PRIMES)
    assert plan.estimated_server_ms < two.estimated_server_ms
    assert Plan.from_dict(plan.to_dict()) == plan


def test_one_prime_is_refused_where_its_bound_fails_and_never_chosen_by_itself() -> None:
    # Wider layers, a larger activation bound or a stricter request: the bound grows past.
    for overrides in (
        {"hidden_size": 4096},
        {"hidden_size": 64, "max_relative_error": 1e-4},
        {"hidden_size": 64, "activation_bound": 4096.0},
    ):
        arguments = {"hidden_size": 64, **overrides}
        with pytest.raises(InvalidArgument) as caught:
            one_prime_plan(**arguments)  # type: ignore[arg-type]
        assert caught.value.field == "max_relative_error"
        assert "ONE_PRIME" in caught.value.message
        # Unforced, the compiler keeps the current variant.
        arguments.pop("hidden_size")
        fallback = one_prime_plan(overrides["hidden_size"], variant=None, **arguments)  # type: ignore[arg-type]
        assert fallback.variant is Variant.TWO_PRIMES
    assert one_prime_plan(64, variant=None).variant is Variant.TWO_PRIMES
    # Accepted under a looser request, and decoded back (the runtime's peer does).
    layout = one_prime_layout(DEFAULT, hidden_size=4096, rank=8, activation_bound=64.0)
    wide = one_prime_plan(4096, max_relative_error=layout.error_bound)
    assert wide.error_bound == layout.error_bound > 1e-3
    assert Plan.from_dict(json.loads(wide.to_json())) == wide


def test_layers_on_one_input_get_disjoint_regions_when_they_fit() -> None:
    def plan(hidden: int, packing: Packing = Packing.PER_TOKEN) -> Plan:
        return compile_plan(
            hidden_size=hidden,
            output_size=hidden,
            rank=8,
            alpha=16.0,
            tokens=1,
            params=compact_params(),
            packing=packing,
        )

    # Region l: d_out_l + L - 1 slots (L = 64): outputs 0..63, then 127.., then 222...
    assert shared_input_offsets(plan(64), [64, 32, 32]) == (0, 127, 222)
    assert shared_input_offsets(plan(48), [48, 48]) == (0, 111)  # L = 64 for d = 48
    # 4096 slots: two layers of d = 1024 fit (2 x 2047), three do not.
    assert shared_input_offsets(plan(1024), [1024, 1024]) == (0, 2047)
    assert shared_input_offsets(plan(1024), [1024, 1024, 1024]) is None
    assert shared_input_offsets(plan(4096), [4096, 4096]) is None
    assert shared_input_offsets(plan(64), [64]) is None  # one layer: nothing to share
    assert shared_input_offsets(plan(64, Packing.BATCH_FIRST), [64, 64]) is None
