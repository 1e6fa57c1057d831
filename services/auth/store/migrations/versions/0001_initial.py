"""Auth v1: tenants, principals, API keys, signing keys, issued tokens, audit chain.

Times are integer microseconds since the epoch (UTC): exact on both back ends, so the
audit hashes recompute bit for bit.

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


def upgrade() -> None:
    op.create_table(
        "auth_tenants",
        sa.Column("id", sa.String(_ID), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("is_platform", sa.Boolean(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True, unique=True),
    )
    op.create_table(
        "auth_principals",
        sa.Column("id", sa.String(_ID), primary_key=True),
        sa.Column("tenant_id", sa.String(_ID), sa.ForeignKey("auth_tenants.id"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("roles", sa.String(200), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant_id", "name", name="uq_auth_principals_name"),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_auth_principals_request"),
    )
    op.create_table(
        "auth_api_keys",
        sa.Column("id", sa.String(_ID), primary_key=True),
        sa.Column("prefix", sa.String(16), nullable=False, unique=True),
        sa.Column(
            "principal_id", sa.String(_ID), sa.ForeignKey("auth_principals.id"), nullable=False
        ),
        sa.Column("tenant_id", sa.String(_ID), sa.ForeignKey("auth_tenants.id"), nullable=False),
        sa.Column("secret_hash", sa.String(256), nullable=False),
        sa.Column("description", sa.String(1000), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("expire_time_us", sa.BigInteger(), nullable=True),
        sa.Column("revoke_time_us", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.UniqueConstraint("principal_id", "request_id", name="uq_auth_api_keys_request"),
    )
    op.create_index("ix_auth_api_keys_tenant", "auth_api_keys", ["tenant_id", "id"])
    op.create_table(
        "auth_signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("encrypted_private_key", sa.LargeBinary(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("retire_time_us", sa.BigInteger(), nullable=True),
        sa.Column("verify_until_us", sa.BigInteger(), nullable=True),
    )
    op.create_table(
        "auth_tokens",
        sa.Column("token_id", sa.String(_ID), primary_key=True),
        sa.Column("tenant_id", sa.String(_ID), nullable=False),
        sa.Column("principal_id", sa.String(_ID), nullable=False),
        sa.Column("api_key_id", sa.String(_ID), nullable=False),
        sa.Column("expire_time_us", sa.BigInteger(), nullable=False),
        sa.Column("revoke_time_us", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_auth_tokens_revoked", "auth_tokens", ["revoke_time_us"])
    op.create_index("ix_auth_tokens_api_key", "auth_tokens", ["api_key_id"])
    op.create_index("ix_auth_tokens_expire", "auth_tokens", ["expire_time_us"])
    op.create_table(
        "auth_audit_events",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(_ID), nullable=False),
        sa.Column("principal_id", sa.String(_ID), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_auth_audit_events_tenant", "auth_audit_events", ["tenant_id", "seq"])
    # The chain head is also the lock row that serialises appends (SELECT ... FOR UPDATE).
    head = op.create_table(
        "auth_audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "last_seq": 0, "last_hash": "0" * 64}])


def downgrade() -> None:
    op.drop_table("auth_audit_head")
    op.drop_index("ix_auth_audit_events_tenant", table_name="auth_audit_events")
    op.drop_table("auth_audit_events")
    op.drop_index("ix_auth_tokens_expire", table_name="auth_tokens")
    op.drop_index("ix_auth_tokens_api_key", table_name="auth_tokens")
    op.drop_index("ix_auth_tokens_revoked", table_name="auth_tokens")
    op.drop_table("auth_tokens")
    op.drop_table("auth_signing_keys")
    op.drop_index("ix_auth_api_keys_tenant", table_name="auth_api_keys")
    op.drop_table("auth_api_keys")
    op.drop_table("auth_principals")
    op.drop_table("auth_tenants")
