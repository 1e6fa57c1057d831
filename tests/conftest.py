"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from testkit.postgres import postgres_database
from testkit.softhsm import SoftHsmToken, new_token

# Tests never export traces, whatever the developer's shell says.
os.environ.pop("TENSAFE_OTEL_EXPORTER", None)


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database on the machine's server, dropped afterwards."""
    with postgres_database("tensafe_test") as database:
        yield database.url


@pytest.fixture
def softhsm(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> SoftHsmToken:
    """A fresh SoftHSM2 token of this test only (SOFTHSM2_CONF points at its folder)."""
    return new_token(tmp_path_factory.mktemp("softhsm"), monkeypatch)
