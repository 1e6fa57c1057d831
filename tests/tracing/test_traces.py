"""One trace across the services: the SDK's CLIENT span → the trainer API's SERVER span →
the JetStream PRODUCER span (context in the message headers) → the worker's CONSUMER
span, all with one trace id and each the parent of the next; and an HE runtime call
from the SDK joined the same way. Real gRPC over loopback, real nats-server, real
SQLite, a real tiny model; spans are collected with OpenTelemetry's in-memory exporter
and metrics (RPC durations, job queue depth and outcomes) with its in-memory reader.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tensafe.client.auth import BearerInterceptor
from tensafe.client.he import HeRuntimeRpc, plan_spec
from tensafe.client.tiny_model import build_tiny_model
from tensafe.client.training import ChannelOptions, TrainerRpc, make_channel
from tensafe.common.config import ServiceConfig
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.common.quotas import quota_exceeded
from tensafe.common.telemetry import setup_metrics
from tensafe.helora import default_params
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.trainer.server import build_api
from tensafe.trainer.worker import run_worker
from testkit.tokens import RecordedAudit, StaticToken, Tokens
from tests.he_runtime.conftest import Runtime, runtime_config
from tests.trainer_service.conftest import trainer_config

BASE_MODEL = "tiny-trace"
FORWARD_BACKWARD = "tensafe.trainer.v1.TrainerService/ForwardBackward"
WAIT_FUTURE = "tensafe.common.v1.FutureService/WaitFuture"
COMPILE_PLAN = "tensafe.he.v1.HeRuntimeService/CompilePlan"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test, from the process's SDK tracer provider.

    OpenTelemetry allows one global provider per process; the services and the SDK look
    it up, so the exporter is attached to it (installed here if no test did before).
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later spans are dropped, not kept in memory


_READER: list[InMemoryMetricReader] = []


@pytest.fixture
def readings() -> InMemoryMetricReader:
    """An in-memory reader of the process's meter provider (installed once: OpenTelemetry
    allows one global meter provider, and a provider's readers are fixed when it is built)."""
    if not _READER:
        assert not isinstance(metrics.get_meter_provider(), MeterProvider), (
            "another test installed a meter provider without this reader"
        )
        reader = InMemoryMetricReader()
        setup_metrics("tensafe-tests", extra_readers=[reader])
        _READER.append(reader)
    return _READER[0]


Points = dict[frozenset[tuple[str, Any]], float]


def _points(reader: InMemoryMetricReader, name: str) -> Points:
    """Each data point of metric ``name`` by its attributes: a count for histograms, the
    value for sums and gauges (cumulative, so tests compare before and after)."""
    found: Points = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    key = frozenset((point.attributes or {}).items())
                    found[key] = float(getattr(point, "count", None) or point.value)
    return found


def _delta(before: Points, after: Points, **attributes: Any) -> float:
    wanted = set(attributes.items())
    return sum(v - before.get(k, 0.0) for k, v in after.items() if wanted <= set(k))


def _sdk_channel(address: str, token: str) -> grpc.Channel:
    # What open_trainer / open_he_runtime build: the SDK's channel (which propagates the
    # trace context) under the bearer-token interceptor.
    return grpc.intercept_channel(
        make_channel(address, options=ChannelOptions()),
        BearerInterceptor(StaticToken(token)),  # type: ignore[arg-type]
    )


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind is kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


