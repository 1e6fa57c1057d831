"""Thin gRPC layer of the trainer service: identify the caller, call the domain, convert.

Errors are typed domain errors; the shared interceptor maps them to status codes. The
caller's identity comes from :func:`caller`, the one place that reads it. RPCs this
deployment does not serve yet raise :class:`~tensafe.common.errors.Unimplemented`
(status UNIMPLEMENTED); none returns a made-up answer.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc.aio

from tensafe.common.auth import SCOPE_READ, SCOPE_TRAIN, require_scope
from tensafe.common.errors import InvalidArgument, Unimplemented
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer import serde
from tensafe.trainer.domain.datasets.service import DatasetService
from tensafe.trainer.domain.ledger import Lineage, client_dp
from tensafe.trainer.domain.service import Caller, TrainerDomain

Context = grpc.aio.ServicerContext[Any, Any]

MAX_WAIT_SECONDS = 60.0
"""Longest WaitFuture wait, whatever the request asks; clients wait in a loop."""


def caller(*scopes: str) -> Caller:
    """The authenticated caller of the current RPC, checked for ``scopes``.

    Raises:
        Unauthenticated: No identity (the auth interceptor is not installed).
        PermissionDenied: A scope is missing.
    """
    identity = require_scope(*scopes)
    return Caller(tenant=identity.tenant_id, principal=identity.principal_id)


def _unimplemented(method: str) -> NoReturn:
    raise Unimplemented(
        f"tensafe.trainer.v1.TrainerService/{method} is not served by this deployment yet"
    )


class TrainerServiceServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """``tensafe.trainer.v1.TrainerService``.

    Args:
        api: The trainer's domain.
        datasets: The server-held datasets' domain.
    """

    def __init__(self, api: TrainerDomain, *, datasets: DatasetService) -> None:
        self._api = api
        self._datasets = datasets

    async def GetBaseModelTokenizer(
        self, request: pb.GetBaseModelTokenizerRequest, context: Context
    ) -> pb.GetBaseModelTokenizerResponse:
        """A base model's tokenizer files (authorized as ListBaseModels: the files are as
        public within the deployment as the model names)."""
        caller(SCOPE_READ)
        files, digest = await self._api.base_model_tokenizer(request.base_model)
        return pb.GetBaseModelTokenizerResponse(
            files=[pb.TokenizerFile(name=name, content=content) for name, content in files],
            sha256=digest,
        )

    async def ListBaseModels(
        self, request: pb.ListBaseModelsRequest, context: Context
    ) -> pb.ListBaseModelsResponse:
        """List the registered base models."""
        caller(SCOPE_READ)
        models = await self._api.list_base_models()
        return pb.ListBaseModelsResponse(
            base_models=[
                pb.BaseModel(
                    name=info.name,
                    weights_sha256=info.weights_sha256,
                    vocab_size=info.vocab_size,
                    max_context_length=info.max_context_length,
                    lora_target_modules=list(info.lora_target_modules),
                )
                for info in models
            ]
        )

    async def CreateTrainingClient(
        self, request: pb.CreateTrainingClientRequest, context: Context
    ) -> pb.CreateTrainingClientResponse:
        """Create a LoRA training client."""
        who = caller(SCOPE_TRAIN)
        row = await self._api.create_client(who, serde.create_client(request))
        return pb.CreateTrainingClientResponse(training_client=serde.client_to_proto(row))

    async def GetTrainingClient(
        self, request: pb.GetTrainingClientRequest, context: Context
    ) -> pb.GetTrainingClientResponse:
        """Return a training client, by id or by the request id that created it."""
        who = caller(SCOPE_READ)
        if request.request_id:
            if request.training_client_id:
                raise InvalidArgument("request_id", "give training_client_id or request_id")
            row = await self._api.client_by_request(who, request.request_id)
        else:
            row = await self._api.get_client(who, request.training_client_id)
        return pb.GetTrainingClientResponse(training_client=serde.client_to_proto(row))

    async def ListTrainingClients(
        self, request: pb.ListTrainingClientsRequest, context: Context
    ) -> pb.ListTrainingClientsResponse:
        """List the caller's training clients."""
        page = await self._api.list_clients(
            caller(SCOPE_READ), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListTrainingClientsResponse(
            training_clients=[serde.client_to_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteTrainingClient(
        self, request: pb.DeleteTrainingClientRequest, context: Context
    ) -> pb.DeleteTrainingClientResponse:
        """Delete a training client and its checkpoints."""
        await self._api.delete_client(caller(SCOPE_TRAIN), request.training_client_id)
        return pb.DeleteTrainingClientResponse()

    async def ForwardBackward(
        self, request: pb.ForwardBackwardRequest, context: Context
    ) -> pb.ForwardBackwardResponse:
        """Queue a forward-backward pass."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.forward_backward(who, serde.forward_backward(request))
        return pb.ForwardBackwardResponse(future=serde.future_to_proto(future))

    async def Forward(self, request: pb.ForwardRequest, context: Context) -> pb.ForwardResponse:
        """Queue a forward pass."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.forward_backward(who, serde.forward_backward(request))
        return pb.ForwardResponse(future=serde.future_to_proto(future))

    async def OptimStep(
        self, request: pb.OptimStepRequest, context: Context
    ) -> pb.OptimStepResponse:
        """Queue an optimizer step (refused when over the privacy budget)."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.optim_step(who, serde.optim_step(request))
        return pb.OptimStepResponse(future=serde.future_to_proto(future))

    async def Sample(self, request: pb.SampleRequest, context: Context) -> pb.SampleResponse:
        """Queue sampling."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.sample(who, serde.sample(request))
        return pb.SampleResponse(future=serde.future_to_proto(future))

    async def ComputeLogprobs(
        self, request: pb.ComputeLogprobsRequest, context: Context
    ) -> pb.ComputeLogprobsResponse:
        """Queue a log-probability computation."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.compute_logprobs(who, serde.compute_logprobs(request))
        return pb.ComputeLogprobsResponse(future=serde.future_to_proto(future))

    async def SaveState(
        self, request: pb.SaveStateRequest, context: Context
    ) -> pb.SaveStateResponse:
        """Queue a checkpoint."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.save(who, serde.save_state(request))
        return pb.SaveStateResponse(future=serde.future_to_proto(future))

    async def LoadState(
        self, request: pb.LoadStateRequest, context: Context
    ) -> pb.LoadStateResponse:
        """Queue a checkpoint restore."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.load_state(who, serde.load_state(request))
        return pb.LoadStateResponse(future=serde.future_to_proto(future))

    async def SaveWeightsForSampler(
        self, request: pb.SaveWeightsForSamplerRequest, context: Context
    ) -> pb.SaveWeightsForSamplerResponse:
        """Queue freezing the weights for sampling."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.save(who, serde.save_weights_for_sampler(request))
        return pb.SaveWeightsForSamplerResponse(future=serde.future_to_proto(future))

    async def GetPrivacySpent(
        self, request: pb.GetPrivacySpentRequest, context: Context
    ) -> pb.GetPrivacySpentResponse:
        """Report the privacy spent by a client."""
        row, report = await self._api.privacy_spent(caller(SCOPE_READ), request.training_client_id)
        return pb.GetPrivacySpentResponse(privacy_spent=serde.privacy_spent(client_dp(row), report))

    async def ListTrainingSteps(
        self, request: pb.ListTrainingStepsRequest, context: Context
    ) -> pb.ListTrainingStepsResponse:
        """List a client's committed optimizer steps with their loss and epsilon."""
        page = await self._api.list_steps(
            caller(SCOPE_READ),
            request.training_client_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListTrainingStepsResponse(
            steps=[serde.step_to_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Context
    ) -> pb.ListCheckpointsResponse:
        """List a client's saved states and sampler weights."""
        page = await self._api.list_checkpoints(
            caller(SCOPE_READ),
            request.training_client_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListCheckpointsResponse(
            checkpoints=[
                serde.checkpoint_to_proto(row, Lineage.parse(row.lineage_json))
                for row in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def SaveAdapter(
        self, request: pb.SaveAdapterRequest, context: Context
    ) -> pb.SaveAdapterResponse:
        """Queue sealing the client's adapter as a TGSP package and publishing it."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.save(who, serde.save_adapter(request))
        return pb.SaveAdapterResponse(future=serde.future_to_proto(future))

    async def UploadDataset(
        self, request_iterator: Any, context: Context
    ) -> pb.UploadDatasetResponse:
        """Store a streamed JSONL dataset, tokenised and encrypted."""
        who = caller(SCOPE_TRAIN)
        row = await self._datasets.upload(who, serde.upload_parts(request_iterator))
        return pb.UploadDatasetResponse(dataset=serde.dataset_to_proto(row))

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        """Return a dataset's metadata."""
        row = await self._datasets.get(caller(SCOPE_READ), request.dataset_id)
        spent = await self._datasets.epsilon_spent(row)
        return pb.GetDatasetResponse(dataset=serde.dataset_to_proto(row, spent))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        """List the caller's datasets."""
        page = await self._datasets.list(
            caller(SCOPE_READ), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListDatasetsResponse(
            datasets=[
                serde.dataset_to_proto(row, await self._datasets.epsilon_spent(row))
                for row in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> pb.DeleteDatasetResponse:
        """Delete a dataset."""
        await self._datasets.delete(caller(SCOPE_TRAIN), request.dataset_id)
        return pb.DeleteDatasetResponse()

    async def TrainOnDataset(
        self, request: pb.TrainOnDatasetRequest, context: Context
    ) -> pb.TrainOnDatasetResponse:
        """Queue DP-SGD on a server-held dataset with server-drawn Poisson batches."""
        who = caller(SCOPE_TRAIN)
        future = await self._datasets.train_on_dataset(who, serde.train_on_dataset(request))
        return pb.TrainOnDatasetResponse(future=serde.future_to_proto(future))

    async def AuditPrivacy(
        self, request: pb.AuditPrivacyRequest, context: Context
    ) -> pb.AuditPrivacyResponse:
        """Queue an empirical privacy audit (a shadow run; no tenant data or budget)."""
        who = caller(SCOPE_TRAIN)
        future = await self._api.audit_privacy(who, serde.audit_privacy(request))
        return pb.AuditPrivacyResponse(future=serde.future_to_proto(future))


class TrainerFutureServicer(common_pb2_grpc.FutureServiceServicer):
    """``tensafe.common.v1.FutureService`` over the trainer's futures.

    Args:
        api: The trainer's domain.
    """

    def __init__(self, api: TrainerDomain) -> None:
        self._api = api

    async def GetFuture(
        self, request: common_pb2.GetFutureRequest, context: Context
    ) -> common_pb2.GetFutureResponse:
        """Return a future."""
        future = await self._api.get_future(caller(SCOPE_READ), request.future_id)
        return common_pb2.GetFutureResponse(future=serde.future_to_proto(future))

    async def WaitFuture(
        self, request: common_pb2.WaitFutureRequest, context: Context
    ) -> common_pb2.WaitFutureResponse:
        """Wait for a future, bounded by the request, the deadline and a maximum."""
        who = caller(SCOPE_READ)
        # From the fields: ToTimedelta() overflows on a Duration of 2^63 seconds.
        timeout = request.timeout.seconds + request.timeout.nanos / 1e9
        if timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer a little before the deadline so the client gets the snapshot.
            timeout = min(timeout, max(0.0, remaining - 0.05))
        future = await self._api.wait_future(
            who, request.future_id, timeout=min(timeout, MAX_WAIT_SECONDS)
        )
        return common_pb2.WaitFutureResponse(future=serde.future_to_proto(future))

    async def CancelFuture(
        self, request: common_pb2.CancelFutureRequest, context: Context
    ) -> common_pb2.CancelFutureResponse:
        """Cancel a future that has not finished."""
        future = await self._api.cancel_future(caller(SCOPE_TRAIN), request.future_id)
        return common_pb2.CancelFutureResponse(future=serde.future_to_proto(future))

    async def ListFutures(
        self, request: common_pb2.ListFuturesRequest, context: Context
    ) -> common_pb2.ListFuturesResponse:
        """List the caller's futures, newest first."""
        page = await self._api.list_futures(
            caller(SCOPE_READ),
            page_size=request.page_size,
            page_token=request.page_token,
            kind=request.kind or None,
        )
        return common_pb2.ListFuturesResponse(
            futures=[serde.future_to_proto(future) for future in page.futures],
            next_page_token=page.next_page_token,
        )
