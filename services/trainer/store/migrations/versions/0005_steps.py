"""Per-step history of a training client: loss and epsilon after each optimizer step.

Revision ID: 0005_steps
Revises: 0004_lineage
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_steps"
down_revision = "0004_lineage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the step table and the client's ForwardBackward totals since its last step.

    Steps committed before this revision have no row (their epsilon is still in the
    privacy ledger); ``ListTrainingSteps`` starts with the first step after it.
    """
    with op.batch_alter_table("trainer_training_clients") as batch:
        batch.add_column(
            sa.Column("pending_loss_sum", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("pending_tokens", sa.Float(), nullable=False, server_default="0")
        )
    op.create_table(
        "trainer_steps",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("future_id", sa.String(32), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("dp_step", sa.BigInteger(), nullable=True),
        sa.Column("epsilon_after", sa.Float(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_trainer_steps_client", "trainer_steps", ["client_id", "id"])


def downgrade() -> None:
    """Drop the step table and the pending totals."""
    op.drop_index("ix_trainer_steps_client", table_name="trainer_steps")
    op.drop_table("trainer_steps")
    with op.batch_alter_table("trainer_training_clients") as batch:
        batch.drop_column("pending_tokens")
        batch.drop_column("pending_loss_sum")
