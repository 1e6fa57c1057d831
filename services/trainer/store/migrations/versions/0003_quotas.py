"""Per-tenant quotas: stored dataset sizes and an index to count a tenant's open jobs.

Revision ID: 0003_quotas
Revises: 0002_datasets
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_quotas"
down_revision = "0002_datasets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``trainer_datasets.size_bytes`` and index futures by (tenant, status).

    Datasets stored before this revision count 0 bytes toward the storage quota (their
    size is not known without reading every object).
    """
    with op.batch_alter_table("trainer_datasets") as batch:
        batch.add_column(
            sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
    op.create_index("ix_trainer_futures_tenant_status", "trainer_futures", ["tenant", "status"])


def downgrade() -> None:
    """Drop the index and the size column."""
    op.drop_index("ix_trainer_futures_tenant_status", table_name="trainer_futures")
    with op.batch_alter_table("trainer_datasets") as batch:
        batch.drop_column("size_bytes")
