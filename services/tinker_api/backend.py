"""The trainer's and auth's gRPC contracts as this service calls them: with the caller's
own token, each call bounded by a deadline, each failure a typed TenSafe error.

The service is a client like any other: it holds no credential of its own. Every call
carries the JWT the SDK sent (``X-API-Key``) as ``authorization: Bearer``, so the trainer
and auth apply tenancy, scopes and revocation to the Tinker user exactly as on gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2

from tensafe.client.channels import ClientTls
from tensafe.common import errors
from tensafe.common.grpc_errors import from_rpc_error
from tensafe.common.tls import open_channel
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.tinker_api.config import TinkerApiConfig

R = TypeVar("R")

_GRPC_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


class Backend:
    """Stubs of the trainer (``TrainerService``, ``FutureService``) and auth.

    Args:
        config: Where the trainer and auth are, TLS, the call deadline.
    """

    def __init__(self, config: TinkerApiConfig) -> None:
        credentials = None
        if config.tls_ca_file is not None:
            credentials = ClientTls(
                ca_file=config.tls_ca_file,
                client_cert_file=config.tls_client_cert_file,
                client_key_file=config.tls_client_key_file,
            ).credentials()
        self._trainer_channel = open_channel(config.trainer_url, credentials, _GRPC_OPTIONS)
        self._auth_channel = open_channel(config.auth_url, credentials, _GRPC_OPTIONS)
        self._trainer = trainer_service_pb2_grpc.TrainerServiceStub(self._trainer_channel)
        self._futures = common_pb2_grpc.FutureServiceStub(self._trainer_channel)
        self._auth = auth_service_pb2_grpc.AuthServiceStub(self._auth_channel)
        self._timeout = config.tinker_call_timeout_seconds

    async def close(self) -> None:
        """Close the channels."""
        await self._trainer_channel.close(None)
        await self._auth_channel.close(None)

    async def _call(
        self, method: Callable[..., Awaitable[R]], request: object, token: str, *, extra: float = 0
    ) -> R:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            return await method(request, metadata=metadata, timeout=self._timeout + extra)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    # -- auth --------------------------------------------------------------------------

    async def exchange_api_key(self, api_key: str) -> str:
        """A JWT for a TenSafe API key (auth's ``ExchangeApiKey``)."""
        response: auth_pb.ExchangeApiKeyResponse = await self._call(
            self._auth.ExchangeApiKey, auth_pb.ExchangeApiKeyRequest(api_key=api_key), ""
        )
        return response.access_token

    async def access_token(self, credential: str) -> str:
        """The JWT of a caller's credential: a JWT (``eyJ...``) as it is (the trainer
        checks it on use), a TenSafe API key exchanged at auth."""
        if credential.startswith("eyJ"):
            return credential
        return await self.exchange_api_key(credential)

    # -- trainer -----------------------------------------------------------------------

    async def list_base_models(self, token: str) -> list[pb.BaseModel]:
        """The base models; also how a credential is checked (needs a valid token)."""
        response: pb.ListBaseModelsResponse = await self._call(
            self._trainer.ListBaseModels, pb.ListBaseModelsRequest(), token
        )
        return list(response.base_models)

    async def base_model_tokenizer(
        self, base_model: str, token: str
    ) -> pb.GetBaseModelTokenizerResponse:
        """The tokenizer files of a base model and their digest (never the weights)."""
        response: pb.GetBaseModelTokenizerResponse = await self._call(
            self._trainer.GetBaseModelTokenizer,
            pb.GetBaseModelTokenizerRequest(base_model=base_model),
            token,
        )
        return response

    async def create_training_client(
        self, request: pb.CreateTrainingClientRequest, token: str
    ) -> pb.TrainingClient:
        """Create a training client."""
        response: pb.CreateTrainingClientResponse = await self._call(
            self._trainer.CreateTrainingClient, request, token
        )
        return response.training_client

    async def get_training_client(self, client_id: str, token: str) -> pb.TrainingClient:
        """A training client of the caller's tenant (NOT_FOUND for another tenant's)."""
        response: pb.GetTrainingClientResponse = await self._call(
            self._trainer.GetTrainingClient,
            pb.GetTrainingClientRequest(training_client_id=client_id),
            token,
        )
        return response.training_client

    async def get_training_client_by_request(
        self, request_id: str, token: str
    ) -> pb.TrainingClient:
        """The caller's training client a CreateTrainingClient with ``request_id`` made."""
        response: pb.GetTrainingClientResponse = await self._call(
            self._trainer.GetTrainingClient,
            pb.GetTrainingClientRequest(request_id=request_id),
            token,
        )
        return response.training_client

    async def privacy_spent(self, client_id: str, token: str) -> pb.PrivacySpent:
        """The privacy a training client has spent."""
        response: pb.GetPrivacySpentResponse = await self._call(
            self._trainer.GetPrivacySpent,
            pb.GetPrivacySpentRequest(training_client_id=client_id),
            token,
        )
        return response.privacy_spent

    async def submit(self, request: object, token: str) -> str:
        """Submit a future-returning trainer call; returns the future's id."""
        methods: dict[type, Callable[..., Awaitable[Any]]] = {
            pb.ForwardBackwardRequest: self._trainer.ForwardBackward,
            pb.ForwardRequest: self._trainer.Forward,
            pb.OptimStepRequest: self._trainer.OptimStep,
            pb.SaveStateRequest: self._trainer.SaveState,
            pb.LoadStateRequest: self._trainer.LoadState,
            pb.SaveWeightsForSamplerRequest: self._trainer.SaveWeightsForSampler,
            pb.SampleRequest: self._trainer.Sample,
            pb.ComputeLogprobsRequest: self._trainer.ComputeLogprobs,
        }
        method = methods.get(type(request))
        if method is None:  # a programming error, not a caller's
            raise TypeError(f"no trainer call takes {type(request).__name__}")
        response = await self._call(method, request, token)
        return str(response.future.id)

    async def wait_future(self, future_id: str, token: str, seconds: float) -> common_pb2.Future:
        """The future, once done or after ``seconds`` (then still pending)."""
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(seconds * 1e9))
        response: common_pb2.WaitFutureResponse = await self._call(
            self._futures.WaitFuture,
            common_pb2.WaitFutureRequest(future_id=future_id, timeout=timeout),
            token,
            extra=seconds,
        )
        return response.future

    async def cancel_future(self, future_id: str, token: str) -> None:
        """Cancel a pending future."""
        await self._call(
            self._futures.CancelFuture, common_pb2.CancelFutureRequest(future_id=future_id), token
        )


def future_error(future: common_pb2.Future) -> tuple[errors.ErrorCode, str]:
    """The code and message of a failed or cancelled future."""
    if future.status == common_pb2.FUTURE_STATUS_CANCELLED:
        return errors.ErrorCode.CANCELLED, "the request was cancelled"
    name = grpc.StatusCode.UNKNOWN.name
    for code in grpc.StatusCode:
        if code.value[0] == future.error.code:
            name = code.name
    known = name in errors.ErrorCode.__members__
    return (errors.ErrorCode[name] if known else errors.ErrorCode.INTERNAL), future.error.message
