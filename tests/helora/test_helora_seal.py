"""HE-LoRA end to end on real SEAL: client encrypts, executor evaluates, client decrypts."""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest
import seal

from tensafe.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from tensafe.he_runtime.domain.executor import HeLoraExecutor, LoraWeights
from tensafe.he_runtime.domain.parallel import EvaluationPeers
from tensafe.helora import CkksParams, Packing, Plan, compact_params, compile_plan, default_params
from tensafe.helora.client import HeLoraClient
from tensafe.helora.packing import reference_delta
from tensafe.helora.plan import Variant, shared_input_offsets
from tensafe.helora.wire import WireKind, pack, unpack, wire_kind

DEFAULT = default_params()
# Same ring, other primes: a different parameter set with a different fingerprint.
OTHER = CkksParams(poly_modulus_degree=8192, coeff_modulus_bits=(50, 40, 40, 50), scale_bits=40)


@pytest.fixture(scope="module")
def client() -> HeLoraClient:
    return HeLoraClient(DEFAULT)


@pytest.fixture(scope="module")
def other_client() -> HeLoraClient:
    return HeLoraClient(OTHER)


def make_plan(
    packing: Packing,
    *,
    hidden_size: int,
    rank: int,
    tokens: int,
    output_size: int | None = None,
    params: CkksParams = DEFAULT,
    complex_packing: bool = True,
    variant: Variant | None = None,
) -> Plan:
    return compile_plan(
        hidden_size=hidden_size,
        output_size=output_size or hidden_size,
        rank=rank,
        alpha=2.0 * rank,
        tokens=tokens,
        params=params,
        packing=packing,
        complex_packing=complex_packing,
        variant=variant,
    )


def lora_case(plan: Plan, seed: int) -> tuple[np.ndarray, LoraWeights]:
    """Activations and weights of LoRA-like magnitude (kaiming-uniform A, small B)."""
    rng = np.random.default_rng(seed)
    d = plan.hidden_size
    x = rng.normal(0.0, 2.0, (plan.tokens, d)).clip(-plan.activation_bound, plan.activation_bound)
    lora_a = rng.uniform(-1 / np.sqrt(d), 1 / np.sqrt(d), (d, plan.rank))
    lora_b = rng.normal(0.0, 0.02, (plan.rank, plan.output_size))
    return x, LoraWeights(lora_a=lora_a, lora_b=lora_b)


def bound_scale(plan: Plan, weights: LoraWeights, expected: np.ndarray) -> float:
    """What a plan's error bound is relative to: max |delta|, or ONE_PRIME's range W."""
    if plan.variant is not Variant.ONE_PRIME:
        return float(np.max(np.abs(expected)))
    scaled_b = np.asarray(weights.lora_b) * plan.lora_scaling
    return float(
        plan.activation_bound
        * np.sqrt(2.0)
        * plan.hidden_size
        * plan.rank
        * np.max(np.abs(weights.lora_a))
        * np.max(np.abs(scaled_b))
    )


def session(client: HeLoraClient, plan: Plan) -> HeLoraExecutor:
    material = client.public_material(plan)
    return HeLoraExecutor(parameters=material.parameters, galois_keys=material.galois_keys)


def run_and_check(client: HeLoraClient, plan: Plan, seed: int = 0) -> None:
    x, weights = lora_case(plan, seed)
    executor = session(client, plan)
    adapter = executor.encode_adapter(plan, weights)
    result = executor.apply(plan, adapter, client.encrypt_activations(plan, x))
    delta = client.decrypt_delta(plan, result.ciphertexts)
    expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=plan.lora_scaling)
    assert delta.shape == (plan.tokens, plan.output_size)
    # Within the plan's stated bound (1e-3 or tighter), and the counted operations are
    # the plan's.
    assert np.max(np.abs(delta - expected)) <= plan.error_bound * np.max(np.abs(expected))
    assert result.counts == plan.counts
    assert len(result.ciphertexts) == plan.output_ciphertexts


