"""The translation layer against the official SDK's own (de)serializers: what the SDK
encodes the server decodes, what the server encodes the SDK decodes to the same values;
DP settings from config and user_metadata; config validated at start-up."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import any_pb2
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError, InvalidArgument
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.tinker_api import privacy, serde
from tensafe.tinker_api.config import TinkerApiConfig
from tensafe.tinker_api.wire import tinker_public_pb2 as wire

ENV = {"TENSAFE_TRAINER_URL": "127.0.0.1:1", "TENSAFE_AUTH_URL": "127.0.0.1:2"}


def _config(**overrides: str) -> TinkerApiConfig:
    return load_config(TinkerApiConfig, {**ENV, **overrides})


def test_the_sdks_forward_backward_body_decodes_to_the_trainers_datums() -> None:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[
                types.Datum(
                    model_input=types.ModelInput.from_ints([3, 4, 5]),
                    loss_fn_inputs={
                        "target_tokens": types.TensorData.from_numpy(
                            np.array([4, 5, 6], dtype=np.int64)
                        ),
                        "weights": types.TensorData.from_numpy(
                            np.array([0.0, 1.0, 0.5], dtype=np.float32)
                        ),
                    },
                )
            ],
            loss_fn="ppo",
            loss_fn_config={"clip_low_threshold": 0.8},
        ),
        model_id="m",
        seq_id=7,
    )
    body = forward_backward_request_to_proto(request).SerializeToString()
    parsed = wire.ForwardBackwardRequest.FromString(body)
    (datum,) = serde.datums(parsed)
    assert list(datum.model_input.chunks[0].encoded_text.tokens) == [3, 4, 5]
    assert list(datum.loss_fn_inputs["target_tokens"].int_data) == [4, 5, 6]
    assert list(datum.loss_fn_inputs["weights"].float_data) == [0.0, 1.0, 0.5]
    assert serde.loss_fn_config(parsed) == {"clip_low_threshold": pytest.approx(0.8)}
    assert parsed.seq_id == 7 and parsed.loss_fn == "ppo"


def test_image_chunks_are_refused_naming_the_chunk() -> None:
    parsed = wire.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    parsed.data.add().model_input.add().image.data = b"\x89PNG"
    with pytest.raises(InvalidArgument) as refused:
        serde.datums(parsed)
    assert refused.value.message.startswith("forward_backward_input.data[0].model_input.chunks[0]")


def test_the_sdk_decodes_a_forward_backward_result_to_the_same_values() -> None:
    result = pb.ForwardBackwardResult(metrics={"loss:sum": 3.5})
    for logprobs in ([-0.5, -1.25], [-2.0, -0.125, -3.0]):
        output = result.loss_fn_outputs.add()
        output.outputs["logprobs"].CopyFrom(
            pb.TensorData(dtype=pb.D_TYPE_FLOAT32, shape=[len(logprobs)], float_data=logprobs)
        )
    decoded = deserialize_forward_backward_output(serde.forward_backward_output(result))
    assert decoded.metrics == {"loss:sum": 3.5}
    assert [o["logprobs"].to_numpy().tolist() for o in decoded.loss_fn_outputs] == [
        [-0.5, -1.25],
        [-2.0, -0.125, -3.0],
    ]


def test_the_sdk_decodes_a_sample_result() -> None:
    result = pb.SampleResult(
        sequences=[
            pb.SampledSequence(
                tokens=[9, 8], logprobs=[-0.5, -0.25], stop_reason=pb.STOP_REASON_STOP
            ),
            pb.SampledSequence(tokens=[7], logprobs=[-1.0], stop_reason=pb.STOP_REASON_LENGTH),
        ]
    )
    decoded = deserialize_sample_response(serde.sample_response(result))
    assert [list(s.tokens) for s in decoded.sequences] == [[9, 8], [7]]
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert list(decoded.sequences[0].logprobs or []) == [-0.5, -0.25]


def test_prompt_logprobs_reach_the_sdk_with_none_for_the_first_token() -> None:
    result = pb.SampleResult(
        sequences=[
            pb.SampledSequence(tokens=[4], logprobs=[-0.5], stop_reason=pb.STOP_REASON_LENGTH)
        ]
    )
    scores = pb.SequenceLogprobs(logprobs=[0.0, -1.5, -0.25], first_token_has_logprob=False)
    decoded = deserialize_sample_response(serde.sample_response(result, prompt_logprobs=scores))
    assert decoded.prompt_logprobs == [None, -1.5, -0.25]
    assert serde.split_paired_request_id(serde.paired_request_id("a1", "b2")) == ("a1", "b2")
    assert serde.split_paired_request_id("a1") is None
    with pytest.raises(InvalidArgument):
        serde.split_paired_request_id("lp.only-one")


def test_optim_step_results_carry_epsilon() -> None:
    packed = any_pb2.Any()
    packed.Pack(
        pb.OptimStepResult(
            step=3,
            privacy_spent=pb.PrivacySpent(
                epsilon=1.5, delta=1e-5, steps=3, noise_multiplier=1.1, private=True
            ),
        )
    )
    metrics = serde.json_result(packed)
    assert metrics is not None
    assert metrics["metrics"]["dp/epsilon"] == 1.5
    assert metrics["metrics"]["step"] == 3.0
    assert types.OptimStepResponse.model_validate(metrics).metrics == metrics["metrics"]


def test_paths_and_sampling_sessions_round_trip() -> None:
    tensafe = "tensafe://training_clients/" + "a" * 32 + "/sampler_weights/s-1"
    tinker_path = serde.to_tinker_path(tensafe)
    assert tinker_path.startswith("tinker://training_clients/")
    assert serde.to_tensafe_path("model_path", tinker_path) == tensafe
    assert serde.client_of_path("model_path", tensafe) == "a" * 32
    session = serde.sampling_session_id(tensafe, "n1")
    assert "/" not in session
    assert serde.path_of_sampling_session("id", session) == tensafe
    with pytest.raises(InvalidArgument):
        serde.to_tensafe_path("model_path", "s3://bucket/x")
    with pytest.raises(InvalidArgument):
        serde.path_of_sampling_session("id", "smp-!!!")


def test_dp_by_default_from_config() -> None:
    dp = privacy.dp_config(_config(TENSAFE_TINKER_DP_TARGET_EPSILON="4"), None)
    assert dp is not None
    assert dp.target_epsilon == 4.0 and dp.planned_steps == 1000
    assert dp.max_grad_norm == 1.0 and dp.delta == 1e-5 and dp.accountant == pb.ACCOUNTANT_RDP


def test_user_metadata_overrides_and_opt_out() -> None:
    config = _config()
    dp = privacy.dp_config(
        config,
        {
            "tensafe.dp.noise_multiplier": "0.8",
            "tensafe.dp.max_grad_norm": "0.5",
            "tensafe.dp.accountant": "pld",
            "tensafe.dp.epsilon_budget": "3",
            "unrelated": "kept out",
        },
    )
    assert dp is not None
    assert dp.WhichOneof("noise") == "noise_multiplier" and dp.noise_multiplier == 0.8
    assert dp.max_grad_norm == 0.5 and dp.accountant == pb.ACCOUNTANT_PLD
    assert dp.epsilon_budget == 3.0
    assert privacy.dp_config(config, {"tensafe.dp": "off"}) is None


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"tensafe.dp.delta": "1.5"}, "user_metadata.tensafe.dp.delta"),
        ({"tensafe.dp.target_epsilon": "-1"}, "user_metadata.tensafe.dp.target_epsilon"),
        ({"tensafe.dp.planned_steps": "2.5"}, "user_metadata.tensafe.dp.planned_steps"),
        ({"tensafe.dp.sigma": "1"}, "user_metadata.tensafe.dp.sigma"),
        ({"tensafe.dp": "maybe"}, "user_metadata.tensafe.dp"),
        (
            {"tensafe.dp.noise_multiplier": "1", "tensafe.dp.target_epsilon": "2"},
            "user_metadata.tensafe.dp.noise_multiplier",
        ),
    ],
)
def test_bad_dp_metadata_names_the_key(metadata: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        privacy.dp_config(_config(), metadata)
    assert refused.value.message.startswith(f"{field}:")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"TENSAFE_TRAINER_URL": "http://x:1"}, "TENSAFE_TRAINER_URL"),
        ({"TENSAFE_TINKER_RETRIEVE_WAIT_SECONDS": "60"}, "TENSAFE_TINKER_RETRIEVE_WAIT_SECONDS"),
        ({"TENSAFE_TINKER_DP_DELTA": "1"}, "TENSAFE_TINKER_DP_DELTA"),
        ({"TENSAFE_TINKER_DP_ACCOUNTANT": "gdp"}, "TENSAFE_TINKER_DP_ACCOUNTANT"),
        ({"TENSAFE_TLS_CLIENT_CERT_FILE": "/nope"}, "TENSAFE_TLS_CLIENT_KEY_FILE"),
    ],
)
def test_bad_config_names_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        _config(**env)


def test_trainer_and_auth_addresses_are_required() -> None:
    with pytest.raises(ConfigError, match="TENSAFE_TRAINER_URL"):
        load_config(TinkerApiConfig, {"TENSAFE_AUTH_URL": "a:1"})
