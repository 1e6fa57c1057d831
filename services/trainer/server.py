"""Wiring of the trainer API: build the object graph from config and serve it."""

from __future__ import annotations

from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.servicer import TrainerServiceServicer


async def build(config: TrainerConfig) -> Assembly:
    """Build the trainer API's gRPC services from its config."""
    return Assembly(
        services=[
            ServiceRegistration(
                "tensafe.trainer.v1.TrainerService",
                trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server,
                TrainerServiceServicer(),
            )
        ]
    )


def main() -> int:
    """Entry point of ``python -m tensafe.trainer``."""
    return run_service("trainer", TrainerConfig, build)
