"""A real local stack (`tensafe up`'s LocalStack, the console among its processes) on the
tiny model, two tenants, and an HTTP client of the console that keeps cookies the way a
browser does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tensafe.client.demo import TenantCredentials, create_tenant
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.tinker import ServiceClient, types
from testkit.models import BASE_MODEL, build_tiny_llama

STACK_ENV = {"TENSAFE_TORCH_THREADS": "1", "TENSAFE_CONSOLE_POLL_SECONDS": "0.5"}


@dataclass
class Stack:
    local: LocalStack
    connection: dict[str, Any]
    tenant: TenantCredentials
    other_tenant: TenantCredentials

    @property
    def console_url(self) -> str:
        return str(self.connection["console_url"])

    def service(self, tenant: TenantCredentials) -> ServiceClient:
        """The TenSafe SDK as the tenant's trainer principal."""
        return ServiceClient(api_key=tenant.api_key, connection_file=self.local.connection_file)


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("console")
    build_tiny_llama(data_dir / "models" / BASE_MODEL)
    with pytest.MonkeyPatch.context() as env:
        for key, value in STACK_ENV.items():
            env.setenv(key, value)
        local = LocalStack(StackOptions(data_dir=data_dir))
        with local:
            connection = local.start()
            yield Stack(
                local=local,
                connection=connection,
                tenant=create_tenant(local.connection_file, name="console-a"),
                other_tenant=create_tenant(local.connection_file, name="console-b"),
            )


def datums(count: int = 4) -> list[types.Datum]:
    """A small batch of token-id sequences of the tiny model (vocabulary 512)."""
    data = []
    for index in range(count):
        tokens = [(7 * index + 3 * position) % 500 + 1 for position in range(12)]
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 11},
            )
        )
    return data


def step(client: Any, count: int = 1) -> list[tuple[float, float]]:
    """``count`` DP optimizer steps of a training client.

    Returns:
        Each step's (loss per token, epsilon after it) as the SDK observed them.
    """
    observed = []
    for _ in range(count):
        metrics = client.forward_backward(datums(), loss_fn="cross_entropy").result().metrics
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        loss = metrics["loss:sum"] / metrics["tokens:sum"]
        observed.append((loss, client.get_privacy_spent().epsilon))
    return observed


CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')
NONCE_INPUT = re.compile(r'name="login_nonce" value="([^"]+)"')


@pytest.fixture(scope="package")
def trained(stack: Stack) -> dict[str, Any]:
    """One DP training client of tenant A with 2 steps (a state saved after the first)
    and a published adapter."""
    with stack.service(stack.tenant) as service:
        client = service.create_lora_training_client(
            base_model=BASE_MODEL, rank=4, seed=1, target_epsilon=4.0, planned_steps=20
        )
        observed = step(client, 1)
        checkpoint = client.save_state("after-one").result().path
        observed += step(client, 1)
        saved = client.save_adapter("console-adapter").result()
        return {
            "client_id": client.model_id,
            "observed": observed,
            "checkpoint": checkpoint,
            "adapter": saved.adapter_name,
            "version": saved.version,
            "epsilon": client.get_privacy_spent().epsilon,
        }
