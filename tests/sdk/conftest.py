"""An in-process gRPC server for the SDK's tests, on port 0 in a background thread.

It serves the real ``tensafe.common.v1.FutureService`` contract over a real
``SqlFutureStore`` on a SQLite file, behind the shared ``ErrorInterceptor`` (so errors
reach the SDK exactly as a TenSafe service sends them), plus a *recording* trainer
servicer: it keeps every request it receives and answers the submit calls with a
PENDING future created idempotently by ``request_id`` in the same store. It computes
nothing; tests complete the futures themselves through :meth:`Served.run`, which is how
they decide what the server "returns". The real trainer is exercised by
``test_e2e_trainer.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from google.protobuf import any_pb2

from tensafe.common import errors
from tensafe.common.db import Database
from tensafe.common.futures import Future, FutureStatus, SqlFutureStore, futures_table
from tensafe.common.grpc_errors import ErrorInterceptor, to_status_proto
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

TENANT = "tenant-sdk"
T = TypeVar("T")


def future_to_proto(future: Future) -> common_pb2.Future:
    """The store's future as the contract's message (what a FutureService returns)."""
    message = common_pb2.Future(
        id=future.id,
        kind=future.kind,
        status=common_pb2.FutureStatus.Value(f"FUTURE_STATUS_{future.status.value}"),
    )
    message.create_time.FromDatetime(future.created_at)
    if future.status is FutureStatus.SUCCEEDED and future.result is not None:
        message.result.ParseFromString(future.result)
    elif future.status is FutureStatus.FAILED and future.error is not None:
        # The status a TenSafe service sends for this error: code + ErrorInfo(reason).
        typed = errors.TenSafeError(future.error.message, reason=future.error.reason)
        typed.code = future.error.code
        status = to_status_proto(typed)
        message.error.ParseFromString(status.SerializeToString())
    return message


class StoreFutureService(common_pb2_grpc.FutureServiceServicer):
    """``FutureService`` over a ``SqlFutureStore`` for one tenant."""

    def __init__(self, store: SqlFutureStore) -> None:
        self.store = store
        self.wait_calls = 0

    async def GetFuture(self, request: Any, context: Any) -> common_pb2.GetFutureResponse:
        future = await self.store.get(TENANT, request.future_id)
        return common_pb2.GetFutureResponse(future=future_to_proto(future))

    async def WaitFuture(self, request: Any, context: Any) -> common_pb2.WaitFutureResponse:
        self.wait_calls += 1
        timeout = request.timeout.ToNanoseconds() / 1e9
        future = await self.store.wait(TENANT, request.future_id, timeout=timeout)
        return common_pb2.WaitFutureResponse(future=future_to_proto(future))

    async def CancelFuture(self, request: Any, context: Any) -> common_pb2.CancelFutureResponse:
        future = await self.store.cancel(TENANT, request.future_id)
        return common_pb2.CancelFutureResponse(future=future_to_proto(future))


@dataclass
class RecordingTrainer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """Records requests; answers submits with a PENDING future per request id.

    ``unavailable_first`` makes the first N calls of each method fail with UNAVAILABLE
    (to test retries); ``raise_on`` maps a method name to a typed error to raise.
    """

    store: SqlFutureStore
    requests: dict[str, list[Any]] = field(default_factory=dict)
    unavailable_first: int = 0
    raise_on: dict[str, errors.TenSafeError] = field(default_factory=dict)

    def _record(self, method: str, request: Any) -> None:
        calls = self.requests.setdefault(method, [])
        calls.append(request)
        if len(calls) <= self.unavailable_first:
            raise errors.Unavailable(f"{method}: warming up")
        if method in self.raise_on:
            raise self.raise_on[method]

    async def _submit(self, method: str, request: Any) -> common_pb2.Future:
        self._record(method, request)
        created = await self.store.create(TENANT, kind=method, request_id=request.request_id)
        return future_to_proto(created.future)

    async def CreateTrainingClient(self, request: Any, context: Any) -> Any:
        self._record("CreateTrainingClient", request)
        client = pb.TrainingClient(
            id="tc-1",
            base_model=request.base_model,
            lora=request.lora,
            private=request.HasField("dp"),
            state=pb.TRAINING_CLIENT_STATE_ACTIVE,
        )
        if request.HasField("dp"):
            client.dp.CopyFrom(request.dp)
        return pb.CreateTrainingClientResponse(training_client=client)

    async def GetPrivacySpent(self, request: Any, context: Any) -> Any:
        self._record("GetPrivacySpent", request)
        return pb.GetPrivacySpentResponse(
            privacy_spent=pb.PrivacySpent(
                epsilon=1.25,
                delta=1e-5,
                accountant=pb.ACCOUNTANT_PLD,
                steps=3,
                noise_multiplier=1.1,
                private=True,
            )
        )

    async def ListBaseModels(self, request: Any, context: Any) -> Any:
        self._record("ListBaseModels", request)
        return pb.ListBaseModelsResponse(
            base_models=[pb.BaseModel(name="tiny", vocab_size=512, max_context_length=128)]
        )

    async def ForwardBackward(self, request: Any, context: Any) -> Any:
        return pb.ForwardBackwardResponse(future=await self._submit("ForwardBackward", request))

    async def Forward(self, request: Any, context: Any) -> Any:
        return pb.ForwardResponse(future=await self._submit("Forward", request))

    async def OptimStep(self, request: Any, context: Any) -> Any:
        return pb.OptimStepResponse(future=await self._submit("OptimStep", request))

    async def Sample(self, request: Any, context: Any) -> Any:
        return pb.SampleResponse(future=await self._submit("Sample", request))

    async def ComputeLogprobs(self, request: Any, context: Any) -> Any:
        return pb.ComputeLogprobsResponse(future=await self._submit("ComputeLogprobs", request))

    async def SaveState(self, request: Any, context: Any) -> Any:
        return pb.SaveStateResponse(future=await self._submit("SaveState", request))

    async def SaveWeightsForSampler(self, request: Any, context: Any) -> Any:
        return pb.SaveWeightsForSamplerResponse(
            future=await self._submit("SaveWeightsForSampler", request)
        )


@dataclass
class Served:
    """The running server and a way to run coroutines on its loop."""

    address: str
    loop: asyncio.AbstractEventLoop
    store: SqlFutureStore
    trainer: RecordingTrainer
    futures: StoreFutureService

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and return its value."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def succeed(self, future_id: str, result: Any) -> None:
        """Complete a future with a packed result message."""
        packed = any_pb2.Any()
        packed.Pack(result)
        self.run(self.store.succeed(TENANT, future_id, result=packed.SerializeToString()))

    def fail(self, future_id: str, error: errors.TenSafeError) -> None:
        """Fail a future with a typed error."""
        self.run(
            self.store.fail(
                TENANT, future_id, code=error.code, message=error.message, reason=error.reason
            )
        )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The server of this module's docstring, on a fresh SQLite file."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, Database, Served]:
        metadata = sa.MetaData()
        table = futures_table(metadata, prefix="trainer")
        db = Database.from_url(f"sqlite+aiosqlite:///{tmp_path / 'futures.db'}")
        async with db.connection() as connection:
            await connection.run_sync(metadata.create_all)
        store = SqlFutureStore(db, table, poll_initial=0.005, poll_max=0.05)
        trainer = RecordingTrainer(store)
        futures = StoreFutureService(store)
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        common_pb2_grpc.add_FutureServiceServicer_to_server(futures, server)
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, db, Served(f"127.0.0.1:{port}", loop, store, trainer, futures)

    server, db, handle = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield handle
    finally:

        async def stop() -> None:
            await server.stop(grace=None)
            await db.dispose()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
