"""Overhead of the trainer pipeline: ForwardBackward + OptimStep through gRPC, the
database, JetStream and a worker process, against the same step run in-process with
the engine.

Both sides train the same LoRA configuration on the same batch of the same model, with
one torch thread each; rounds alternate (pipeline, in-process, pipeline, ...) so that
drifts of the shared machine hit both, and the table reports medians and their ratio.
The pipeline step is timed from the ForwardBackward call to the OptimStep future
reported SUCCEEDED (both calls are sent at once, as a Tinker client does); the phases
printed after it come from the futures' own timestamps (created, started, finished).

Run: ``python bench/pipeline.py [--rounds 15] [--batch 16] [--tokens 64] [--dp]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path

import grpc.aio
import jwt
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import duration_pb2

from tensafe.client.tiny_model import build_tiny_model
from tensafe.common.auth import (
    SCOPE_READ,
    SCOPE_TRAIN,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    AuditRecord,
    AuthInterceptor,
    JsonWebKey,
    Revocations,
    TokenVerifier,
    jwk_from_public_key,
)
from tensafe.common.grpc_server import GrpcServer
from tensafe.common.nats_server import NatsServer, NatsServerConfig
from tensafe.proto.common.v1 import common_pb2, common_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from tensafe.trainer.config import TrainerConfig
from tensafe.trainer.domain.engine.config import AdamConfig, DpConfig, LoraConfig
from tensafe.trainer.domain.engine.training import LoraTrainingEngine
from tensafe.trainer.server import build_api

MODEL = "bench-llama"


class _Keys:
    def __init__(self, jwk: JsonWebKey) -> None:
        self._jwk = jwk

    async def jwks(self) -> Sequence[JsonWebKey]:
        return [self._jwk]

    async def revocations(self) -> Revocations:
        return Revocations()


class _Audit:
    async def record(self, record: AuditRecord) -> None:
        return None


def _token(key: Ed25519PrivateKey, kid: str) -> tuple[tuple[str, str], ...]:
    now = int(time.time())
    claims = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": "bench",
        "tenant": "bench",
        "principal": "bench",
        "scopes": [SCOPE_READ, SCOPE_TRAIN],
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 3600,
    }
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})
    return (("authorization", f"Bearer {token}"),)


def _datum(tokens: list[int]) -> pb.Datum:
    datum = pb.Datum(
        model_input=pb.ModelInput(
            chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens[:-1]))]
        )
    )
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_INT64, int_data=tokens[1:])
    )
    datum.loss_fn_inputs["weights"].CopyFrom(
        pb.TensorData(dtype=pb.D_TYPE_FLOAT32, float_data=[1.0] * (len(tokens) - 1))
    )
    return datum


async def _run(args: argparse.Namespace, root: Path) -> None:
    torch.set_num_threads(1)
    models = root / "models"
    build_tiny_model(
        models / MODEL,
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        max_position_embeddings=max(256, args.tokens + 1),
    )
    generator = torch.Generator().manual_seed(0)
    batch = [
        torch.randint(3, 700, (args.tokens + 1,), generator=generator).tolist()
        for _ in range(args.batch)
    ]
    lora = LoraConfig(rank=8, alpha=16.0)
    dp = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0) if args.dp else None
    adam = AdamConfig(learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-12)

    with NatsServer.start(NatsServerConfig(data_dir=root / "nats")) as nats:
        kek_file = root / "dataset.kek"
        kek_file.write_text(secrets.token_bytes(32).hex())
        kek_file.chmod(0o600)
        config = TrainerConfig(
            dataset_kek_file=kek_file,
            database_url=args.database_url or f"sqlite+aiosqlite:///{root / 'trainer.db'}",
            data_dir=root / "data",
            nats_url=nats.url,
            base_models_dir=models,
            log_format="text",
            log_level="WARNING",
        )
        key = Ed25519PrivateKey.generate()
        kid = "bench"
        interceptor = AuthInterceptor(
            TokenVerifier(_Keys(jwk_from_public_key(kid, key.public_key()))),
            _Audit(),
            service="trainer",
        )
        assembly, _ = await build_api(config, interceptors=[interceptor])
        server = GrpcServer(
            config=config, services=assembly.services, interceptors=assembly.interceptors
        )
        port = await server.start()
        env = {
            **os.environ,
            "TENSAFE_DATABASE_URL": config.database_url,
            "TENSAFE_DATA_DIR": str(config.data_dir),
            "TENSAFE_NATS_URL": nats.url,
            "TENSAFE_BASE_MODELS_DIR": str(models),
            "TENSAFE_DATASET_KEK_FILE": str(kek_file),
            "TENSAFE_TORCH_THREADS": "1",
            "TENSAFE_LOG_LEVEL": "WARNING",
            "TENSAFE_LOG_FORMAT": "text",
        }
        worker = subprocess.Popen([sys.executable, "-m", "tensafe.trainer.worker"], env=env)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            auth = _token(key, kid)
            trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            futures = common_pb2_grpc.FutureServiceStub(channel)
            request = pb.CreateTrainingClientRequest(
                base_model=MODEL,
                lora=pb.LoraConfig(rank=lora.rank, alpha=lora.alpha, seed=1),
            )
            if dp is not None:
                request.dp.CopyFrom(
                    pb.DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
                )
            client = (await trainer.CreateTrainingClient(request, metadata=auth)).training_client
            data = [_datum(tokens) for tokens in batch]
            engine = LoraTrainingEngine(models / MODEL, lora=lora, dp=dp, seed=1)
            inputs = [{"target_tokens": t[1:], "weights": [1.0] * args.tokens} for t in batch]

            phases: list[list[float]] = []

            async def pipeline_step() -> float:
                start, called = time.perf_counter(), time.time()
                forward_backward = await trainer.ForwardBackward(
                    pb.ForwardBackwardRequest(
                        training_client_id=client.id, data=data, loss_fn="cross_entropy"
                    ),
                    metadata=auth,
                )
                step = await trainer.OptimStep(
                    pb.OptimStepRequest(
                        training_client_id=client.id,
                        adam_params=pb.AdamParams(learning_rate=1e-3),
                    ),
                    metadata=auth,
                )
                while True:
                    done = (
                        await futures.WaitFuture(
                            common_pb2.WaitFutureRequest(
                                future_id=step.future.id,
                                timeout=duration_pb2.Duration(seconds=60),
                            ),
                            metadata=auth,
                        )
                    ).future
                    if done.status == common_pb2.FUTURE_STATUS_SUCCEEDED:
                        elapsed, arrived = time.perf_counter() - start, time.time()
                        break
                    if done.status not in (
                        common_pb2.FUTURE_STATUS_PENDING,
                        common_pb2.FUTURE_STATUS_RUNNING,
                    ):
                        raise RuntimeError(f"step failed: {done.error.message}")
                # Read after the timing: the ForwardBackward's own timestamps.
                first = (
                    await futures.GetFuture(
                        common_pb2.GetFutureRequest(future_id=forward_backward.future.id),
                        metadata=auth,
                    )
                ).future
                moments = (
                    first.create_time,
                    first.start_time,
                    first.finish_time,
                    done.finish_time,
                )
                phases.append(
                    [(m.ToDatetime(tzinfo=UTC).timestamp() - called) * 1e3 for m in moments]
                    + [(arrived - called) * 1e3]
                )
                return elapsed

            def local_step() -> float:
                start = time.perf_counter()
                engine.forward_backward([t[:-1] for t in batch], "cross_entropy", inputs)
                engine.optim_step(adam)
                return time.perf_counter() - start

            for _ in range(args.warmup):
                await pipeline_step()
                local_step()
            remote_times: list[float] = []
            local_times: list[float] = []
            for _ in range(args.rounds):
                remote_times.append(await pipeline_step())
                local_times.append(local_step())
            remote = statistics.median(remote_times)
            local = statistics.median(local_times)
            mode = "DP-SGD" if dp is not None else "non-DP"
            print(
                f"model: hidden {args.hidden}, {args.layers} layers; LoRA r=8 q/k/v/o; "
                f"{mode}; batch {args.batch} x {args.tokens} tokens; {args.rounds} rounds"
            )
            print(f"{'path':<36} {'median step (ms)':>17}")
            print(f"{'in-process engine':<36} {local * 1e3:>17.1f}")
            print(f"{'gRPC + JetStream + worker + DB':<36} {remote * 1e3:>17.1f}")
            print(f"{'ratio (target <= 1.10)':<36} {remote / local:>17.3f}")
            print(f"{'overhead per step (ms)':<36} {(remote - local) * 1e3:>17.1f}")
            # The futures' timestamps are the server's clock, the call's this process's:
            # one machine here, so one clock.
            print("pipeline phases, ms after the ForwardBackward call (medians):")
            names = (
                "ForwardBackward admitted (future created)",
                "ForwardBackward started by the worker",
                "ForwardBackward finished (its commit)",
                "OptimStep finished (its commit)",
                "OptimStep's result at the client",
            )
            for index, name in enumerate(names):
                moment = statistics.median(row[index] for row in phases[args.warmup :])
                print(f"  {name:<44} {moment:>8.1f}")
            engine.close()
        finally:
            await channel.close(None)
            worker.terminate()
            worker.wait(timeout=30)
            await server.stop()
            if assembly.close is not None:
                await assembly.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dp", action="store_true", help="DP-SGD (sigma 1, C 1)")
    parser.add_argument(
        "--database-url",
        help="an empty database for the trainer (default: a new SQLite file), e.g. "
        "postgresql+asyncpg://postgres@127.0.0.1:5432/bench",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tensafe-bench-") as root:
        asyncio.run(_run(args, Path(root)))


if __name__ == "__main__":
    main()
