"""One real local stack for the fuzz tests, seeded with objects the fuzzer can name.

``tensafe up``'s :class:`~tensafe.client.stack.LocalStack` runs every service as its own
process (SQLite, or PostgreSQL with ``TENSAFE_FUZZ_DATABASE=postgresql``; embedded NATS,
local objects). Before the fuzzer starts, the platform
admin creates a *caller* tenant, which DP-trains one step on the tiny model, saves a
state, publishes an adapter, uploads a dataset and opens an HE session on the adapter,
and a separate *victim* tenant with a principal and an API key. Their ids and names go
into the fuzzer's :class:`Pool`; valid requests and complete valid request streams
(real CKKS keys, the signed package, a dataset) are kept for mutation.
The caller's own ids are kept out of the auth part of the pool: a fuzzed
``DisablePrincipal`` on the caller would otherwise end every later call with
UNAUTHENTICATED and hide the RPCs behind it.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from tensafe.client.auth import TokenProvider, find_api_key
from tensafe.client.connection import Connection, load_connection
from tensafe.client.datasets import DatasetClient
from tensafe.client.demo import create_tenant
from tensafe.client.he import HeLoraSession, open_he_runtime, plan_spec
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model
from tensafe.client.train_cli import to_datum
from tensafe.helora.client import HeLoraClient
from tensafe.helora.params import default_params
from tensafe.helora.plan import choose_plan
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.he.v1 import he_service_pb2 as he_pb
from tensafe.proto.registry.v1 import registry_service_pb2 as registry_pb
from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb
from tensafe.tinker import ServiceClient, types
from testkit.postgres import postgres_database

from .strategies import Pool

BASE_MODEL = "tiny-llama"

STATE_NAME = "fuzz-state"
ADAPTER_NAME = "fuzz-adapter"
DATASET_NAME = "fuzz-dataset"
DATASET_JSONL = b'{"text": "the river ran past the old mill"}\n' * 4
HIDDEN_SIZE = 256
"""The tiny model's hidden size (its adapted attention projections are square)."""


@dataclasses.dataclass
class FuzzTarget:
    """The running stack and what the fuzzer knows about it.

    Attributes:
        data_dir: The stack's data dir (``db/<svc>.db``, ``objects/<svc>``, ``logs``).
        connection: Its connection file.
        channels: A channel per stack service (auth, registry, he_runtime, trainer).
        tokens: Token providers of the platform ``admin`` and the caller ``tenant``.
        pool: Real ids and names.
        bases: Valid requests per method path, for :func:`strategies.mutated`.
        streams: A complete valid request stream per client-streaming method path
            (real CKKS keys, a real signed package, a real dataset), to corrupt.
        pids: The stack's processes (services and the trainer worker) by pid.
    """

    data_dir: Path
    connection: Connection
    channels: dict[str, grpc.Channel]
    tokens: dict[str, TokenProvider]
    pool: Pool
    bases: dict[str, list[Message]]
    streams: dict[str, list[Message]]
    pids: dict[int, str]


