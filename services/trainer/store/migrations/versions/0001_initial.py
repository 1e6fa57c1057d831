"""Initial trainer schema: clients, jobs, futures, reservations, ledger, checkpoints.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tensafe.common.futures import create_futures_table_v1, drop_futures_table_v1

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create every trainer table."""
    create_futures_table_v1(op, prefix="trainer")
    op.create_table(
        "trainer_training_clients",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("lora_json", sa.Text(), nullable=False),
        sa.Column("dp_json", sa.Text(), nullable=True),
        sa.Column("private", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("next_seq", sa.BigInteger(), nullable=False),
        sa.Column("applied_seq", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("dp_steps", sa.BigInteger(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("accountant_state", sa.Text(), nullable=True),
        sa.Column("state_path", sa.Text(), nullable=True),
        sa.Column("state_sha256", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        _timestamp("created_at"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_trainer_clients_tenant_request"),
    )
    op.create_index(
        "ix_trainer_clients_tenant_created",
        "trainer_training_clients",
        ["tenant", "created_at", "id"],
    )
    op.create_table(
        "trainer_jobs",
        sa.Column("future_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("client_id", "seq", name="uq_trainer_jobs_client_seq"),
    )
    op.create_index("ix_trainer_jobs_status_created", "trainer_jobs", ["status", "created_at"])
    op.create_table(
        "trainer_budget_reservations",
        sa.Column("future_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sampling", sa.String(32), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sampling_probability", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("created_at"),
    )
    op.create_index(
        "ix_trainer_reservations_client_status",
        "trainer_budget_reservations",
        ["client_id", "status"],
    )
    op.create_table(
        "trainer_privacy_ledger",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("dp_step", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("future_id", sa.String(32), nullable=False),
        sa.Column("sampling", sa.String(32), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sampling_probability", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("accountant", sa.String(16), nullable=False),
        sa.Column("epsilon_after", sa.Float(), nullable=False),
        sa.Column("accountant_state", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("client_id", "dp_step", name="uq_trainer_ledger_client_step"),
    )
    op.create_table(
        "trainer_checkpoints",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("object_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("accountant_state", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.UniqueConstraint("client_id", "kind", "name", name="uq_trainer_checkpoints_name"),
    )


def downgrade() -> None:
    """Drop every trainer table."""
    op.drop_table("trainer_checkpoints")
    op.drop_table("trainer_privacy_ledger")
    op.drop_index("ix_trainer_reservations_client_status", "trainer_budget_reservations")
    op.drop_table("trainer_budget_reservations")
    op.drop_index("ix_trainer_jobs_status_created", "trainer_jobs")
    op.drop_table("trainer_jobs")
    op.drop_index("ix_trainer_clients_tenant_created", "trainer_training_clients")
    op.drop_table("trainer_training_clients")
    drop_futures_table_v1(op, prefix="trainer")
