"""Fixtures of the HE runtime tests: a real tiny model with a real PEFT LoRA adapter, and
the real HE runtime (real SEAL, real gRPC on port 0, the real authentication
interceptor on a test signing key) running on its own event loop in a thread, so the
synchronous SDK can call it from plain test functions."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tensafe.client.auth import BearerInterceptor
from tensafe.client.he import HeRuntimeRpc
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
from tensafe.common.grpc_server import Assembly, GrpcServer
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.he_runtime.domain.sessions import HeSessions
from tensafe.he_runtime.server import build_service

ADAPTER = "tiny-lora"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8
ALPHA = 16.0
TTL_SECONDS = 600.0
MIB = 1024 * 1024


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One torch thread: the runtime's SEAL work and the test share two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) with its tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_tiny_model(
        path,
        seed=0,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """The runtime's data folder holding ``adapters/tiny-lora``: a PEFT LoRA adapter
    (r=8, alpha=16 on q/k/v/o) whose B is random and non-zero, saved by peft."""
    root = tmp_path_factory.mktemp("he_data")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    peft_model.save_pretrained(root / "adapters" / ADAPTER)
    return root


class StaticKeys:
    """A key source holding the test's one signing key (the verifier is the real one)."""

    def __init__(self, jwk: JsonWebKey) -> None:
        self._jwk = jwk

    async def jwks(self) -> Sequence[JsonWebKey]:
        return [self._jwk]

    async def revocations(self) -> Revocations:
        return Revocations()


class RecordedAudit:
    """Keeps the audit events the interceptor emits."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def record(self, record: AuditRecord) -> None:
        self.records.append(record)


class Tokens:
    """Issues EdDSA access tokens exactly as the auth service does."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex[:8]
        self.jwk = jwk_from_public_key(self.kid, self._key.public_key())

    def token(self, tenant: str, *, scopes: Sequence[str] = (SCOPE_READ, SCOPE_TRAIN)) -> str:
        now = int(time.time())
        principal = f"p-{tenant}"
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": principal,
            "tenant": tenant,
            "principal": principal,
            "scopes": list(scopes),
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self.kid})


class StaticToken:
    """What :class:`~tensafe.client.auth.BearerInterceptor` asks for a token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str:
        return self._token


class Clock:
    """A wall clock the test advances by hand (session expiry without sleeping)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Records every request message the SDK puts on the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def _record(self, method: str, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self.sent.append((method, request))
            yield request

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.sent.append((details.method, request))
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, self._record(details.method, requests))

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, self._record(details.method, requests))


class Runtime:
    """An HE runtime served on its own event loop thread.

    Args:
        config: The runtime configuration.
    """

    def __init__(self, config: HeRuntimeConfig) -> None:
        self.config = config
        self.clock = Clock()
        self.tokens = Tokens()
        self.audit = RecordedAudit()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: GrpcServer | None = None
        self._assembly: Assembly | None = None
        self._channels: list[grpc.Channel] = []
        self.sessions: HeSessions
        self.port = self._call(self._start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    async def _start(self) -> int:
        interceptor = AuthInterceptor(
            TokenVerifier(StaticKeys(self.tokens.jwk)), self.audit, service="he_runtime"
        )
        self._assembly, self.sessions = await build_service(
            self.config, interceptors=[interceptor], clock=self.clock
        )
        self._server = GrpcServer(
            config=self.config,
            services=self._assembly.services,
            interceptors=self._assembly.interceptors,
        )
        return await self._server.start()

    async def _stop(self) -> None:
        assert self._server is not None and self._assembly is not None
        await self._server.stop()
        assert self._assembly.close is not None
        await self._assembly.close()

    def channel(
        self,
        tenant: str | None,
        *,
        recorder: Recorder | None = None,
        scopes: Sequence[str] = (SCOPE_READ, SCOPE_TRAIN),
    ) -> grpc.Channel:
        """A channel carrying ``tenant``'s token (none when ``tenant`` is None)."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self._channels.append(channel)
        interceptors: list[Any] = []
        if tenant is not None:
            interceptors.append(
                BearerInterceptor(StaticToken(self.tokens.token(tenant, scopes=scopes)))
            )  # type: ignore[arg-type]
        if recorder is not None:
            interceptors.append(recorder)
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def rpc(
        self,
        tenant: str | None,
        *,
        recorder: Recorder | None = None,
        scopes: Sequence[str] = (SCOPE_READ, SCOPE_TRAIN),
    ) -> HeRuntimeRpc:
        """The SDK's RPC layer for ``tenant`` with a token granting ``scopes``."""
        return HeRuntimeRpc(self.channel(tenant, recorder=recorder, scopes=scopes))

    def stop(self) -> None:
        """Close channels, stop the server, stop the loop."""
        for channel in self._channels:
            channel.close()
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def runtime_config(data_dir: Path, **settings: Any) -> HeRuntimeConfig:
    """The configuration the tests run with (dev mode: the local adapter source)."""
    values: dict[str, Any] = {
        "database_url": "sqlite+aiosqlite:///unused-by-he-runtime.db",
        "data_dir": data_dir,
        "dev_mode": True,
        "log_format": "text",
        "shutdown_grace_seconds": 1.0,
        "max_message_bytes": 4 * MIB,
        "max_session_key_bytes": 64 * MIB,
        "max_key_bytes_per_tenant": 65 * MIB,
        "max_sessions_per_tenant": 2,
        "max_apply_bytes": 24 * MIB,
        "session_idle_ttl_seconds": TTL_SECONDS,
    }
    values.update(settings)
    return HeRuntimeConfig(**values)


@pytest.fixture(scope="module")
def runtime(data_dir: Path) -> Iterator[Runtime]:
    """A running dev-mode HE runtime shared by a test module (tests use own tenants)."""
    served = Runtime(runtime_config(data_dir))
    yield served
    served.stop()


def new_tenant() -> str:
    """A fresh tenant id, so tests do not share quotas."""
    return f"tenant-{uuid.uuid4().hex[:8]}"
