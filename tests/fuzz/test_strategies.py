"""The descriptor-driven strategies build valid wire messages with the edge values."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, find, given, settings

from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb

from .strategies import Pool, message_strategy, mutated
from .test_fuzz_rpcs import RPCS, Rpc

POOL = Pool()
POOL.add("client-1", fields=("training_client_id",))
QUIET = settings(
    max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_every_request_type_gets_serialisable_messages(rpc: Rpc) -> None:
    @QUIET
    @given(message_strategy(rpc.method.input_type, POOL))
    def round_trip(message: Message) -> None:
        assert isinstance(message, rpc.request_class)
        wire = message.SerializeToString(deterministic=True)
        again = rpc.request_class.FromString(wire).SerializeToString(deterministic=True)
        assert again == wire

    round_trip()


def _floats(message: trainer_pb.ForwardBackwardRequest) -> list[float]:
    return [
        value
        for datum in message.data
        for tensor in datum.loss_fn_inputs.values()
        for value in tensor.float_data
    ]


def _ints(message: trainer_pb.ForwardBackwardRequest) -> list[int]:
    return [
        value
        for datum in message.data
        for tensor in datum.loss_fn_inputs.values()
        for value in tensor.int_data
    ]


EDGES: dict[str, Callable[[trainer_pb.ForwardBackwardRequest], bool]] = {
    "pool id": lambda m: m.training_client_id == "client-1",
    "path traversal": lambda m: m.loss_fn == "../../etc/passwd",
    "NUL": lambda m: "\x00" in m.loss_fn,
    "long string": lambda m: len(m.request_id) >= 5000,
    "NaN": lambda m: any(math.isnan(v) for v in _floats(m)),
    "-inf": lambda m: any(v == -math.inf for v in _floats(m)),
    "int64 min": lambda m: -(2**63) in _ints(m),
    "map entry": lambda m: any(len(d.loss_fn_inputs) > 0 for d in m.data),
    "unknown enum": lambda m: any(
        t.dtype not in (0, 1, 2) for d in m.data for t in d.loss_fn_inputs.values()
    ),
}


@pytest.mark.parametrize("edge", EDGES)
def test_the_edge_values_are_drawn(edge: str) -> None:
    strategy = message_strategy(trainer_pb.ForwardBackwardRequest.DESCRIPTOR, POOL)
    found = find(
        strategy,
        EDGES[edge],
        # No shrinking: the test needs an example, not the smallest one. Derandomised:
        # a rare edge must not make this test flaky.
        settings=settings(
            max_examples=1000,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert EDGES[edge](found)


def test_a_mutation_changes_at_most_three_fields_of_the_valid_request() -> None:
    base = trainer_pb.TrainOnDatasetRequest(
        training_client_id="c",
        dataset_id="d",
        sample_rate=0.5,
        steps=1,
        adam_params=trainer_pb.AdamParams(learning_rate=1e-3),
        request_id="r",
    )

    @QUIET
    @given(mutated(base, POOL))
    def check(message: trainer_pb.TrainOnDatasetRequest) -> None:
        # A oneof counts once: setting expected_batch_size clears sample_rate.
        changed = {
            (field.containing_oneof or field).name
            for field in base.DESCRIPTOR.fields
            if getattr(message, field.name) != getattr(base, field.name)
        }
        assert len(changed) <= 3, changed

    check()