# -- correctness and operation counts ---------------------------------------------------


@pytest.mark.parametrize("rank", [4, 8, 16])
@pytest.mark.parametrize(
    "hidden_size",
    [256, 1024, pytest.param(4096, marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("variant", [Variant.CLIENT_BABY_STEPS, Variant.SERVER_BABY_STEPS])
def test_per_token_delta_matches_numpy(
    client: HeLoraClient, hidden_size: int, rank: int, variant: Variant
) -> None:
    plan = make_plan(
        Packing.PER_TOKEN, hidden_size=hidden_size, rank=rank, tokens=3, variant=variant
    )
    run_and_check(client, plan, seed=hidden_size + rank)


def test_per_token_rectangular_real_packing(client: HeLoraClient) -> None:
    plan = make_plan(
        Packing.PER_TOKEN,
        hidden_size=1024,
        output_size=256,
        rank=8,
        tokens=2,
        complex_packing=False,
    )
    run_and_check(client, plan, seed=5)


def test_per_token_odd_shapes(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=300, output_size=200, rank=5, tokens=3)
    run_and_check(client, plan, seed=6)


def test_per_token_at_n16384_encrypts_below_the_top_level() -> None:
    params = CkksParams(
        poly_modulus_degree=16384, coeff_modulus_bits=(60, 40, 40, 40, 40, 60), scale_bits=40
    )
    plan = make_plan(Packing.PER_TOKEN, hidden_size=4096, rank=16, tokens=2, params=params)
    assert plan.input_primes == 2 and plan.block_length == 4096 and plan.slot_count == 8192
    run_and_check(HeLoraClient(params), plan, seed=7)


@pytest.mark.parametrize(
    ("hidden_size", "rank"),
    [(256, 4), (256, 8), (256, 16), (1024, 4)],
)
def test_batch_first_delta_matches_numpy(client: HeLoraClient, hidden_size: int, rank: int) -> None:
    # Batch work is r * (d + d_out) products plus d encryptions whatever the token
    # count, so d_out is kept small to keep the test fast.
    plan = make_plan(
        Packing.BATCH_FIRST, hidden_size=hidden_size, output_size=64, rank=rank, tokens=300
    )
    run_and_check(client, plan, seed=hidden_size * rank)


def test_batch_first_spans_several_token_groups(client: HeLoraClient) -> None:
    plan = make_plan(Packing.BATCH_FIRST, hidden_size=4, output_size=3, rank=2, tokens=8192 + 7)
    assert plan.units == 2
    run_and_check(client, plan, seed=11)
    real_only = make_plan(
        Packing.BATCH_FIRST,
        hidden_size=4,
        output_size=3,
        rank=2,
        tokens=4097,
        complex_packing=False,
    )
    assert real_only.units == 2
    run_and_check(client, real_only, seed=12)


@pytest.mark.slow
def test_batch_first_at_hidden_size_4096(client: HeLoraClient) -> None:
    plan = make_plan(Packing.BATCH_FIRST, hidden_size=4096, output_size=16, rank=4, tokens=100)
    run_and_check(client, plan, seed=13)


@pytest.mark.parametrize("packing", [Packing.PER_TOKEN, Packing.BATCH_FIRST])
def test_zero_lora_b_gives_a_zero_delta(client: HeLoraClient, packing: Packing) -> None:
    # A fresh LoRA has B = 0: every product with B's plaintexts would be transparent.
    plan = make_plan(packing, hidden_size=64, rank=4, tokens=3)
    x, weights = lora_case(plan, 3)
    zero_b = LoraWeights(lora_a=weights.lora_a, lora_b=np.zeros_like(weights.lora_b))
    executor = session(client, plan)
    result = executor.apply(
        plan, executor.encode_adapter(plan, zero_b), client.encrypt_activations(plan, x)
    )
    assert np.max(np.abs(client.decrypt_delta(plan, result.ciphertexts))) < 1e-4
    assert result.counts == plan.counts


def test_plan_from_json_drives_the_runtime(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=128, rank=4, tokens=2)
    received = Plan.from_dict(json.loads(plan.to_json()))
    x, weights = lora_case(plan, 4)
    executor = session(client, received)
    result = executor.apply(
        received, executor.encode_adapter(received, weights), client.encrypt_activations(plan, x)
    )
    expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=plan.lora_scaling)
    delta = client.decrypt_delta(plan, result.ciphertexts)
    assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))


