"""Fixtures for the libs/common tests: a real nats-server, SQLite files, a PostgreSQL db.

PostgreSQL: one uniquely named database per test session (see :mod:`testkit.postgres`),
dropped at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tensafe.common.nats_server import NatsServer, NatsServerConfig
from testkit.postgres import postgres_database

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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL database created for this test session (dropped afterwards)."""
    with postgres_database("tensafe_test") as database:
        yield database.url


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
