"""Privacy lineage of weights, per-dataset budgets.

Revision ID: 0004_lineage
Revises: 0003_quotas
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_lineage"
down_revision = "0003_quotas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add lineage columns, the lineage event table and dataset budgets.

    Checkpoints saved before this revision have no lineage snapshot; the ledger reads
    their accountant state instead (the saving client's own steps, which was all a
    client could have then).
    """
    with op.batch_alter_table("trainer_training_clients") as batch:
        batch.add_column(sa.Column("lineage_json", sa.Text(), nullable=True))
    with op.batch_alter_table("trainer_checkpoints") as batch:
        batch.add_column(sa.Column("lineage_json", sa.Text(), nullable=True))
    with op.batch_alter_table("trainer_budget_reservations") as batch:
        batch.add_column(sa.Column("dataset_id", sa.String(32), nullable=True))
    with op.batch_alter_table("trainer_privacy_ledger") as batch:
        batch.add_column(sa.Column("dataset_id", sa.String(32), nullable=True))
    op.create_index(
        "ix_trainer_privacy_ledger_dataset_id", "trainer_privacy_ledger", ["dataset_id"]
    )
    with op.batch_alter_table("trainer_datasets") as batch:
        batch.add_column(sa.Column("epsilon_budget", sa.Float(), nullable=True))
        batch.add_column(sa.Column("delta", sa.Float(), nullable=True))
    op.create_table(
        "trainer_privacy_lineage",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("source_client_id", sa.String(32), nullable=False),
        sa.Column("checkpoint_id", sa.String(32), nullable=False),
        sa.Column("future_id", sa.String(32), nullable=False),
        sa.Column("private", sa.Boolean(), nullable=False),
        sa.Column("dp_steps_before", sa.BigInteger(), nullable=False),
        sa.Column("dp_steps_after", sa.BigInteger(), nullable=False),
        sa.Column("steps_after", sa.BigInteger(), nullable=False),
        sa.Column("epsilon_after", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_trainer_lineage_client", "trainer_privacy_lineage", ["client_id", "id"])


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_index("ix_trainer_lineage_client", table_name="trainer_privacy_lineage")
    op.drop_table("trainer_privacy_lineage")
    with op.batch_alter_table("trainer_datasets") as batch:
        batch.drop_column("delta")
        batch.drop_column("epsilon_budget")
    op.drop_index("ix_trainer_privacy_ledger_dataset_id", table_name="trainer_privacy_ledger")
    with op.batch_alter_table("trainer_privacy_ledger") as batch:
        batch.drop_column("dataset_id")
    with op.batch_alter_table("trainer_budget_reservations") as batch:
        batch.drop_column("dataset_id")
    with op.batch_alter_table("trainer_checkpoints") as batch:
        batch.drop_column("lineage_json")
    with op.batch_alter_table("trainer_training_clients") as batch:
        batch.drop_column("lineage_json")