async def test_a_training_step_is_one_trace_from_sdk_to_worker(
    tmp_path: Path, spans: InMemorySpanExporter, readings: InMemoryMetricReader
) -> None:
    durations_before = _points(readings, "rpc.server.duration")
    processed_before = _points(readings, "tensafe.jobs.processed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    build_tiny_model(
        tmp_path / "models" / BASE_MODEL,
        seed=0,
        vocab_size=256,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=64,
    )
    tokens = Tokens()
    token = tokens.token("tenant-tracing")
    try:
        with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as nats:
            config = trainer_config(
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}",
                nats_url=nats.url,
                data_dir=tmp_path / "data",
                base_models_dir=tmp_path / "models",
            )
            interceptor = tokens.interceptor(RecordedAudit(), service="trainer")
            assembly, _ = await build_api(config, interceptors=[interceptor])
            server = GrpcServer(
                config=config, services=assembly.services, interceptors=assembly.interceptors
            )
            port = await server.start()
            stop = asyncio.Event()
            worker = asyncio.create_task(run_worker(config, stop=stop))
            try:

                def step() -> tuple[int, int, str]:
                    rpc = TrainerRpc(_sdk_channel(f"127.0.0.1:{port}", token))
                    try:
                        client = rpc.create_training_client(
                            pb.CreateTrainingClientRequest(
                                base_model=BASE_MODEL,
                                lora=pb.LoraConfig(rank=4, alpha=8.0),
                                dp=pb.DpConfig(
                                    noise_multiplier=1.0,
                                    max_grad_norm=1.0,
                                    delta=1e-5,
                                    accountant=pb.ACCOUNTANT_RDP,
                                ),
                                request_id=uuid.uuid4().hex,
                            )
                        )
                        datum = pb.Datum(
                            model_input=pb.ModelInput(
                                chunks=[
                                    pb.ModelInputChunk(
                                        encoded_text=pb.EncodedTextChunk(tokens=[3, 9, 14, 22])
                                    )
                                ]
                            ),
                            loss_fn_inputs={
                                "target_tokens": pb.TensorData(
                                    dtype=pb.D_TYPE_INT64, int_data=[9, 14, 22, 31]
                                ),
                                "weights": pb.TensorData(
                                    dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * 4
                                ),
                            },
                        )
                        tracer = trace.get_tracer("tests.tracing")
                        with tracer.start_as_current_span("user step") as root:
                            future = rpc.submit(
                                "ForwardBackward",
                                pb.ForwardBackwardRequest(
                                    training_client_id=client.id,
                                    data=[datum],
                                    loss_fn="cross_entropy",
                                    request_id=uuid.uuid4().hex,
                                ),
                            )
                            finished = rpc.wait_future(future.id, timeout=60)
                        assert finished.HasField("result"), finished
                        context = root.get_span_context()
                        return context.trace_id, context.span_id, future.id
                    finally:
                        rpc.close()

                trace_id, root_span_id, future_id = await asyncio.to_thread(step)
            finally:
                # The worker drains before returning, so its spans have ended by then.
                stop.set()
                await worker
                await server.stop()
                assert assembly.close is not None
                await assembly.close()
    finally:
        torch.set_num_threads(threads)

    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    sdk_call = _one(in_trace, FORWARD_BACKWARD, SpanKind.CLIENT)
    api = _one(in_trace, FORWARD_BACKWARD, SpanKind.SERVER)
    publish = [s for s in in_trace if s.kind is SpanKind.PRODUCER]
    consume = [s for s in in_trace if s.kind is SpanKind.CONSUMER]
    assert len(publish) == 1 and len(consume) >= 1
    (publish_span,) = publish

    assert _parent_of(sdk_call) == root_span_id
    assert _parent_of(api) == sdk_call.context.span_id
    assert _parent_of(publish_span) == api.context.span_id
    assert publish_span.attributes is not None
    assert publish_span.attributes["messaging.message.id"] == future_id
    subject = publish_span.attributes["messaging.destination.name"]
    assert isinstance(subject, str) and subject.startswith("tensafe.trainer.jobs.")
    for delivery in consume:
        # The worker's span: a child of the publish, across the NATS hop.
        assert _parent_of(delivery) == publish_span.context.span_id
        assert delivery.name == f"{subject} process"
        assert delivery.attributes is not None
        assert delivery.attributes["messaging.message.id"] == future_id
        assert delivery.attributes["messaging.consumer.group.name"] == config.jobs_durable
    assert consume[-1].attributes is not None
    assert consume[-1].attributes["tensafe.job.outcome"] == "ack"
    # The worker ran the job after the API admitted it, inside the same trace.
    assert consume[0].start_time is not None and publish_span.start_time is not None
    assert consume[0].start_time >= publish_span.start_time

    wait_client = [s for s in in_trace if s.name == WAIT_FUTURE and s.kind is SpanKind.CLIENT]
    wait_server = [s for s in in_trace if s.name == WAIT_FUTURE and s.kind is SpanKind.SERVER]
    assert wait_client and len(wait_client) == len(wait_server)
    assert {_parent_of(s) for s in wait_server} == {s.context.span_id for s in wait_client}
    assert sdk_call.attributes is not None and sdk_call.attributes["rpc.grpc.status_code"] == 0

    # Metrics of the same step: the RPC's duration, the job's outcome, the queue drained.
    durations = _points(readings, "rpc.server.duration")
    assert (
        _delta(durations_before, durations, **{"rpc.method": "ForwardBackward"})
        == _delta(
            durations_before,
            durations,
            **{"rpc.method": "ForwardBackward", "rpc.grpc.status": "OK"},
        )
        == 1
    )
    group = {"messaging.consumer.group.name": config.jobs_durable}
    processed = _points(readings, "tensafe.jobs.processed")
    assert _delta(processed_before, processed, **group, **{"tensafe.job.outcome": "ack"}) >= 1
    pending = _points(readings, "tensafe.jobs.pending")
    assert pending[frozenset({"messaging.system": "nats", **group}.items())] == 0