def test_peft_orientation() -> None:
    rng = np.random.default_rng(0)
    peft_a, peft_b = rng.normal(size=(4, 10)), rng.normal(size=(7, 4))
    weights = LoraWeights.from_peft(lora_a_weight=peft_a, lora_b_weight=peft_b)
    x = rng.normal(size=(2, 10))
    # PEFT's delta is scaling * B(A(x)) = scaling * x @ A^T @ B^T.
    np.testing.assert_allclose(
        reference_delta(x, weights.lora_a, weights.lora_b, scaling=2.0),
        2.0 * x @ peft_a.T @ peft_b.T,
    )


def test_adapter_encoding_is_cached_per_layout(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=1)
    _, weights = lora_case(plan, 0)
    executor = session(client, plan)
    loads: list[int] = []

    def load() -> LoraWeights:
        loads.append(1)
        return weights

    first = executor.adapter(plan, "adapter-1@v1", load)
    longer = make_plan(Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=9)
    assert executor.adapter(longer, "adapter-1@v1", load) is first
    assert len(loads) == 1
    executor.adapter(plan, "adapter-2@v1", load)
    assert len(loads) == 2


# -- refusals ---------------------------------------------------------------------------


def test_insecure_parameters_are_refused_by_the_runtime(client: HeLoraClient) -> None:
    # A client (or attacker) hand-crafts a 200-bit modulus at N=4096 (~60-bit security).
    insecure = {
        "poly_modulus_degree": 4096,
        "coeff_modulus_bits": [60, 40, 40, 60],
        "scale_bits": 40,
    }
    blob = pack(WireKind.PARAMETERS, client.fingerprint, json.dumps(insecure).encode())
    with pytest.raises(InvalidArgument) as caught:
        HeLoraExecutor(parameters=blob, galois_keys=None)
    assert caught.value.field == "parameters.coeff_modulus_bits"


def test_missing_galois_key_is_refused(client: HeLoraClient) -> None:
    small = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=4, tokens=1)
    large = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=16, tokens=1)
    assert set(large.rotation_steps) - set(small.rotation_steps) == {3, 12}
    executor = session(client, small)
    _, weights = lora_case(large, 0)
    with pytest.raises(FailedPrecondition) as caught:
        executor.encode_adapter(large, weights)
    assert caught.value.reason == "GALOIS_KEY_MISSING" and caught.value.metadata["step"] == "3"
    without_keys = HeLoraExecutor(parameters=client.parameters_blob(), galois_keys=None)
    with pytest.raises(FailedPrecondition):
        without_keys.check_plan(small)


