"""Migration 0002: the dataset tables exist exactly as the models say, on SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tensafe.common.db import Database, current_revision, head_revision, migrate
from tensafe.trainer.store.models import MIGRATIONS, VERSION_TABLE, Base

_DATASET_TABLES = {"trainer_dataset_keys", "trainer_datasets", "trainer_dataset_runs"}


def _differences(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    return [
        diff
        for diff in compare_metadata(context, Base.metadata)
        if not (diff[0] == "remove_table" and not diff[1].name.startswith("trainer_"))
    ]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'trainer.db'}"
        return
    yield request.getfixturevalue("fresh_postgres_url")


async def test_migrations_0002_to_head_match_the_models(database_url: str) -> None:
    assert head_revision(MIGRATIONS) == "0005_steps"
    database = Database.from_url(database_url)
    try:
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        assert await current_revision(database, version_table=VERSION_TABLE) == "0005_steps"
        async with database.connection(read_only=True) as connection:
            assert await connection.run_sync(_differences) == []
            names = await connection.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
            columns = await connection.run_sync(
                lambda c: {
                    column["name"]
                    for column in sa.inspect(c).get_columns("trainer_budget_reservations")
                }
            )
            dataset_columns = await connection.run_sync(
                lambda c: {
                    column["name"] for column in sa.inspect(c).get_columns("trainer_datasets")
                }
            )
        assert names >= _DATASET_TABLES
        assert {"steps", "dataset_id"} <= columns
        assert {"size_bytes", "epsilon_budget", "delta"} <= dataset_columns
    finally:
        await database.dispose()
