"""``tensafe token``: print a short-lived TenSafe access token (a JWT) for the API key.

Made for the official ``tinker`` SDK: ``TINKER_CREDENTIAL_CMD="tensafe token"`` has the SDK
run it whenever it needs a fresh credential, and the SDK sends the printed JWT to the
Tinker API (docs/tinker.md), which forwards it to the trainer. Nothing but the token goes
to stdout. The API key is found as everywhere in the SDK (``--api-key``,
``TENSAFE_API_KEY``, the connection file); auth's address from ``--auth-url``,
``TENSAFE_AUTH_URL`` or the connection file. Exit code 2 on an error (the message on
stderr says why).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``tensafe token`` to the CLI's sub-commands."""
    token = subparsers.add_parser(
        "token", help="print a short-lived access token (JWT) for the API key"
    )
    token.add_argument("--api-key", default=None, help="default: $TENSAFE_API_KEY, connection file")
    token.add_argument(
        "--auth-url",
        default=None,
        help="auth host:port; default: $TENSAFE_AUTH_URL, connection file",
    )
    token.add_argument("--connection-file", help="default: .tensafe/connection.json")
    token.add_argument(
        "--ttl-seconds",
        type=int,
        default=0,
        help="requested lifetime (auth caps it; default and maximum 15 minutes)",
    )
    token.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe token``."""
    import grpc
    from google.protobuf import duration_pb2

    from tensafe.client.auth import find_api_key
    from tensafe.client.channels import open_channel, resolve_tls
    from tensafe.client.connection import connection_path, load_connection
    from tensafe.common.errors import TenSafeError
    from tensafe.common.grpc_errors import from_rpc_error
    from tensafe.proto.auth.v1 import auth_service_pb2 as pb
    from tensafe.proto.auth.v1 import auth_service_pb2_grpc

    try:
        auth_url = args.auth_url or os.environ.get("TENSAFE_AUTH_URL", "").strip()
        connection = None
        if not auth_url or connection_path(args.connection_file).exists():
            connection = load_connection(args.connection_file)
        api_key = find_api_key(
            args.api_key, connection_file=connection.path if connection else None
        )
        if auth_url:
            channel = open_channel(
                auth_url, tls=resolve_tls(connection_tls=connection.tls if connection else None)
            )
        else:
            assert connection is not None
            channel = connection.channel("auth")
    except (FileNotFoundError, KeyError, TenSafeError) as exc:
        print(f"tensafe token: {exc}", file=sys.stderr)
        return 2
    request = pb.ExchangeApiKeyRequest(api_key=api_key)
    if args.ttl_seconds:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=args.ttl_seconds))
    with channel:
        try:
            response = auth_service_pb2_grpc.AuthServiceStub(channel).ExchangeApiKey(
                request, timeout=30
            )
        except grpc.RpcError as exc:
            print(f"tensafe token: {from_rpc_error(exc).message}", file=sys.stderr)
            return 2
    print(response.access_token)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tensafe.client.token_cli``: ``tensafe token`` without loading the rest of
    the CLI (which imports torch): the form to use where the SDK runs it often."""
    parser = argparse.ArgumentParser(prog="tensafe")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["token", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