def test_an_he_call_joins_the_callers_trace(
    tmp_path: Path, spans: InMemorySpanExporter, readings: InMemoryMetricReader
) -> None:
    durations_before = _points(readings, "rpc.server.duration")
    runtime = Runtime(runtime_config(tmp_path))
    try:
        token = runtime.tokens.token("tenant-tracing-he")
        rpc = HeRuntimeRpc(_sdk_channel(f"127.0.0.1:{runtime.port}", token))
        try:
            with trace.get_tracer("tests.tracing").start_as_current_span("user he") as root:
                plan = rpc.compile_plan(
                    plan_spec(
                        hidden_size=64,
                        output_size=32,
                        rank=8,
                        alpha=16.0,
                        tokens=1,
                        params=default_params(),
                        packing=None,
                    )
                )
                bad: Exception | None = None
                try:
                    rpc.compile_plan(
                        plan_spec(
                            hidden_size=0,
                            output_size=32,
                            rank=8,
                            alpha=16.0,
                            tokens=1,
                            params=default_params(),
                            packing=None,
                        )
                    )
                except Exception as error:
                    bad = error
        finally:
            rpc.close()
    finally:
        runtime.stop()
    assert plan.plan_id and bad is not None

    trace_id = root.get_span_context().trace_id
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    clients = [s for s in in_trace if s.name == COMPILE_PLAN and s.kind is SpanKind.CLIENT]
    servers = [s for s in in_trace if s.name == COMPILE_PLAN and s.kind is SpanKind.SERVER]
    assert len(clients) == len(servers) == 2
    assert {_parent_of(s) for s in clients} == {root.get_span_context().span_id}
    for client, server in zip(
        sorted(clients, key=lambda s: s.start_time or 0),
        sorted(servers, key=lambda s: s.start_time or 0),
        strict=True,
    ):
        assert _parent_of(server) == client.context.span_id
    statuses = sorted(s.status.status_code.name for s in servers)
    assert statuses == ["ERROR", "UNSET"]
    client_codes = sorted(
        int(s.attributes["rpc.grpc.status_code"]) for s in clients if s.attributes is not None
    )
    assert client_codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]

    # The HE runtime's latency per method and outcome.
    durations = _points(readings, "rpc.server.duration")
    method = {"rpc.service": "tensafe.he.v1.HeRuntimeService", "rpc.method": "CompilePlan"}
    assert _delta(durations_before, durations, **method, **{"rpc.grpc.status": "OK"}) == 1
    assert (
        _delta(durations_before, durations, **method, **{"rpc.grpc.status": "INVALID_ARGUMENT"})
        == 1
    )


class _QuotaProbe(common_pb2_grpc.FutureServiceServicer):
    """Refuses every GetFuture as a per-tenant quota would."""

    async def GetFuture(self, request: Any, context: Any) -> Any:
        raise quota_exceeded("max_pending_jobs_per_tenant", 3, "3 queued jobs")


async def test_quota_refusals_are_counted_by_method_reason_and_limit(
    tmp_path: Path, readings: InMemoryMetricReader
) -> None:
    server = GrpcServer(
        config=ServiceConfig(database_url="sqlite+aiosqlite:///unused.db", data_dir=tmp_path),
        services=[
            ServiceRegistration(
                "tensafe.common.v1.FutureService",
                common_pb2_grpc.add_FutureServiceServicer_to_server,
                _QuotaProbe(),
            )
        ],
    )
    port = await server.start()
    before = _points(readings, "tensafe.rpc.refusals")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = common_pb2_grpc.FutureServiceStub(channel)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetFuture(common_pb2.GetFutureRequest(future_id="f"))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop()
    after = _points(readings, "tensafe.rpc.refusals")
    assert (
        _delta(
            before,
            after,
            **{
                "rpc.method": "/tensafe.common.v1.FutureService/GetFuture",
                "reason": "QUOTA_EXCEEDED",
                "limit": "max_pending_jobs_per_tenant",
            },
        )
        == 2
    )
