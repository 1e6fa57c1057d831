"""Train → SaveAdapter → registry → open / HE-LoRA, on the real local stack.

One ``tensafe up`` stack (every service its own process, real NATS JetStream, SQLite,
the shared KEK folder, the trainer's own signing key trusted by the registry) serves the
module. A tenant made by the platform admin DP-trains a LoRA adapter through the SDK and
publishes it with ``save_adapter``; the tests then check that

* the package the tenant downloads and opens holds tensors bit-identical to the
  adapter the worker trained (its committed state), gives the same log-probabilities
  as the trainer when loaded into peft, and carries the ledger's DP certificate;
* an HE-LoRA session on the registry adapter (loaded by the HE runtime acting for the
  tenant) generates exactly the tokens of plaintext LoRA;
* another tenant can neither download the adapter nor open an HE session on it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensafe import tgsp
from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.he import HeLoraModel, open_he_runtime
from tensafe.client.registry import RegistryClient
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model, tiny_corpus, weights_digest
from tensafe.client.train_cli import build_corpus, to_datum
from tensafe.common.db import Database
from tensafe.common.errors import FailedPrecondition, NotFound
from tensafe.common.registry_client import RegistryClient as ServiceRegistryClient
from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb
from tensafe.tinker import ServiceClient, types
from tensafe.trainer.base_models import BaseModelRegistry
from tensafe.trainer.domain.engine.state import decode_state
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.domain.ledger import PrivacyLedger
from tensafe.trainer.domain.settings import lora_from_json
from tensafe.trainer.publisher import AdapterPublisher
from tensafe.trainer.store.models import JobRow, TrainingClientRow

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BASE_MODEL = "tiny-llama"
STEPS = 2
NEW_TOKENS = 6
PROMPT = "The river ran past the old"


@dataclasses.dataclass(frozen=True)
class Trained:
    data_dir: Path
    connection_file: Path
    tenant: TenantCredentials
    client_id: str
    adapter_name: str
    version: int
    package_sha256: str
    privacy: types.PrivacySpent
    probe: types.Datum
    server_logprobs: list[float]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    data_dir = tmp_path_factory.mktemp("stack")
    # The randomly initialised tiny model: its adapter visibly changes greedy tokens,
    # which the HE test below relies on (the demo's pretrained one need not).
    build_tiny_model(data_dir / "models" / BASE_MODEL, seed=0)
    with LocalStack(StackOptions(data_dir=data_dir)) as stack:
        stack.start()
        connection_file = stack.connection_file
        tenant = create_tenant(connection_file, name="integration")
        with ServiceClient(api_key=tenant.api_key, connection_file=connection_file) as service:
            client = service.create_lora_training_client(
                base_model=BASE_MODEL, rank=4, lora_alpha=8.0, dp_noise_multiplier=1.0
            )
            tokenizer = client.get_tokenizer()
            corpus = build_corpus(tiny_corpus()[:64], tokenizer.encode, max_length=32)
            datums = [to_datum(tokens) for tokens in corpus.sequences]
            rng = random.Random(0)
            for _ in range(STEPS):
                batch = rng.sample(datums, 8)
                client.forward_backward(batch, "cross_entropy")
                client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
            probe = datums[0]
            output = client.forward([probe], "cross_entropy").result()
            server_logprobs = [float(v) for v in output.loss_fn_outputs[0]["logprobs"].data]
            saved = client.save_adapter("integration-adapter").result()
            privacy = client.get_privacy_spent()
            yield Trained(
                data_dir=data_dir,
                connection_file=connection_file,
                tenant=tenant,
                client_id=str(client.model_id),
                adapter_name=saved.adapter_name,
                version=saved.version,
                package_sha256=saved.package_sha256,
                privacy=privacy,
                probe=probe,
                server_logprobs=server_logprobs,
            )


def _trained_adapter(trained: Trained) -> dict[str, torch.Tensor]:
    """The adapter the worker committed, from its latest state object, in PEFT names."""
    states = sorted(
        (trained.data_dir / "objects" / "trainer" / "trainer" / "states" / trained.client_id).glob(
            "*.safetensors"
        )
    )
    tensors, _ = decode_state(states[-1].read_bytes())
    return {
        name.removeprefix("lora/").replace(".default.weight", ".weight"): tensor
        for name, tensor in tensors.items()
        if name.startswith("lora/")
    }


def _token_logprobs(model: Any, datum: types.Datum) -> list[float]:
    inputs = torch.tensor([datum.model_input.to_ints()])
    targets = torch.tensor([datum.loss_fn_inputs["target_tokens"].data])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[0, :, 0]
    return [float(v) for v in logprobs]


def _greedy(model: Any, input_ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, input_ids.shape[1] :]]


def test_published_adapter_is_the_trained_one_with_the_ledgers_certificate(
    trained: Trained, tmp_path: Path
) -> None:
    model_dir = trained.data_dir / "models" / BASE_MODEL
    with RegistryClient.connect(
        connection_file=trained.connection_file, api_key=trained.tenant.api_key
    ) as registry:
        downloaded = registry.download(trained.adapter_name, version=trained.version)
        assert downloaded.version.package_sha256 == trained.package_sha256
        opened = registry.open(trained.adapter_name, version=trained.version)
        peft_model = registry.load_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir), trained.adapter_name
        ).eval()
        signers = {key.key_id for key in registry.signing_keys()}
    trainer_key = tgsp.VerifyingKey.from_pem(
        (trained.data_dir / "keys" / "trainer-signing-key.pub.pem").read_bytes()
    )
    assert opened.signer_key_id == trainer_key.key_id and trainer_key.key_id in signers

    trained_tensors = _trained_adapter(trained)
    package_tensors = opened.torch_tensors()
    assert sorted(package_tensors) == sorted(trained_tensors) and len(package_tensors) == 32
    for name, tensor in trained_tensors.items():
        assert torch.equal(package_tensors[name], tensor), name
    assert any(bool(t.abs().sum() > 0) for n, t in package_tensors.items() if "lora_B" in n)

    local = _token_logprobs(peft_model, trained.probe)
    assert local == pytest.approx(trained.server_logprobs, abs=1e-5)

    manifest = opened.manifest
    certificate = manifest.dp_certificate
    assert isinstance(certificate, tgsp.DPGuarantee)
    assert certificate.steps == STEPS == trained.privacy.steps
    assert certificate.epsilon == pytest.approx(trained.privacy.epsilon, rel=1e-12)
    assert certificate.epsilon > 0
    assert (certificate.delta, certificate.noise_multiplier) == (trained.privacy.delta, 1.0)
    assert isinstance(certificate.sampling, tgsp.ClientBatches) and certificate.assumptions
    assert manifest.base_model.model_id == BASE_MODEL
    assert manifest.base_model.weights_sha256 == weights_digest(model_dir)
    assert manifest.provenance.tenant_id == trained.tenant.tenant_id
    assert manifest.provenance.training_client_id == trained.client_id
    assert (manifest.lora.rank, manifest.lora.alpha) == (4, 8.0)
    tgsp.write_peft_dir(opened, tmp_path / "exported")
    assert (
        '"base_model_name_or_path": "tiny-llama"'
        in (tmp_path / "exported" / "adapter_config.json").read_text()
    )


def test_he_lora_on_the_registry_adapter_equals_plaintext_lora(trained: Trained) -> None:
    model_dir = trained.data_dir / "models" / BASE_MODEL
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with RegistryClient.connect(
        connection_file=trained.connection_file, api_key=trained.tenant.api_key
    ) as registry:
        opened = registry.open(trained.adapter_name, version=trained.version)
    adapter_dir = model_dir.parent.parent / "exported-for-he"
    tgsp.write_peft_dir(opened, adapter_dir)
    lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)
    ).eval()
    lora_tokens = _greedy(lora, input_ids)
    base_tokens = _greedy(AutoModelForCausalLM.from_pretrained(model_dir).eval(), input_ids)
    assert lora_tokens != base_tokens  # the adapter matters: a zero HE delta would fail

    rpc = open_he_runtime(api_key=trained.tenant.api_key, connection_file=trained.connection_file)
    he_model = HeLoraModel.create(
        AutoModelForCausalLM.from_pretrained(model_dir).eval(),
        rpc,
        adapter_name=trained.adapter_name,
        adapter_version=trained.version,
        rank=opened.manifest.lora.rank,
        alpha=opened.manifest.lora.alpha,
        target_modules=opened.manifest.lora.target_modules,
    )
    try:
        he_tokens = _greedy(he_model.model, input_ids)
        calls = sum(s.calls for s in he_model.session.stats.values())
    finally:
        he_model.close()
        rpc.close()
    assert he_tokens == lora_tokens
    assert calls == len(he_model.session.layers) * NEW_TOKENS == 16 * NEW_TOKENS


def test_another_tenant_can_neither_download_nor_run_the_adapter(trained: Trained) -> None:
    other = create_tenant(trained.connection_file, name="other")
    with (
        RegistryClient.connect(
            connection_file=trained.connection_file, api_key=other.api_key
        ) as registry,
        pytest.raises(NotFound),
    ):
        registry.download(trained.adapter_name, version=trained.version)
    model_dir = trained.data_dir / "models" / BASE_MODEL
    rpc = open_he_runtime(api_key=other.api_key, connection_file=trained.connection_file)
    try:
        with pytest.raises(NotFound):
            HeLoraModel.create(
                AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                rpc,
                adapter_name=trained.adapter_name,
                adapter_version=trained.version,
                rank=4,
                alpha=8.0,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            )
    finally:
        rpc.close()


async def test_a_redelivered_save_adapter_publishes_the_same_bytes(trained: Trained) -> None:
    """A worker that published and died before committing: the next attempt of the same
    job (same future id) must get the same version back, not a second one or an error."""
    credentials = json.loads((trained.data_dir / "credentials.json").read_text())
    connection = json.loads(trained.connection_file.read_text())
    database = Database.from_url(f"sqlite+aiosqlite:///{trained.data_dir / 'db' / 'trainer.db'}")
    staging = trained.data_dir / "publisher-test-staging"
    publisher = AdapterPublisher(
        database=database,
        base_models=BaseModelRegistry(trained.data_dir / "models"),
        registry=ServiceRegistryClient.connect(
            registry_url=connection["services"]["registry"],
            auth_url=connection["services"]["auth"],
            service_api_key=credentials["service_api_keys"]["trainer"],
        ),
        kek_provider=tgsp.LocalFileKekProvider(Path(connection["kek_dir"])),
        signing_key=tgsp.SigningKey.from_pem(
            (trained.data_dir / "keys" / "trainer-signing-key.pem").read_bytes()
        ),
        staging_dir=staging,
        ledger=PrivacyLedger(),
        dev_mode=False,
    )
    try:
        async with database.transaction(read_only=True) as session:
            client = await session.get(TrainingClientRow, trained.client_id)
        assert client is not None
        lora, seed = lora_from_json(client.lora_json)
        engine = LoraTrainingEngine(
            trained.data_dir / "models" / BASE_MODEL, lora=lora, dp=None, seed=seed
        )
        job = JobRow(future_id=uuid.uuid4().hex, tenant=trained.tenant.tenant_id)
        request = trainer_pb.SaveAdapterRequest(
            training_client_id=trained.client_id, adapter_name="redelivered"
        )
        first = await publisher.publish(job=job, client=client, engine=engine, request=request)
        again = await publisher.publish(job=job, client=client, engine=engine, request=request)
        assert (again.version, again.package_sha256) == (first.version, first.package_sha256)
        publisher.forget(job.future_id)
        assert not list(staging.iterdir())
        # Sealing again gives other bytes (a fresh data key), which the registry refuses
        # under the same request id: this is why the sealed bytes are kept until commit.
        with pytest.raises(FailedPrecondition, match="request_id"):
            await publisher.publish(job=job, client=client, engine=engine, request=request)
        engine.close()
    finally:
        await publisher.close()
        await database.dispose()
