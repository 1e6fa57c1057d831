"""The Tinker-compatible SDK against the real trainer: API + JetStream + worker + SQLite
+ a real tiny Llama model, built the way tests/trainer_service builds it (its config
helper and testkit's key source and token issuer, so the auth interceptor is the real one).

The SDK is synchronous; the server runs on the test's event loop, so each scenario runs
in a worker thread (``asyncio.to_thread``) while the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
import grpc
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe.client import train_cli
from tensafe.client.auth import BearerInterceptor
from tensafe.client.progress import TrainingProgress
from tensafe.client.tiny_model import tiny_corpus
from tensafe.common.auth import AuthInterceptor
from tensafe.common.errors import InvalidArgument
from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.tinker import BudgetExhausted, ServiceClient, types
from tensafe.trainer.server import build_api
from tensafe.trainer.worker import run_worker
from testkit.models import BASE_MODEL, build_base_models, one_torch_thread
from testkit.tokens import RecordedAudit, StaticToken, Tokens
from tests.auth.conftest import Clock, new_kek, start_auth
from tests.trainer_service.conftest import trainer_config

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One torch thread: the API, the worker and the SDK share two cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def base_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_models(tmp_path_factory.mktemp("sdk_base_models"))


@dataclass
class Trainer:
    address: str
    tokens: Tokens
    tenant: str
    database_url: str

    def service(self, base_models_dir: Path) -> ServiceClient:
        provider = StaticToken(self.tokens.token(self.tenant))
        channel = grpc.intercept_channel(
            grpc.insecure_channel(self.address),
            BearerInterceptor(provider),  # type: ignore[arg-type]
        )
        return ServiceClient(channel=channel, base_models_dir=base_models_dir)


@pytest.fixture
async def trainer(tmp_path: Path, base_models_dir: Path) -> AsyncIterator[Trainer]:
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as nats:
        config = trainer_config(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}",
            nats_url=nats.url,
            data_dir=tmp_path / "data",
            base_models_dir=base_models_dir,
        )
        tokens = Tokens()
        interceptor = tokens.interceptor(RecordedAudit(), service="trainer")
        assembly, _ = await build_api(config, interceptors=[interceptor])
        server = GrpcServer(
            config=config, services=assembly.services, interceptors=assembly.interceptors
        )
        port = await server.start()
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(config, stop=stop))
        try:
            yield Trainer(f"127.0.0.1:{port}", tokens, "tenant-sdk-e2e", config.database_url)
        finally:
            stop.set()
            await worker
            await server.stop()
            assert assembly.close is not None
            await assembly.close()


def _reference_rdp_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), steps)
    )
    return float(accountant.get_epsilon(delta))


def _datums(tokenizer: Any, count: int) -> list[types.Datum]:
    """Tinker's minimal-loop datums: inputs tokens[:-1], targets tokens[1:], weight 1."""
    lines = tiny_corpus()
    data = []
    for index in range(count):
        tokens = tokenizer.encode(lines[index] + " " + lines[index + 1])[:32]
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return data


def _mean_nll(output: types.ForwardBackwardOutput, data: list[types.Datum]) -> float:
    return train_cli.mean_nll(output, data)


