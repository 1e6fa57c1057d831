"""Prometheus ``/metrics`` on every process of a ``tensafe up`` stack (metrics on).

Each service serves its own registry on a loopback port of its own. The test scrapes
all of them, makes calls, trains one DP step and sees the counters and gauges move:
the RPC latency histogram counts the calls by method and status, a quota refusal is
counted by reason, the training client's steps and ε appear as gauges, and auth's audit
chain length grows. The process collectors (RSS, open fds) are there for the soak bench.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensafe.client.connection import load_connection
from tensafe.client.demo import create_tenant
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.client.tiny_model import build_tiny_model
from tensafe.client.train_cli import to_datum
from tensafe.proto.registry.v1 import registry_service_pb2 as registry_pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.tinker import ServiceClient, types

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Series:
    """Every sample of one ``/metrics`` page, by (name, labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_every_service_serves_metrics_that_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSAFE_METRICS_SAMPLE_SECONDS", "0.5")
    build_tiny_model(tmp_path / "models" / "tiny-llama", seed=0)
    with LocalStack(StackOptions(data_dir=tmp_path, metrics=True)) as stack:
        connection = stack.start()
        endpoints = connection["metrics"]
        assert isinstance(endpoints, dict)
        assert set(endpoints) == {"auth", "registry", "he_runtime", "trainer", "trainer-worker"}
        for name, address in endpoints.items():
            page = scrape(str(address))
            assert value(page, "process_resident_memory_bytes") > 10e6, name
            assert value(page, "process_open_fds") > 0, name

        # RPC counts by method and status.
        caller = create_tenant(stack.connection_file, name="metrics")
        registry_address = str(endpoints["registry"])
        histogram = "rpc_server_duration_milliseconds_count"
        before = value(scrape(registry_address), histogram, rpc_method="ListAdapters")
        channel = load_connection(stack.connection_file).channel("registry")
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError):  # no token: UNAUTHENTICATED, counted too
                stub.ListAdapters(registry_pb.ListAdaptersRequest())
        channel.close()
        # A call's count can reach the page after its client saw the status (the
        # server records it as the handler unwinds; CI once scraped 2 of 3): wait.
        deadline = time.monotonic() + 10
        after = scrape(registry_address)
        while value(after, histogram, rpc_method="ListAdapters") < before + 3:
            assert time.monotonic() < deadline, "three ListAdapters calls never counted"
            time.sleep(0.1)
            after = scrape(registry_address)
        assert value(after, histogram, rpc_method="ListAdapters") == before + 3
        assert (
            value(after, histogram, rpc_method="ListAdapters", rpc_grpc_status="UNAUTHENTICATED")
            >= 3
        )

        # Steps and ε of a training client, sampled from the trainer's database.
        trainer_address = str(endpoints["trainer"])
        with ServiceClient(api_key=caller.api_key, connection_file=stack.connection_file) as svc:
            client = svc.create_lora_training_client(
                base_model="tiny-llama", rank=2, lora_alpha=4.0, dp_noise_multiplier=1.0
            )
            client_id = str(client.model_id)
            for _ in range(2):
                client.forward_backward([to_datum([1, 2, 3, 4, 5])], "cross_entropy").result()
                client.optim_step(types.AdamParams(learning_rate=1e-3)).result()

        def trained() -> bool:
            page = scrape(trainer_address)
            return value(page, "tensafe_trainer_client_steps", training_client=client_id) == 2

        wait_for(trained)
        page = scrape(trainer_address)
        assert value(page, "tensafe_trainer_client_dp_steps", training_client=client_id) == 2
        # The worker built the client's engine once (the base model loaded once).
        worker_page = scrape(str(endpoints["trainer-worker"]))
        assert (
            value(
                worker_page,
                "tensafe_trainer_engine_loads_total",
                base_model="tiny-llama",
                reason="not_resident",
            )
            == 1
        )
        assert value(worker_page, "tensafe_trainer_base_loads_total", base_model="tiny-llama") == 1
        assert value(worker_page, "tensafe_trainer_resident_clients") == 1
        epsilon = value(page, "tensafe_trainer_client_epsilon_spent", training_client=client_id)
        assert 0 < epsilon < 1e6
        assert value(page, histogram, rpc_method="CreateTrainingClient", rpc_grpc_status="OK") == 1

        # The audit chain grows with the security events of this test.
        wait_for(lambda: value(scrape(str(endpoints["auth"])), "tensafe_audit_chain_length") > 0)
