"""Fixtures of the HE runtime tests: a real tiny model with a real PEFT LoRA adapter, and
the real HE runtime (real SEAL, real gRPC on port 0, the real authentication
interceptor on a test signing key) running on its own event loop in a thread, so the
synchronous SDK can call it from plain test functions."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tensafe.client.auth import BearerInterceptor
from tensafe.client.he import HeRuntimeRpc
from tensafe.common.grpc_server import Assembly, GrpcServer
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.he_runtime.domain.sessions import HeSessions, Session
from tensafe.he_runtime.server import build_service
from testkit.models import BASE_MODEL, build_tiny_llama, one_torch_thread
from testkit.tokens import DEFAULT_SCOPES, RecordedAudit, StaticToken, Tokens

ADAPTER = "tiny-lora"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8
ALPHA = 16.0
TTL_SECONDS = 600.0
MIB = 1024 * 1024


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One torch thread: the runtime's SEAL work and the test share two cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) with its tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / BASE_MODEL)


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
        interceptor = self.tokens.interceptor(self.audit, service="he_runtime")
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

    def usage(self, tenant: str) -> tuple[int, int]:
        """(sessions, key bytes) the runtime counts for ``tenant`` (DB rows + reservations)."""
        return self._call(self.sessions.usage(tenant))  # type: ignore[no-any-return]

    def held(self, tenant: str, session_id: str) -> Session:
        """The runtime's cached session object (rebuilt if not cached)."""
        return self._call(self.sessions.get(tenant, session_id))  # type: ignore[no-any-return]

    def reap(self) -> int:
        """Run one reaper sweep now."""
        return self._call(self.sessions.reap())  # type: ignore[no-any-return]

    def channel(
        self,
        tenant: str | None,
        *,
        recorder: Recorder | None = None,
        scopes: Sequence[str] = DEFAULT_SCOPES,
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
        scopes: Sequence[str] = DEFAULT_SCOPES,
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
        "database_url": f"sqlite+aiosqlite:///{data_dir / 'he_runtime.db'}",
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
