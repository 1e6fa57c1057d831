"""Registry v1: adapters, their versions and aliases.

Times are integer microseconds since the epoch (UTC). Package bytes are not here: they
live in the object store under their SHA-256 (``registry_versions.package_sha256``).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = 32
_TENANT = 128
_NAME = 128


def upgrade() -> None:
    op.create_table(
        "registry_adapters",
        sa.Column("id", sa.String(_ID), primary_key=True),
        sa.Column("tenant_id", sa.String(_TENANT), nullable=False),
        sa.Column("name", sa.String(_NAME), nullable=False),
        sa.Column("next_version", sa.BigInteger(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_registry_adapters_name"),
    )
    op.create_table(
        "registry_versions",
        sa.Column(
            "adapter_id",
            sa.String(_ID),
            sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.BigInteger(), primary_key=True),
        sa.Column("tenant_id", sa.String(_TENANT), nullable=False),
        sa.Column("package_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest_json", sa.Text(), nullable=False),
        sa.Column("signer_key_id", sa.String(64), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_registry_versions_request"),
    )
    op.create_index("ix_registry_versions_sha256", "registry_versions", ["package_sha256"])
    op.create_table(
        "registry_aliases",
        sa.Column(
            "adapter_id",
            sa.String(_ID),
            sa.ForeignKey("registry_adapters.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("alias", sa.String(32), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_aliases")
    op.drop_index("ix_registry_versions_sha256", table_name="registry_versions")
    op.drop_table("registry_versions")
    op.drop_table("registry_adapters")
