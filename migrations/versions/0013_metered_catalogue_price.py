"""Metered prices remembered in catalogue_price: its kind may be 'meter' as well as 'tier' or 'addon',
so a subscription's metered item still maps to its meter after `transfer_lookup_key` moved the metered
price's lookup key to a newer price.

The downgrade forgets the remembered metered prices (they are remembered again when next seen).

Revision ID: 0013_metered_catalogue_price
Revises: 0012_pricing
Create Date: 2026-12-06
"""

from alembic import op

revision = "0013_metered_catalogue_price"
down_revision = "0012_pricing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("catalogue_price") as batch:  # batch: the SQLite stand-in too
        batch.drop_constraint("ck_catalogue_price_kind", type_="check")
        batch.create_check_constraint("ck_catalogue_price_kind", "kind IN ('tier', 'addon', 'meter')")


def downgrade() -> None:
    op.execute("DELETE FROM catalogue_price WHERE kind = 'meter'")
    with op.batch_alter_table("catalogue_price") as batch:
        batch.drop_constraint("ck_catalogue_price_kind", type_="check")
        batch.create_check_constraint("ck_catalogue_price_kind", "kind IN ('tier', 'addon')")
