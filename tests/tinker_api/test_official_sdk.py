"""The OFFICIAL `tinker` SDK (0.38.0, unchanged) against TenSafe's Tinker API on a real
local stack: training with DP by default, sampling, checkpoints, ε reported; a revoked
credential, another tenant's model, a budget refusal and a dropped connection during
retrieve_future as the SDK sees them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dp_accounting
import grpc
import jwt
import numpy as np
import pytest
import tinker
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from tinker import types
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType

from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
from tensafe.client.channels import open_channel
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

from .conftest import BASE_MODEL, Stack, tiny_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DELTA = 1e-5


def _datum(seed: int, length: int = 12) -> types.Datum:
    tokens = np.random.default_rng(seed).integers(5, 400, size=length + 1).tolist()
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(length, dtype=np.float32)),
        },
    )


def _one_step_epsilons(sigma: float, steps: int) -> list[float]:
    """ε after 1..steps full-batch Gaussian steps (no amplification), as the trainer's RDP
    accountant composes them (client batches)."""
    out = []
    for n in range(1, steps + 1):
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(sigma), n)
        out.append(accountant.get_epsilon(DELTA))
    return out


def _raw_get_info(training: tinker.TrainingClient) -> dict[str, object]:
    """get_info's JSON, through the SDK's own HTTP client (auth, retries and all)."""
    holder = training.holder

    async def fetch() -> dict[str, object]:
        with holder.aclient(ClientConnectionPoolType.TRAIN) as client:
            body = {"model_id": training.model_id}
            return await client.post("/api/v1/get_info", body=body, cast_to=dict)

    return holder.run_coroutine_threadsafe(fetch()).result()


def _admin_auth(stack: Stack) -> tuple[grpc.Channel, auth_service_pb2_grpc.AuthServiceStub]:
    address = str(stack.connection["services"]["auth"])
    channel = open_channel(address)
    admin_key = find_api_key(connection_file=stack.local.connection_file)
    stub = auth_service_pb2_grpc.AuthServiceStub(
        authenticated_channel(channel, TokenProvider(channel, admin_key))
    )
    return channel, stub


def _jwt_for(stack: Stack, api_key: str) -> str:
    with open_channel(str(stack.connection["services"]["auth"])) as channel:
        return str(
            auth_service_pb2_grpc.AuthServiceStub(channel)
            .ExchangeApiKey(auth_pb.ExchangeApiKeyRequest(api_key=api_key))
            .access_token
        )


def test_train_sample_save_load_with_dp_by_default(
    tinker_env: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented set-up, exactly: TINKER_CREDENTIAL_CMD runs `tensafe token`.
    monkeypatch.setenv(
        "TINKER_CREDENTIAL_CMD", tinker_env.credential_cmd(tinker_env.tenant, whole_cli=True)
    )
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=BASE_MODEL, rank=4, user_metadata={"tensafe.dp.noise_multiplier": "1.0"}
    ).result()
    info = training.get_info()
    assert info.model_data.model_name == BASE_MODEL
    assert info.lora_rank == 4
    batch = [_datum(i) for i in range(4)]

    # forward_backward + optim_step, submitted back to back as the SDK's docs show.
    fwd_bwd = training.forward_backward(batch, "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=1e-2))
    output = fwd_bwd.result()
    metrics = step.result().metrics
    assert output.loss_fn_output_type == "ArrayRecord"
    assert len(output.loss_fn_outputs) == 4
    logprobs = output.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs.shape == (12,) and np.all(logprobs <= 0) and np.all(np.isfinite(logprobs))
    assert metrics is not None
    # DP by default: one client-batch step at sigma = 1, epsilon as the RDP accountant says.
    expected = _one_step_epsilons(1.0, 2)
    assert metrics["dp/private"] == 1.0
    assert metrics["dp/steps"] == 1.0
    assert metrics["dp/epsilon"] == pytest.approx(expected[0], rel=1e-3)
    second = training.forward_backward(batch, "cross_entropy")
    metrics = training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
    assert second.result().metrics
    assert metrics is not None and metrics["dp/epsilon"] == pytest.approx(expected[1], rel=1e-3)

    # forward only: the same logprob shape, no step taken.
    forward = training.forward(batch[:1], "cross_entropy").result()
    assert forward.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (12,)

    # checkpoints: tinker:// paths, a load into the same client.
    saved = training.save_state("ckpt-a").result()
    assert saved.path.startswith("tinker://training_clients/")
    training.load_state(saved.path).result()

    # sampling from the current weights, through a sampling session.
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    sample = sampler.sample(
        prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=5, seed=3)
    ).result()
    assert len(sample.sequences) == 2
    for sequence in sample.sequences:
        assert 1 <= len(sequence.tokens) <= 5
        assert sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens)
        assert sequence.stop_reason in ("length", "stop")
    # compute_logprobs: the prompt scored by the trainer (no logprob for the first token).
    scored = sampler.compute_logprobs(prompt).result()
    assert len(scored) == 4 and scored[0] is None
    assert all(lp is not None and lp <= 0 and np.isfinite(lp) for lp in scored[1:])
    # a named sampler checkpoint and a sampling client on its path
    named = training.save_weights_for_sampler("named-sampler").result()
    assert named.path.endswith("/sampler_weights/named-sampler")
    from_path = service.create_sampling_client(model_path=named.path).result()
    again = from_path.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=3)).result()
    assert len(again.sequences) == 1
    service.close("success").result()


def _rl_datum(seed: int, advantage: float, length: int = 10) -> types.Datum:
    tokens = np.random.default_rng(seed).integers(5, 400, size=length + 1).tolist()
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "logprobs": types.TensorData.from_numpy(np.full(length, -6.0, dtype=np.float32)),
            "advantages": types.TensorData.from_numpy(np.full(length, advantage, np.float32)),
        },
    )


def test_rl_losses_custom_loss_and_stable_reinforce_through_the_sdk(tinker_env: Stack) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=BASE_MODEL, rank=2, user_metadata={"tensafe.dp.noise_multiplier": "1.0"}
    ).result()
    data = [_rl_datum(30, 1.0), _rl_datum(31, -0.5)]
    q = -6.0
    # cispo: the loss the server reports is Tinker's formula of the logprobs it returns.
    low, high = 0.9, 1.1
    cispo = training.forward(
        data, "cispo", {"clip_low_threshold": low, "clip_high_threshold": high}
    ).result()
    expected = 0.0
    for datum, out in zip(data, cispo.loss_fn_outputs, strict=True):
        p = out["logprobs"].to_numpy().astype(np.float64)
        a = datum.loss_fn_inputs["advantages"].to_numpy()
        expected += float(-(np.clip(np.exp(p - q), low, high) * p * a).sum())
    assert cispo.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    # dro, with beta: -Σ (p·A − ½β(p − q)²).
    dro = training.forward(data, "dro", {"beta": 0.2}).result()
    expected = 0.0
    for datum, out in zip(data, dro.loss_fn_outputs, strict=True):
        p = out["logprobs"].to_numpy().astype(np.float64)
        a = datum.loss_fn_inputs["advantages"].to_numpy()
        expected += float(-(p * a - 0.1 * (p - q) ** 2).sum())
    assert dro.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    training.forward_backward(data, "cispo").result()
    assert training.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics

    # The SDK's own forward_backward_custom (forward, client loss, linear surrogate).
    def squared_sums(
        batch: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        sums = torch.stack([lp.sum() for lp in logprobs])
        return (sums**2).sum(), {}

    custom = training.forward_backward_custom([_datum(32), _datum(33)], squared_sums).result()
    assert custom.metrics["surrogate_loss:sum"] == pytest.approx(
        2 * custom.metrics["loss:sum"], rel=1e-3
    )
    metrics = training.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics
    assert metrics is not None and metrics["dp/steps"] == 2.0

    # stable_reinforce: sampling with record_stability_info works (and names sequences);
    # the loss itself is refused by name.
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    sequence = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=1)).result()
    sampled = sequence.sequences[0]
    assert sampled.sequence_id
    datum = types.Datum(
        model_input=prompt.append(types.EncodedTextChunk(tokens=sampled.tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": [6, 7, 8, *sampled.tokens],
            "logprobs": [0.0, 0.0, 0.0, *(sampled.logprobs or [])],
            "advantages": [0.0, 0.0, 0.0] + [1.0] * len(sampled.tokens),
        },
    ).with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sampled.sequence_id, length=4),
            types.SampledProvenanceSpan(
                sequence_id=sampled.sequence_id, length=len(sampled.tokens) - 1
            ),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sampled.sequence_id, offset=1, length=3),
            types.SampledProvenanceSpan(
                sequence_id=sampled.sequence_id, length=len(sampled.tokens)
            ),
        ],
    )
    with pytest.raises(tinker.BadRequestError) as refused:
        training.forward_backward([datum], "stable_reinforce").result()
    assert "stable_reinforce is not served" in str(refused.value)
    service.close("success").result()


def test_create_training_client_from_state_inherits_epsilon(tinker_env: Stack) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=BASE_MODEL, rank=2, user_metadata={"tensafe.dp.noise_multiplier": "1.0"}
    ).result()
    batch = [_datum(40), _datum(41)]
    training.forward_backward(batch, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved = training.save_state("resume-me").result()
    expected = _one_step_epsilons(1.0, 2)
    for create in (
        service.create_training_client_from_state,
        service.create_training_client_from_state_with_optimizer,
    ):
        resumed = create(saved.path).result()
        # The SDK names the client itself (<session>:train:<n>); the Tinker API resolves it.
        assert ":train:" in resumed.model_id
        assert resumed.get_info().model_data.model_name == BASE_MODEL
        assert _raw_get_info(resumed)["privacy"]["steps"] == 1  # the checkpoint's step
        forward = resumed.forward(batch, "cross_entropy").result()
        before = training.forward(batch, "cross_entropy").result()
        # Same weights as the checkpoint (the source took no step since).
        np.testing.assert_allclose(
            forward.loss_fn_outputs[0]["logprobs"].to_numpy(),
            before.loss_fn_outputs[0]["logprobs"].to_numpy(),
            rtol=1e-5,
        )
        resumed.forward_backward(batch, "cross_entropy").result()
        metrics = resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
        # ε follows the weights: the checkpoint's step and this one.
        assert metrics is not None and metrics["dp/steps"] == 2.0
        assert metrics["dp/epsilon"] == pytest.approx(expected[1], rel=1e-3)
    service.close("success").result()


def test_budget_refusal_reaches_the_sdk(tinker_env: Stack) -> None:
    epsilons = _one_step_epsilons(1.0, 2)
    budget = (epsilons[0] + epsilons[1]) / 2  # one step fits, the second does not
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=BASE_MODEL,
        rank=2,
        user_metadata={
            "tensafe.dp.noise_multiplier": "1.0",
            "tensafe.dp.epsilon_budget": str(budget),
        },
    ).result()
    batch = [_datum(10), _datum(11)]
    training.forward_backward(batch, "cross_entropy").result()
    first = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert first.metrics is not None
    assert first.metrics["dp/epsilon"] < budget < epsilons[1]
    # get_info's JSON says the same (the SDK's typed GetInfoResponse drops the block).
    privacy = _raw_get_info(training)["privacy"]
    assert privacy["private"] is True and privacy["steps"] == 1
    assert privacy["epsilon"] == pytest.approx(first.metrics["dp/epsilon"])
    assert privacy["epsilon_budget"] == pytest.approx(budget)
    training.forward_backward(batch, "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError) as refused:
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert "privacy budget" in str(refused.value)
    assert refused.value.status_code == 400


def test_bad_dp_setting_is_a_400_naming_the_key(tinker_env: Stack) -> None:
    service = tinker.ServiceClient()
    with pytest.raises(tinker.BadRequestError) as refused:
        service.create_lora_training_client(
            base_model=BASE_MODEL, rank=2, user_metadata={"tensafe.dp.delta": "2"}
        ).result()
    assert "user_metadata.tensafe.dp.delta" in str(refused.value)


def test_another_tenants_model_is_not_found(tinker_env: Stack) -> None:
    # Tenant B trains and saves sampler weights through the SDK with its own credential.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_CREDENTIAL_CMD", tinker_env.credential_cmd(tinker_env.other_tenant))
        other = tinker.ServiceClient()
        training = other.create_lora_training_client(base_model=BASE_MODEL, rank=2).result()
        path = training.save_weights_for_sampler("b-weights").result().path
        other.close("success").result()
    # Tenant A names B's weights: 404, as if they did not exist.
    service = tinker.ServiceClient()
    with pytest.raises(tinker.NotFoundError) as missing:
        service.create_sampling_client(model_path=path).result()
    assert missing.value.status_code == 404
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "NOT_FOUND"


def test_revoked_credential_is_refused(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    token = _jwt_for(stack, stack.tenant.api_key)
    monkeypatch.setenv("TINKER_BASE_URL", stack.base_url)
    monkeypatch.delenv("TINKER_CREDENTIAL_CMD", raising=False)
    # A JWT as the SDK's API key works ...
    tinker.ServiceClient(api_key=token).create_lora_training_client(
        base_model=BASE_MODEL, rank=2
    ).result()
    # ... until it is revoked at auth; the trainer refuses it once its revocation list
    # has refreshed (docs/auth.md), and so does the Tinker API, which checks nothing itself.
    channel, admin = _admin_auth(stack)
    with channel:
        admin.RevokeToken(
            auth_pb.RevokeTokenRequest(
                token_id=jwt.decode(token, options={"verify_signature": False})["jti"]
            )
        )
    with open_channel(str(stack.connection["services"]["trainer"])) as trainer_channel:
        trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                trainer.ListBaseModels(
                    pb.ListBaseModelsRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "the revocation never reached the trainer"
            time.sleep(0.5)
    with pytest.raises(tinker.AuthenticationError) as refused:
        tinker.ServiceClient(api_key=token).create_lora_training_client(
            base_model=BASE_MODEL, rank=2
        ).result()
    assert refused.value.status_code == 401
    assert "revoked" in str(refused.value)


def test_capabilities_and_an_unknown_route_in_the_sdks_error_shape(tinker_env: Stack) -> None:
    rest = tinker.RestClient()
    capabilities = rest.get_server_capabilities().result()
    assert [m.model_name for m in capabilities.supported_models] == [BASE_MODEL]
    with pytest.raises(tinker.NotFoundError) as missing:
        rest.list_training_runs().result()
    assert isinstance(missing.value.body, dict)
    assert "is not served by TenSafe's Tinker API" in missing.value.body["detail"]


def test_dropped_connection_during_retrieve_future(tinker_env: Stack) -> None:
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=BASE_MODEL, rank=2, user_metadata={"tensafe.dp.noise_multiplier": "1.0"}
    ).result()
    local = tinker_env.local
    # With the worker down the job stays pending, so the SDK sits in retrieve_future.
    local.kill("trainer-worker")
    try:
        future = training.forward_backward([_datum(20)], "cross_entropy")
        _wait_for_pending_future(tinker_env, kind_suffix="forward_backward")
        local.kill("tinker_api")  # SIGKILL: the open retrieve_future connection drops
        local.restart("tinker_api")
    finally:
        local.restart("trainer-worker")
    output = future.result(timeout=180)
    assert len(output.loss_fn_outputs) == 1
    assert output.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (12,)


def _wait_for_pending_future(stack: Stack, *, kind_suffix: str) -> None:
    """Until the trainer holds a pending future of this kind for the tenant (the SDK's
    submission went through and it is now polling)."""
    token = _jwt_for(stack, stack.tenant.api_key)
    metadata = (("authorization", f"Bearer {token}"),)
    deadline = time.monotonic() + 60
    with open_channel(str(stack.connection["services"]["trainer"])) as channel:
        futures = common_pb2_grpc.FutureServiceStub(channel)
        while time.monotonic() < deadline:
            listed = futures.ListFutures(
                common_pb2.ListFuturesRequest(page_size=50), metadata=metadata
            )
            if any(
                f.kind.endswith(kind_suffix) and f.status == common_pb2.FUTURE_STATUS_PENDING
                for f in listed.futures
            ):
                return
            time.sleep(0.2)
    raise AssertionError(f"no pending {kind_suffix} future appeared ({uuid.uuid4().hex})")


def test_tensafe_tinker_needs_one_address_and_no_tokenizer_folder(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tinker's quickstart through tensafe.tinker with only base_url and api_key: no
    connection file, no local tokenizer folder."""
    from transformers import AutoTokenizer

    from tensafe.tinker import ServiceClient
    from tensafe.tinker import types as tensafe_types

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TENSAFE_CONNECTION_FILE", str(tmp_path / "absent.json"))
    monkeypatch.delenv("TENSAFE_BASE_MODELS_DIR", raising=False)
    monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
    monkeypatch.setenv("TENSAFE_TOKENIZER_CACHE", str(tmp_path / "cache"))
    with ServiceClient(base_url=stack.base_url, api_key=stack.tenant.api_key) as service:
        training = service.create_lora_training_client(base_model=BASE_MODEL, rank=2)
        tokenizer = training.get_tokenizer()
        text = "the cat sat on the mat"
        reference = AutoTokenizer.from_pretrained(str(tiny_path(stack)))
        assert tokenizer.encode(text) == reference.encode(text)
        (cached,) = (tmp_path / "cache").iterdir()
        assert len(cached.name) == 64 and (cached / "tokenizer.json").is_file()
        assert not (cached / "model.safetensors").exists()  # only tokenizer files travel
        tokens = tokenizer.encode(text)
        datum = tensafe_types.Datum(
            model_input=tensafe_types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        training.forward_backward([datum], "cross_entropy").result()
        step = training.optim_step(tensafe_types.AdamParams(learning_rate=1e-3)).result()
        assert step.step == 1 and step.privacy_spent is not None and step.privacy_spent.private


_GET_TOKENIZER = """
import json, sys, tinker
service = tinker.ServiceClient()
training = service.create_lora_training_client(base_model=sys.argv[1], rank=2)
print(json.dumps(training.get_tokenizer().encode(sys.argv[2])))
"""


def test_official_sdk_get_tokenizer_from_the_hub_routes(
    tinker_env: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's own get_tokenizer() (AutoTokenizer.from_pretrained of get_info's
    tokenizer_id) with HF_ENDPOINT = the Tinker API and HF_TOKEN = a TenSafe credential:
    in a fresh process (huggingface_hub reads HF_ENDPOINT at import), in a folder with no
    model folder, with an empty Hugging Face cache."""
    import httpx
    from transformers import AutoTokenizer

    stack = tinker_env
    text = "the cat sat on the mat"
    reference = AutoTokenizer.from_pretrained(str(tiny_path(stack))).encode(text)
    env = {
        **os.environ,
        "HF_ENDPOINT": stack.base_url,
        "HF_TOKEN": stack.tenant.api_key,  # an API key works as well as a JWT
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", _GET_TOKENIZER, BASE_MODEL, text],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == reference
    cached = {p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() or p.is_symlink()}
    assert "tokenizer_config.json" in cached
    assert not any(name.endswith(".safetensors") for name in cached)

    # Weights are never served; files need a credential; unknown models are the Hub's 404.
    jwt_token = _jwt_for(stack, stack.tenant.api_key)
    bearer = {"Authorization": f"Bearer {jwt_token}"}
    resolve = f"{stack.base_url}/{BASE_MODEL}/resolve/main"
    weights = httpx.head(f"{resolve}/model.safetensors", headers=bearer)
    assert weights.status_code == 404 and weights.headers["X-Error-Code"] == "EntryNotFound"
    config = httpx.get(f"{resolve}/tokenizer_config.json", headers=bearer)
    assert config.status_code == 200 and len(config.headers["X-Repo-Commit"]) == 40
    assert config.content == (tiny_path(stack) / "tokenizer_config.json").read_bytes()
    assert httpx.get(f"{resolve}/tokenizer_config.json").status_code == 401
    unknown = httpx.get(f"{stack.base_url}/no-such-model/resolve/main/config.json", headers=bearer)
    assert unknown.status_code == 404 and unknown.headers["X-Error-Code"] == "RepoNotFound"
    commit = config.headers["X-Repo-Commit"]
    at_commit = httpx.get(
        f"{stack.base_url}/{BASE_MODEL}/resolve/{commit}/tokenizer_config.json", headers=bearer
    )
    assert at_commit.status_code == 200 and at_commit.content == config.content
    stale = httpx.get(
        f"{stack.base_url}/{BASE_MODEL}/resolve/{'0' * 40}/tokenizer_config.json", headers=bearer
    )
    assert stale.status_code == 404 and stale.headers["X-Error-Code"] == "RevisionNotFound"
    tree = httpx.get(f"{stack.base_url}/api/models/{BASE_MODEL}/tree/main", headers=bearer).json()
    listed = {entry["path"]: entry["size"] for entry in tree}
    assert listed["tokenizer_config.json"] == len(config.content)
    assert not any(name.endswith(".safetensors") for name in listed)
    info = httpx.get(f"{stack.base_url}/api/models/{BASE_MODEL}", headers=bearer).json()
    assert info["sha"] == commit and {s["rfilename"] for s in info["siblings"]} == set(listed)
