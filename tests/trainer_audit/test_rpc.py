"""AuditPrivacy end to end: real gRPC server, auth interceptor, nats-server, worker, SQLite."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from tensafe.proto.common.v1 import common_pb2
from tensafe.proto.trainer.v1 import trainer_service_pb2 as pb
from tests.trainer_service.conftest import BASE_MODEL, Stack
from tests.trainer_service.helpers import create_client, dp_config, expect_code, unpack, wait

StackFactory = Callable[..., Awaitable[Stack]]


def _request(**fields: object) -> pb.AuditPrivacyRequest:
    values: dict[str, object] = {
        "base_model": BASE_MODEL,
        "lora": pb.LoraConfig(rank=8),
        "dp": pb.DpConfig(
            target_epsilon=4.0, max_grad_norm=1.0, delta=1e-5, accountant=pb.ACCOUNTANT_RDP
        ),
        "steps": 5,
        "batch_size": 4,
        "sampling": pb.SAMPLING_CLIENT_BATCHES,
        "canaries": 100,
        "guesses_per_side": 10,
        "canary_kind": pb.CANARY_KIND_WHITE_BOX,
    }
    values.update(fields)
    return pb.AuditPrivacyRequest(**values)  # type: ignore[arg-type]


async def test_audit_privacy_rpc(make_stack: StackFactory) -> None:
    stack = await make_stack()
    tenant_client = await create_client(stack, dp=dp_config(epsilon_budget=2.0))
    for fields in (
        {"canaries": 9, "guesses_per_side": 2},
        {"guesses_per_side": 51},
        {"confidence": 1.5},
        {"confidence": -0.1},
    ):
        await expect_code(
            stack.trainer.AuditPrivacy(_request(**fields), metadata=stack.auth),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    response = await stack.trainer.AuditPrivacy(_request(request_id="audit-1"), metadata=stack.auth)
    assert response.future.kind == "trainer.audit_privacy"
    again = await stack.trainer.AuditPrivacy(_request(request_id="audit-1"), metadata=stack.auth)
    assert again.future.id == response.future.id
    done = await wait(stack, response.future)
    result = unpack(done, pb.AuditPrivacyResult)
    assert isinstance(result, pb.AuditPrivacyResult)
    assert 3.9 < result.claimed_epsilon <= 4.0
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon
    assert (result.canaries, result.guesses, result.confidence) == (100, 20, 0.95)
    assert result.correct_guesses > 10  # the white-box canaries are clearly seen
    assert result.delta == 1e-5
    # No training client was created, and the tenant's own client was not charged.
    clients = await stack.trainer.ListTrainingClients(
        pb.ListTrainingClientsRequest(), metadata=stack.auth
    )
    assert [c.id for c in clients.training_clients] == [tenant_client.id]
    spent = await stack.trainer.GetPrivacySpent(
        pb.GetPrivacySpentRequest(training_client_id=tenant_client.id), metadata=stack.auth
    )
    assert (spent.privacy_spent.steps, spent.privacy_spent.epsilon) == (0, 0.0)
    other = stack.tokens.metadata("another-tenant")
    await expect_code(
        stack.futures.GetFuture(common_pb2.GetFutureRequest(future_id=done.id), metadata=other),
        grpc.StatusCode.NOT_FOUND,
    )