def test_galois_keys_for_steps_the_plan_does_not_need_are_refused(
    client: HeLoraClient,
) -> None:
    small = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=4, tokens=1)
    large = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=16, tokens=1)
    extra = sorted(set(large.rotation_steps) - set(small.rotation_steps))
    assert extra
    executor = session(client, large)
    executor.refuse_unneeded_keys(large)  # exactly the plan's keys: accepted
    with pytest.raises(InvalidArgument) as caught:
        executor.refuse_unneeded_keys(small)
    assert caught.value.field == "galois_keys"
    assert caught.value.metadata["step"] == str(extra[0])
    assert f"rotation step {extra[0]}," in caught.value.description
    # A key for a right rotation is named by its negative step.
    keys = seal.GaloisKeys()
    client._keygen.create_galois_keys([*small.rotation_steps, -5], keys)
    blob = pack(WireKind.GALOIS_KEYS, client.fingerprint, keys.to_string())
    with_right = HeLoraExecutor(parameters=client.parameters_blob(), galois_keys=blob)
    with pytest.raises(InvalidArgument) as caught:
        with_right.refuse_unneeded_keys(small)
    assert caught.value.metadata["step"] == "-5"
    # Keys for a plan that rotates nothing (BATCH_FIRST) are all refused.
    batch = make_plan(Packing.BATCH_FIRST, hidden_size=64, rank=4, tokens=1)
    with pytest.raises(InvalidArgument):
        session(client, small).refuse_unneeded_keys(batch)


