"""HE runtime v1: durable HE sessions.

Times are integer microseconds since the epoch (UTC). The Galois keys are not here:
they live in ``<data_dir>/he_runtime/keys/<id>.galois`` (one file per row).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "he_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("adapter_name", sa.String(128), nullable=False),
        sa.Column("adapter_version", sa.BigInteger(), nullable=False),
        sa.Column("adapter_digest", sa.String(64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("seal_parameters", sa.LargeBinary(), nullable=False),
        sa.Column("key_bytes", sa.BigInteger(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("last_used_time_us", sa.BigInteger(), nullable=False),
        sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_he_sessions_request"),
    )
    op.create_index("ix_he_sessions_tenant", "he_sessions", ["tenant_id"])
    op.create_index("ix_he_sessions_expire", "he_sessions", ["expire_time_us"])


def downgrade() -> None:
    op.drop_table("he_sessions")
