"""Thin gRPC layer of the trainer service: validate, call the domain, convert.

Every RPC of the contract is listed here. Those this deployment does not serve yet
raise :class:`~tensafe.common.errors.Unimplemented` (status UNIMPLEMENTED); none
returns a made-up answer.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc.aio

from tensafe.common.errors import Unimplemented
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(method: str) -> NoReturn:
    raise Unimplemented(
        f"tensafe.trainer.v1.TrainerService/{method} is not served by this deployment yet"
    )


class TrainerServiceServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """``tensafe.trainer.v1.TrainerService``."""

    async def ListBaseModels(
        self, request: pb.ListBaseModelsRequest, context: Context
    ) -> pb.ListBaseModelsResponse:
        _unimplemented("ListBaseModels")

    async def CreateTrainingClient(
        self, request: pb.CreateTrainingClientRequest, context: Context
    ) -> pb.CreateTrainingClientResponse:
        _unimplemented("CreateTrainingClient")

    async def GetTrainingClient(
        self, request: pb.GetTrainingClientRequest, context: Context
    ) -> pb.GetTrainingClientResponse:
        _unimplemented("GetTrainingClient")

    async def ListTrainingClients(
        self, request: pb.ListTrainingClientsRequest, context: Context
    ) -> pb.ListTrainingClientsResponse:
        _unimplemented("ListTrainingClients")

    async def DeleteTrainingClient(
        self, request: pb.DeleteTrainingClientRequest, context: Context
    ) -> pb.DeleteTrainingClientResponse:
        _unimplemented("DeleteTrainingClient")

    async def ForwardBackward(
        self, request: pb.ForwardBackwardRequest, context: Context
    ) -> pb.ForwardBackwardResponse:
        _unimplemented("ForwardBackward")

    async def Forward(self, request: pb.ForwardRequest, context: Context) -> pb.ForwardResponse:
        _unimplemented("Forward")

    async def OptimStep(
        self, request: pb.OptimStepRequest, context: Context
    ) -> pb.OptimStepResponse:
        _unimplemented("OptimStep")

    async def Sample(self, request: pb.SampleRequest, context: Context) -> pb.SampleResponse:
        _unimplemented("Sample")

    async def ComputeLogprobs(
        self, request: pb.ComputeLogprobsRequest, context: Context
    ) -> pb.ComputeLogprobsResponse:
        _unimplemented("ComputeLogprobs")

    async def SaveState(
        self, request: pb.SaveStateRequest, context: Context
    ) -> pb.SaveStateResponse:
        _unimplemented("SaveState")

    async def LoadState(
        self, request: pb.LoadStateRequest, context: Context
    ) -> pb.LoadStateResponse:
        _unimplemented("LoadState")

    async def SaveWeightsForSampler(
        self, request: pb.SaveWeightsForSamplerRequest, context: Context
    ) -> pb.SaveWeightsForSamplerResponse:
        _unimplemented("SaveWeightsForSampler")

    async def GetPrivacySpent(
        self, request: pb.GetPrivacySpentRequest, context: Context
    ) -> pb.GetPrivacySpentResponse:
        _unimplemented("GetPrivacySpent")

    async def SaveAdapter(
        self, request: pb.SaveAdapterRequest, context: Context
    ) -> pb.SaveAdapterResponse:
        _unimplemented("SaveAdapter")

    async def UploadDataset(
        self, request_iterator: Any, context: Context
    ) -> pb.UploadDatasetResponse:
        _unimplemented("UploadDataset")

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        _unimplemented("GetDataset")

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        _unimplemented("ListDatasets")

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> pb.DeleteDatasetResponse:
        _unimplemented("DeleteDataset")

    async def TrainOnDataset(
        self, request: pb.TrainOnDatasetRequest, context: Context
    ) -> pb.TrainOnDatasetResponse:
        _unimplemented("TrainOnDataset")

    async def AuditPrivacy(
        self, request: pb.AuditPrivacyRequest, context: Context
    ) -> pb.AuditPrivacyResponse:
        _unimplemented("AuditPrivacy")
