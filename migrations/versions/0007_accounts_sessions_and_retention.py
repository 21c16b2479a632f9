"""Accounts: a per-user session epoch (sign out everywhere), the time an email address was confirmed,
and the database's guarantee that only an open signup keeps a password hash.

Revision ID: 0007_accounts
Revises: 0006_whop_event
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_accounts"
down_revision = "0006_whop_event"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column(
        "user_account",
        sa.Column("session_epoch", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column(
        "user_account",
        sa.Column("email_verified_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Signups that ended before this migration may still hold a hash: erase them, then forbid it.
    op.execute("UPDATE pending_signup SET password_hash = NULL WHERE status <> 'pending'")
    with op.batch_alter_table("pending_signup") as batch:  # batch: the SQLite stand-in too
        batch.create_check_constraint(
            "ck_pending_signup_hash_only_while_open", "status = 'pending' OR password_hash IS NULL"
        )


def downgrade():
    with op.batch_alter_table("pending_signup") as batch:
        batch.drop_constraint("ck_pending_signup_hash_only_while_open", type_="check")
    with op.batch_alter_table("user_account") as batch:
        batch.drop_column("email_verified_at")
        batch.drop_column("session_epoch")
