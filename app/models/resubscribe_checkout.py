from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, JsonDocument, Timestamp, utcnow


class ResubscribeStatus(StrEnum):
    OPEN = "open"  # the owner may still pay it
    EXPIRED = "expired"  # replaced by a newer checkout (expired at Stripe) or ran out
    ATTACHED = "attached"  # its subscription is the organization's
    SURPLUS = "surplus"  # paid while the organization already had a live subscription: to cancel and refund
    REFUNDED = "refunded"  # the surplus subscription was canceled and its payment refunded


class ResubscribeCheckout(Model):
    """A Checkout Session an owner opened to start a new subscription after the last one ended."""

    __tablename__ = "resubscribe_checkout"
    __table_args__ = (
        CheckConstraint(
            "status IN ('open', 'expired', 'attached', 'surplus', 'refunded')", name="ck_resubscribe_checkout_status"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    checkout_session_id: Mapped[str] = mapped_column(String(255), unique=True)
    organization_id: Mapped[int] = mapped_column(BigId, ForeignKey("organization.id", ondelete="CASCADE"), index=True)
    tier: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(16), default=ResubscribeStatus.OPEN)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    settlement: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
