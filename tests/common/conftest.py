"""Fixtures for the libs/common tests: a real nats-server, SQLite files, a PostgreSQL db.

PostgreSQL: one uniquely named database per test session, created through the
``postgres`` (or ``test``) maintenance database with AUTOCOMMIT and dropped at the end.
Tests that need it are skipped, with the reason, only when the server cannot be reached.
Override the server with ``TENSAFE_TEST_POSTGRES_URL`` (an asyncpg URL of a maintenance
database).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tensafe.common.nats_server import NatsServer, NatsServerConfig

POSTGRES_ADMIN_URLS = (
    [os.environ["TENSAFE_TEST_POSTGRES_URL"]]
    if os.environ.get("TENSAFE_TEST_POSTGRES_URL")
    else [
        "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    ]
)

SAMPLE_MIGRATIONS = "tensafe_sample_migrations:migrations"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port, storing under tmp_path."""
    with NatsServer.start(NatsServerConfig(data_dir=tmp_path / "nats")) as server:
        yield server


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"


async def _admin_execute(admin_url: str, statement: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text(statement))
    finally:
        await engine.dispose()


def _create_database(name: str) -> str:
    """Create the database via the first reachable maintenance db; return its admin URL."""
    unreachable: list[str] = []
    for admin_url in POSTGRES_ADMIN_URLS:
        try:
            asyncio.run(_admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
            return admin_url
        except (OSError, TimeoutError) as error:
            unreachable.append(f"{admin_url}: {error}")
        except sa_exc.DBAPIError as error:
            # The maintenance database itself may not exist; try the next one.
            if "does not exist" not in str(error):
                raise
            unreachable.append(f"{admin_url}: {error.orig}")
    pytest.skip("PostgreSQL unreachable: " + "; ".join(unreachable))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL database created for this test session (dropped afterwards)."""
    name = f"tensafe_test_{uuid.uuid4().hex[:12]}"
    admin_url = _create_database(name)
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    asyncio.run(_admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sample_migrations(monkeypatch: pytest.MonkeyPatch) -> str:
    """The sample migrations package, importable by name whatever pytest's import mode."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return SAMPLE_MIGRATIONS


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))
