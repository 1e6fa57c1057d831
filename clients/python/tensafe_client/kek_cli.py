"""``tensafe admin rotate-kek --tenant T``: rotate a tenant's key-encryption key.

Calls ``RegistryService.RotateTenantKek`` over gRPC (no service package is imported)
with the connection's API key, which must carry the ``platform_admin`` scope. The
registry makes a new KEK version and re-wraps every stored package's data key under it;
the job's state is in the registry's database, so running the command again after an
interruption resumes the same rotation. Prints the report as JSON. Exit codes: 0 done,
2 on an error. Destroying an old KEK version is an operator command on a registry host
(``python -m tensafe.registry.admin destroy-kek``, docs/registry.md §5.1).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(admin_subparsers: Any) -> None:
    """Add ``rotate-kek`` to the ``tensafe admin`` sub-commands."""
    rotate = admin_subparsers.add_parser(
        "rotate-kek", help="new KEK version for a tenant; re-wrap its packages (resumable)"
    )
    rotate.add_argument("--tenant", required=True, help="the tenant id")
    rotate.add_argument("--connection-file", help="default: .tensafe/connection.json")
    rotate.add_argument("--timeout", type=float, default=3600.0, help="seconds")
    rotate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe admin rotate-kek``."""
    import grpc

    from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
    from tensafe.client.connection import load_connection
    from tensafe.common.errors import TenSafeError
    from tensafe.common.grpc_errors import from_rpc_error
    from tensafe.proto.registry.v1 import registry_service_pb2 as pb
    from tensafe.proto.registry.v1 import registry_service_pb2_grpc

    try:
        connection = load_connection(args.connection_file)
        api_key = find_api_key(connection_file=connection.path)
        auth_channel, registry_channel = connection.channel("auth"), connection.channel("registry")
    except (FileNotFoundError, KeyError, TenSafeError) as exc:
        print(f"tensafe admin rotate-kek: {exc}", file=sys.stderr)
        return 2
    with auth_channel, registry_channel:
        channel = authenticated_channel(registry_channel, TokenProvider(auth_channel, api_key))
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        try:
            report = stub.RotateTenantKek(
                pb.RotateTenantKekRequest(tenant_id=args.tenant), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"tensafe admin rotate-kek: {from_rpc_error(exc).message}", file=sys.stderr)
            return 2
    print(
        json.dumps(
            {
                "tenant_id": report.tenant_id,
                "kek_id": report.kek_id,
                "resumed": report.resumed,
                "rewrapped": report.rewrapped,
                "pinned_by_format_1": list(report.pinned_versions),
                "kek_ids": list(report.kek_ids),
            },
            indent=2,
        )
    )
    return 0