def test_malformed_ciphertexts_are_refused(client: HeLoraClient) -> None:
    plan = make_plan(
        Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=2, variant=Variant.SERVER_BABY_STEPS
    )
    x, weights = lora_case(plan, 0)
    executor = session(client, plan)
    adapter = executor.encode_adapter(plan, weights)
    good = client.encrypt_activations(plan, x)
    payload = unpack(good[0], field="c", expected=WireKind.CIPHERTEXT).payload
    fingerprint = client.fingerprint
    bad_inputs = {
        "random bytes": b"\x00" * 100,
        "garbage payload": pack(WireKind.CIPHERTEXT, fingerprint, b"\x5e\xa1" + b"\x01" * 500),
        "truncated": pack(WireKind.CIPHERTEXT, fingerprint, payload[: len(payload) // 2]),
        "zeroed body": pack(
            WireKind.CIPHERTEXT, fingerprint, payload[:16] + bytes(len(payload) - 16)
        ),
        "wrong kind": client.public_material(plan).galois_keys,
    }
    for name, blob in bad_inputs.items():
        with pytest.raises(InvalidArgument) as caught:
            executor.apply(plan, adapter, [blob])
        assert caught.value.field == "ciphertexts[0]", name
    with pytest.raises(InvalidArgument) as caught:
        executor.apply(plan, adapter, good + good)
    assert caught.value.field == "ciphertexts"


def test_ciphertext_at_the_wrong_level_or_scale_is_refused(client: HeLoraClient) -> None:
    per_token = make_plan(
        Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=1, variant=Variant.SERVER_BABY_STEPS
    )
    batch = make_plan(Packing.BATCH_FIRST, hidden_size=1, output_size=64, rank=1, tokens=1)
    executor = session(client, per_token)
    adapter = executor.encode_adapter(per_token, lora_case(per_token, 0)[1])
    # One batch ciphertext: right count, but two primes and scale 2^28.
    wrong_level = client.encrypt_activations(batch, np.ones((1, 1)))
    with pytest.raises(InvalidArgument, match="level with 2 primes"):
        executor.apply(per_token, adapter, wrong_level)
    # Right level (the top one, three primes) but encoded at 2^30 instead of 2^40.
    encryptor = seal.Encryptor(client._context.seal_context, client._keygen.secret_key())
    ciphertext = encryptor.encrypt_symmetric(client._context.encoder.encode(np.ones(4096), 2.0**30))
    wrong_scale = [pack(WireKind.CIPHERTEXT, client.fingerprint, ciphertext.to_string())]
    with pytest.raises(InvalidArgument, match="scale"):
        executor.apply(per_token, adapter, wrong_scale)


def test_ciphertext_under_other_parameters_is_refused(
    client: HeLoraClient, other_client: HeLoraClient
) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=1)
    other_plan = make_plan(Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=1, params=OTHER)
    x, weights = lora_case(plan, 0)
    executor = session(client, plan)
    adapter = executor.encode_adapter(plan, weights)
    foreign = other_client.encrypt_activations(other_plan, x)
    with pytest.raises(FailedPrecondition) as caught:
        executor.apply(plan, adapter, foreign)
    assert caught.value.reason == "PARAMETER_SET_MISMATCH"
    # The same foreign ciphertext under a forged fingerprint: SEAL's own check refuses it.
    forged = [
        pack(
            WireKind.CIPHERTEXT,
            client.fingerprint,
            unpack(foreign[0], field="c", expected=WireKind.CIPHERTEXT).payload,
        )
    ]
    with pytest.raises(InvalidArgument):
        executor.apply(plan, adapter, forged)
    with pytest.raises(FailedPrecondition):
        executor.check_plan(other_plan)
    with pytest.raises(FailedPrecondition):
        HeLoraExecutor(
            parameters=client.parameters_blob(),
            galois_keys=other_client.public_material(other_plan).galois_keys,
        )


def test_adapter_for_another_layout_is_refused(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=64, rank=4, tokens=1)
    wider = make_plan(Packing.PER_TOKEN, hidden_size=64, output_size=32, rank=4, tokens=1)
    executor = session(client, plan)
    adapter = executor.encode_adapter(wider, lora_case(wider, 0)[1])
    with pytest.raises(FailedPrecondition) as caught:
        executor.apply(plan, adapter, client.encrypt_activations(plan, lora_case(plan, 0)[0]))
    assert caught.value.reason == "PLAN_MISMATCH"


@pytest.mark.parametrize("packing", [Packing.PER_TOKEN, Packing.BATCH_FIRST])
def test_adapter_that_could_overflow_is_refused(client: HeLoraClient, packing: Packing) -> None:
    plan = make_plan(packing, hidden_size=64, rank=4, tokens=1)
    _, weights = lora_case(plan, 0)
    huge = LoraWeights(lora_a=weights.lora_a * 1e4, lora_b=weights.lora_b * 1e4)
    with pytest.raises(FailedPrecondition) as caught:
        session(client, plan).encode_adapter(plan, huge)
    assert caught.value.reason == "ADAPTER_OUT_OF_RANGE"


def test_client_refuses_activations_beyond_the_plan_bound(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=8, rank=2, tokens=1)
    x = np.zeros((1, 8))
    x[0, 3] = plan.activation_bound * 1.01
    with pytest.raises(InvalidArgument) as caught:
        client.encrypt_activations(plan, x)
    assert caught.value.field == "activations"
    with pytest.raises(InvalidArgument):
        client.encrypt_activations(plan, np.zeros((2, 8)))


# -- what crosses the wire ----------------------------------------------------------------


def test_wire_carries_only_public_material_and_ciphertexts(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=8, tokens=2)
    batch = make_plan(Packing.BATCH_FIRST, hidden_size=4, rank=2, tokens=2)
    x, weights = lora_case(plan, 0)
    material = client.public_material(plan)
    uploads = client.encrypt_activations(plan, x)
    executor = session(client, plan)
    downloads = list(
        executor.apply(plan, executor.encode_adapter(plan, weights), uploads).ciphertexts
    )
    batch_material = client.public_material(batch)
    assert batch_material.galois_keys is None  # no rotations, no Galois keys
    blobs = material.blobs() + batch_material.blobs() + uploads + downloads

    kinds = {wire_kind(blob) for blob in blobs}
    assert kinds == {WireKind.PARAMETERS, WireKind.GALOIS_KEYS, WireKind.CIPHERTEXT}
    context = client._context.seal_context
    for blob in blobs:
        kind = wire_kind(blob)
        payload = unpack(blob, field="blob", expected=kind).payload
        if kind is WireKind.PARAMETERS:
            assert CkksParams.from_dict(json.loads(payload)) == DEFAULT
        elif kind is WireKind.GALOIS_KEYS:
            keys = context.from_galois_str(payload)
            assert keys.size() == len(plan.rotation_steps)
        else:
            seal.Ciphertext().load_bytes(context, payload)

    # No blob contains any 64-byte window of the secret key's serialised polynomial.
    secret = client._keygen.secret_key().to_string()
    body = secret[64:]
    windows = {body[i : i + 64] for i in range(0, len(body) - 64, 4096)}
    assert len(windows) > 50
    for blob in blobs:
        assert not any(window in blob for window in windows)


def test_compact_params_halve_the_keys_and_keep_the_error() -> None:
    compact = compact_params()
    assert compact.total_bits <= seal.CoeffModulus.MaxBitCount(8192, seal.sec_level_type.tc128)
    plan = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=4, tokens=2, params=compact)
    assert plan.variant is Variant.CLIENT_BABY_STEPS and plan.input_primes == 2
    compact_client = HeLoraClient(compact)
    run_and_check(compact_client, plan, seed=9)
    default_plan = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=4, tokens=2)
    assert default_plan.rotation_steps == plan.rotation_steps
    compact_keys = compact_client.public_material(plan).galois_keys
    default_keys = HeLoraClient(DEFAULT).public_material(default_plan).galois_keys
    assert compact_keys is not None and default_keys is not None
    assert len(compact_keys) < 0.55 * len(default_keys)
    # The v1 layout needs a third data prime.
    with pytest.raises(InvalidArgument) as caught:
        make_plan(
            Packing.PER_TOKEN,
            hidden_size=256,
            rank=4,
            tokens=1,
            params=compact,
            variant=Variant.SERVER_BABY_STEPS,
        )
    assert caught.value.field == "params.coeff_modulus_bits"


