"""Revocation is a bound, not a hope (DESIGN §8), on a real stack, SQLite and PostgreSQL.

The stack runs with a revocation bound of 1 s (``TENSAFE_REVOCATION_BOUND_SECONDS``).
Three principals of a tenant each hold a token that trainer, registry and he_runtime
have verified and cached; then the first one's API key is revoked, the second
principal disabled and the third token revoked by id. After the services were *idle*
for just over the bound, the very first call of each token to each service must be
UNAUTHENTICATED — the old verifier admitted it on a list up to 60 s old and refreshed
only afterwards. A fourth, untouched token keeps working: the refusal is the
revocation, not a broken verifier.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jwt
import pytest

from tensafe.client.auth import find_api_key
from tensafe.client.connection import load_connection
from tensafe.client.stack import LocalStack, StackOptions
from tensafe.proto.auth.v1 import auth_service_pb2 as auth_pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc
from tensafe.proto.he.v1 import he_service_pb2 as he_pb
from tensafe.proto.he.v1 import he_service_pb2_grpc
from tensafe.proto.registry.v1 import registry_service_pb2 as registry_pb
from tensafe.proto.registry.v1 import registry_service_pb2_grpc
from tensafe.proto.trainer.v1 import trainer_service_pb2 as trainer_pb
from tensafe.proto.trainer.v1 import trainer_service_pb2_grpc
from testkit.postgres import postgres_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BOUND_SECONDS = 1.0
"""The revocation bound the stack runs with (production default: 5 s)."""

Probe = Callable[[tuple[tuple[str, str], ...]], grpc.StatusCode]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` (one SQLite file per service) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_database("tensafe_revocation") as database:
        yield database.url


def _probes(channels: dict[str, grpc.Channel]) -> dict[str, Probe]:
    """One cheap authenticated call per service; returns its status code."""
    trainer = trainer_service_pb2_grpc.TrainerServiceStub(channels["trainer"])
    registry = registry_service_pb2_grpc.RegistryServiceStub(channels["registry"])
    he = he_service_pb2_grpc.HeRuntimeServiceStub(channels["he_runtime"])

    def code(call: Callable[[], object]) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    return {
        "trainer": lambda md: code(
            lambda: trainer.ListTrainingClients(
                trainer_pb.ListTrainingClientsRequest(), metadata=md, timeout=30
            )
        ),
        "registry": lambda md: code(
            lambda: registry.ListAdapters(
                registry_pb.ListAdaptersRequest(), metadata=md, timeout=30
            )
        ),
        # An unknown session: NOT_FOUND when authenticated, UNAUTHENTICATED when not.
        "he_runtime": lambda md: code(
            lambda: he.GetSession(
                he_pb.GetSessionRequest(session_id="none"), metadata=md, timeout=30
            )
        ),
    }


def test_revocation_takes_effect_within_the_bound_on_every_service(
    tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack's processes inherit this environment.
    monkeypatch.setenv("TENSAFE_REVOCATION_BOUND_SECONDS", str(BOUND_SECONDS))
    with LocalStack(StackOptions(data_dir=tmp_path, database_url=database_url)) as stack:
        stack.start()
        connection = load_connection(stack.connection_file)
        channels = {name: connection.channel(name) for name in connection.services}
        try:
            auth = auth_service_pb2_grpc.AuthServiceStub(channels["auth"])
            admin_key = find_api_key(connection_file=stack.connection_file)
            admin = (
                (
                    "authorization",
                    "Bearer "
                    + auth.ExchangeApiKey(
                        auth_pb.ExchangeApiKeyRequest(api_key=admin_key)
                    ).access_token,
                ),
            )
            tenant = auth.CreateTenant(
                auth_pb.CreateTenantRequest(display_name="revoked", request_id=uuid.uuid4().hex),
                metadata=admin,
            ).tenant
            subjects: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {}
            for case in ("api_key", "principal", "token", "untouched"):
                principal = auth.CreatePrincipal(
                    auth_pb.CreatePrincipalRequest(
                        kind=auth_pb.PRINCIPAL_KIND_USER,
                        name=f"user-{case}",
                        roles=[auth_pb.ROLE_TRAINER],
                        tenant_id=tenant.id,
                        request_id=uuid.uuid4().hex,
                    ),
                    metadata=admin,
                ).principal
                key = auth.CreateApiKey(
                    auth_pb.CreateApiKeyRequest(principal_id=principal.id, description=case),
                    metadata=admin,
                )
                token = auth.ExchangeApiKey(
                    auth_pb.ExchangeApiKeyRequest(api_key=key.secret)
                ).access_token
                metadata = (("authorization", f"Bearer {token}"),)
                subjects[case] = (principal.id, key.api_key.id, metadata)
            probes = _probes(channels)
            expected_ok = {
                "trainer": grpc.StatusCode.OK,
                "registry": grpc.StatusCode.OK,
                "he_runtime": grpc.StatusCode.NOT_FOUND,
            }
            # Every service verifies (and caches) every token.
            for principal_id, _, metadata in subjects.values():
                for service, probe in probes.items():
                    assert probe(metadata) == expected_ok[service], (service, principal_id)

            auth.RevokeApiKey(
                auth_pb.RevokeApiKeyRequest(api_key_id=subjects["api_key"][1]), metadata=admin
            )
            auth.DisablePrincipal(
                auth_pb.DisablePrincipalRequest(principal_id=subjects["principal"][0]),
                metadata=admin,
            )
            bearer = subjects["token"][2][0][1].removeprefix("Bearer ")
            jti = jwt.decode(bearer, options={"verify_signature": False})["jti"]
            auth.RevokeToken(auth_pb.RevokeTokenRequest(token_id=jti), metadata=admin)
            revoked_at = time.monotonic()

            # Idle past the bound: no call reaches trainer, registry or he_runtime.
            time.sleep(BOUND_SECONDS * 1.5)
            for case in ("api_key", "principal", "token"):
                metadata = subjects[case][2]
                for service, probe in probes.items():
                    assert probe(metadata) == grpc.StatusCode.UNAUTHENTICATED, (case, service)
            for service, probe in probes.items():
                assert probe(subjects["untouched"][2]) == expected_ok[service], service
            # Sanity of the timing: the whole check ran well inside the old 60 s window.
            assert time.monotonic() - revoked_at < 30
        finally:
            for channel in channels.values():
                channel.close()