async def test_tinker_minimal_loop_trains_checkpoints_and_samples(
    trainer: Trainer, base_models_dir: Path
) -> None:
    steps, sigma = 12, 0.6

    def scenario() -> dict[str, Any]:
        with trainer.service(base_models_dir) as service:
            assert [m.model_name for m in service.get_server_capabilities().supported_models] == [
                BASE_MODEL
            ]
            training_client = service.create_lora_training_client(
                base_model=BASE_MODEL,
                rank=8,
                seed=3,
                train_mlp=True,
                lora_alpha=16,
                dp_noise_multiplier=sigma,
            )
            tokenizer = training_client.get_tokenizer()
            data = _datums(tokenizer, 16)
            before = _mean_nll(training_client.forward(data, "cross_entropy").result(), data)
            for _ in range(steps):
                fwd_bwd_future = training_client.forward_backward(data, loss_fn="cross_entropy")
                optim_future = training_client.optim_step(types.AdamParams(learning_rate=5e-2))
                fwd_bwd_result = fwd_bwd_future.result()
                optim_result = optim_future.result()
            after = _mean_nll(training_client.forward(data, "cross_entropy").result(), data)
            saved = training_client.save_state("after-training").result()
            sampler = training_client.save_weights_and_get_sampling_client("frozen")
            prompt = types.ModelInput.from_ints(tokenizer.encode("the cat"))
            sampled = sampler.sample(
                prompt=prompt,
                num_samples=2,
                sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=11),
            ).result()
            prompt_logprobs = sampler.compute_logprobs(prompt).result()
            # One more step, then back to the checkpoint: the frozen sampler's scores of
            # the saved weights must come back exactly.
            training_client.forward_backward(data, "cross_entropy").result()
            training_client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
            restored = training_client.load_state(saved.path).result()
            scored_again = training_client.save_weights_and_get_sampling_client("restored")
            restored_logprobs = scored_again.compute_logprobs(prompt).result()
            resumed = service.create_training_client_from_state(saved.path)
            return {
                "resumed": (
                    resumed.model_id != training_client.model_id,
                    resumed.get_info(),
                    resumed.get_privacy_spent(),
                ),
                "before": before,
                "after": after,
                "fb": fwd_bwd_result,
                "optim": optim_result,
                "spent": training_client.get_privacy_spent(),
                "saved": saved,
                "restored": restored,
                "sampled": sampled,
                "prompt": prompt,
                "prompt_logprobs": prompt_logprobs,
                "restored_logprobs": restored_logprobs,
                "info": training_client.get_info(),
            }

    out = await asyncio.to_thread(scenario)
    assert out["after"] < out["before"] - 0.05, (out["before"], out["after"])
    assert len(out["fb"].loss_fn_outputs) == 16 and "logprobs" in out["fb"].loss_fn_outputs[0]
    expected = _reference_rdp_epsilon(sigma, steps, 1e-5)
    assert out["optim"].step == steps
    assert out["optim"].privacy_spent.epsilon == pytest.approx(expected, rel=1e-6)
    spent = out["spent"]
    assert spent.private and spent.accountant == "rdp" and spent.delta == 1e-5
    assert spent.steps == steps + 1  # the extra step is charged; loading never refunds
    assert spent.epsilon > expected
    assert out["saved"].step == steps and out["restored"].step == steps
    assert len(out["sampled"].sequences) == 2
    for sequence in out["sampled"].sequences:
        assert 1 <= len(sequence.tokens) <= 6
        assert len(sequence.logprobs) == len(sequence.tokens)
        assert all(lp <= 0.0 for lp in sequence.logprobs)
        assert sequence.stop_reason in ("length", "stop")
    logprobs = out["prompt_logprobs"]
    assert len(logprobs) == out["prompt"].length and logprobs[0] is None
    assert all(lp is not None and lp < 0 for lp in logprobs[1:])
    assert out["restored_logprobs"] == pytest.approx(logprobs, abs=1e-5)
    assert out["info"].model_data.model_name == BASE_MODEL and out["info"].model_data.private
    new_client, resumed_info, resumed_spent = out["resumed"]
    assert new_client and resumed_info.model_data.step == steps
    # The new client's weights carry the checkpoint's 12 steps (not the 13th, taken
    # after the checkpoint): epsilon follows the weights.
    assert (resumed_spent.steps, resumed_spent.inherited_steps) == (steps, steps)
    assert resumed_spent.epsilon == pytest.approx(expected, rel=1e-6)


async def test_forward_backward_custom_sends_the_loss_gradient_as_linear_weights(
    trainer: Trainer, base_models_dir: Path
) -> None:
    import torch

    def squared_sums(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # Non-linear per datum: dC/dlp_t = 2 S_d, so the surrogate -Σ w·lp with
        # w = -dC/dlp = -2 S_d sums to 2 Σ S_d² = 2 C (weights of the wrong sign: -2 C).
        sums = torch.stack([lp.sum() for lp in logprobs])
        return (sums**2).sum(), {"custom/mean_sum": float(sums.detach().mean())}

    def scenario() -> dict[str, Any]:
        with trainer.service(base_models_dir) as service:
            client = service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, dp_noise_multiplier=1.0
            )
            data = _datums(client.get_tokenizer(), 3)
            forward = client.forward(data, "cross_entropy").result()
            custom = client.forward_backward_custom(data, squared_sums)
            step = client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            return {"forward": forward, "custom": custom.result(), "step": step}

    out = await asyncio.to_thread(scenario)
    sums = [float(o["logprobs"].to_numpy().sum()) for o in out["forward"].loss_fn_outputs]
    metrics = out["custom"].metrics
    assert metrics["loss:sum"] == pytest.approx(sum(x * x for x in sums), rel=1e-4)
    assert metrics["surrogate_loss:sum"] == pytest.approx(2 * metrics["loss:sum"], rel=1e-4)
    assert metrics["custom/mean_sum"] == pytest.approx(sum(sums) / 3, rel=1e-4)
    # A DP step over the surrogate: charged like any other.
    assert out["step"].step == 1 and out["step"].privacy_spent.epsilon > 0


