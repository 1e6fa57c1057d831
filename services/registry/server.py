"""Wiring of the registry service: build the object graph from config and serve it."""

from __future__ import annotations

from tensafe.common.auth import connect_authentication
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.registry.config import RegistryConfig
from tensafe.registry.servicer import RegistryServiceServicer


async def build(config: RegistryConfig) -> Assembly:
    """Build the registry service's gRPC services from its config."""
    authentication = await connect_authentication(config, service="registry")
    return Assembly(
        services=[
            ServiceRegistration(
                "tensafe.registry.v1.RegistryService",
                registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
                RegistryServiceServicer(),
            )
        ],
        interceptors=[authentication.interceptor],
        close=authentication.close,
    )


def main() -> int:
    """Entry point of ``python -m tensafe.registry``."""
    return run_service("registry", RegistryConfig, build)
