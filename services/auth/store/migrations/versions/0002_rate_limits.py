"""Rate limits shared by every auth replica: one GCRA row per limited key.

A row holds the key's theoretical arrival time (``tat_us``, integer microseconds since
the epoch, exact on both back ends); a key without a row is not limited. Rows whose
``tat_us`` has passed carry no state and are pruned (``ix_auth_rate_limits_tat``).

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
        "auth_rate_limits",
        sa.Column("bucket", sa.String(64), primary_key=True),
        sa.Column("tat_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_auth_rate_limits_tat", "auth_rate_limits", ["tat_us"])


def downgrade() -> None:
    op.drop_index("ix_auth_rate_limits_tat", table_name="auth_rate_limits")
    op.drop_table("auth_rate_limits")
