"""The job queue and the outbox: procrastinate's schema (the SQL shipped in the procrastinate package,
applied as it stands) and outbox_delivery, which records each consumer's handling of a domain event.

Revision ID: 0002_queue_outbox
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager

revision = "0002_queue_outbox"
down_revision = "0001"
branch_labels = None
depends_on = None

# Everything procrastinate's schema.sql creates is named procrastinate_*; the downgrade drops it by name.
DROP_PROCRASTINATE = """
DO $$
DECLARE
    item record;
BEGIN
    DROP TABLE IF EXISTS procrastinate_periodic_defers, procrastinate_events, procrastinate_jobs,
        procrastinate_workers CASCADE;
    FOR item IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\\_%'
    LOOP
        EXECUTE 'DROP FUNCTION IF EXISTS ' || item.signature || ' CASCADE';
    END LOOP;
    DROP TYPE IF EXISTS procrastinate_job_to_defer_v1, procrastinate_job_event_type,
        procrastinate_job_status CASCADE;
END
$$
"""


def _postgresql():
    # The development stand-in (SQLite) runs without a queue: jobs run in the web process there.
    return op.get_bind().dialect.name == "postgresql"


def _execute_script(sql):
    # The script has literal "%" signs: run it on the migration's own connection (and transaction)
    # without parameters, so that no driver or SQLAlchemy escaping touches it.
    cursor = op.get_bind().connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def upgrade():
    if _postgresql():
        _execute_script(SchemaManager.get_schema())
    op.create_table(
        "outbox_delivery",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("domain_event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["domain_event_id"], ["domain_event.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("domain_event_id", "consumer", name="uq_outbox_delivery_event_consumer"),
    )


def downgrade():
    op.drop_table("outbox_delivery")
    if _postgresql():
        _execute_script(DROP_PROCRASTINATE)
