"""The ``tensafe`` command line.

``tensafe up`` runs the local stack, ``tensafe status`` checks each service's health,
``tensafe serve <service>`` runs one service in the foreground (the container
entry point does the same).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensafe.client.connection import DEFAULT_DATA_DIR, load_connection
from tensafe.client.stack import SERVICES, LocalStack, StackError, StackOptions

SERVE_TARGETS = {name.replace("_", "-"): name for name in SERVICES}


def _cmd_up(args: argparse.Namespace) -> int:
    options = StackOptions(
        data_dir=Path(args.data_dir),
        database_url=args.database_url,
        nats_url=args.nats_url,
    )
    stack = LocalStack(options)
    print("tensafe up: DEV MODE (no production secrets; loopback only)", flush=True)
    try:
        connection = stack.start()
    except (StackError, OSError) as exc:
        stack.stop()
        print(f"tensafe up: {exc}", file=sys.stderr)
        return 1
    services = connection["services"]
    assert isinstance(services, dict)
    for name, address in services.items():
        print(f"  {name:<11} {address}")
    print(f"  {'nats':<11} {connection['nats_url']}")
    print(f"connection file: {stack.connection_file}", flush=True)
    print(f"logs: {options.data_dir / 'logs'}", flush=True)
    print("ready; Ctrl-C or SIGTERM stops everything", flush=True)
    try:
        reason = stack.wait()
    finally:
        stack.stop()
    print(f"tensafe up: stopped ({reason})", flush=True)
    return 0 if reason == "signal" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        connection = load_connection(args.connection_file)
    except FileNotFoundError as exc:
        print(f"tensafe status: {exc}", file=sys.stderr)
        return 1
    healthy = True
    for name, address in connection.services.items():
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as exc:
                state = f"UNREACHABLE ({exc.code().name})"
        healthy &= state == "SERVING"
        print(f"{name:<11} {address:<22} {state}")
    return 0 if healthy else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    module = f"tensafe.{SERVE_TARGETS[args.service]}"
    os.execv(sys.executable, [sys.executable, "-m", module])  # noqa: S606 - replaces this process


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensafe`` command."""
    parser = argparse.ArgumentParser(prog="tensafe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine (dev mode)")
    up.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="state folder (kept)")
    up.add_argument("--database-url", help="shared PostgreSQL URL instead of SQLite files")
    up.add_argument("--nats-url", help="external NATS instead of the embedded server")
    up.set_defaults(func=_cmd_up)

    status = sub.add_parser("status", help="health of each service of the stack")
    status.add_argument("--connection-file", help="default: .tensafe/connection.json")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per check")
    status.set_defaults(func=_cmd_status)

    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=sorted(SERVE_TARGETS))
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensafe`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
