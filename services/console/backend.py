"""The trainer's, registry's and auth's gRPC contracts as the console calls them.

The console is a client like any other and holds no credential of its own: each call
carries the signed-in user's access token, so the services apply tenancy, scopes and
revocation exactly as on gRPC (another tenant's training client is NOT_FOUND here too).
Every failure is a typed TenSafe error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from tensafe.client.channels import ClientTls
from tensafe.common.errors import Unavailable
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.common.tls import open_channel
from tensafe.console.config import ConsoleConfig
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.registry.v1 import registry_service_pb2 as registry_pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

R = TypeVar("R")

_GRPC_OPTIONS = (
    # A package page downloads the package to verify it; packages are chunked by the
    # registry, so the default message size is enough for each part.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class Backend:
    """Stubs of the trainer (``TrainerService``, ``FutureService``), registry and auth.

    Args:
        config: Where the services are, TLS, the call deadline.
    """

    def __init__(self, config: ConsoleConfig) -> None:
        credentials = None
        if config.tls_ca_file is not None:
            credentials = ClientTls(
                ca_file=config.tls_ca_file,
                client_cert_file=config.tls_client_cert_file,
                client_key_file=config.tls_client_key_file,
            ).credentials()
        self._channels = [
            open_channel(address, credentials, _GRPC_OPTIONS)
            for address in (config.trainer_url, config.registry_url, config.auth_url)
        ]
        trainer, registry, auth = self._channels
        self._trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer)
        self._futures = common_pb2_grpc.FutureServiceStub(trainer)
        self._registry = registry_service_pb2_grpc.RegistryServiceStub(registry)
        self._auth = auth_service_pb2_grpc.AuthServiceStub(auth)
        self._timeout = config.console_call_timeout_seconds

    async def close(self) -> None:
        """Close the channels."""
        await asyncio.gather(*(channel.close(None) for channel in self._channels))

    async def _call(self, method: Callable[..., Awaitable[R]], request: object, token: str) -> R:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            return await method(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    # -- auth --------------------------------------------------------------------------

    async def exchange_api_key(self, api_key: str) -> auth_pb.ExchangeApiKeyResponse:
        """An access token for an API key (auth's ``ExchangeApiKey``)."""
        request = auth_pb.ExchangeApiKeyRequest(api_key=api_key)
        response: auth_pb.ExchangeApiKeyResponse = await self._call(
            self._auth.ExchangeApiKey, request, ""
        )
        return response

    async def revoke_token(self, token_id: str, token: str) -> None:
        """Revoke the caller's own access token (sign-out)."""
        await self._call(
            self._auth.RevokeToken, auth_pb.RevokeTokenRequest(token_id=token_id), token
        )

    async def audit_events(
        self, token: str, *, page_size: int, page_token: str
    ) -> auth_pb.ListAuditEventsResponse:
        """One page of the tenant's audit events, in chain order."""
        request = auth_pb.ListAuditEventsRequest(page_size=page_size, page_token=page_token)
        response: auth_pb.ListAuditEventsResponse = await self._call(
            self._auth.ListAuditEvents, request, token
        )
        return response

    async def verify_audit_log(self, token: str) -> auth_pb.VerifyAuditLogResponse:
        """Verify the hash chain of the audit log."""
        response: auth_pb.VerifyAuditLogResponse = await self._call(
            self._auth.VerifyAuditLog, auth_pb.VerifyAuditLogRequest(), token
        )
        return response

    # -- trainer -----------------------------------------------------------------------

    async def training_clients(
        self, token: str, *, page_size: int, page_token: str
    ) -> pb.ListTrainingClientsResponse:
        """One page of the tenant's training clients."""
        request = pb.ListTrainingClientsRequest(page_size=page_size, page_token=page_token)
        response: pb.ListTrainingClientsResponse = await self._call(
            self._trainer.ListTrainingClients, request, token
        )
        return response

    async def training_client(self, client_id: str, token: str) -> pb.TrainingClient:
        """A training client of the caller's tenant (NOT_FOUND for another tenant's)."""
        request = pb.GetTrainingClientRequest(training_client_id=client_id)
        response: pb.GetTrainingClientResponse = await self._call(
            self._trainer.GetTrainingClient, request, token
        )
        return response.training_client

    async def privacy_spent(self, client_id: str, token: str) -> pb.PrivacySpent:
        """The privacy a training client has spent."""
        request = pb.GetPrivacySpentRequest(training_client_id=client_id)
        response: pb.GetPrivacySpentResponse = await self._call(
            self._trainer.GetPrivacySpent, request, token
        )
        return response.privacy_spent

    async def training_steps(
        self, client_id: str, token: str, *, page_size: int, page_token: str
    ) -> pb.ListTrainingStepsResponse:
        """One page of a training client's committed steps (loss, ε after each)."""
        request = pb.ListTrainingStepsRequest(
            training_client_id=client_id, page_size=page_size, page_token=page_token
        )
        response: pb.ListTrainingStepsResponse = await self._call(
            self._trainer.ListTrainingSteps, request, token
        )
        return response

    async def checkpoints(
        self, client_id: str, token: str, *, page_size: int, page_token: str
    ) -> pb.ListCheckpointsResponse:
        """One page of a training client's saved states and sampler weights."""
        request = pb.ListCheckpointsRequest(
            training_client_id=client_id, page_size=page_size, page_token=page_token
        )
        response: pb.ListCheckpointsResponse = await self._call(
            self._trainer.ListCheckpoints, request, token
        )
        return response

    async def datasets(
        self, token: str, *, page_size: int, page_token: str
    ) -> pb.ListDatasetsResponse:
        """One page of the tenant's server-held datasets."""
        request = pb.ListDatasetsRequest(page_size=page_size, page_token=page_token)
        response: pb.ListDatasetsResponse = await self._call(
            self._trainer.ListDatasets, request, token
        )
        return response

    async def futures(
        self, token: str, *, kind: str, page_size: int, page_token: str
    ) -> common_pb2.ListFuturesResponse:
        """One page of the caller's futures of one kind, newest first."""
        request = common_pb2.ListFuturesRequest(
            kind=kind, page_size=page_size, page_token=page_token
        )
        response: common_pb2.ListFuturesResponse = await self._call(
            self._futures.ListFutures, request, token
        )
        return response

    # -- registry ----------------------------------------------------------------------

    async def adapters(
        self, token: str, *, page_size: int, page_token: str
    ) -> registry_pb.ListAdaptersResponse:
        """One page of the tenant's adapters."""
        request = registry_pb.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        response: registry_pb.ListAdaptersResponse = await self._call(
            self._registry.ListAdapters, request, token
        )
        return response

    async def adapter(self, name: str, token: str) -> registry_pb.Adapter:
        """One adapter of the tenant (NOT_FOUND for another tenant's)."""
        request = registry_pb.GetAdapterRequest(adapter_name=name)
        response: registry_pb.GetAdapterResponse = await self._call(
            self._registry.GetAdapter, request, token
        )
        return response.adapter

    async def versions(
        self, name: str, token: str, *, page_size: int, page_token: str
    ) -> registry_pb.ListVersionsResponse:
        """One page of an adapter's versions, newest first."""
        request = registry_pb.ListVersionsRequest(
            adapter_name=name, page_size=page_size, page_token=page_token
        )
        response: registry_pb.ListVersionsResponse = await self._call(
            self._registry.ListVersions, request, token
        )
        return response

    async def signing_keys(self, token: str) -> list[registry_pb.SigningKey]:
        """The public keys whose package signatures the registry accepts."""
        response: registry_pb.GetSigningKeysResponse = await self._call(
            self._registry.GetSigningKeys, registry_pb.GetSigningKeysRequest(), token
        )
        return list(response.keys)

    async def download(
        self, name: str, version: int, token: str
    ) -> tuple[registry_pb.AdapterVersion, bytes]:
        """A version's record and its package bytes (the package stays encrypted)."""
        request = registry_pb.DownloadAdapterRequest(adapter_name=name, version=version)
        metadata = (("authorization", f"Bearer {token}"),)
        record: registry_pb.AdapterVersion | None = None
        data = bytearray()
        try:
            stream = self._registry.DownloadAdapter(
                request, metadata=metadata, timeout=self._timeout
            )
            async for part in stream:
                if part.WhichOneof("part") == "version":
                    record = part.version
                else:
                    data += part.chunk
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        if record is None or len(data) != record.size_bytes:
            raise Unavailable("the registry's download stream ended early")
        return record, bytes(data)
