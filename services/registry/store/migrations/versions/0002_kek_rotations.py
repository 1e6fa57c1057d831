"""Registry v2: KEK rotations, the state of each tenant's resumable re-wrap job.

A row per rotation: the tenant, the KEK version the tenant's packages are re-wrapped
under, whether the job is still running, and its counts. Which packages are done is
not stored separately: each stored package names the KEK version that wrapped its data
key, so a resumed job skips those already re-wrapped.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_kek_rotations",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("kek_id", sa.String(2048), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("rewrapped", sa.BigInteger(), nullable=False),
        sa.Column("pinned", sa.BigInteger(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("finish_time_us", sa.BigInteger(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("registry_kek_rotations")
