"""Server-held datasets: wrapped tenant data keys, dataset metadata, TrainOnDataset
progress, and multi-step budget reservations.

Revision ID: 0002_datasets
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_datasets"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    """Create the dataset tables and add ``steps`` to the budget reservations."""
    with op.batch_alter_table("trainer_budget_reservations") as batch:
        batch.add_column(
            sa.Column("steps", sa.BigInteger(), nullable=False, server_default=sa.text("1"))
        )
    op.create_table(
        "trainer_dataset_keys",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        _timestamp("created_at"),
    )
    op.create_table(
        "trainer_datasets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("object_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_trainer_datasets_tenant_request"),
    )
    op.create_index(
        "ix_trainer_datasets_tenant_created", "trainer_datasets", ["tenant", "created_at", "id"]
    )
    op.create_table(
        "trainer_dataset_runs",
        sa.Column("future_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("expected_batch_size", sa.Float(), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("steps_done", sa.BigInteger(), nullable=False),
        sa.Column("losses_json", sa.Text(), nullable=False),
        sa.Column("batch_sizes_json", sa.Text(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
    )


def downgrade() -> None:
    """Drop the dataset tables and the reservations' ``steps``."""
    op.drop_table("trainer_dataset_runs")
    op.drop_index("ix_trainer_datasets_tenant_created", "trainer_datasets")
    op.drop_table("trainer_datasets")
    op.drop_table("trainer_dataset_keys")
    with op.batch_alter_table("trainer_budget_reservations") as batch:
        batch.drop_column("steps")