async def test_cispo_and_dro_train_and_stable_reinforce_is_refused(
    trainer: Trainer, base_models_dir: Path
) -> None:
    def rl_datum(tokens: list[int], advantage: float) -> types.Datum:
        n = len(tokens) - 1
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "logprobs": [-2.0] * n,
                "advantages": [advantage] * n,
            },
        )

    def scenario() -> tuple[dict[str, float], dict[str, float], InvalidArgument]:
        with trainer.service(base_models_dir) as service:
            client = service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, dp_noise_multiplier=1.0
            )
            tokens = client.get_tokenizer().encode(" ".join(tiny_corpus()[:3]))[:12]
            data = [rl_datum(tokens, 1.0), rl_datum(tokens[:8], -0.5)]
            cispo = client.forward_backward(data, "cispo", {"clip_high_threshold": 1.1}).result()
            client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            dro = client.forward_backward(data, "dro", {"beta": 0.1}).result()
            with pytest.raises(InvalidArgument) as refused:
                client.forward_backward(data, "stable_reinforce").result()  # type: ignore[arg-type]
            return cispo.metrics, dro.metrics, refused.value

    cispo, dro, refused = await asyncio.to_thread(scenario)
    assert math.isfinite(cispo["loss:sum"]) and math.isfinite(dro["loss:sum"])
    assert refused.field == "loss_fn" and "not published" in str(refused)


async def test_the_cookbooks_calls_run_as_written_for_tinker(
    trainer: Trainer, base_models_dir: Path
) -> None:
    def scenario() -> tuple[Any, Any, Any]:
        with trainer.service(base_models_dir) as service:
            # Tinker 0.38: create_* return futures of the clients.
            client = service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, dp_noise_multiplier=1.0
            ).result()
            saved = client.save_state("cookbook", ttl_seconds=3600).result()
            sampler_path = client.save_weights_for_sampler("cb", ttl_seconds=None).result().path
            resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
            sampler = client.save_weights_and_get_sampling_client(
                record_stability_info=False
            ).result()
            sample = sampler.sample(
                types.ModelInput.from_ints([5, 6, 7]),
                num_samples=3,
                sampling_params=types.SamplingParams(max_tokens=3, seed=1),
            ).result()
            return resumed, sampler_path, sample

    resumed, sampler_path, sample = await asyncio.to_thread(scenario)
    assert resumed.model_id and sampler_path.endswith("/sampler_weights/cb")
    ids = [sequence.sequence_id for sequence in sample.sequences]
    assert len(set(ids)) == 3 and all(i and i.endswith(f".{n}") for n, i in enumerate(ids))


async def test_budget_refusal_is_a_typed_error(trainer: Trainer, base_models_dir: Path) -> None:
    one_step = _reference_rdp_epsilon(1.0, 1, 1e-5)

    def scenario() -> tuple[int, BudgetExhausted]:
        with trainer.service(base_models_dir) as service:
            client = service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, epsilon_budget=one_step * 1.01
            )
            data = _datums(client.get_tokenizer(), 2)
            client.forward_backward(data, "cross_entropy").result()
            first = client.optim_step(types.AdamParams()).result()
            client.forward_backward(data, "cross_entropy").result()
            with pytest.raises(BudgetExhausted) as info:
                client.optim_step(types.AdamParams()).result()
            return first.step, info.value

    step, error = await asyncio.to_thread(scenario)
    assert step == 1 and error.reason == "PRIVACY_BUDGET_EXHAUSTED"


async def test_train_command_loop_prints_loss_and_epsilon(
    trainer: Trainer, base_models_dir: Path, tmp_path: Path
) -> None:
    data_file = tmp_path / "texts.jsonl"
    data_file.write_text("\n".join(json.dumps({"text": line}) for line in tiny_corpus()[:12]))
    out, err = io.StringIO(), io.StringIO()
    metrics_file = tmp_path / "metrics.jsonl"

    def scenario() -> list[train_cli.StepRecord]:
        with trainer.service(base_models_dir) as service:
            client = service.create_lora_training_client(base_model=BASE_MODEL, rank=4)
            tokenizer = client.get_tokenizer()
            corpus = train_cli.build_corpus(
                train_cli.read_texts(data_file), tokenizer.encode, max_length=32
            )
            datums = [train_cli.to_datum(tokens) for tokens in corpus.sequences]
            return train_cli.train(
                client,
                datums,
                steps=3,
                batches=train_cli.Batches(size=4, count=len(datums), rng=random.Random(0)),
                adam_params=types.AdamParams(learning_rate=1e-2),
                out=out,
                progress=TrainingProgress(3, stream=err, metrics_file=metrics_file),
            )

    records = await asyncio.to_thread(scenario)
    assert [r.step for r in records] == [1, 2, 3]
    expected = [_reference_rdp_epsilon(1.0, n, 1e-5) for n in (1, 2, 3)]
    assert [r.epsilon for r in records] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(r.loss) and r.loss > 0 for r in records)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[2].startswith("step    3/3  loss ")
    # tqdm's bar on stderr ends at 3/3 with the last loss and ε in it.
    assert "3/3" in err.getvalue()
    assert f"ε {records[-1].epsilon:.4f}" in err.getvalue()
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["epsilon"] for m in metrics] == pytest.approx(expected, rel=1e-6)
    assert [m["loss"] for m in metrics] == [r.loss for r in records]


