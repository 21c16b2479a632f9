from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class StripeEventStatus(StrEnum):
    PENDING = "pending"  # stored and queued; the worker has not applied it yet
    PROCESSED = "processed"
    FAILED = "failed"
    IGNORED = "ignored"


SETTLED_STATUSES = (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)
# A delivery of an event in one of these states is a duplicate: it is stored and queued or settled.
RECORDED_STATUSES = (StripeEventStatus.PENDING, *SETTLED_STATUSES)


class StripeEvent(Model):
    """Every verified webhook delivery, stored before it is applied (in the same transaction, with the
    status it settles with); the unique event id is what makes webhook handling idempotent."""

    __tablename__ = "stripe_event"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'processed', 'failed', 'ignored')", name="ck_stripe_event_status"),
        Index("ix_stripe_event_status_received_at", "status", "received_at"),
        Index(
            "ix_stripe_event_pending_object_key",
            "object_key",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    api_version: Mapped[str | None] = mapped_column(String(64))
    livemode: Mapped[bool] = mapped_column(Boolean)
    stripe_created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # The Stripe object the event is about ("subscription:sub_...", "checkout:cs_...",
    # "customer:cus_..."): its job is keyed, locked and coalesced on it.
    object_key: Mapped[str | None] = mapped_column(String(300))
