"""Wiring of the HE runtime service: build the object graph from config and serve it."""

from __future__ import annotations

from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.he_runtime.servicer import HeRuntimeServiceServicer
from tensafe.proto.he.v1 import he_service_pb2_grpc


async def build(config: HeRuntimeConfig) -> Assembly:
    """Build the HE runtime's gRPC services from its config."""
    return Assembly(
        services=[
            ServiceRegistration(
                "tensafe.he.v1.HeRuntimeService",
                he_service_pb2_grpc.add_HeRuntimeServiceServicer_to_server,
                HeRuntimeServiceServicer(),
            )
        ]
    )


def main() -> int:
    """Entry point of ``python -m tensafe.he_runtime``."""
    return run_service("he_runtime", HeRuntimeConfig, build)
