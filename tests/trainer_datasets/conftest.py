"""Fixtures of the dataset tests: a real tiny model, nats-server, SQLite, the trainer API
and worker in-process, and the real authentication interceptor on a test signing key."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest

from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.common.v1 import common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.server import build_api
from tensafe.trainer.worker import run_worker
from testkit.models import BASE_MODEL, build_base_models, one_torch_thread
from testkit.tokens import NoAudit, Tokens

__all__ = ["BASE_MODEL"]  # the test modules import it from here

CONTEXT = 64


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One torch thread: the API, the worker and the test share two cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def base_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base models folder with one real tiny Llama model and its tokenizer."""
    return build_base_models(tmp_path_factory.mktemp("base_models"), context=CONTEXT)


class Stack:
    """A running trainer API and worker with stubs and tokens for two tenants."""

    def __init__(
        self, *, config: TrainerConfig, port: int, channel: grpc.aio.Channel, tokens: Tokens
    ):
        self.config = config
        self.port = port
        self.channel = channel
        self.trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        self.futures = common_pb2_grpc.FutureServiceStub(channel)
        self.tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        self.auth = tokens.metadata(self.tenant)
        self.other_auth = tokens.metadata(f"other-{uuid.uuid4().hex[:8]}")
        self._workers: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start_worker(self) -> None:
        """Run one more worker in this process (its own lease owner id)."""
        stop = asyncio.Event()
        self._workers.append((stop, asyncio.create_task(run_worker(self.config, stop=stop))))

    async def stop_workers(self) -> None:
        """Stop every in-process worker (graceful: the current job is handed back)."""
        for stop, _ in self._workers:
            stop.set()
        for _, task in self._workers:
            await task
        self._workers = []


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path, base_models_dir: Path) -> AsyncIterator[StackFactory]:
    """Factory of running stacks (SQLite, a real nats-server, one in-process worker)."""
    cleanups: list[Callable[[], Awaitable[None]]] = []
    nats_contexts: list[NatsServer] = []

    async def factory(
        *,
        dev_mode: bool = False,
        base_models: Path | None = None,
        database_url: str | None = None,
        **settings: object,
    ) -> Stack:
        nats = NatsServer.start(NatsServerConfig(data_dir=tmp_path / f"nats-{len(nats_contexts)}"))
        nats_contexts.append(nats)
        kek_file: Path | None = None
        if not dev_mode:
            kek_file = tmp_path / "dataset.kek"
            kek_file.write_text(secrets.token_bytes(32).hex())
            kek_file.chmod(0o600)
        config = TrainerConfig(
            database_url=database_url or f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}",
            data_dir=tmp_path / "data",
            nats_url=nats.url,
            base_models_dir=base_models or base_models_dir,
            log_format="text",
            shutdown_grace_seconds=1.0,
            job_ack_wait_seconds=5.0,
            lease_seconds=5.0,
            outbox_interval_seconds=0.5,
            outbox_grace_seconds=0.5,
            retry_delay_seconds=0.02,
            dev_mode=dev_mode,
            dataset_kek_file=kek_file,
            **settings,  # type: ignore[arg-type]
        )
        tokens = Tokens()
        interceptor = tokens.interceptor(NoAudit(), service="trainer")
        assembly, _ = await build_api(config, interceptors=[interceptor])
        server = GrpcServer(
            config=config, services=assembly.services, interceptors=assembly.interceptors
        )
        port = await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack = Stack(config=config, port=port, channel=channel, tokens=tokens)
        stack.start_worker()

        async def cleanup() -> None:
            await stack.stop_workers()
            await channel.close(None)
            await server.stop()
            assert assembly.close is not None
            await assembly.close()

        cleanups.append(cleanup)
        return stack

    yield factory
    for cleanup in reversed(cleanups):
        await cleanup()
    for nats in nats_contexts:
        nats.stop()