# -- a peer process shares the work -------------------------------------------------------


@pytest.fixture(scope="module")
def peers() -> Iterator[EvaluationPeers]:
    pool = EvaluationPeers(1)
    yield pool
    pool.close()


@pytest.mark.parametrize(
    ("packing", "variant", "tokens"),
    [
        (Packing.PER_TOKEN, Variant.CLIENT_BABY_STEPS, 1),  # one unit split inside
        (Packing.PER_TOKEN, Variant.CLIENT_BABY_STEPS, 5),  # three units, 2 + 1
        (Packing.PER_TOKEN, Variant.SERVER_BABY_STEPS, 4),  # two units
        (Packing.BATCH_FIRST, Variant.TWO_PRIMES, 2 * 4096 + 3),  # two token groups
        (Packing.BATCH_FIRST, Variant.TWO_PRIMES, 300),  # one group, split by features
        (Packing.BATCH_FIRST, Variant.ONE_PRIME, 300),  # the same at one prime
    ],
)
def test_a_peer_process_gives_the_serial_result_with_the_planned_counts(
    client: HeLoraClient,
    peers: EvaluationPeers,
    packing: Packing,
    variant: Variant,
    tokens: int,
) -> None:
    hidden = 64 if packing is Packing.BATCH_FIRST else 256
    plan = make_plan(packing, hidden_size=hidden, rank=8, tokens=tokens, variant=variant)
    x, weights = lora_case(plan, seed=tokens)
    material = client.public_material(plan)
    serial = HeLoraExecutor(parameters=material.parameters, galois_keys=material.galois_keys)
    shared = HeLoraExecutor(
        parameters=material.parameters, galois_keys=material.galois_keys, peers=peers
    )
    uploads = client.encrypt_activations(plan, x)
    alone = serial.apply(plan, serial.encode_adapter(plan, weights), uploads)
    split = shared.apply(plan, shared.encode_adapter(plan, weights), uploads)
    # The peer's operations are counted, and the split reorders only exact modular
    # additions, so the result ciphertexts are bit-identical to the serial ones.
    assert split.counts == plan.counts
    assert split.ciphertexts == alone.ciphertexts
    delta = client.decrypt_delta(plan, split.ciphertexts)
    expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=plan.lora_scaling)
    error = np.max(np.abs(delta - expected))
    assert error <= plan.error_bound * bound_scale(plan, weights, expected)


