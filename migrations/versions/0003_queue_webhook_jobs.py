"""Webhooks applied by the worker: a stored event waits as 'pending' until its job applies it, and
remembers the Stripe object it is about (object_key, e.g. subscription:sub_123), which is what its
job is keyed, locked and coalesced on.

Revision ID: 0003_queue_webhook_jobs
Revises: 0002_queue_outbox
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_queue_webhook_jobs"
down_revision = "0002_queue_outbox"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("stripe_event") as batch:
        batch.add_column(sa.Column("object_key", sa.String(length=300), nullable=True))
        batch.drop_constraint("ck_stripe_event_status", type_="check")
        batch.create_check_constraint("ck_stripe_event_status", "status IN ('pending', 'processed', 'failed', 'ignored')")
    op.create_index(
        "ix_stripe_event_pending_object_key",
        "stripe_event",
        ["object_key", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )


def downgrade():
    op.drop_index("ix_stripe_event_pending_object_key", table_name="stripe_event")
    op.execute("UPDATE stripe_event SET status = 'failed', last_error = 'not applied before a downgrade' WHERE status = 'pending'")
    with op.batch_alter_table("stripe_event") as batch:
        batch.drop_constraint("ck_stripe_event_status", type_="check")
        batch.create_check_constraint("ck_stripe_event_status", "status IN ('processed', 'failed', 'ignored')")
        batch.drop_column("object_key")
