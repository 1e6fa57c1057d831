"""``tensafe audit privacy``: run the trainer's empirical one-run privacy audit.

Calls ``TrainerService.AuditPrivacy`` over gRPC (no service package is imported), waits
for the future and prints the claimed epsilon next to the empirical lower bound. The
audit is a shadow run on a base model: it uses no tenant data and charges no budget.
Exit codes: 0 when the bound does not exceed the claim, 1 when it does (the audit
refutes the claimed epsilon), 2 on an error.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

import grpc
from google.protobuf import duration_pb2

_POLL_SECONDS = 30


def register(audit_subparsers: Any) -> None:
    """Add ``privacy`` to the ``tensafe audit`` sub-commands."""
    privacy = audit_subparsers.add_parser(
        "privacy", help="empirical one-run audit of the DP-SGD implementation"
    )
    privacy.add_argument("--base-model", required=True)
    privacy.add_argument("--rank", type=int, default=8)
    noise = privacy.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float)
    noise.add_argument("--target-epsilon", type=float)
    privacy.add_argument("--max-grad-norm", type=float, default=1.0)
    privacy.add_argument("--delta", type=float, default=1e-5)
    privacy.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    privacy.add_argument("--steps", type=int, default=100)
    privacy.add_argument("--batch-size", type=int, default=8)
    privacy.add_argument(
        "--sampling", choices=("client-batches", "poisson"), default="client-batches"
    )
    privacy.add_argument("--canaries", type=int, default=1000, help="m, >= 10")
    privacy.add_argument("--guesses-per-side", type=int, default=100, help="k, <= m/2")
    privacy.add_argument("--confidence", type=float, default=0.95)
    privacy.add_argument("--canary-kind", choices=("white-box", "black-box"), default="white-box")
    privacy.add_argument("--connection-file", help="default: .tensafe/connection.json")
    privacy.add_argument("--timeout", type=float, default=3600.0, help="seconds")
    privacy.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``tensafe audit privacy``."""
    from tensafe.client.auth import TokenProvider, authenticated_channel, find_api_key
    from tensafe.client.connection import load_connection
    from tensafe.common.errors import TenSafeError
    from tensafe.common.grpc_errors import from_rpc_error
    from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
    from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
    from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc

    dp = pb.DpConfig(
        max_grad_norm=args.max_grad_norm,
        delta=args.delta,
        accountant=pb.ACCOUNTANT_PLD if args.accountant == "pld" else pb.ACCOUNTANT_RDP,
    )
    if args.target_epsilon is not None:
        dp.target_epsilon = args.target_epsilon
    else:
        dp.noise_multiplier = args.noise_multiplier
    request = pb.AuditPrivacyRequest(
        base_model=args.base_model,
        lora=pb.LoraConfig(rank=args.rank),
        dp=dp,
        steps=args.steps,
        batch_size=args.batch_size,
        sampling=pb.SAMPLING_POISSON if args.sampling == "poisson" else pb.SAMPLING_CLIENT_BATCHES,
        canaries=args.canaries,
        guesses_per_side=args.guesses_per_side,
        confidence=args.confidence,
        canary_kind=(
            pb.CANARY_KIND_BLACK_BOX
            if args.canary_kind == "black-box"
            else pb.CANARY_KIND_WHITE_BOX
        ),
        request_id=uuid.uuid4().hex,
    )
    try:
        connection = load_connection(args.connection_file)
        api_key = find_api_key(connection_file=connection.path)
        auth_channel, trainer_channel = connection.channel("auth"), connection.channel("trainer")
    except (FileNotFoundError, KeyError, TenSafeError) as exc:
        print(f"tensafe audit privacy: {exc}", file=sys.stderr)
        return 2
    with auth_channel, trainer_channel:
        channel = authenticated_channel(trainer_channel, TokenProvider(auth_channel, api_key))
        trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        futures = common_pb2_grpc.FutureServiceStub(channel)
        try:
            future = trainer.AuditPrivacy(request, timeout=60).future
            waited = 0.0
            while future.status in (
                common_pb2.FUTURE_STATUS_PENDING,
                common_pb2.FUTURE_STATUS_RUNNING,
            ):
                if waited >= args.timeout:
                    print(f"tensafe audit privacy: not finished, future {future.id}")
                    return 2
                future = futures.WaitFuture(
                    common_pb2.WaitFutureRequest(
                        future_id=future.id, timeout=duration_pb2.Duration(seconds=_POLL_SECONDS)
                    ),
                    timeout=_POLL_SECONDS + 10,
                ).future
                waited += _POLL_SECONDS
        except grpc.RpcError as exc:
            print(f"tensafe audit privacy: {from_rpc_error(exc).message}", file=sys.stderr)
            return 2
    if future.status != common_pb2.FUTURE_STATUS_SUCCEEDED:
        print(f"tensafe audit privacy: {future.error.message or 'failed'}", file=sys.stderr)
        return 2
    result = pb.AuditPrivacyResult()
    future.result.Unpack(result)
    print(
        f"claimed epsilon {result.claimed_epsilon:.4g} at delta {result.delta:g}; "
        f"empirical lower bound {result.epsilon_lower_bound:.4g} at {result.confidence:.0%} "
        f"confidence ({result.correct_guesses}/{result.guesses} guesses correct, "
        f"{result.canaries} canaries)"
    )
    if result.epsilon_lower_bound > result.claimed_epsilon:
        print("the audit REFUTES the claimed epsilon: the implementation leaks more")
        return 1
    print("not refuted (a lower bound, not a proof of privacy)")
    return 0
