"""Pricing: the address an organization's receipts go to (organization.billing_email), chosen by the
owner on the billing page; empty means the owner's own address.

The downgrade drops it: receipts go to the owner again.

Revision ID: 0012_pricing
Revises: 0011_usage
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_pricing"
down_revision = "0011_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organization") as batch:  # batch: the SQLite stand-in too
        batch.add_column(sa.Column("billing_email", sa.String(length=320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        batch.drop_column("billing_email")
