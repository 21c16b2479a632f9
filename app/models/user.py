from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from flask_login import UserMixin
from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import Model
from app.models.organization import Organization
from app.models.types import BigId, Timestamp, utcnow


class UserRole(StrEnum):
    OWNER = "owner"
    MEMBER = "member"


class User(UserMixin, Model):
    __tablename__ = "user_account"
    __table_args__ = (
        CheckConstraint("email = lower(email)", name="ck_user_account_email_normalised"),
        CheckConstraint("role IN ('owner', 'member')", name="ck_user_account_role"),
        # Two-factor sign-in is on only with a secret to check codes against.
        CheckConstraint("totp_enabled_at IS NULL OR totp_secret IS NOT NULL", name="ck_user_account_totp_secret"),
        # One owner per organization, enforced by the database.
        Index(
            "uq_user_account_one_owner",
            "organization_id",
            unique=True,
            postgresql_where=text("role = 'owner'"),
            sqlite_where=text("role = 'owner'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="RESTRICT"), index=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # A member the owner removed: kept (domain events name them) but signed out and unable to sign in.
    removed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Raised to sign the user out everywhere: a session is valid only while it carries the current one.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    email_verified_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Two-factor sign-in (TOTP, app/services/two_factor_service.py): the shared secret (base32), when it
    # was turned on, and the last 30-second time step whose code was accepted (no code is accepted twice).
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_enabled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    # Staff may use the operations console (app/admin/); granted and revoked only from the command line
    # (`flask users grant-staff EMAIL`), and only with two-factor sign-in on.
    is_staff: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    organization: Mapped[Organization] = relationship()

    @property
    def is_owner(self) -> bool:
        return self.role == UserRole.OWNER

    @property
    def email_verified(self) -> bool:
        return self.email_verified_at is not None

    @property
    def two_factor_enabled(self) -> bool:
        return self.totp_enabled_at is not None