async def test_tensafe_train_command_end_to_end_with_api_key(
    tmp_path: Path, base_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tensafe train` as a user runs it: connection file + API key, exchanged for tokens
    at the real auth service, which the trainer's interceptor verifies."""
    auth_server, domain, auth_db, verifier = await start_auth(
        f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}", tmp_path, kek=new_kek(), clock=Clock()
    )
    bootstrap = await domain.bootstrap(tenant_name="acme", admin_name="alice")
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as nats:
        config = trainer_config(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}",
            nats_url=nats.url,
            data_dir=tmp_path / "data",
            base_models_dir=base_models_dir,
        )
        interceptor = AuthInterceptor(verifier, RecordedAudit(), service="trainer")
        assembly, _ = await build_api(config, interceptors=[interceptor])
        server = GrpcServer(
            config=config, services=assembly.services, interceptors=assembly.interceptors
        )
        port = await server.start()
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(config, stop=stop))
        connection_file = tmp_path / "connection.json"
        connection_file.write_text(
            json.dumps(
                {
                    "services": {
                        "trainer": f"127.0.0.1:{port}",
                        "auth": f"127.0.0.1:{auth_server.port}",
                    },
                    "api_key": bootstrap.admin_api_key,
                }
            )
        )
        data_file = tmp_path / "texts.jsonl"
        data_file.write_text("\n".join(json.dumps({"text": t}) for t in tiny_corpus()[:10]))
        monkeypatch.setenv("TENSAFE_CONNECTION_FILE", str(connection_file))
        monkeypatch.setenv("TENSAFE_BASE_MODELS_DIR", str(base_models_dir))
        monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
        argv = ["train", str(data_file), "--base-model", BASE_MODEL, "--steps", "2"]
        argv += ["--batch-size", "3", "--rank", "4", "--target-epsilon", "20"]
        argv += ["--save-state", "final"]
        out, err = io.StringIO(), io.StringIO()

        def run_cli() -> int:
            from contextlib import redirect_stderr, redirect_stdout

            from tensafe.client.cli import main

            with redirect_stdout(out), redirect_stderr(err):
                return main(argv)

        try:
            code = await asyncio.to_thread(run_cli)
        finally:
            stop.set()
            await worker
            await server.stop()
            assert assembly.close is not None
            await assembly.close()
            await auth_server.stop()
            await verifier.close()
            await auth_db.dispose()
    assert code == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert "(DP-SGD)" in lines[0]
    assert [line.split()[1] for line in lines[1:3]] == ["1/2", "2/2"]
    assert lines[3].startswith("checkpoint: tensafe://") and lines[3].endswith("(step 2)")
    assert lines[4].startswith("privacy spent: ε = ") and "rdp, 2 steps" in lines[4]
    epsilon = float(lines[4].split("ε = ")[1].split()[0])
    assert 19.0 <= epsilon <= 20.0 + 1e-4  # target_epsilon over the planned 2 steps


async def test_epsilon_follows_the_weights_across_clients(
    trainer: Trainer, base_models_dir: Path
) -> None:
    """Issue 14's repro: client B loads client A's checkpoint. B's epsilon composes A's
    steps too, A's budget keeps applying, and B's certificate lists every step."""
    sigma, budget = 1.0, 17.0
    reference = [_reference_rdp_epsilon(sigma, steps, 1e-5) for steps in range(1, 12)]
    crossing = next(n for n, epsilon in enumerate(reference, start=1) if epsilon > budget)
    assert crossing > 5  # B gets at least one step before A's budget refuses it

    def scenario() -> dict[str, Any]:
        with trainer.service(base_models_dir) as service:
            first = service.create_lora_training_client(
                base_model=BASE_MODEL,
                rank=4,
                seed=1,
                dp_noise_multiplier=sigma,
                epsilon_budget=budget,
            )
            data = _datums(first.get_tokenizer(), 2)
            for _ in range(4):
                first.forward_backward(data, "cross_entropy").result()
                first.optim_step(types.AdamParams()).result()
            saved = first.save_state("after-four").result()
            # B: a new client with no budget of its own and a looser delta.
            second = service.create_lora_training_client(
                base_model=BASE_MODEL,
                rank=4,
                seed=2,
                dp_noise_multiplier=sigma,
            )
            second.load_state(saved.path).result()
            loaded = second.get_privacy_spent()
            epsilons = []
            refused: BudgetExhausted | None = None
            for _ in range(crossing):
                second.forward_backward(data, "cross_entropy").result()
                try:
                    epsilons.append(
                        second.optim_step(types.AdamParams()).result().privacy_spent.epsilon
                    )
                except BudgetExhausted as error:
                    refused = error
                    break
            # Loading A's checkpoint again never counts its history twice.
            second.load_state(saved.path).result()
            return {
                "loaded": loaded,
                "epsilons": epsilons,
                "refused": refused,
                "again": second.get_privacy_spent(),
                "first": first.get_privacy_spent(),
                "second_id": second.model_id,
                "first_id": first.model_id,
            }

    out = await asyncio.to_thread(scenario)
    loaded = out["loaded"]
    assert (loaded.steps, loaded.inherited_steps) == (4, 4)
    assert loaded.epsilon == pytest.approx(reference[3], rel=1e-6)
    assert loaded.epsilon_budget == budget  # A's budget applies to its weights
    assert out["epsilons"] == pytest.approx(reference[4 : crossing - 1], rel=1e-6)
    assert out["refused"] is not None and out["refused"].reason == "PRIVACY_BUDGET_EXHAUSTED"
    again = out["again"]
    assert again.steps == crossing - 1 and again.epsilon == pytest.approx(
        reference[crossing - 2], rel=1e-6
    )
    assert out["first"].steps == 4  # A's own account is unchanged

    # The certificate SaveAdapter would seal for B (the publisher's exact inputs).
    from tensafe.common.db import Database
    from tensafe.trainer.domain.ledger import PrivacyLedger
    from tensafe.trainer.publisher import dp_certificate
    from tensafe.trainer.store.sql import TrainerTransaction

    database = Database.from_url(trainer.database_url)
    ledger = PrivacyLedger()
    try:
        async with database.transaction(read_only=True) as session:
            tx = TrainerTransaction(session)
            row = await tx.client(out["second_id"])
            assert row is not None
            history = await ledger.history(tx, row)
            certificate = dp_certificate(row, history, ledger.report(row))
    finally:
        await database.dispose()
    assert certificate.steps == crossing - 1  # type: ignore[union-attr]
    assert {(g.training_client_id, g.steps) for g in certificate.history} == {  # type: ignore[union-attr]
        (out["first_id"], 4),
        (out["second_id"], crossing - 5),
    }
    assert certificate.epsilon == pytest.approx(reference[crossing - 2], rel=1e-6)  # type: ignore[union-attr]


async def test_the_sdk_warns_once_when_epsilon_passes_ten_without_a_budget(
    trainer: Trainer, base_models_dir: Path
) -> None:
    """The default sigma (1.0) spends epsilon ~13.8 in six client-batch steps; the SDK
    says so once, with the figure, when a step passes HIGH_EPSILON with no budget."""
    import warnings

    from tensafe.tinker import HIGH_EPSILON, PrivacyWarning

    crossing = next(n for n in range(1, 20) if _reference_rdp_epsilon(1.0, n, 1e-5) > HIGH_EPSILON)

    def scenario() -> list[warnings.WarningMessage]:
        with (
            trainer.service(base_models_dir) as service,
            warnings.catch_warnings(record=True) as seen,
        ):
            warnings.simplefilter("always")
            client = service.create_lora_training_client(base_model=BASE_MODEL, rank=4)
            data = _datums(client.get_tokenizer(), 1)
            for _ in range(crossing + 1):
                client.forward_backward(data, "cross_entropy").result()
                client.optim_step(types.AdamParams()).result()
            service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, target_epsilon=20.0, planned_steps=10
            )
            return [w for w in seen if issubclass(w.category, PrivacyWarning)]

    seen = await asyncio.to_thread(scenario)
    assert len(seen) == 2, [str(w.message) for w in seen]
    assert f"after {crossing} DP step(s)" in str(seen[0].message)
    assert "up to epsilon 20" in str(seen[1].message)
