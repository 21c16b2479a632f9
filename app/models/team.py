from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class InvitationStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REVOKED = "revoked"


class Invitation(Model):
    """An owner's invitation of a teammate by email. The link sent is signed (itsdangerous, with the
    app's secret) over this row's id and email, so the database never holds a usable token; it works
    once (pending -> accepted by a conditional update) and until expires_at."""

    __tablename__ = "invitation"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'accepted', 'revoked')", name="ck_invitation_status"),
        CheckConstraint("email = lower(email)", name="ck_invitation_email_normalised"),
        # One open invitation per email and organization: inviting again replaces it.
        Index(
            "uq_invitation_open_email",
            "organization_id",
            "email",
            unique=True,
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), default=InvitationStatus.PENDING)
    invited_by_user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    accepted_user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class SubscriptionChangeStatus(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    REFUSED = "refused"
    FAILED = "failed"


class SubscriptionChange(Model):
    """One confirmed plan or seat change, claimed before Stripe is called. At most one is pending per
    organization (a partial unique index), and the idempotency key sent to Stripe is unique, so double
    submits and two tabs make one change at Stripe."""

    __tablename__ = "subscription_change"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'applied', 'refused', 'failed')", name="ck_subscription_change_status"),
        Index(
            "uq_subscription_change_one_pending",
            "organization_id",
            unique=True,
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    summary: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default=SubscriptionChangeStatus.PENDING)
    outcome: Mapped[str | None] = mapped_column(String(500))
    actor_user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
