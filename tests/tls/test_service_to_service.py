"""A service calls another over mutual TLS: an auth-protected service (built with the
production ``connect_authentication``) fetches auth's keys over mTLS and verifies the
tokens a user obtained from auth over mTLS; both listeners refuse plaintext."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tensafe.auth.config import AuthConfig
from tensafe.auth.server import build, build_domain
from tensafe.common import tls
from tensafe.common.auth import connect_authentication, current_identity
from tensafe.common.grpc_server import GrpcServer, ServiceRegistration
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc

from .conftest import Pki, tls_config


class WhoAmI(common_pb2_grpc.FutureServiceServicer):
    """Answers with the verified caller."""

    async def GetFuture(self, request: Any, context: Any) -> common_pb2.GetFutureResponse:
        identity = current_identity()
        return common_pb2.GetFutureResponse(
            future=common_pb2.Future(id=f"{identity.tenant_id}/{identity.principal_id}")
        )


async def test_protected_service_verifies_tokens_against_auth_over_mtls(
    tmp_path: Path, pki: Pki
) -> None:
    auth_config = tls_config(
        tmp_path,
        pki,
        mutual=True,
        server="auth",
        cls=AuthConfig,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
        signing_key_encryption_key=base64.b64encode(os.urandom(32)).decode(),
        api_key_hash_time_cost=1,
        api_key_hash_memory_kib=1024,
        api_key_hash_parallelism=1,
    )
    components = await build_domain(auth_config)
    boot = await components.domain.bootstrap(
        tenant_name="platform", admin_name="root", service_accounts=["probe"]
    )
    await components.database.dispose()
    assembly = await build(auth_config)
    auth = GrpcServer(
        config=auth_config, services=assembly.services, interceptors=assembly.interceptors
    )
    auth_port = await auth.start()
    probe_client = pki.client("probe")
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as nats:
        config = tls_config(
            tmp_path,
            pki,
            mutual=True,
            server="probe",
            auth_url=f"127.0.0.1:{auth_port}",
            service_api_key=boot.service_api_keys["probe"],
            nats_url=nats.url,
            tls_ca_file=pki.trusted.ca_file,
            tls_client_cert_file=probe_client.cert_file,
            tls_client_key_file=probe_client.key_file,
        )
        authentication = await connect_authentication(config, service="probe")
        probe = GrpcServer(
            config=config,
            services=[
                ServiceRegistration(
                    "tensafe.common.v1.FutureService",
                    common_pb2_grpc.add_FutureServiceServicer_to_server,
                    WhoAmI(),
                )
            ],
            interceptors=[authentication.interceptor],
        )
        probe_port = await probe.start()
        user = pki.credentials(client=pki.client())
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{auth_port}", user) as channel:
                token = await auth_service_pb2_grpc.AuthServiceStub(channel).ExchangeApiKey(
                    auth_pb.ExchangeApiKeyRequest(api_key=boot.admin_api_key), timeout=10
                )
            bearer = (("authorization", f"Bearer {token.access_token}"),)
            request = common_pb2.GetFutureRequest(future_id="x")
            async with grpc.aio.secure_channel(f"127.0.0.1:{probe_port}", user) as channel:
                answer = await common_pb2_grpc.FutureServiceStub(channel).GetFuture(
                    request, metadata=bearer, timeout=10
                )
            assert answer.future.id == f"{boot.tenant.id}/{boot.admin.id}"
            assert (token.tenant_id, token.principal_id) == (boot.tenant.id, boot.admin.id)
            # The same call in plaintext never reaches the interceptor.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await common_pb2_grpc.FutureServiceStub(channel).GetFuture(
                        request, metadata=bearer, timeout=10
                    )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # A service whose client certificate is from another CA cannot reach auth.
            stranger = pki.other.clients["user"]
            outsider = dataclasses.replace(
                config,
                tls_client_cert_file=stranger.cert_file,
                tls_client_key_file=stranger.key_file,
            )
            async with tls.service_channel(outsider.auth_url, outsider) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await auth_service_pb2_grpc.AuthServiceStub(channel).GetJwks(
                        auth_pb.GetJwksRequest(), timeout=10
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await probe.stop()
            await authentication.close()
            await auth.stop()
            assert assembly.close is not None
            await assembly.close()
