"""Usage-based billing: usage_event (each usage event an organization recorded, once per idempotency
key, with the part of it billed past what the tier includes), usage_period_total (an organization's
running total per meter and billing period: the counter hard limits and warnings are decided on),
usage_report (what was reported to Stripe's meter events, one row per deterministic identifier) and
api_key (an organization's keys for the usage API, stored as SHA-256 with a visible prefix).

The downgrade drops all of it: recorded usage, reports and API keys are lost.

Revision ID: 0011_usage
Revises: 0010_staff_console
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_usage"
down_revision = "0010_staff_console"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_report",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("organization_id", BIG_ID, nullable=False),
        sa.Column("meter", sa.String(length=50), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("identifier", sa.String(length=100), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("identifier", name="uq_usage_report_identifier"),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_usage_report_status"),
        sa.CheckConstraint("quantity > 0", name="ck_usage_report_quantity"),
    )
    op.create_index("ix_usage_report_status", "usage_report", ["status"])
    op.create_table(
        "usage_event",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("organization_id", BIG_ID, nullable=False),
        sa.Column("meter", sa.String(length=50), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("billable_quantity", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("report_id", BIG_ID, nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["report_id"], ["usage_report.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("organization_id", "idempotency_key", name="uq_usage_event_idempotency_key"),
        sa.CheckConstraint("quantity >= 0", name="ck_usage_event_quantity"),
        sa.CheckConstraint(
            "billable_quantity >= 0 AND billable_quantity <= quantity", name="ck_usage_event_billable_quantity"
        ),
    )
    op.create_index("ix_usage_event_organization_meter_time", "usage_event", ["organization_id", "meter", "occurred_at"])
    op.create_index(
        "ix_usage_event_unreported",
        "usage_event",
        ["recorded_at"],
        postgresql_where=sa.text("report_id IS NULL AND billable_quantity > 0"),
        sqlite_where=sa.text("report_id IS NULL AND billable_quantity > 0"),
    )
    op.create_table(
        "usage_period_total",
        sa.Column("organization_id", BIG_ID, nullable=False),
        sa.Column("meter", sa.String(length=50), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("billable", sa.BigInteger(), nullable=False, server_default="0"),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("organization_id", "meter", "period_start"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("organization_id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by_user_id", BIG_ID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["created_by_user_id"], ["user_account.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash", name="uq_api_key_hash"),
    )
    op.create_index("ix_api_key_organization_id", "api_key", ["organization_id"])


def downgrade() -> None:
    op.drop_table("api_key")
    op.drop_table("usage_period_total")
    op.drop_index("ix_usage_event_unreported", table_name="usage_event")
    op.drop_table("usage_event")
    op.drop_index("ix_usage_report_status", table_name="usage_report")
    op.drop_table("usage_report")
