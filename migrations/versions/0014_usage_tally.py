"""Usage is tallied by the worker, not counted by each request: usage_event.billable_quantity is NULL
until the worker's tally has counted the event into its period's total (usage_period_total) and
decided its billable part; each event keeps its period's end, which the tally needs to create the
period's row. A partial index finds the untallied events (the tally's work, and what the billing page
and a hard limit add to the tallied total).

Existing events were all counted when stored: they keep their billable quantity, and their period's
end is copied from their period's row. The downgrade cannot tell what a tier includes (that is in
plans.toml): events still untallied are added to their period's total and bill nothing, so run the
worker (or `flask billing usage`) before downgrading.

Revision ID: 0014_usage_tally
Revises: 0013_metered_catalogue_price
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_usage_tally"
down_revision = "0013_metered_catalogue_price"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_event") as batch:  # batch: the SQLite stand-in too
        batch.add_column(sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("billable_quantity", existing_type=sa.BigInteger(), nullable=True, server_default=None)
    op.execute(
        "UPDATE usage_event SET period_end = (SELECT t.period_end FROM usage_period_total t"
        " WHERE t.organization_id = usage_event.organization_id AND t.meter = usage_event.meter"
        " AND t.period_start = usage_event.period_start)"
    )
    with op.batch_alter_table("usage_event") as batch:
        batch.alter_column("period_end", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index(
        "ix_usage_event_untallied",
        "usage_event",
        ["organization_id", "meter", "period_start"],
        postgresql_where=sa.text("billable_quantity IS NULL"),
        sqlite_where=sa.text("billable_quantity IS NULL"),
    )


def downgrade() -> None:
    op.execute(
        "INSERT INTO usage_period_total (organization_id, meter, period_start, period_end, total, billable)"
        " SELECT organization_id, meter, period_start, max(period_end), sum(quantity), 0 FROM usage_event"
        " WHERE billable_quantity IS NULL GROUP BY organization_id, meter, period_start"
        " ON CONFLICT (organization_id, meter, period_start)"
        " DO UPDATE SET total = usage_period_total.total + excluded.total"
    )
    op.execute("UPDATE usage_event SET billable_quantity = 0 WHERE billable_quantity IS NULL")
    op.drop_index("ix_usage_event_untallied", table_name="usage_event")
    with op.batch_alter_table("usage_event") as batch:
        batch.alter_column(
            "billable_quantity", existing_type=sa.BigInteger(), nullable=False, server_default=sa.text("0")
        )
        batch.drop_column("period_end")
