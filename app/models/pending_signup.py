from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import JsonDocument, Timestamp, utcnow


class SignupStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    EXPIRED = "expired"
    FAILED = "failed"


class PendingSignup(Model):
    """A customer's intent to sign up, held while they pay on Stripe Checkout. The password is kept
    only as a hash and only until the account exists."""

    __tablename__ = "pending_signup"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'completed', 'expired', 'failed')", name="ck_pending_signup_status"),
        CheckConstraint("email = lower(email)", name="ck_pending_signup_email_normalised"),
        # Retention: the password hash is kept only while the signup is open, and erased the moment it
        # completes (the owner's account holds it), fails or expires.
        CheckConstraint("status = 'pending' OR password_hash IS NULL", name="ck_pending_signup_hash_only_while_open"),
        # At most one open attempt per email: a new attempt supersedes the old one in the same
        # transaction, and two racing attempts cannot both be open.
        Index(
            "uq_pending_signup_open_email",
            "email",
            unique=True,
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320))
    organization_name: Mapped[str] = mapped_column(String(200))
    owner_name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    tier: Mapped[str] = mapped_column(String(50))
    addons: Mapped[dict[str, int]] = mapped_column(JsonDocument, default=dict)
    checkout_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=SignupStatus.PENDING)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    organization_id: Mapped[int | None] = mapped_column(ForeignKey("organization.id", ondelete="SET NULL"))
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Bumped by a subscription event that arrived before the organization existed; provisioning that
    # read Stripe before the bump reads it again (no lock is held across the read).
    subscription_events_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A paid checkout that could not become an account (the email already has one): the subscription
    # to cancel, and when and how it was canceled and refunded at Stripe.
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    settled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    settlement: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
