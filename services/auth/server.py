"""Wiring of the auth service: build the object graph from config and serve it."""

from __future__ import annotations

from tensafe.auth.config import AuthConfig
from tensafe.auth.servicer import AuthServiceServicer
from tensafe.common.grpc_server import Assembly, ServiceRegistration, run_service
from tensafe.proto.auth.v1 import auth_service_pb2_grpc


async def build(config: AuthConfig) -> Assembly:
    """Build the auth service's gRPC services from its config."""
    return Assembly(
        services=[
            ServiceRegistration(
                "tensafe.auth.v1.AuthService",
                auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
                AuthServiceServicer(),
            )
        ]
    )


def main() -> int:
    """Entry point of ``python -m tensafe.auth``."""
    return run_service("auth", AuthConfig, build)
