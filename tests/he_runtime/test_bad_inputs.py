"""Bad inputs to CreateSession and ApplyLora get a clear status, reserve nothing, and
the runtime keeps serving: the next good call returns the right delta."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import seal

from tensafe.client.he import HeLoraSession, plan_spec
from tensafe.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TenSafeError,
)
from tensafe.helora import CkksParams, Packing, compile_plan, default_params
from tensafe.helora.client import HeLoraClient
from tensafe.helora.wire import WireKind, pack

from .conftest import ADAPTER, ALPHA, MIB, RANK, Runtime, new_tenant
from .helpers import activations, raises, reference

LAYER = "model.layers.0.self_attn.q_proj"
DEFAULT = default_params()
# Same ring, other primes: another parameter set with another fingerprint.
OTHER = CkksParams(poly_modulus_degree=8192, coeff_modulus_bits=(50, 40, 40, 50), scale_bits=40)


@pytest.fixture(scope="module")
def tenant() -> str:
    return new_tenant()


@pytest.fixture(scope="module")
def session(runtime: Runtime, tenant: str) -> Iterator[HeLoraSession]:
    opened = HeLoraSession.create(
        runtime.rpc(tenant),
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=64,
        output_size=64,
        # The bad inputs below are made under DEFAULT (its three-prime chain has a level
        # that is not the plan's input level); the SDK's own default is compact_params.
        params=DEFAULT,
    )
    yield opened
    opened.close()


def per_token_plan(tokens: int, *, params: CkksParams = DEFAULT, rank: int = RANK) -> object:
    return compile_plan(
        hidden_size=64,
        output_size=64,
        rank=rank,
        alpha=ALPHA,
        tokens=tokens,
        params=params,
        packing=Packing.PER_TOKEN,
    )


def assert_still_serving(session: HeLoraSession, data_dir: Path) -> None:
    x = activations(2, seed=11)
    delta = session.apply(LAYER, x, output_size=64)
    expected = reference(data_dir, LAYER, x)
    assert np.max(np.abs(delta - expected)) <= 1e-3 * np.max(np.abs(expected))


def _ciphertext_of(client: HeLoraClient, plan: object) -> bytes:
    return client.encrypt_activations(plan, activations(2, seed=4))[0]  # type: ignore[arg-type]


FINGERPRINT = HeLoraClient(DEFAULT).fingerprint

BAD_CIPHERTEXTS: dict[str, tuple[Callable[[], list[bytes]], type[TenSafeError], str]] = {
    "garbage bytes": (lambda: [b"\x00garbage" * 100], InvalidArgument, "ciphertexts[0]"),
    "framed garbage": (
        lambda: [pack(WireKind.CIPHERTEXT, FINGERPRINT, b"\xa1\x5e" + b"\x07" * 4000)],
        InvalidArgument,
        "ciphertexts[0]",
    ),
    "wrong kind": (
        lambda: [pack(WireKind.GALOIS_KEYS, FINGERPRINT, b"\x01" * 100)],
        InvalidArgument,
        "ciphertexts[0]",
    ),
    "another parameter set": (
        lambda: [_ciphertext_of(HeLoraClient(OTHER), per_token_plan(2, params=OTHER))],
        FailedPrecondition,
        "PARAMETER_SET_MISMATCH",
    ),
    "wrong level": (
        lambda: [
            HeLoraClient(DEFAULT).encrypt_activations(
                compile_plan(
                    hidden_size=64,
                    output_size=64,
                    rank=RANK,
                    alpha=ALPHA,
                    tokens=2,
                    params=DEFAULT,
                    packing=Packing.BATCH_FIRST,
                ),
                activations(2, seed=4),
            )[0]
        ],
        InvalidArgument,
        "ciphertexts[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CIPHERTEXTS))
def test_bad_ciphertexts(
    runtime: Runtime, session: HeLoraSession, tenant: str, data_dir: Path, case: str
) -> None:
    make, kind, detail = BAD_CIPHERTEXTS[case]
    rpc = runtime.rpc(tenant)
    # One unit: the plan's input_copies ciphertexts (client-side baby steps), all bad.
    blobs = make() * session.plan.input_copies
    error = raises(kind, rpc.apply_lora, session.session.id, LAYER, blobs)
    if isinstance(error, InvalidArgument):
        assert error.field == detail, error.message
    else:
        assert error.reason == detail, error.message
    assert_still_serving(session, data_dir)


def test_bad_apply_requests(
    runtime: Runtime, session: HeLoraSession, tenant: str, data_dir: Path
) -> None:
    rpc = runtime.rpc(tenant)
    good = _ciphertext_of(HeLoraClient(DEFAULT), per_token_plan(2))
    error = raises(InvalidArgument, rpc.apply_lora, session.session.id, "lm_head", [good])
    assert error.field == "header.layer"  # type: ignore[attr-defined]
    error = raises(InvalidArgument, rpc.apply_lora, session.session.id, "", [good])
    assert error.field == "header.layer"  # type: ignore[attr-defined]
    # The header announces two ciphertexts, one arrives: streamed, then in one message.
    for apply, field in ((rpc.apply_lora_streamed, "chunk"), (rpc.apply_lora, "ciphertexts")):
        error = raises(
            InvalidArgument, _apply_announcing, apply, session.session.id, announced=2, blobs=[good]
        )
        assert error.field == field  # type: ignore[attr-defined]
    assert_still_serving(session, data_dir)


def test_bad_more_layers(
    runtime: Runtime, session: HeLoraSession, tenant: str, data_dir: Path
) -> None:
    rpc = runtime.rpc(tenant)
    good = [_ciphertext_of(HeLoraClient(DEFAULT), per_token_plan(2))] * session.plan.input_copies
    other = "model.layers.0.self_attn.k_proj"
    for more, index in (
        (["lm_head"], 0),
        ([""], 0),
        ([LAYER], 0),  # header.layer again
        ([other, other], 1),
    ):
        error = raises(
            InvalidArgument, rpc.apply_lora, session.session.id, LAYER, good, more_layers=more
        )
        assert error.field == f"header.more_layers[{index}]", error.message  # type: ignore[attr-defined]
    assert_still_serving(session, data_dir)


def _apply_announcing(
    apply: Callable[[str, str, list[bytes]], object],
    session_id: str,
    *,
    announced: int,
    blobs: list[bytes],
) -> object:
    # The SDK always announces len(blobs); pad the list with a lying length instead.
    class Announce(list[bytes]):
        def __len__(self) -> int:
            return announced

    return apply(session_id, LAYER, Announce(blobs))


def test_oversized_messages_are_resource_exhausted(
    runtime: Runtime, session: HeLoraSession, tenant: str, data_dir: Path
) -> None:
    rpc = runtime.rpc(tenant)
    # One message larger than the server's 4 MiB message limit (refused by gRPC).
    huge = b"\x00" * (5 * MIB)
    raises(
        ResourceExhausted, rpc.apply_lora, session.session.id, LAYER, [huge], chunk_bytes=len(huge)
    )
    # Messages within the limit, but more than max_apply_bytes (24 MiB) in total.
    error = raises(
        ResourceExhausted,
        rpc.apply_lora,
        session.session.id,
        LAYER,
        [b"\x00" * (25 * MIB)],
        chunk_bytes=3 * MIB,
    )
    assert "max_apply_bytes" in error.message
    assert_still_serving(session, data_dir)


def _header(
    *,
    rank: int = RANK,
    hidden_size: int = 64,
    params: CkksParams = DEFAULT,
    parameters_from: HeLoraClient | None = None,
    keys_from: HeLoraClient | None = None,
    keys_rank: int | None = None,
    truncate_keys: int = 0,
    garbage_keys: bool = False,
    extra_step: int = 0,
) -> tuple[object, bytes | None]:
    from tensafe.proto.he.v1 import he_service_pb2 as pb

    client = HeLoraClient(params)
    keys_client = keys_from or client
    key_plan = compile_plan(
        hidden_size=hidden_size,
        output_size=64,
        rank=keys_rank or rank,
        alpha=ALPHA,
        tokens=1,
        params=keys_client.params,
        packing=Packing.PER_TOKEN,
    )
    keys = keys_client.public_material(key_plan).galois_keys
    assert keys is not None
    if extra_step:
        extended = seal.GaloisKeys()
        keys_client._keygen.create_galois_keys([*key_plan.rotation_steps, extra_step], extended)
        keys = pack(WireKind.GALOIS_KEYS, keys_client.fingerprint, extended.to_string())
    if garbage_keys:
        keys = pack(WireKind.GALOIS_KEYS, client.fingerprint, b"\xa1\x5e" + b"\x03" * 5000)
    declared = len(keys)
    if truncate_keys:
        keys = keys[:-truncate_keys]
    header = pb.CreateSessionHeader(
        adapter_name=ADAPTER,
        spec=plan_spec(
            hidden_size=hidden_size,
            output_size=64,
            rank=rank,
            alpha=ALPHA,
            tokens=1,
            params=params,
            packing=Packing.PER_TOKEN,
        ),
        seal_parameters=(parameters_from or client).parameters_blob(),
        galois_keys_size=declared,
    )
    return header, keys


BAD_SESSIONS: dict[
    str, tuple[Callable[[], tuple[object, bytes | None]], type[TenSafeError], str]
] = {
    "missing galois key": (lambda: _header(keys_rank=4), FailedPrecondition, "GALOIS_KEY_MISSING"),
    "rank differs from the adapter": (
        lambda: _header(rank=4),
        FailedPrecondition,
        "ADAPTER_MISMATCH",
    ),
    "hidden size differs from the adapter": (
        lambda: _header(hidden_size=128),
        FailedPrecondition,
        "ADAPTER_MISMATCH",
    ),
    "parameters from another set": (
        lambda: _header(parameters_from=HeLoraClient(OTHER)),
        InvalidArgument,
        "header.seal_parameters",
    ),
    "galois keys from another set": (
        lambda: _header(keys_from=HeLoraClient(OTHER)),
        FailedPrecondition,
        "PARAMETER_SET_MISMATCH",
    ),
    "malformed galois keys": (lambda: _header(garbage_keys=True), InvalidArgument, "galois_keys"),
    "a galois key the plan does not need": (
        lambda: _header(extra_step=5),
        InvalidArgument,
        "galois_keys",
    ),
    "fewer key bytes than declared": (
        lambda: _header(truncate_keys=10),
        InvalidArgument,
        "galois_keys_chunk",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SESSIONS))
def test_bad_sessions(runtime: Runtime, case: str) -> None:
    make, kind, detail = BAD_SESSIONS[case]
    tenant = new_tenant()
    rpc = runtime.rpc(tenant)
    header, keys = make()
    error = raises(kind, rpc.create_session, header, keys)
    if isinstance(error, InvalidArgument):
        assert error.field == detail, error.message
        if case == "a galois key the plan does not need":
            assert "rotation step 5," in error.message
    else:
        assert error.reason == detail, error.message
    assert runtime.usage(tenant) == (0, 0)  # nothing reserved or kept


def test_insecure_and_unknown_spec_fields(runtime: Runtime) -> None:
    from tensafe.proto.he.v1 import he_service_pb2 as pb

    rpc = runtime.rpc(new_tenant())
    header, keys = _header()
    assert isinstance(header, pb.CreateSessionHeader)
    header.spec.packing = 99  # type: ignore[assignment]
    error = raises(InvalidArgument, rpc.create_session, header, keys)
    assert error.field == "header.spec.packing"  # type: ignore[attr-defined]
    header.spec.packing = pb.PACKING_PER_TOKEN
    header.spec.variant = 99  # type: ignore[assignment]
    error = raises(InvalidArgument, rpc.create_session, header, keys)
    assert error.field == "header.spec.variant"  # type: ignore[attr-defined]
    header.spec.variant = pb.PLAN_VARIANT_TWO_PRIMES  # not a PER_TOKEN variant
    error = raises(InvalidArgument, rpc.create_session, header, keys)
    assert error.field == "header.spec.variant"  # type: ignore[attr-defined]
    header.spec.variant = pb.PLAN_VARIANT_UNSPECIFIED
    header.spec.parameters.coeff_modulus_bits[:] = [60, 60, 60, 60]
    error = raises(InvalidArgument, rpc.create_session, header, keys)
    assert error.field == "header.spec.parameters.coeff_modulus_bits"  # type: ignore[attr-defined]
    # A good session after all of it.
    good, good_keys = _header()
    session = rpc.create_session(good, good_keys)  # type: ignore[arg-type]
    rpc.close_session(session.id)
