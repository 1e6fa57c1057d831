"""The RLVR example end to end on the real stack: mean reward rises under DP."""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tensafe.tinker import ServiceClient

from .conftest import BASE_MODEL, StackFactory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rlvr_arithmetic.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rlvr_arithmetic", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the test tenant's access token to every call (what the SDK's auth does)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> _Details:
        metadata = list(details.metadata or []) + list(self._metadata)
        return _Details(details.method, details.timeout, metadata, details.credentials)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, iterator: Any) -> Any:
        return continuation(self._details(details), iterator)


@pytest.fixture(scope="module")
def pretrained_base_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base models folder with the example's briefly pretrained tiny model."""
    root = tmp_path_factory.mktemp("pretrained_base_models")
    _load_example().prepare_base_model(root / BASE_MODEL)
    return root


@pytest.mark.slow
async def test_rlvr_mean_reward_rises_under_dp(
    make_stack: StackFactory, pretrained_base_models: Path
) -> None:
    example = _load_example()
    stack = await make_stack(base_models=pretrained_base_models)
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{stack.port}"), _BearerToken(stack.auth)
    )
    service = ServiceClient(channel=channel, base_models_dir=pretrained_base_models)
    lines: list[str] = []
    try:
        report = await asyncio.to_thread(
            example.run,
            service,
            base_model=BASE_MODEL,
            config=example.RlvrConfig(),
            log=lines.append,
        )
    finally:
        service.close()
    print("\n".join(lines))
    # Each mean is over 16 problems x 32 samples (standard error ~0.02, so ~0.03 on the
    # difference). With the example's defaults the rise measured 0.16-0.25 in 6 of 6
    # runs; a loop that does not learn (or learns the wrong sign) stays within the
    # evaluation noise of zero or falls, and fails the 0.05 margin.
    assert report.reward_after > report.reward_before + 0.05, lines
    assert 0.0 < report.reward_before < 1.0
    # Every step of the example, SFT and RL, was a DP step on the client's ledger.
    config = example.RlvrConfig()
    assert config.sft_steps < report.steps <= config.sft_steps + config.iterations
    assert math.isfinite(report.epsilon) and report.epsilon > 0
