"""The SDK's token handling, the bootstrap command and ``tensafe audit verify``."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tensafe.auth.config import DEV_KEK_FILE
from tensafe.client.auth import (
    TokenProvider,
    authenticated_channel,
    find_api_key,
)
from tensafe.common.errors import InvalidArgument, Unauthenticated
from tensafe.proto.auth.v1 import auth_service_pb2 as pb
from tensafe.proto.auth.v1 import auth_service_pb2_grpc

from .conftest import AuthHarness, kek_b64, new_kek


def test_api_key_comes_from_argument_env_or_connection_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"services": {}, "api_key": "tsk_from_file"}))
    monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
    assert find_api_key(connection_file=connection) == "tsk_from_file"
    monkeypatch.setenv("TENSAFE_API_KEY", "tsk_from_env")
    assert find_api_key(connection_file=connection) == "tsk_from_env"
    assert find_api_key("tsk_explicit", connection_file=connection) == "tsk_explicit"
    monkeypatch.delenv("TENSAFE_API_KEY")
    with pytest.raises(Unauthenticated) as info:
        find_api_key(connection_file=tmp_path / "missing.json")
    assert "TENSAFE_API_KEY" in info.value.message


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_an_empty_api_key_is_an_error_naming_its_source_never_the_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    """An empty key from the first source given must not fall through to the
    connection file's key (under `tensafe up`, the platform admin's)."""
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"services": {}, "api_key": "tsk_admin"}))
    monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
    with pytest.raises(InvalidArgument) as info:
        find_api_key(blank, connection_file=connection)
    assert info.value.field == "api_key"
    assert "tsk_admin" not in info.value.message

    monkeypatch.setenv("TENSAFE_API_KEY", blank)
    with pytest.raises(InvalidArgument) as info:
        find_api_key(connection_file=connection)
    assert info.value.field == "TENSAFE_API_KEY"
    assert "set but empty" in info.value.message
    # An explicit key still wins over an empty environment variable.
    assert find_api_key(" tsk_explicit ", connection_file=connection) == "tsk_explicit"

    monkeypatch.delenv("TENSAFE_API_KEY")
    connection.write_text(json.dumps({"services": {}, "api_key": blank}))
    with pytest.raises(InvalidArgument) as info:
        find_api_key(connection_file=connection)
    assert info.value.field == f"{connection}:api_key"


@pytest.fixture
def sync_channel(auth_sqlite: AuthHarness) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_sqlite.address) as channel:
        yield channel


async def test_sdk_adds_the_bearer_and_refreshes_before_expiry(
    auth_sqlite: AuthHarness, sync_channel: grpc.Channel
) -> None:
    now = [1_000.0]
    provider = TokenProvider(
        sync_channel, auth_sqlite.bootstrap.admin_api_key, clock=lambda: now[0]
    )
    stub = auth_service_pb2_grpc.AuthServiceStub(authenticated_channel(sync_channel, provider))

    def calls() -> list[str]:
        names = []
        for _ in range(3):
            response = stub.ListPrincipals(pb.ListPrincipalsRequest())
            names.append(sorted(p.name for p in response.principals)[0])
        return names

    # The sync SDK blocks; run it off the event loop that serves auth.
    assert await asyncio.to_thread(calls) == ["registry"] * 3
    assert provider.exchanges == 1
    first = provider.token()
    # The token lives 900 s; at 80 % of its life the provider exchanges again.
    now[0] += 0.79 * 900
    assert await asyncio.to_thread(provider.token) == first
    now[0] += 0.02 * 900
    second = await asyncio.to_thread(provider.token)
    assert second != first and provider.exchanges == 2


async def test_sdk_surfaces_a_revoked_key_as_unauthenticated(
    auth_sqlite: AuthHarness, sync_channel: grpc.Channel
) -> None:
    provider = TokenProvider(sync_channel, "tsk_aaaaaaaaaa_wrong")
    with pytest.raises(Unauthenticated):
        await asyncio.to_thread(provider.token)


async def test_sdk_token_refresh_is_shared_across_threads(
    auth_sqlite: AuthHarness, sync_channel: grpc.Channel
) -> None:
    provider = TokenProvider(sync_channel, auth_sqlite.bootstrap.admin_api_key)
    tokens: list[str] = []

    def worker() -> None:
        tokens.append(provider.token())

    def run() -> None:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    await asyncio.to_thread(run)
    assert len(set(tokens)) == 1 and provider.exchanges == 1


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TENSAFE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
        "TENSAFE_DATA_DIR": str(tmp_path / "data"),
        "TENSAFE_API_KEY_HASH_TIME_COST": "1",
        "TENSAFE_API_KEY_HASH_MEMORY_KIB": "1024",
        "TENSAFE_API_KEY_HASH_PARALLELISM": "1",
        **extra,
    }


async def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tensafe.client.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_bootstrap_prints_the_key_once_and_refuses_a_second_time(tmp_path: Path) -> None:
    env = _env(tmp_path, TENSAFE_DEV_MODE="1")
    code, out, err = await _run(
        ["admin", "bootstrap", "--json", "--service-account", "registry"], env
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["api_key"].startswith("tsk_") and set(created["service_api_keys"]) == {
        "registry"
    }
    # Dev mode keeps its key-encryption key explicitly in the data dir, owner-only.
    kek_file = tmp_path / "data" / DEV_KEK_FILE
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    assert "DEV MODE" in err

    code, out, err = await _run(["admin", "bootstrap"], env)
    assert code == 3
    assert "already bootstrapped" in err and "tsk_" not in out


async def test_bootstrap_needs_the_key_encryption_key_outside_dev_mode(tmp_path: Path) -> None:
    code, out, err = await _run(["admin", "bootstrap"], _env(tmp_path))
    assert code == 2 and "tsk_" not in out
    assert "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY" in err
    assert not (tmp_path / "data" / DEV_KEK_FILE).exists()

    env = _env(tmp_path, TENSAFE_SIGNING_KEY_ENCRYPTION_KEY=kek_b64(new_kek()))
    code, out, err = await _run(["admin", "bootstrap", "--json"], env)
    assert code == 0, err
    assert json.loads(out)["api_key"].startswith("tsk_")
    # Another key-encryption key cannot decrypt the stored signing key: start-up fails.
    env["TENSAFE_SIGNING_KEY_ENCRYPTION_KEY"] = kek_b64(new_kek())
    code, _, err = await _run(["admin", "bootstrap"], env)
    assert code != 0 and "does not decrypt" in err


async def test_audit_verify_command(auth_sqlite: AuthHarness, tmp_path: Path) -> None:
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"services": {"auth": auth_sqlite.address}}))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TENSAFE_API_KEY": auth_sqlite.bootstrap.admin_api_key,
    }
    code, out, err = await _run(["audit", "verify", "--connection-file", str(connection)], env)
    assert code == 0, err
    assert "audit log OK" in out

    async with auth_sqlite.database.connection() as db:
        import sqlalchemy as sa

        await db.execute(sa.text("UPDATE auth_audit_events SET kind = 'x' WHERE seq = 2"))
    code, out, err = await _run(["audit", "verify", "--connection-file", str(connection)], env)
    assert code == 1
    assert "BROKEN at entry 2" in out


async def test_admin_commands_create_a_tenant_user_and_key(
    auth_sqlite: AuthHarness, tmp_path: Path
) -> None:
    connection = tmp_path / "connection.json"
    connection.write_text(
        json.dumps(
            {
                "services": {"auth": auth_sqlite.address},
                "api_key": auth_sqlite.bootstrap.admin_api_key,
            }
        )
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    where = ["--connection-file", str(connection)]
    code, out, err = await _run(["admin", "create-tenant", "acme", *where], env)
    assert code == 0, err
    tenant_id = out.split()[1]
    code, out, err = await _run(
        ["admin", "create-principal", "ann", "--role", "trainer", "--tenant-id", tenant_id, *where],
        env,
    )
    assert code == 0, err
    principal_id = out.split()[1]
    code, out, err = await _run(["admin", "create-api-key", principal_id, *where], env)
    assert code == 0, err
    secret = out.strip().splitlines()[-1].rsplit(" ", 1)[1]
    token = await auth_sqlite.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=secret))
    assert (token.tenant_id, token.principal_id) == (tenant_id, principal_id)
    assert sorted(token.scopes) == ["read", "train"]
    # The new user is not a platform admin: the CLI reports the refusal.
    user_env = {**env, "TENSAFE_API_KEY": secret}
    code, out, err = await _run(["admin", "create-tenant", "other", *where], user_env)
    assert code == 2 and "missing scope platform_admin" in err
