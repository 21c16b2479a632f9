"""The operations console: a staff flag on users (granted and revoked only from the command line) and
the append-only staff audit log (staff_audit): who did what to which organization, when, why (the
reason they typed), and the billing before and after. On PostgreSQL a trigger refuses UPDATE and
DELETE of staff_audit rows, as it does for domain_event; on the SQLite stand-in a trigger does too.

The downgrade drops both: nobody is staff any more and the staff audit log is gone.

Revision ID: 0010_staff_console
Revises: 0009_two_factor
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010_staff_console"
down_revision = "0009_two_factor"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION staff_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'staff_audit is append-only: % refused', TG_OP;
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table("user_account") as batch:
        batch.add_column(sa.Column("is_staff", sa.Boolean(), nullable=False, server_default=sa.text("false")))
    op.create_table(
        "staff_audit",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        # Who: the staff member's id and, kept apart from the account, their email at the time.
        sa.Column("staff_user_id", BIG_ID, nullable=True),
        sa.Column("staff_email", sa.String(length=320), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("organization_id", BIG_ID, nullable=True),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("before", JSON, nullable=True),
        sa.Column("after", JSON, nullable=True),
        sa.Column("outcome", sa.String(length=500), nullable=False),
        # The confirmation form's one-time token: the same form submitted twice is one action.
        sa.Column("request_key", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_key", name="uq_staff_audit_request_key"),
    )
    op.create_index("ix_staff_audit_organization_id", "staff_audit", ["organization_id", "id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute(
            "CREATE TRIGGER staff_audit_append_only BEFORE UPDATE OR DELETE ON staff_audit "
            "FOR EACH ROW EXECUTE FUNCTION staff_audit_append_only()"
        )
    else:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER staff_audit_no_{operation.lower()} BEFORE {operation} ON staff_audit "
                f"BEGIN SELECT RAISE(ABORT, 'staff_audit is append-only: {operation} refused'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER staff_audit_append_only ON staff_audit")
        op.execute("DROP FUNCTION staff_audit_append_only()")
    op.drop_index("ix_staff_audit_organization_id", table_name="staff_audit")
    op.drop_table("staff_audit")
    with op.batch_alter_table("user_account") as batch:
        batch.drop_column("is_staff")
