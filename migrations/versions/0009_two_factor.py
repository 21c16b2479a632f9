"""Two-factor sign-in: a user's TOTP secret, when it was turned on and the last time step whose code was
accepted; ten hashed single-use recovery codes per user (recovery_code); and an organization's
requirement that every member signs in with two factors.

The downgrade drops all of it: users who had turned two-factor sign-in on sign in with their password
alone again.

Revision ID: 0009_two_factor
Revises: 0008_provider_neutral_billing
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_two_factor"
down_revision = "0008_provider_neutral_billing"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("user_account") as batch:  # batch: the SQLite stand-in too
        batch.add_column(sa.Column("totp_secret", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("totp_enabled_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))
        batch.create_check_constraint(
            "ck_user_account_totp_secret", "totp_enabled_at IS NULL OR totp_secret IS NOT NULL"
        )
    op.add_column(
        "organization",
        sa.Column("require_two_factor", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_table(
        "recovery_code",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("user_id", BIG_ID, nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "code_hash", name="uq_recovery_code_user_hash"),
    )


def downgrade() -> None:
    op.drop_table("recovery_code")
    with op.batch_alter_table("organization") as batch:
        batch.drop_column("require_two_factor")
    with op.batch_alter_table("user_account") as batch:
        batch.drop_constraint("ck_user_account_totp_secret", type_="check")
        batch.drop_column("totp_last_step")
        batch.drop_column("totp_enabled_at")
        batch.drop_column("totp_secret")
