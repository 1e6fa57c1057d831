"""``tensafe.tinker.types`` and their exact conversion to and from the trainer's messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensafe.common.errors import InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker import serde, types

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def tensors(draw: st.DrawFn) -> types.TensorData:
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(0, 5))
    if draw(st.booleans()):
        data: list[int] | list[float] = draw(
            st.lists(int64s, min_size=rows * cols, max_size=rows * cols)
        )
        return types.TensorData(data=data, dtype="int64", shape=[rows, cols])
    data = draw(st.lists(float32s, min_size=rows * cols, max_size=rows * cols))
    return types.TensorData(data=data, dtype="float32", shape=[rows, cols])


@given(tensors())
def test_tensor_round_trip_is_exact(tensor: types.TensorData) -> None:
    message = serde.tensor_to_proto(tensor)
    assert serde.tensor_from_proto(pb.TensorData.FromString(message.SerializeToString())) == tensor


@given(st.lists(st.lists(st.integers(0, 50_000), max_size=20), max_size=4))
def test_model_input_round_trip_keeps_chunks(chunks: list[list[int]]) -> None:
    model_input = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=c) for c in chunks])
    back = serde.model_input_from_proto(serde.model_input_to_proto(model_input))
    assert back == model_input
    assert back.to_ints() == [t for c in chunks for t in c]
    assert back.length == sum(len(c) for c in chunks)


def test_model_input_helpers_match_tinker() -> None:
    model_input = types.ModelInput.from_ints([3, 4]).append_int(5)
    assert model_input.to_ints() == [3, 4, 5] and model_input.length == 3
    assert len(model_input.chunks) == 2 and model_input.chunks[0].type == "encoded_text"
    assert types.ModelInput.empty().length == 0


def test_datum_converts_arrays_tensors_and_lists_like_tinker() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "weights": np.array([1.0, 0.5, 0.0]),
            "advantages": torch.tensor([[0.25, -1.0]]),
            "logprobs": types.ModelInput.from_ints([7]),
        },
    )
    inputs = datum.loss_fn_inputs
    assert inputs["target_tokens"] == types.TensorData(data=[2, 3, 4], dtype="int64", shape=[3])
    assert inputs["weights"] == types.TensorData(data=[1.0, 0.5, 0.0], dtype="float32", shape=[3])
    assert inputs["advantages"] == types.TensorData(
        data=[0.25, -1.0], dtype="float32", shape=[1, 2]
    )
    assert inputs["logprobs"].dtype == "int64"
    assert serde.datum_from_proto(serde.datum_to_proto(datum)) == datum


def test_list_under_weights_becomes_float32_even_when_integral() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": [1, 0]}
    )
    assert datum.loss_fn_inputs["weights"].dtype == "float32"
    assert datum.loss_fn_inputs["weights"].to_numpy().dtype == np.float32


def test_datum_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="rectangular"):
        types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": ["a"]})
    with pytest.raises(ValueError, match="pass TensorData"):
        types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"mask": [1]})
    with pytest.raises(TypeError):
        types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": 1.0})
    with pytest.raises(ValueError, match="does not hold"):
        types.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])


def test_zero_dimensional_tensor_is_refused_not_reshaped() -> None:
    with pytest.raises(InvalidArgument):
        serde.tensor_to_proto(types.TensorData(data=[1.5], dtype="float32", shape=[]))
    one_d = types.TensorData(data=[1.5], dtype="float32")
    assert serde.tensor_from_proto(serde.tensor_to_proto(one_d)).shape == [1]


def test_tensor_data_numpy_and_torch_views() -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    tensor = types.TensorData.from_numpy(array)
    assert tensor.dtype == "int64" and tensor.shape == [2, 3]
    assert tensor.to_torch().dtype == torch.int64
    assert torch.equal(tensor.to_torch(), torch.arange(6).reshape(2, 3))
    floats = types.TensorData.from_torch(torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert floats.dtype == "float32" and floats.tolist() == [0.5, 1.5]


def test_forward_backward_output_round_trip() -> None:
    output = types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[
            {"logprobs": types.TensorData(data=[-0.5, -2.25], dtype="float32", shape=[2])},
            {
                "logprobs": types.TensorData(data=[-1.0], dtype="float32", shape=[1]),
                "elementwise_loss": types.TensorData(data=[1.0], dtype="float32", shape=[1]),
            },
        ],
        metrics={"loss:sum": 3.75},
    )
    message = serde.forward_backward_output_to_proto(output)
    assert serde.forward_backward_output_from_proto(message) == output


def test_adam_params_defaults_and_round_trip() -> None:
    params = types.AdamParams()
    assert (params.learning_rate, params.beta1, params.beta2, params.eps) == (
        1e-4,
        0.9,
        0.95,
        1e-12,
    )
    custom = types.AdamParams(
        learning_rate=3e-4, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.01
    )
    assert serde.adam_params_from_proto(serde.adam_params_to_proto(custom)) == custom


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (types.AdamParams(grad_clip_norm=1.0), "adam_params.grad_clip_norm"),
        (types.AdamParams(beta1=0.0), "adam_params.beta1"),
    ],
)
def test_adam_params_the_contract_cannot_carry(params: types.AdamParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        serde.adam_params_to_proto(params)
    assert info.value.field == field


@pytest.mark.parametrize(
    "params",
    [
        types.SamplingParams(max_tokens=8),
        types.SamplingParams(max_tokens=1, seed=3, stop=["\n", "END"], temperature=0.0, top_k=5),
        types.SamplingParams(max_tokens=20, stop=[2, 7], temperature=0.7, top_p=0.9),
    ],
)
def test_sampling_params_round_trip(params: types.SamplingParams) -> None:
    back = serde.sampling_params_from_proto(serde.sampling_params_to_proto(params))
    expected_stop = list(params.stop) if params.stop is not None else None
    assert back == types.SamplingParams(
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=expected_stop,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
    )


def test_sampling_params_single_stop_string_and_tinker_defaults() -> None:
    message = serde.sampling_params_to_proto(types.SamplingParams(max_tokens=4, stop="\n\n"))
    assert list(message.stop) == ["\n\n"] and message.top_k == 0 and message.top_p == 1.0
    assert message.temperature == 1.0 and message.seed == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (types.SamplingParams(), "sampling_params.max_tokens"),
        (types.SamplingParams(max_tokens=2, top_k=0), "sampling_params.top_k"),
        (types.SamplingParams(max_tokens=2, seed=0), "sampling_params.seed"),
        (types.SamplingParams(max_tokens=2, stop=["a", 3]), "sampling_params.stop"),  # type: ignore[list-item]
    ],
)
def test_sampling_params_refused(params: types.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        serde.sampling_params_to_proto(params)
    assert info.value.field == field


@pytest.mark.parametrize(
    "spent",
    [
        types.PrivacySpent(
            epsilon=2.5,
            delta=1e-5,
            accountant="rdp",
            steps=10,
            noise_multiplier=1.1,
            epsilon_budget=8.0,
            private=True,
        ),
        types.PrivacySpent(
            epsilon=0.75,
            delta=1e-6,
            accountant="pld",
            steps=1,
            noise_multiplier=4.0,
            epsilon_budget=None,
            private=True,
        ),
    ],
)
def test_privacy_spent_round_trip(spent: types.PrivacySpent) -> None:
    assert serde.privacy_spent_from_proto(serde.privacy_spent_to_proto(spent)) == spent


def test_sample_result_and_logprobs_conversion() -> None:
    result = pb.SampleResult()
    result.sequences.add(tokens=[4, 5], logprobs=[-0.5, -1.5], stop_reason=pb.STOP_REASON_LENGTH)
    response = serde.sample_response_from_proto(result)
    assert response.sequences == [
        types.SampledSequence(stop_reason="length", tokens=[4, 5], logprobs=[-0.5, -1.5])
    ]
    assert response.type == "sample" and response.prompt_logprobs is None
    with pytest.raises(InvalidArgument):
        serde.sample_response_from_proto(pb.SampleResult(sequences=[pb.SampledSequence()]))
    scored = serde.sequence_logprobs_from_proto(pb.SequenceLogprobs(logprobs=[0.0, -0.25, -4.0]))
    assert scored == [None, -0.25, -4.0]


def test_dp_config_builder() -> None:
    noise = serde.dp_config_to_proto(
        dp_noise_multiplier=0.8,
        target_epsilon=None,
        planned_steps=None,
        max_grad_norm=0.5,
        delta=1e-5,
        accountant="rdp",
        epsilon_budget=6.0,
    )
    assert noise.WhichOneof("noise") == "noise_multiplier" and noise.noise_multiplier == 0.8
    assert noise.epsilon_budget == 6.0 and noise.max_grad_norm == 0.5
    target = serde.dp_config_to_proto(
        dp_noise_multiplier=None,
        target_epsilon=4.0,
        planned_steps=100,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant="pld",
        epsilon_budget=None,
    )
    assert target.WhichOneof("noise") == "target_epsilon" and target.planned_steps == 100
    assert target.accountant == pb.ACCOUNTANT_PLD and target.epsilon_budget == 0.0


def test_lora_target_module_flags() -> None:
    assert serde.lora_target_modules(train_attn=None, train_mlp=None, train_unembed=None) == []
    assert serde.lora_target_modules(train_attn=False, train_mlp=True, train_unembed=True) == [
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    with pytest.raises(InvalidArgument):
        serde.lora_target_modules(train_attn=False, train_mlp=False, train_unembed=False)


def test_datums_to_proto_names_the_bad_item() -> None:
    good = types.Datum(model_input=types.ModelInput.from_ints([1]))
    with pytest.raises(InvalidArgument) as info:
        serde.datums_to_proto([good, {"model_input": [1]}])  # type: ignore[list-item]
    assert info.value.field == "data[1]"
    assert len(serde.datums_to_proto([good])) == 1


def test_a_datum_of_the_official_sdk_is_taken_as_ours() -> None:
    """The cookbook's own modules build data with the official ``tinker``; a recipe whose
    import alone was switched hands those over."""
    import tinker as official

    tokens = [5, 6, 7, 8]
    theirs = official.Datum(
        model_input=official.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": official.TensorData(data=tokens[1:], dtype="int64", shape=[3]),
            "weights": official.TensorData(data=[0.0, 1.0, 1.0], dtype="float32", shape=[3]),
        },
    )
    ours = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0, 1.0, 1.0]},
    )
    assert serde.datums_to_proto([theirs]) == serde.datums_to_proto([ours])
    image = official.Datum(
        model_input=official.ModelInput(
            chunks=[official.types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]
        ),
        loss_fn_inputs={},
    )
    with pytest.raises(InvalidArgument) as caught:
        serde.datums_to_proto([image])
    assert caught.value.field == "data[0].model_input.chunks[0]"


def test_optim_step_metrics_carry_epsilon_under_the_tinker_api_keys() -> None:
    message = pb.OptimStepResult(step=3)
    message.metrics["examples"] = 4.0
    message.privacy_spent.CopyFrom(
        pb.PrivacySpent(
            private=True,
            epsilon=1.5,
            delta=1e-5,
            steps=3,
            noise_multiplier=1.0,
            accountant=pb.ACCOUNTANT_RDP,
        )
    )
    metrics = serde.optim_step_response_from_proto(message).metrics
    assert metrics["examples"] == 4.0
    assert (metrics["dp/epsilon"], metrics["dp/steps"], metrics["dp/private"]) == (1.5, 3.0, 1.0)


def test_tinker_module_paths_of_tensor_data_and_provenance_spans() -> None:
    """Code importing the official SDK's module paths imports ours with the prefix
    changed, and gets the very classes ``types`` exports."""
    from tensafe.tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan
    from tensafe.tinker.types.tensor_data import TensorData

    assert TensorData is types.TensorData
    assert PromptProvenanceSpan is types.PromptProvenanceSpan
    assert SampledProvenanceSpan is types.SampledProvenanceSpan


def test_datum_with_provenance_as_the_official_sdk() -> None:
    """Same result and same refusals as ``tinker.Datum.with_provenance`` (0.38.0)."""
    import tinker as official
    from tinker.types import provenance_spans as official_spans

    tokens = [5, 6, 7, 8, 9]
    ours = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0, 0.0, 1.0, 1.0]},
    )
    theirs = official.Datum(
        model_input=official.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0, 0.0, 1.0, 1.0]},
    )
    prompt, sampled = (
        types.PromptProvenanceSpan(sequence_id="f.0", length=2),
        types.SampledProvenanceSpan(sequence_id="f.0", offset=0, length=2),
    )
    with_spans = ours.with_provenance(
        model_input=[prompt, sampled], loss_fn_inputs=[sampled, prompt]
    )
    official_with = theirs.with_provenance(
        model_input=[
            official_spans.PromptProvenanceSpan(sequence_id="f.0", length=2),
            official_spans.SampledProvenanceSpan(sequence_id="f.0", length=2),
        ],
        loss_fn_inputs=[
            official_spans.SampledProvenanceSpan(sequence_id="f.0", length=2),
            official_spans.PromptProvenanceSpan(sequence_id="f.0", length=2),
        ],
    )
    assert ours.model_input_spans is None  # a copy: the original is unchanged
    assert with_spans.model_input_spans == [prompt, sampled]
    assert with_spans.loss_fn_input_spans == [sampled, prompt]
    assert [(s.sequence_id, s.offset, s.length) for s in with_spans.model_input_spans] == [
        (s.sequence_id, s.offset, s.length) for s in official_with.model_input_spans or []
    ]
    assert with_spans.loss_fn_inputs == ours.loss_fn_inputs

    # Refusals: runs that do not tile the field, spans of another type, an unpaired list,
    # a bad span. The official SDK refuses each of these too.
    short = [types.SampledProvenanceSpan(sequence_id="f.0", length=3)]
    with pytest.raises(ValueError, match="model_input spans cover 3 positions but the field has 4"):
        ours.with_provenance(model_input=short, loss_fn_inputs=[prompt, sampled])
    with pytest.raises(ValueError, match="loss_fn_inputs spans cover 3"):
        ours.with_provenance(model_input=[prompt, sampled], loss_fn_inputs=short)
    with pytest.raises(ValueError, match="loss_fn_inputs spans cover 3"):
        theirs.with_provenance(
            model_input=[official_spans.PromptProvenanceSpan(sequence_id="f.0", length=4)],
            loss_fn_inputs=[official_spans.PromptProvenanceSpan(sequence_id="f.0", length=3)],
        )
    with pytest.raises(TypeError, match="PromptProvenanceSpan or SampledProvenanceSpan"):
        types.Datum(
            model_input=ours.model_input,
            model_input_spans=[(0, 4)],  # type: ignore[list-item]
            loss_fn_input_spans=[],
        )
    with pytest.raises(ValueError, match="as a pair"):
        types.Datum(model_input=ours.model_input, model_input_spans=[prompt, sampled])
    with pytest.raises(ValueError, match="length must be >= 0"):
        types.PromptProvenanceSpan(sequence_id="f.0", length=-1)
    with pytest.raises(ValueError, match="sequence_id must be non-empty"):
        types.SampledProvenanceSpan(sequence_id="", length=1)


def test_a_datum_with_provenance_is_sent_without_it() -> None:
    """Spans are validated on the client and not sent (TenSafe refuses the one loss that
    reads them): the proto of a datum with provenance is that of the datum without."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    span = types.SampledProvenanceSpan(sequence_id="f.0", length=3)
    spanned = datum.with_provenance(model_input=[span], loss_fn_inputs=[span])
    assert serde.datums_to_proto([spanned]) == serde.datums_to_proto([datum])
