"""The shared gRPC bootstrap through a real in-process server on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensafe.common import errors
from tensafe.common.config import ServiceConfig
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

RAISES: dict[str, Exception] = {
    "invalid": errors.InvalidArgument("future_id", "must be a UUID"),
    "missing": errors.NotFound("future f-1 not found"),
    "budget": errors.BudgetExhausted("step would spend epsilon 3.2 > budget 3.0"),
    "quota": errors.ResourceExhausted("limit queued_jobs=100 reached"),
    "bug": ZeroDivisionError("secret internal detail"),
}


class ProbeFutureService(common_pb2_grpc.FutureServiceServicer):
    """A test servicer: raises the error its request names, or waits on an event."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def GetFuture(
        self, request: common_pb2.GetFutureRequest, context: Any
    ) -> common_pb2.GetFutureResponse:
        if request.future_id == "slow":
            self.entered.set()
            await self.release.wait()
        elif request.future_id in RAISES:
            raise RAISES[request.future_id]
        return common_pb2.GetFutureResponse(future=common_pb2.Future(id=request.future_id))


class ReadingRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """The generated base (every RPC unimplemented), except that PublishAdapter reads
    its request stream first, as a real servicer does."""

    async def PublishAdapter(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            pass
        raise NotImplementedError


def _config(tmp_path: Path, grace: float = 5.0) -> ServiceConfig:
    return ServiceConfig(
        database_url="sqlite+aiosqlite:///unused.db",
        data_dir=tmp_path,
        shutdown_grace_seconds=grace,
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[GrpcServer, ProbeFutureService, str]]:
    probe = ProbeFutureService()
    server = GrpcServer(
        config=_config(tmp_path),
        services=[
            ServiceRegistration(
                "tensafe.common.v1.FutureService",
                common_pb2_grpc.add_FutureServiceServicer_to_server,
                probe,
            ),
            ServiceRegistration(
                "tensafe.registry.v1.RegistryService",
                registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
                # The generated base: every RPC unimplemented, as a servicer that does
                # not override a method.
                ReadingRegistry(),
            ),
        ],
    )
    port = await server.start()
    assert port > 0
    yield server, probe, f"127.0.0.1:{port}"
    probe.release.set()
    await server.stop()


async def _status(address: str, future_id: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = common_pb2_grpc.FutureServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetFuture(common_pb2.GetFutureRequest(future_id=future_id))
    return info.value


async def test_health_and_reflection(served: tuple[GrpcServer, ProbeFutureService, str]) -> None:
    _, _, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "tensafe.registry.v1.RegistryService", "tensafe.common.v1.FutureService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for response in reflect.ServerReflectionInfo(iter([request])):
            names |= {s.name for s in response.list_services_response.service}
        assert {"tensafe.registry.v1.RegistryService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("future_id", "code", "reason"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("missing", grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        ("budget", grpc.StatusCode.FAILED_PRECONDITION, "PRIVACY_BUDGET_EXHAUSTED"),
        ("quota", grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    ],
)
async def test_domain_errors_map_to_status_with_details(
    served: tuple[GrpcServer, ProbeFutureService, str],
    future_id: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    error = await _status(served[2], future_id)
    assert error.code() == code
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    assert status.code == code.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == reason
    typed = from_rpc_error(error)
    assert type(typed) is type(RAISES[future_id])
    if future_id == "invalid":
        assert isinstance(typed, errors.InvalidArgument)
        assert typed.field == "future_id"
        assert typed.description == "must be a UUID"


async def test_unexpected_exception_is_internal_without_details_of_it(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    error = await _status(served[2], "bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in (error.details() or "")
    assert "Traceback" not in (error.details() or "")
    assert "error_id=" in (error.details() or "")


async def test_streaming_calls_map_errors_too(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    async with grpc.aio.insecure_channel(served[2]) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as server_stream:
            async for _ in stub.DownloadAdapter(
                registry_service_pb2.DownloadAdapterRequest(adapter_name="a")
            ):
                pass
        with pytest.raises(grpc.aio.AioRpcError) as client_stream:
            await stub.PublishAdapter(
                iter([registry_service_pb2.PublishAdapterRequest(chunk=b"x")])
            )
    for info in (server_stream, client_stream):
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert from_rpc_error(info.value).code == errors.ErrorCode.UNIMPLEMENTED


async def test_undecodable_request_is_invalid_argument_naming_the_request(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    # grpc's asyncio server alone answers a request that does not decode with UNKNOWN.
    async with grpc.aio.insecure_channel(served[2]) as channel:
        get_future = channel.unary_unary(
            "/tensafe.common.v1.FutureService/GetFuture",
            request_serializer=lambda raw: raw,
            response_deserializer=common_pb2.GetFutureResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_future(b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = from_rpc_error(info.value)
    assert isinstance(typed, errors.InvalidArgument) and typed.field == "request"


async def test_unserved_rpc_is_unimplemented(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    async with grpc.aio.insecure_channel(served[2]) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetAdapter(registry_service_pb2.GetAdapterRequest(adapter_name="a"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "GetAdapter" in (info.value.details() or "")


async def test_oversized_message_is_resource_exhausted(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    huge = "x" * (17 * 1024 * 1024)
    async with grpc.aio.insecure_channel(
        served[2], options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = common_pb2_grpc.FutureServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetFuture(common_pb2.GetFutureRequest(future_id=huge))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_stop_flips_health_then_drains_in_flight_calls(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    server, probe, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = common_pb2_grpc.FutureServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            stub.GetFuture(common_pb2.GetFutureRequest(future_id="slow"))
        )
        await probe.entered.wait()
        stopping = asyncio.ensure_future(server.stop())
        update = await watch.read()
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert not in_flight.done()
        probe.release.set()
        response = await in_flight
        assert response.future.id == "slow"
        await stopping


@pytest.mark.parametrize("character", ["\x00", "\n", "\r", "\x1b", "\x7f", "\x85"])
async def test_control_characters_in_text_are_invalid_argument_naming_the_field(
    served: tuple[GrpcServer, ProbeFutureService, str], character: str
) -> None:
    # Before the rule, NUL reached the servicer: asyncpg refused it (INTERNAL) where
    # SQLite answered NOT_FOUND.
    error = await _status(served[2], f"f-1{character}")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = from_rpc_error(error)
    assert isinstance(typed, errors.InvalidArgument) and typed.field == "future_id"
    assert f"U+{ord(character):04X} at position 3" in typed.description
    assert typed.reason == "CONTROL_CHARACTER"
    # Printable unicode is text: the servicer answers.
    async with grpc.aio.insecure_channel(served[2]) as channel:
        stub = common_pb2_grpc.FutureServiceStub(channel)
        ok = await stub.GetFuture(common_pb2.GetFutureRequest(future_id="f-1 é中🙂"))
    assert ok.future.id == "f-1 é中🙂"


async def test_streamed_requests_are_checked_too(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    async with grpc.aio.insecure_channel(served[2]) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        header = registry_service_pb2.PublishAdapterHeader(adapter_name="a\x00b")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PublishAdapter(
                iter([registry_service_pb2.PublishAdapterRequest(header=header)])
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = from_rpc_error(info.value)
    assert isinstance(typed, errors.InvalidArgument) and typed.field == "header.adapter_name"


async def test_the_helm_test_healthcheck_command(
    served: tuple[GrpcServer, ProbeFutureService, str],
) -> None:
    from tensafe.common import healthcheck

    address = served[2]
    assert await asyncio.to_thread(healthcheck.main, [address]) == 0
    # A port nobody serves: UNAVAILABLE, and the command fails naming it.
    closed = "127.0.0.1:1"
    assert await asyncio.to_thread(healthcheck.main, [address, closed, "--timeout", "2"]) == 1
