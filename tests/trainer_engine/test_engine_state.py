"""Checkpoint round trips: a restored engine computes and steps exactly like the original."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save as save_safetensors

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig
from tensafe.trainer.domain.engine.state import STATE_FORMAT, decode_state, encode_state

from .conftest import EngineFactory, cross_entropy_batch

ADAM = AdamConfig(learning_rate=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("dp", [DpConfig(noise_multiplier=0.0, max_grad_norm=0.5), None])
def test_state_round_trip_mid_step_resumes_exactly(
    make_engine: EngineFactory, corpus_sequences: list[list[int]], dp: DpConfig | None
) -> None:
    # LoRA dropout on: the restored engine must also draw the same dropout masks.
    original = make_engine(dp=dp, dropout=0.1, seed=21)
    batches = [cross_entropy_batch(corpus_sequences[i : i + 6]) for i in range(0, 36, 6)]
    original.forward_backward(*batches[0][:1], "cross_entropy", batches[0][1])
    original.optim_step(ADAM)
    original.forward_backward(*batches[1][:1], "cross_entropy", batches[1][1])
    original.optim_step(ADAM)
    # Checkpoint in the middle of step 3: one ForwardBackward accumulated.
    original.forward_backward(*batches[2][:1], "cross_entropy", batches[2][1])
    checkpoint = original.state_dict()
    assert len(checkpoint) < 1_000_000

    restored = make_engine(dp=dp, dropout=0.1, seed=21)
    restored.load_state(checkpoint)
    assert restored.step == original.step == 2
    assert restored.accumulated_examples == original.accumulated_examples == 6
    probe = corpus_sequences[50:56]
    assert restored.compute_logprobs(probe) == original.compute_logprobs(probe)
    for name, value in original.pending_gradient_sum().items():
        assert torch.equal(restored.pending_gradient_sum()[name], value)

    for engine in (original, restored):
        engine.forward_backward(*batches[3][:1], "cross_entropy", batches[3][1])
        engine.optim_step(ADAM)
        engine.forward_backward(*batches[4][:1], "cross_entropy", batches[4][1])
        engine.optim_step(ADAM)
    after_original = original.adapter_tensors()
    after_restored = restored.adapter_tensors()
    for name, value in after_original.items():
        assert torch.equal(after_restored[name], value)
    assert restored.state_dict() == original.state_dict()


_STATE_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,  # no numpy dtype: the safetensors.torch path
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("extra", _STATE_DTYPES)
def test_encoded_state_is_the_bytes_safetensors_torch_writes(extra: torch.dtype) -> None:
    # fp32 tensors of every shape the engine writes (and an empty and a 0-d one), names
    # out of order, a non-contiguous one, one sharing another's memory, plus one tensor
    # of ``extra``: the bytes must be exactly safetensors.torch's (of clones), whichever
    # path encode_state takes, and decode back.
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "z.lora_A": torch.randn(8, 32, generator=generator),
        "a.lora_B": torch.randn(32, 8, generator=generator).t(),
        "m.empty": torch.zeros(0),
        "m.scalar": torch.tensor(2.5),
        "x.extra": (torch.randn(5, 3, generator=generator) * 50).to(extra),
    }
    tensors["s.row"] = tensors["z.lora_A"][1]
    metadata = {"step": "7", "lora": '{"rank": 8}'}
    encoded = encode_state(tensors, metadata)
    decoded, read = decode_state(encoded)
    header = {"tensafe": json.dumps({**metadata, "format": STATE_FORMAT}, sort_keys=True)}
    clones = {name: tensor.contiguous().clone() for name, tensor in tensors.items()}
    assert encoded == save_safetensors(clones, metadata=header)
    assert read == {**metadata, "format": STATE_FORMAT}
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor)


def test_fresh_engine_with_another_seed_differs_until_loaded(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    original = make_engine(dp=None, seed=1)
    batch, inputs = cross_entropy_batch(corpus_sequences[:8])
    original.forward_backward(batch, "cross_entropy", inputs)
    original.optim_step(ADAM)
    other = make_engine(dp=None, seed=2)
    probe = corpus_sequences[10:12]
    assert other.compute_logprobs(probe) != original.compute_logprobs(probe)
    other.load_state(original.state_dict())
    assert other.compute_logprobs(probe) == original.compute_logprobs(probe)


def test_state_for_another_configuration_is_refused_and_changes_nothing(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    dp_engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    between_steps = dp_engine.state_dict()
    sequence = corpus_sequences[0]
    dp_engine.forward_backward(
        [sequence[:-1]],
        "cross_entropy",
        [{"target_tokens": sequence[1:], "weights": [1.0] * (len(sequence) - 1)}],
    )
    mid_step = dp_engine.state_dict()
    # Another LoRA shape never loads; other DP settings load only between steps (the
    # weights carry over and the privacy ledger follows them; a sum clipped under
    # other settings does not).
    refused = [
        (make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0), rank=4), between_steps)
    ]
    for dp in (None, DpConfig(noise_multiplier=2.0, max_grad_norm=1.0)):
        refused.append((make_engine(dp=dp), mid_step))
        make_engine(dp=dp).load_state(between_steps)
    for target, checkpoint in refused:
        before = target.state_dict()
        with pytest.raises(InvalidArgument) as raised:
            target.load_state(checkpoint)
        assert raised.value.field == "state"
        assert target.state_dict() == before


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"",
        lambda data: b"not a checkpoint at all",
        lambda data: data[: len(data) // 2],
        lambda data: data[:8] + data[8:].replace(b"tensafe.trainer.engine.state/1", b"x" * 30),
    ],
)
def test_corrupt_state_is_refused(
    make_engine: EngineFactory, corrupt: Callable[[bytes], bytes]
) -> None:
    engine = make_engine(dp=None)
    before = engine.state_dict()
    with pytest.raises(InvalidArgument) as raised:
        engine.load_state(corrupt(before))
    assert raised.value.field == "state"
    assert engine.state_dict() == before


def test_adapter_tensors_use_peft_names_and_match_the_model(make_engine: EngineFactory) -> None:
    engine = make_engine(dp=None, rank=4, target_modules=("q_proj", "v_proj"))
    tensors = engine.adapter_tensors()
    # 2 layers x 2 modules x (A, B)
    assert len(tensors) == 8
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert name in tensors
    assert tensors[name].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (
        32,
        4,
    )
    parameters = dict(engine.model.named_parameters())
    assert torch.equal(
        tensors[name],
        parameters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
    )
    config = engine.adapter_config()
    assert config["r"] == 4
    target_modules = config["target_modules"]
    assert isinstance(target_modules, list)
    assert sorted(target_modules) == ["q_proj", "v_proj"]


def test_forward_computes_the_same_outputs_and_changes_nothing(
    make_engine: EngineFactory, corpus_sequences: list[list[int]]
) -> None:
    engine = make_engine(dp=DpConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    batch, inputs = cross_entropy_batch(corpus_sequences[:5])
    before = engine.state_dict()
    evaluated = engine.forward(batch, "cross_entropy", inputs)
    assert engine.state_dict() == before
    assert engine.accumulated_examples == 0
    trained = engine.forward_backward(batch, "cross_entropy", inputs)
    assert engine.accumulated_examples == 5
    assert evaluated.metrics["loss:sum"] == pytest.approx(trained.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(evaluated.outputs, trained.outputs, strict=True):
        assert len(a.logprobs) == len(b.logprobs)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
