"""Fixtures of the trainer service tests: a real tiny model, nats-server, databases and
the real authentication interceptor on a test signing key."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import pytest

from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.common.v1 import common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.domain.service import TrainerDomain
from tensafe.trainer.server import build_api
from tensafe.trainer.worker import run_worker
from testkit.models import BASE_MODEL, build_base_models, one_torch_thread
from testkit.postgres import postgres_database
from testkit.tokens import RecordedAudit, Tokens

__all__ = ["BASE_MODEL"]  # the test modules import it from here


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One torch thread: the API, the worker and the test share two cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def base_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base models folder holding one real tiny Llama model with its tokenizer."""
    return build_base_models(tmp_path_factory.mktemp("base_models"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database for this session (skipped, with the reason, if unreachable)."""
    with postgres_database("tensafe_trainer") as database:
        yield database.url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port."""
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


def dataset_kek_file(data_dir: Path) -> Path:
    """A dataset KEK (64 hex digits, mode 0600) beside the data dir, made once."""
    path = data_dir.parent / f"{data_dir.name}.dataset.kek"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_bytes(32).hex())
        path.chmod(0o600)
    return path


def trainer_config(
    *, database_url: str, nats_url: str, data_dir: Path, base_models_dir: Path
) -> TrainerConfig:
    """The trainer configuration the tests run with (short timers)."""
    return TrainerConfig(
        dataset_kek_file=dataset_kek_file(data_dir),
        database_url=database_url,
        data_dir=data_dir,
        nats_url=nats_url,
        base_models_dir=base_models_dir,
        log_format="text",
        shutdown_grace_seconds=1.0,
        job_ack_wait_seconds=2.0,
        lease_seconds=2.0,
        outbox_interval_seconds=0.5,
        outbox_grace_seconds=0.5,
        retry_delay_seconds=0.02,
    )


class Stack:
    """A running trainer API (and optionally a worker) with stubs and tokens."""

    def __init__(
        self,
        *,
        config: TrainerConfig,
        api: TrainerDomain,
        channel: grpc.aio.Channel,
        tokens: Tokens,
        audit: RecordedAudit,
    ) -> None:
        self.config = config
        self.api = api
        self.channel = channel
        self.trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        self.futures = common_pb2_grpc.FutureServiceStub(channel)
        self.tokens = tokens
        self.audit = audit
        self.tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        self.auth = tokens.metadata(self.tenant)
        self._workers: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start_worker(self) -> None:
        """Run one more worker in this process (an asyncio task with its own lease id)."""
        stop = asyncio.Event()
        self._workers.append((stop, asyncio.create_task(run_worker(self.config, stop=stop))))

    async def stop_worker(self) -> None:
        """Drain and stop every in-process worker."""
        for stop, _ in self._workers:
            stop.set()
        for _, task in self._workers:
            await task
        self._workers = []


@pytest.fixture
async def make_stack(
    tmp_path: Path, nats_server: NatsServer, base_models_dir: Path
) -> AsyncIterator[object]:
    """Factory of running stacks on a given database URL (default: a SQLite file)."""
    stacks: list[tuple[Stack, GrpcServer, object]] = []

    async def factory(
        database_url: str | None = None, *, worker: bool = True, **settings: object
    ) -> Stack:
        config = dataclasses.replace(
            trainer_config(
                database_url=database_url or f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}",
                nats_url=nats_server.url,
                data_dir=tmp_path / "data",
                base_models_dir=base_models_dir,
            ),
            **settings,  # type: ignore[arg-type]
        )
        tokens = Tokens()
        audit = RecordedAudit()
        interceptor = tokens.interceptor(audit, service="trainer")
        assembly, api = await build_api(config, interceptors=[interceptor])
        server = GrpcServer(
            config=config, services=assembly.services, interceptors=assembly.interceptors
        )
        port = await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack = Stack(config=config, api=api, channel=channel, tokens=tokens, audit=audit)
        stacks.append((stack, server, assembly.close))
        if worker:
            stack.start_worker()
        return stack

    yield factory
    for stack, server, close in stacks:
        await stack.stop_worker()
        await stack.channel.close(None)
        await server.stop()
        assert callable(close)
        await close()
