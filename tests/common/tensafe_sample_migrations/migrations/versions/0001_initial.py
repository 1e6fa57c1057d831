"""Sample service v1: a widgets table with one seed row, and the futures table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from tensafe.common.futures import create_futures_table_v1, drop_futures_table_v1

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    widgets = op.create_table(
        "sample_widgets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
    )
    # Data migration: re-running this revision would insert a second row (or fail on
    # the unique name), which is how the tests see that a second migrate is a no-op.
    op.bulk_insert(widgets, [{"id": 1, "name": "seed"}])
    create_futures_table_v1(op, prefix="sample")


def downgrade() -> None:
    drop_futures_table_v1(op, prefix="sample")
    op.drop_table("sample_widgets")
