"""whop_event: Whop's webhook deliveries, stored as stripe_event stores Stripe's (same columns and
statuses, pending included, and object_key; whop_created instead of stripe_created), unique on the
delivery's webhook-id.

Revision ID: 0006_whop_event
Revises: 0005_owner_team
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_whop_event"
down_revision = "0005_owner_team"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "whop_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("api_version", sa.String(length=64), nullable=True),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("whop_created", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("object_key", sa.String(length=300), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'processed', 'failed', 'ignored')", name="ck_whop_event_status"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_whop_event_status_received_at", "whop_event", ["status", "received_at"], unique=False)
    op.create_index(
        "ix_whop_event_pending_object_key",
        "whop_event",
        ["object_key", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    # Below this revision there is no Whop: the providers parked by 0008's downgrade go too.
    op.execute("DROP TABLE IF EXISTS organization_billing_provider")
    op.drop_index("ix_whop_event_pending_object_key", table_name="whop_event")
    op.drop_index("ix_whop_event_status_received_at", table_name="whop_event")
    op.drop_table("whop_event")
