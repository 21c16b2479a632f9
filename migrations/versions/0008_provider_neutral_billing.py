"""Provider-neutral billing: an organization's billing no longer lives in Stripe-named columns.

- organization.billing_provider ('stripe' | 'whop', existing rows 'stripe');
- organization.stripe_customer_id -> billing_customer_id (Stripe customer cus_..., Whop member mber_...);
  unique among Stripe-billed organizations only (a Whop member may own several organizations);
- organization.stripe_subscription_id -> billing_subscription_id (Stripe sub_..., Whop membership mem_...),
  unique;
- organization_addon.stripe_subscription_item_id -> provider_item_id.

Values move with their columns, so nothing is copied and nothing can be lost. The downgrade restores the
Stripe names and constraints exactly. The old schema has no place for another provider, so a Whop-billed
organization's provider and member id wait in organization_billing_provider (its membership id stays in
stripe_subscription_id) and the next upgrade puts them back; migration 0006_whop_event's downgrade, below which Whop
does not exist, drops that table.

Revision ID: 0008_provider_neutral_billing
Revises: 0007_accounts
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_provider_neutral_billing"
down_revision = "0007_accounts"
branch_labels = None
depends_on = None

STRIPE_ONLY = "billing_provider = 'stripe'"
PARKED = "organization_billing_provider"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # The unique constraints PostgreSQL named after the old columns go; neutral ones replace them.
        op.drop_constraint("organization_stripe_customer_id_key", "organization", type_="unique")
        op.drop_constraint("organization_stripe_subscription_id_key", "organization", type_="unique")
    with op.batch_alter_table("organization") as batch:
        batch.add_column(sa.Column("billing_provider", sa.String(length=16), nullable=False, server_default="stripe"))
        batch.alter_column("stripe_customer_id", new_column_name="billing_customer_id")
        batch.alter_column("stripe_subscription_id", new_column_name="billing_subscription_id")
        batch.create_check_constraint("ck_organization_billing_provider", "billing_provider IN ('stripe', 'whop')")
        if postgres:
            batch.create_unique_constraint("uq_organization_billing_subscription_id", ["billing_subscription_id"])
    if PARKED in sa.inspect(op.get_bind()).get_table_names():
        for column in ("billing_provider", "billing_customer_id"):
            op.execute(
                f"UPDATE organization SET {column} = (SELECT p.{column} FROM {PARKED} p "  # noqa: S608
                f"WHERE p.organization_id = organization.id) WHERE id IN (SELECT organization_id FROM {PARKED})"
            )
        op.drop_table(PARKED)
    op.create_index(
        "uq_organization_stripe_customer",
        "organization",
        ["billing_customer_id"],
        unique=True,
        postgresql_where=sa.text(STRIPE_ONLY),
        sqlite_where=sa.text(STRIPE_ONLY),
    )
    with op.batch_alter_table("organization_addon") as batch:
        batch.alter_column("stripe_subscription_item_id", new_column_name="provider_item_id")


def downgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        PARKED,
        sa.Column("organization_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("billing_provider", sa.String(length=16), nullable=False),
        sa.Column("billing_customer_id", sa.String(length=255), nullable=True),
    )
    op.execute(
        f"INSERT INTO {PARKED} (organization_id, billing_provider, billing_customer_id) "  # noqa: S608
        "SELECT id, billing_provider, billing_customer_id FROM organization WHERE billing_provider <> 'stripe'"
    )
    # A Whop member may own several organizations; stripe_customer_id is unique, so theirs waits parked.
    op.execute("UPDATE organization SET billing_customer_id = NULL WHERE billing_provider <> 'stripe'")
    postgres = bind.dialect.name == "postgresql"
    with op.batch_alter_table("organization_addon") as batch:
        batch.alter_column("provider_item_id", new_column_name="stripe_subscription_item_id")
    op.drop_index("uq_organization_stripe_customer", table_name="organization")
    if postgres:
        op.drop_constraint("uq_organization_billing_subscription_id", "organization", type_="unique")
    with op.batch_alter_table("organization") as batch:
        batch.drop_constraint("ck_organization_billing_provider", type_="check")
        batch.alter_column("billing_customer_id", new_column_name="stripe_customer_id")
        batch.alter_column("billing_subscription_id", new_column_name="stripe_subscription_id")
        batch.drop_column("billing_provider")
    if postgres:
        op.create_unique_constraint("organization_stripe_customer_id_key", "organization", ["stripe_customer_id"])
        op.create_unique_constraint(
            "organization_stripe_subscription_id_key", "organization", ["stripe_subscription_id"]
        )
