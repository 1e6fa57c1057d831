"""The trainer's schema: migrations match the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory

from tensafe.common.db import (
    Database,
    current_revision,
    head_revision,
    migrate,
    resolve_script_location,
)
from tensafe.trainer.store.models import MIGRATIONS, VERSION_TABLE, Base


def _differences(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    return [
        diff
        for diff in compare_metadata(context, Base.metadata)
        # Tables of other services sharing the database are not the trainer's concern.
        if not (diff[0] == "remove_table" and not diff[1].name.startswith("trainer_"))
    ]


async def test_migrations_create_exactly_the_models(database_url: str) -> None:
    database = Database.from_url(database_url)
    try:
        assert await migrate(
            database, script_location=MIGRATIONS, version_table=VERSION_TABLE
        ) == head_revision(MIGRATIONS)
        # A second start-up (API and worker both migrate) is a no-op.
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        assert await current_revision(database, version_table=VERSION_TABLE) == "0005_steps"
        async with database.connection(read_only=True) as connection:
            differences = await connection.run_sync(_differences)
        assert differences == []
        async with database.connection(read_only=True) as connection:
            names = await connection.run_sync(lambda c: sa.inspect(c).get_table_names())
        trainer_tables = sorted(n for n in names if n.startswith("trainer_"))
        assert trainer_tables == [
            "trainer_budget_reservations",
            "trainer_checkpoints",
            "trainer_dataset_keys",
            "trainer_dataset_runs",
            "trainer_datasets",
            "trainer_futures",
            "trainer_jobs",
            "trainer_privacy_ledger",
            "trainer_privacy_lineage",
            "trainer_steps",
            "trainer_training_clients",
        ]
    finally:
        await database.dispose()


def _downgrade_to(connection: sa.Connection, revision: str) -> None:
    directory = resolve_script_location(MIGRATIONS)
    config = AlembicConfig()
    config.set_main_option("script_location", str(directory))
    script = ScriptDirectory(str(directory))

    def downgrade_steps(current: Any, _context: MigrationContext) -> Any:
        return script._downgrade_revs(revision, current)

    with EnvironmentContext(config, script, fn=downgrade_steps, destination_rev=revision) as env:
        env.configure(connection=connection, version_table=VERSION_TABLE)
        with env.begin_transaction():
            env.run_migrations()


async def test_the_step_history_migration_downgrades_and_upgrades_again(
    database_url: str,
) -> None:
    database = Database.from_url(database_url)
    try:
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        async with database.connection() as connection:
            await connection.run_sync(_downgrade_to, "0004_lineage")
            names = await connection.run_sync(lambda c: sa.inspect(c).get_table_names())
            columns = await connection.run_sync(
                lambda c: {
                    col["name"] for col in sa.inspect(c).get_columns("trainer_training_clients")
                }
            )
        assert "trainer_steps" not in names
        assert not {"pending_loss_sum", "pending_tokens"} & columns
        assert await current_revision(database, version_table=VERSION_TABLE) == "0004_lineage"
        await migrate(database, script_location=MIGRATIONS, version_table=VERSION_TABLE)
        async with database.connection(read_only=True) as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await database.dispose()
