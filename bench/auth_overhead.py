"""Authentication overhead per unary call: the shared AuthInterceptor vs no auth.

One process runs a real auth service (SQLite in a temporary folder) and three copies of
a trivial gRPC service (``FutureService.GetFuture`` answering at once), all built with
the same :class:`~tensafe.common.grpc_server.GrpcServer` (tracing and error mapping):

  no_auth        no authentication interceptor (the baseline);
  auth           the AuthInterceptor with the default verifier (verified-token cache);
  auth_no_cache  the same with the verified-token cache off, so every call pays the
                 Ed25519 signature verification (the cost of a never-seen token).

The authenticated servers verify tokens locally against the JWKS fetched from auth over
gRPC (``GrpcKeySource``), exactly as the other services do. Calls are made sequentially
over one channel per server; the variants are interleaved round-robin with the order
rotating every round, and each round's median per-call latency is kept; the table shows
the median over rounds and the ratio to ``no_auth``. The number of JWKS and revocation
fetches during the timed part is printed to show that the hot path never calls auth.

Usage: python bench/auth_overhead.py [--rounds 15] [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from tensafe.auth.config import AuthConfig
from tensafe.auth.server import build as build_auth
from tensafe.common.auth import (
    AuthInterceptor,
    GrpcKeySource,
    JsonWebKey,
    Revocations,
    ServiceCredentials,
    TokenVerifier,
    VerifierOptions,
)
from tensafe.common.config import ServiceConfig
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc

VARIANTS = ("no_auth", "auth", "auth_no_cache")


class Trivial(common_pb2_grpc.FutureServiceServicer):
    async def GetFuture(  # noqa: N802 - the RPC name
        self, request: common_pb2.GetFutureRequest, context: Any
    ) -> common_pb2.GetFutureResponse:
        return common_pb2.GetFutureResponse(future=common_pb2.Future(id=request.future_id))


@dataclasses.dataclass
class Counting:
    inner: GrpcKeySource
    jwks_calls: int = 0
    revocation_calls: int = 0

    async def jwks(self) -> Sequence[JsonWebKey]:
        self.jwks_calls += 1
        return await self.inner.jwks()

    async def revocations(self) -> Revocations:
        self.revocation_calls += 1
        return await self.inner.revocations()


class DiscardAudit:
    """The bench makes no failing calls; a failure would be a bug, so it raises."""

    async def record(self, record: Any) -> None:
        raise RuntimeError(f"unexpected audit event in the bench: {record}")


async def main(rounds: int, calls: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        auth_config = AuthConfig(
            database_url=f"sqlite+aiosqlite:///{base / 'auth.db'}",
            data_dir=base,
            dev_mode=True,
        )
        assembly = await build_auth(auth_config)
        auth_server = GrpcServer(
            config=auth_config, services=assembly.services, interceptors=assembly.interceptors
        )
        auth_port = await auth_server.start()
        auth_address = f"127.0.0.1:{auth_port}"
        from tensafe.auth.server import build_domain  # same database, for the bootstrap

        components = await build_domain(auth_config)
        created = await components.domain.bootstrap(
            tenant_name="platform", admin_name="bench", service_accounts=["probe"]
        )
        await components.database.dispose()

        auth_channel = grpc.aio.insecure_channel(auth_address)
        token = (
            await auth_service_pb2_grpc.AuthServiceStub(auth_channel).ExchangeApiKey(
                pb.ExchangeApiKeyRequest(api_key=created.admin_api_key)
            )
        ).access_token
        metadata = (("authorization", f"Bearer {token}"),)

        sources: dict[str, Counting] = {}
        servers: dict[str, GrpcServer] = {}
        verifiers: list[TokenVerifier] = []
        for variant in VARIANTS:
            interceptors: list[Any] = []
            if variant != "no_auth":
                credentials = ServiceCredentials(auth_channel, created.service_api_keys["probe"])
                sources[variant] = Counting(GrpcKeySource(auth_channel, credentials))
                cache = 4096 if variant == "auth" else 0
                verifier = TokenVerifier(
                    sources[variant],
                    options=VerifierOptions(
                        revocation_ttl_seconds=5.0, verified_token_cache_size=cache
                    ),
                )
                verifiers.append(verifier)
                interceptors.append(AuthInterceptor(verifier, DiscardAudit(), service="bench"))
            servers[variant] = GrpcServer(
                config=ServiceConfig(database_url="sqlite+aiosqlite:///unused.db", data_dir=base),
                services=[
                    ServiceRegistration(
                        "tensafe.common.v1.FutureService",
                        common_pb2_grpc.add_FutureServiceServicer_to_server,
                        Trivial(),
                    )
                ],
                interceptors=interceptors,
            )
        channels = {}
        for variant, server in servers.items():
            port = await server.start()
            channels[variant] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stubs = {v: common_pb2_grpc.FutureServiceStub(c) for v, c in channels.items()}
        request = common_pb2.GetFutureRequest(future_id="f")

        async def one_round(variant: str) -> float:
            stub = stubs[variant]
            call_metadata = () if variant == "no_auth" else metadata
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                await stub.GetFuture(request, metadata=call_metadata)
                samples.append(time.perf_counter() - start)
            return statistics.median(samples)

        for variant in VARIANTS:  # warm-up: connections, JWKS, revocations, caches
            await one_round(variant)
        before = {v: (s.jwks_calls, s.revocation_calls) for v, s in sources.items()}
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        started = time.perf_counter()
        for index in range(rounds):
            order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
            for variant in order:
                results[variant].append(await one_round(variant))
        elapsed = time.perf_counter() - started

        baseline = statistics.median(results["no_auth"])
        print(f"{rounds} rounds x {calls} sequential unary calls per variant, interleaved")
        print(f"{'variant':<15}{'median us/call':>16}{'ratio':>8}{'added us':>10}")
        for variant in VARIANTS:
            value = statistics.median(results[variant])
            print(
                f"{variant:<15}{value * 1e6:>16.1f}{value / baseline:>8.3f}"
                f"{(value - baseline) * 1e6:>10.1f}"
            )
        for variant, source in sources.items():
            jwks0, rev0 = before[variant]
            print(
                f"{variant}: during {elapsed:.1f} s of timed calls, JWKS fetches "
                f"{source.jwks_calls - jwks0}, revocation-list fetches "
                f"{source.revocation_calls - rev0} (background, every >= 5 s)"
            )

        for channel in channels.values():
            await channel.close(None)
        for server in servers.values():
            await server.stop()
        for verifier in verifiers:
            await verifier.close()
        await auth_channel.close(None)
        await auth_server.stop()
        if assembly.close is not None:
            await assembly.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.calls))
