"""A datum given twice in one DP optimizer step is refused (its sensitivity would be
2C, not the C the accountant assumes); near-duplicates are distinct data."""

from __future__ import annotations

import pytest

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig

from .conftest import EngineFactory

DP = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0)


def _inputs(sequences: list[list[int]]) -> list[dict[str, list[float] | list[int]]]:
    return [{"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)} for s in sequences]


def _fb(engine, sequences: list[list[int]]) -> None:  # type: ignore[no-untyped-def]
    engine.forward_backward([s[:-1] for s in sequences], "cross_entropy", _inputs(sequences))


def test_a_duplicate_in_one_call_is_refused_and_nothing_accumulates(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DP)
    a, b = corpus_sequences[0], corpus_sequences[1]
    with pytest.raises(InvalidArgument) as info:
        _fb(engine, [a, b, a])
    assert info.value.field == "data[2]" and "data[0]" in info.value.message
    assert info.value.reason == "DUPLICATE_DATUM"
    assert engine.accumulated_examples == 0
    assert all(float(t.abs().sum()) == 0.0 for t in engine.pending_gradient_sum().values())


def test_a_duplicate_across_calls_of_one_step_is_refused_until_the_step(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DP)
    a, b, c = corpus_sequences[:3]
    _fb(engine, [a, b])
    with pytest.raises(InvalidArgument) as info:
        _fb(engine, [c, b])
    assert info.value.field == "data[1]" and "call 1, data[1]" in info.value.message
    assert engine.accumulated_examples == 2
    # The step's digests survive a checkpoint: a resumed worker refuses it too.
    restored = make_engine(dp=DP)
    restored.load_state(engine.state_dict())
    with pytest.raises(InvalidArgument):
        _fb(restored, [b])
    # A near-duplicate (one weight differs) is another datum.
    near = _inputs([b])
    near[0]["weights"] = [0.5] + [1.0] * (len(b) - 2)
    engine.forward_backward([b[:-1]], "cross_entropy", near)
    # After the optimizer step the same datum may come again.
    engine.optim_step(AdamConfig(learning_rate=1e-3))
    _fb(engine, [a, b])
    assert engine.accumulated_examples == 2


def test_without_dp_or_for_server_records_duplicates_are_data(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    a = corpus_sequences[0]
    plain = make_engine(dp=None)
    _fb(plain, [a, a])
    assert plain.accumulated_examples == 2
    private = make_engine(dp=DP)
    private.forward_backward(
        [a[:-1], a[:-1]], "cross_entropy", _inputs([a, a]), refuse_duplicates=False
    )
    assert private.accumulated_examples == 2