def _stack_processes() -> dict[int, str]:
    """Our child processes that run a TenSafe module (pid → command line)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and "tensafe." in command:
            found[int(entry.name)] = command.strip()
    return found


def _seed_victim(auth: grpc.Channel, admin: TokenProvider, pool: Pool) -> None:
    """A second tenant with a principal and an API key, for the auth RPCs to act on."""
    stub = auth_service_pb2_grpc.AuthServiceStub(auth)
    metadata = (("authorization", f"Bearer {admin.token()}"),)
    tenant = stub.CreateTenant(
        auth_pb.CreateTenantRequest(display_name="fuzz-victim", request_id=uuid.uuid4().hex),
        metadata=metadata,
    ).tenant
    principal = stub.CreatePrincipal(
        auth_pb.CreatePrincipalRequest(
            kind=auth_pb.PRINCIPAL_KIND_USER,
            name="victim",
            roles=[auth_pb.ROLE_TRAINER],
            tenant_id=tenant.id,
            request_id=uuid.uuid4().hex,
        ),
        metadata=metadata,
    ).principal
    key = stub.CreateApiKey(
        auth_pb.CreateApiKeyRequest(principal_id=principal.id, description="victim"),
        metadata=metadata,
    )
    pool.add(tenant.id, fields=("tenant_id",))
    pool.add(principal.id, fields=("principal_id",))
    pool.add(key.api_key.id, fields=("api_key_id",))
    pool.add(key.secret, fields=("api_key",))
    pool.add(key.api_key.prefix)


def _chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _seed_caller(
    data_dir: Path, connection_file: Path, api_key: str, pool: Pool
) -> tuple[dict[str, list[Message]], dict[str, list[Message]]]:
    """Train one DP step, save a state, publish an adapter, upload a dataset, open an
    HE session; returns valid requests and valid streams to fuzz from."""
    with ServiceClient(api_key=api_key, connection_file=connection_file) as service:
        client = service.create_lora_training_client(
            base_model=BASE_MODEL, rank=2, lora_alpha=4.0, dp_noise_multiplier=1.0
        )
        client.forward_backward([to_datum([1, 2, 3, 4, 5])], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        state = client.save_state(STATE_NAME).result()
        saved = client.save_adapter(ADAPTER_NAME).result()
        dataset = DatasetClient(service.rpc).upload(
            DATASET_JSONL,
            name=DATASET_NAME,
            base_model=BASE_MODEL,
            record_format="text",
        )
        client_id = str(client.model_id)
        pool.add(client_id, fields=("training_client_id",))
        pool.add(BASE_MODEL, fields=("base_model",))
        pool.add(state.path, fields=("path", "model_path"))
        pool.add(saved.adapter_name, fields=("adapter_name",))
        pool.add(dataset.id, fields=("dataset_id",))
        pool.add("latest", "stable", fields=("alias",))
        pool.add("cross_entropy", fields=("loss_fn",))
        pool.integers.append(saved.version)
    he = open_he_runtime(api_key=api_key, connection_file=connection_file)
    try:
        session = HeLoraSession.create(
            he,
            adapter_name=saved.adapter_name,
            adapter_version=saved.version,
            rank=2,
            alpha=4.0,
            hidden_size=HIDDEN_SIZE,
            output_size=HIDDEN_SIZE,
        ).session
    finally:
        he.close()
    pool.add(session.id, fields=("session_id",))
    # A header with real CKKS public material, so fuzzed key chunks reach SEAL's parser.
    params = default_params()
    shapes = {"hidden_size": HIDDEN_SIZE, "output_size": HIDDEN_SIZE, "rank": 2, "alpha": 4.0}
    plan, _ = choose_plan(tokens=1, params=params, **shapes)
    material = HeLoraClient(params).public_material(plan)
    sealed_header = he_pb.CreateSessionHeader(
        adapter_name=saved.adapter_name,
        adapter_version=saved.version,
        spec=plan_spec(tokens=1, params=params, packing=None, **shapes),
        seal_parameters=material.parameters,
        galois_keys_size=len(material.galois_keys or b""),
    )
    pool.add(*session.layers, fields=("layer",))
    proto_datum = trainer_pb.Datum(
        model_input=trainer_pb.ModelInput(
            chunks=[
                trainer_pb.ModelInputChunk(
                    encoded_text=trainer_pb.EncodedTextChunk(tokens=[1, 2, 3, 4])
                )
            ]
        )
    )
    proto_datum.loss_fn_inputs["target_tokens"].CopyFrom(
        trainer_pb.TensorData(dtype=trainer_pb.D_TYPE_INT64, shape=[4], int_data=[2, 3, 4, 5])
    )
    spec = he_pb.PlanSpec(
        hidden_size=HIDDEN_SIZE,
        output_size=HIDDEN_SIZE,
        rank=2,
        alpha=4.0,
        tokens=1,
        parameters=he_pb.CkksParameters(
            poly_modulus_degree=8192, coeff_modulus_bits=[60, 40, 40, 60], scale_bits=40
        ),
    )
    trainer = "/tensafe.trainer.v1.TrainerService/"
    digest = saved.package_sha256
    package = data_dir / "objects" / "registry" / "objects" / "sha256" / digest[:2] / digest
    streams: dict[str, list[Message]] = {
        "/tensafe.he.v1.HeRuntimeService/CreateSession": [
            he_pb.CreateSessionRequest(header=sealed_header),
            *(
                he_pb.CreateSessionRequest(galois_keys_chunk=chunk)
                for chunk in _chunks(material.galois_keys or b"")
            ),
        ],
        "/tensafe.registry.v1.RegistryService/PublishAdapter": [
            registry_pb.PublishAdapterRequest(
                header=registry_pb.PublishAdapterHeader(
                    adapter_name="fuzz-republished", size_bytes=package.stat().st_size
                )
            ),
            *(
                registry_pb.PublishAdapterRequest(chunk=chunk)
                for chunk in _chunks(package.read_bytes())
            ),
        ],
        trainer + "UploadDataset": [
            trainer_pb.UploadDatasetRequest(
                header=trainer_pb.UploadDatasetHeader(
                    name="fuzz-upload", base_model=BASE_MODEL, format=trainer_pb.DATASET_FORMAT_TEXT
                )
            ),
            trainer_pb.UploadDatasetRequest(chunk=DATASET_JSONL),
        ],
    }
    bases: dict[str, list[Message]] = {
        trainer + "ForwardBackward": [
            trainer_pb.ForwardBackwardRequest(
                training_client_id=client_id, data=[proto_datum], loss_fn="cross_entropy"
            )
        ],
        trainer + "Forward": [
            trainer_pb.ForwardRequest(
                training_client_id=client_id, data=[proto_datum], loss_fn="cross_entropy"
            )
        ],
        trainer + "ComputeLogprobs": [
            trainer_pb.ComputeLogprobsRequest(
                training_client_id=client_id, sequences=[proto_datum.model_input]
            )
        ],
        trainer + "SaveState": [
            trainer_pb.SaveStateRequest(training_client_id=client_id, name="fuzzed")
        ],
        trainer + "SaveWeightsForSampler": [
            trainer_pb.SaveWeightsForSamplerRequest(training_client_id=client_id, name="fuzzed")
        ],
        trainer + "TrainOnDataset": [
            trainer_pb.TrainOnDatasetRequest(
                training_client_id=client_id,
                dataset_id=dataset.id,
                expected_batch_size=2.0,
                steps=1,
                adam_params=trainer_pb.AdamParams(learning_rate=1e-3),
            )
        ],
        trainer + "OptimStep": [
            trainer_pb.OptimStepRequest(
                training_client_id=client_id,
                adam_params=trainer_pb.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95),
            )
        ],
        trainer + "Sample": [
            trainer_pb.SampleRequest(
                training_client_id=client_id,
                prompt=proto_datum.model_input,
                num_samples=1,
                sampling_params=trainer_pb.SamplingParams(max_tokens=2, temperature=1.0),
            )
        ],
        trainer + "CreateTrainingClient": [
            trainer_pb.CreateTrainingClientRequest(
                base_model=BASE_MODEL,
                lora=trainer_pb.LoraConfig(rank=2, alpha=4.0),
                dp=trainer_pb.DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
            )
        ],
        trainer + "GetBaseModelTokenizer": [
            trainer_pb.GetBaseModelTokenizerRequest(base_model=BASE_MODEL)
        ],
        trainer + "ListTrainingSteps": [
            trainer_pb.ListTrainingStepsRequest(training_client_id=client_id, page_size=2)
        ],
        trainer + "ListCheckpoints": [
            trainer_pb.ListCheckpointsRequest(training_client_id=client_id, page_size=2)
        ],
        trainer + "LoadState": [
            trainer_pb.LoadStateRequest(training_client_id=client_id, path=state.path)
        ],
        "/tensafe.he.v1.HeRuntimeService/CompilePlan": [he_pb.CompilePlanRequest(spec=spec)],
        "/tensafe.he.v1.HeRuntimeService/CreateSession": [
            he_pb.CreateSessionRequest(header=sealed_header)
        ],
        "/tensafe.he.v1.HeRuntimeService/ApplyLora": [
            he_pb.ApplyLoraRequest(
                header=he_pb.ApplyLoraHeader(
                    session_id=session.id, layer=session.layers[0], ciphertexts=1
                )
            )
        ],
        "/tensafe.he.v1.HeRuntimeService/ApplyLoraInline": [
            he_pb.ApplyLoraInlineRequest(
                header=he_pb.ApplyLoraHeader(
                    session_id=session.id, layer=session.layers[0], ciphertexts=1
                )
            )
        ],
        "/tensafe.registry.v1.RegistryService/DownloadAdapter": [
            registry_pb.DownloadAdapterRequest(adapter_name=ADAPTER_NAME, version=saved.version)
        ],
        "/tensafe.registry.v1.RegistryService/SetAlias": [
            registry_pb.SetAliasRequest(
                adapter_name=ADAPTER_NAME, alias="stable", version=saved.version
            )
        ],
    }
    return bases, streams


FUZZ_DATABASE = os.environ.get("TENSAFE_FUZZ_DATABASE", "sqlite")
"""``sqlite`` (one file per service, the default) or ``postgresql`` (one fresh database
on the machine's server, shared by the services as in production)."""


@pytest.fixture(scope="package")
def database_url() -> Iterator[str | None]:
    """The stack's database: ``None`` for SQLite files, or a fresh PostgreSQL URL."""
    if FUZZ_DATABASE == "sqlite":
        yield None
    elif FUZZ_DATABASE == "postgresql":
        with postgres_database("tensafe_fuzz") as database:
            yield database.url
    else:
        raise pytest.UsageError(f"TENSAFE_FUZZ_DATABASE={FUZZ_DATABASE!r}: sqlite or postgresql")


@pytest.fixture(scope="package")
def target(
    tmp_path_factory: pytest.TempPathFactory, database_url: str | None
) -> Iterator[FuzzTarget]:
    """The seeded stack of this module's docstring (stopped after the package's tests)."""
    data_dir = tmp_path_factory.mktemp("fuzz-stack")
    build_tiny_model(data_dir / "models" / BASE_MODEL, seed=0)
    with LocalStack(StackOptions(data_dir=data_dir, database_url=database_url)) as stack:
        stack.start()
        connection = load_connection(stack.connection_file)
        channels = {name: connection.channel(name) for name in connection.services}
        try:
            admin = TokenProvider(
                channels["auth"], find_api_key(connection_file=stack.connection_file)
            )
            caller = create_tenant(stack.connection_file, name="fuzz-caller")
            tenant = TokenProvider(channels["auth"], caller.api_key)
            pool = Pool()
            _seed_victim(channels["auth"], admin, pool)
            bases, streams = _seed_caller(data_dir, stack.connection_file, caller.api_key, pool)
            futures = common_pb2_grpc.FutureServiceStub(channels["trainer"]).ListFutures(
                common_pb2.ListFuturesRequest(page_size=5),
                metadata=(("authorization", f"Bearer {tenant.token()}"),),
            )
            pool.add(*(future.id for future in futures.futures), fields=("future_id",))
            yield FuzzTarget(
                data_dir=data_dir,
                connection=connection,
                channels=channels,
                tokens={"admin": admin, "tenant": tenant},
                pool=pool,
                bases=bases,
                streams=streams,
                pids=_stack_processes(),
            )
        finally:
            for channel in channels.values():
                channel.close()