@pytest.mark.parametrize(
    ("packing", "hidden", "tokens", "layers"),
    [
        (Packing.PER_TOKEN, 256, 1, 1),
        (Packing.PER_TOKEN, 256, 1, 2),
        (Packing.PER_TOKEN, 256, 1, 3),
        (Packing.BATCH_FIRST, 64, 300, 3),
    ],
)
def test_layers_on_one_input_run_in_pairs_on_two_cores(
    client: HeLoraClient,
    peers: EvaluationPeers,
    packing: Packing,
    hidden: int,
    tokens: int,
    layers: int,
) -> None:
    # Layers of one input (q, k, v: different adapters and output sizes); with a peer
    # the second of each pair runs there whole, the last odd one is split inside.
    plans = [
        make_plan(packing, hidden_size=hidden, rank=8, tokens=tokens, output_size=size)
        for size in (hidden, hidden // 2, hidden // 4)[:layers]
    ]
    cases = [lora_case(plan, seed=20 + index) for index, plan in enumerate(plans)]
    x = cases[0][0]
    material = client.public_material(plans[0])
    serial = HeLoraExecutor(parameters=material.parameters, galois_keys=material.galois_keys)
    shared = HeLoraExecutor(
        parameters=material.parameters, galois_keys=material.galois_keys, peers=peers
    )
    uploads = client.encrypt_activations(plans[0], x)
    alone = serial.apply_layers(
        [(plan, serial.encode_adapter(plan, w)) for plan, (_, w) in zip(plans, cases, strict=True)],
        uploads,
    )
    paired = shared.apply_layers(
        [(plan, shared.encode_adapter(plan, w)) for plan, (_, w) in zip(plans, cases, strict=True)],
        uploads,
    )
    assert len(paired) == len(alone) == layers
    for plan, (_, weights), mine, theirs in zip(plans, cases, paired, alone, strict=True):
        # Each layer's own counts (the peer's included) and the serial ciphertexts.
        assert mine.counts == theirs.counts == plan.counts
        assert mine.ciphertexts == theirs.ciphertexts
        delta = client.decrypt_delta(plan, mine.ciphertexts)
        expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=plan.lora_scaling)
        assert np.max(np.abs(delta - expected)) <= plan.error_bound * np.max(np.abs(expected))


@pytest.mark.parametrize(("hidden", "with_peer"), [(64, False), (64, True), (256, False)])
def test_layers_on_one_input_share_one_ciphertext(
    client: HeLoraClient, peers: EvaluationPeers, hidden: int, with_peer: bool
) -> None:
    # q, k, v of one block: three adapters, output sizes d, d/2, d/2, each layer in its
    # region of the slots: one plan's operations for the three deltas.
    sizes = [hidden, hidden // 2, hidden // 2]
    layer_plan = make_plan(Packing.PER_TOKEN, hidden_size=hidden, rank=8, tokens=3)
    offsets = shared_input_offsets(layer_plan, sizes)
    assert offsets is not None
    shared = make_plan(
        Packing.PER_TOKEN,
        hidden_size=hidden,
        rank=8,
        tokens=3,
        output_size=offsets[-1] + sizes[-1],
    )
    assert shared.counts == layer_plan.counts  # independent of the output size
    rng = np.random.default_rng(hidden)
    x = rng.normal(0.0, 2.0, (3, hidden))
    layers = [
        LoraWeights(
            lora_a=rng.uniform(-1 / np.sqrt(hidden), 1 / np.sqrt(hidden), (hidden, 8)),
            lora_b=rng.normal(0.0, 0.02, (8, size)),
        )
        for size in sizes
    ]
    material = client.public_material(shared)
    executor = HeLoraExecutor(
        parameters=material.parameters,
        galois_keys=material.galois_keys,
        peers=peers if with_peer else None,
    )
    result = executor.apply(
        shared, executor.encode_adapter(shared, layers), client.encrypt_activations(shared, x)
    )
    assert result.counts == shared.counts
    assert len(result.ciphertexts) == shared.output_ciphertexts == 2  # 3 tokens, 2 units
    together = client.decrypt_delta(shared, result.ciphertexts)
    for weights, start, size in zip(layers, offsets, sizes, strict=True):
        expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=shared.lora_scaling)
        delta = together[:, start : start + size]
        assert np.max(np.abs(delta - expected)) <= shared.error_bound * np.max(np.abs(expected))
    # The regions must fit: at d = 4096 one layer fills every slot.
    assert (
        shared_input_offsets(
            make_plan(Packing.PER_TOKEN, hidden_size=4096, rank=8, tokens=1), [4096, 4096]
        )
        is None
    )
    with pytest.raises(InvalidArgument):
        executor.encode_adapter(layer_plan, layers)  # output_size is not the regions' end


