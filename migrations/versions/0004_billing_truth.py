"""Billing truth: prices remembered from the catalogue (so items still map after a price migration),
payment collection pauses, resubscribe checkouts, and the settlement of paid checkouts that no
organization may keep (a conflicting signup, a surplus resubscription).

Revision ID: 0004_billing_truth
Revises: 0003_queue_webhook_jobs
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_billing_truth"
down_revision = "0003_queue_webhook_jobs"
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade():
    op.create_table(
        "catalogue_price",
        sa.Column("price_id", sa.String(length=255), nullable=False),
        sa.Column("product_id", sa.String(length=255), nullable=True),
        sa.Column("lookup_key", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("catalogue_key", sa.String(length=50), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('tier', 'addon')", name="ck_catalogue_price_kind"),
        sa.PrimaryKeyConstraint("price_id"),
    )
    op.create_index("ix_catalogue_price_product_id", "catalogue_price", ["product_id"])
    op.add_column("organization", sa.Column("collection_paused", sa.String(length=32), nullable=True))
    op.add_column("organization", sa.Column("collection_resumes_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("organization", sa.Column("unmapped_items", JSON_DOCUMENT, nullable=True))
    op.add_column(
        "organization", sa.Column("subscription_events_seen", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "pending_signup", sa.Column("subscription_events_seen", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("pending_signup", sa.Column("stripe_subscription_id", sa.String(length=255), nullable=True))
    op.add_column("pending_signup", sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("pending_signup", sa.Column("settlement", JSON_DOCUMENT, nullable=True))
    op.create_table(
        "resubscribe_checkout",
        sa.Column("id", BIGID, nullable=False),
        sa.Column("checkout_session_id", sa.String(length=255), nullable=False),
        sa.Column("organization_id", BIGID, nullable=False),
        sa.Column("tier", sa.String(length=50), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stripe_subscription_id", sa.String(length=255), nullable=True),
        sa.Column("settlement", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('open', 'expired', 'attached', 'surplus', 'refunded')", name="ck_resubscribe_checkout_status"
        ),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("checkout_session_id"),
    )
    op.create_index("ix_resubscribe_checkout_organization_id", "resubscribe_checkout", ["organization_id"])


def downgrade():
    op.drop_index("ix_resubscribe_checkout_organization_id", table_name="resubscribe_checkout")
    op.drop_table("resubscribe_checkout")
    for column in ("settlement", "settled_at", "stripe_subscription_id", "subscription_events_seen"):
        op.drop_column("pending_signup", column)
    for column in ("subscription_events_seen", "unmapped_items", "collection_resumes_at", "collection_paused"):
        op.drop_column("organization", column)
    op.drop_index("ix_catalogue_price_product_id", table_name="catalogue_price")
    op.drop_table("catalogue_price")
