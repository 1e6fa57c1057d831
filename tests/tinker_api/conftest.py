"""A real local stack (`tensafe up`'s LocalStack: auth, registry, HE runtime, trainer API
and worker, the Tinker API) on the tiny model, and the OFFICIAL `tinker` SDK set up the
way docs/tinker.md tells a user: TINKER_BASE_URL and TINKER_CREDENTIAL_CMD="tensafe token".
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model

BASE_MODEL = "tiny-llama"
STACK_ENV = {"TENSAFE_TORCH_THREADS": "1"}


@dataclass
class Stack:
    local: LocalStack
    connection: dict[str, Any]
    tenant: TenantCredentials
    other_tenant: TenantCredentials

    @property
    def base_url(self) -> str:
        return str(self.connection["tinker_base_url"])

    def credential_cmd(self, tenant: TenantCredentials, *, whole_cli: bool = False) -> str:
        """`tensafe token` for a tenant's API key: the console script's module with
        ``whole_cli``, else the token command's own module (the same code without the
        rest of the CLI's imports, seconds faster; the SDK runs it at every refresh)."""
        entry = ["tensafe.client.cli", "token"] if whole_cli else ["tensafe.client.token_cli"]
        return shlex.join(
            [
                sys.executable,
                "-m",
                *entry,
                "--connection-file",
                str(self.local.connection_file),
                "--api-key",
                tenant.api_key,
            ]
        )


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("tinker_api")
    build_tiny_model(
        data_dir / "models" / BASE_MODEL,
        seed=0,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    with pytest.MonkeyPatch.context() as env:
        for key, value in STACK_ENV.items():
            env.setenv(key, value)
        local = LocalStack(StackOptions(data_dir=data_dir))
        with local:
            connection = local.start()
            yield Stack(
                local=local,
                connection=connection,
                tenant=create_tenant(local.connection_file, name="tinker-a"),
                other_tenant=create_tenant(local.connection_file, name="tinker-b"),
            )


@pytest.fixture
def tinker_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The whole set-up of a Tinker user: two environment variables."""
    monkeypatch.setenv("TINKER_BASE_URL", stack.base_url)
    monkeypatch.setenv("TINKER_CREDENTIAL_CMD", stack.credential_cmd(stack.tenant))
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    return stack


def tiny_path(stack: Stack) -> Path:
    return Path(str(stack.connection["data_dir"])) / "models" / BASE_MODEL
