"""``python -m tensafe.common.healthcheck HOST:PORT...``: is every service SERVING?

The chart's ``helm test`` Pod runs it against the four services. Each address is asked
``grpc.health.v1.Health/Check`` for the server as a whole (service ``""``); the command
prints one line per address and exits 1 if any is not SERVING or does not answer
within ``--timeout`` seconds. With ``--tls-dir`` (the chart's TLS secret: ``ca.crt``,
``tls.crt``, ``tls.key``) the calls are mutual TLS, as the services require then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, tls_dir: Path | None) -> grpc.Channel:
    if tls_dir is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "tls.key").read_bytes(),
        certificate_chain=(tls_dir / "tls.crt").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def check(address: str, *, tls_dir: Path | None, timeout: float) -> str:
    """The health status name of the server at ``address`` (or the call's error code)."""
    with _channel(address, tls_dir) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as error:
            return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None) -> int:
    """Check every address; 0 when all are SERVING."""
    parser = argparse.ArgumentParser(description="gRPC health of TenSafe services")
    parser.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--tls-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    healthy = True
    for address in args.addresses:
        status = check(address, tls_dir=args.tls_dir, timeout=args.timeout)
        print(f"{address}: {status}")
        healthy &= status == "SERVING"
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