def test_a_dead_peer_process_fails_the_request_as_unavailable(client: HeLoraClient) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=8, tokens=1)
    x, weights = lora_case(plan, seed=1)
    material = client.public_material(plan)
    pool = EvaluationPeers(1)
    try:
        executor = HeLoraExecutor(
            parameters=material.parameters, galois_keys=material.galois_keys, peers=pool
        )
        adapter = executor.encode_adapter(plan, weights)
        worker = pool.worker()
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match="tensafe-he-peer-0"):
            executor.apply(plan, adapter, client.encrypt_activations(plan, x))
    finally:
        pool.close()


def test_the_peer_drops_a_session_and_its_adapters_with_the_executor(
    client: HeLoraClient, peers: EvaluationPeers
) -> None:
    plan = make_plan(Packing.PER_TOKEN, hidden_size=256, rank=8, tokens=1)
    _, weights = lora_case(plan, seed=3)
    material = client.public_material(plan)
    worker = peers.worker()  # a pool of one: the executor's worker too
    before = worker.held()
    executor = HeLoraExecutor(
        parameters=material.parameters, galois_keys=material.galois_keys, peers=peers
    )
    adapter = executor.encode_adapter(plan, weights)
    assert worker.held() == (before[0] + 1, before[1] + 1)
    del executor, adapter
    gc.collect()
    # Key hygiene: the peer's copy of the keys goes with the session.
    assert worker.held() == before


@pytest.mark.parametrize(("seed", "extreme"), [(0, False), (1, False), (2, True)])
def test_one_prime_batch_decodes_within_its_derived_bound_with_the_planned_counts(
    client: HeLoraClient, seed: int, extreme: bool
) -> None:
    # d = 64 (the tiny model's width), where its derived bound is within 1e-3.
    plan = make_plan(
        Packing.BATCH_FIRST,
        hidden_size=64,
        output_size=48,
        rank=8,
        tokens=300,
        variant=Variant.ONE_PRIME,
    )
    assert plan.input_primes == plan.output_primes == 1 and plan.counts.rescales == 0
    x, weights = lora_case(plan, seed)
    if extreme:
        # Activations at the bound with A's signs: the delta near the plan's range W.
        x = plan.activation_bound * np.sign(weights.lora_a[:, 0])[None, :].repeat(plan.tokens, 0)
    executor = session(client, plan)
    result = executor.apply(
        plan, executor.encode_adapter(plan, weights), client.encrypt_activations(plan, x)
    )
    assert result.counts == plan.counts
    delta = client.decrypt_delta(plan, result.ciphertexts)
    expected = reference_delta(x, weights.lora_a, weights.lora_b, scaling=plan.lora_scaling)
    error = np.max(np.abs(delta - expected))
    assert error <= plan.error_bound * bound_scale(plan, weights, expected)
    # A wrong scale or a dropped product is far outside the bound.
    assert error < 0.05 * np.max(np.abs(expected))
