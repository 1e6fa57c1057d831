"""Verifiable HE results for the adapter's owner: the SDK's Freivalds check accepts the
real runtime's deltas and refuses a malicious runtime that returns the client's own
input ciphertexts mod-switched to the output level (which passes every format check)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import seal

from tensafe.client.he import HeLoraSession
from tensafe.client.he_verify import DeltaVerifier
from tensafe.common.errors import IntegrityError
from tensafe.helora.wire import WireKind, pack, unpack
from tensafe.proto.he.v1 import he_service_pb2 as pb

from .conftest import ADAPTER, ALPHA, RANK, Runtime, new_tenant
from .helpers import activations, adapter_layers, reference

LAYER = "model.layers.0.self_attn.q_proj"


class InputEchoingRuntime:
    """The issue's malicious server: it runs the real call (so the reported counts and
    the number of results are right) and returns the client's input ciphertexts
    mod-switched to the result level instead of the results."""

    def __init__(self, honest: Any, seal_context: Any) -> None:
        self._honest = honest
        self._context = seal_context
        self._evaluator = seal.Evaluator(seal_context)

    def apply_lora(
        self, session_id: str, layer: str, ciphertexts: Sequence[bytes]
    ) -> tuple[list[bytes], pb.ApplyLoraSummary]:
        results, summary = self._honest.apply_lora(session_id, layer, ciphertexts)
        # PER_TOKEN: one result per unit; a unit is `copies` ciphertexts (the client's
        # baby-step rotations of x, the first unrotated). Echo each unit's x.
        copies, rest = divmod(len(ciphertexts), len(results))
        assert rest == 0
        forged = []
        for sent, returned in zip(ciphertexts[::copies], results, strict=True):
            frame = unpack(sent, field="sent", expected=WireKind.CIPHERTEXT)
            target = seal.Ciphertext()
            target.load_bytes(
                self._context, unpack(returned, field="r", expected=WireKind.CIPHERTEXT).payload
            )
            echoed = seal.Ciphertext()
            echoed.load_bytes(self._context, frame.payload)
            self._evaluator.mod_switch_to_inplace(echoed, target.parms_id())
            forged.append(pack(WireKind.CIPHERTEXT, frame.fingerprint, echoed.to_string()))
        return forged, summary

    def __getattr__(self, name: str) -> Any:
        return getattr(self._honest, name)


def open_session(runtime: Runtime) -> HeLoraSession:
    return HeLoraSession.create(
        runtime.rpc(new_tenant()),
        adapter_name=ADAPTER,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=64,
        output_size=64,
    )


def test_the_owner_detects_a_runtime_that_echoes_its_input(
    runtime: Runtime, data_dir: Path
) -> None:
    session = open_session(runtime)
    verifier = DeltaVerifier(
        {name: pair for name, pair in adapter_layers(data_dir).items()}, scaling=ALPHA / RANK
    )
    session.verifier = verifier
    x = activations(4, seed=7)
    honest = session.apply(LAYER, x, output_size=64)  # the real runtime passes
    assert np.max(np.abs(honest - reference(data_dir, LAYER, x))) < 1e-3
    assert verifier.stats.checked == 1

    session._rpc = InputEchoingRuntime(  # type: ignore[assignment]
        session._rpc, session._crypto._context.seal_context
    )
    # Without the check the forgery is accepted: right count, level, size and counts.
    session.verifier = None
    forged = session.apply(LAYER, x, output_size=64)
    assert forged.shape == honest.shape
    assert np.max(np.abs(forged - honest)) > 0.1
    # With it, the owner refuses the result.
    session.verifier = verifier
    with pytest.raises(IntegrityError, match="he result"):
        session.apply(LAYER, x, output_size=64)
    session._rpc = session._rpc._honest  # type: ignore[attr-defined]
    session.close()


def test_sampling_checks_a_fraction_of_calls() -> None:
    rng = np.random.default_rng(0)
    lora_a, lora_b = rng.standard_normal((4, 16)), rng.standard_normal((8, 4))
    verifier = DeltaVerifier(
        {"l": (lora_a, lora_b)}, scaling=2.0, sample_rate=0.25, rng=np.random.default_rng(1)
    )
    x = rng.standard_normal((3, 16))
    good = 2.0 * x @ lora_a.T @ lora_b.T
    outcomes = [verifier.check("l", x, good) for _ in range(400)]
    assert 60 < sum(outcomes) < 140 and verifier.stats.checked == sum(outcomes)
    # Seeded: an OS-seeded verifier's probes let this small error pass in ~0.4 % of
    # runs (the escape probability the module docstring states); seeded, the test is
    # the same every run.
    always = DeltaVerifier({"l": (lora_a, lora_b)}, scaling=2.0, rng=np.random.default_rng(2))
    bad = good.copy()
    bad[1, 3] += 0.05  # one element of one token, small next to the delta
    with pytest.raises(IntegrityError, match="token 1"):
        always.check("l", x, bad)
