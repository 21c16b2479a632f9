from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class WhopEvent(Model):
    """Every verified Whop webhook delivery, stored as stripe_event stores Stripe's (same columns, same
    statuses): `event_id` is the delivery's `webhook-id`, which Whop keeps across retries, so the unique
    constraint makes Whop's handling idempotent too. `whop_created` is the envelope's `timestamp` in
    unix seconds."""

    __tablename__ = "whop_event"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'processed', 'failed', 'ignored')", name="ck_whop_event_status"),
        Index("ix_whop_event_status_received_at", "status", "received_at"),
        Index(
            "ix_whop_event_pending_object_key",
            "object_key",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )
    created_column: ClassVar[str] = "whop_created"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    api_version: Mapped[str | None] = mapped_column(String(64))
    livemode: Mapped[bool] = mapped_column(Boolean)
    whop_created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # The Whop object the event is about ("membership:mem_...", "member:mber_..."): its job is keyed,
    # locked and coalesced on it.
    object_key: Mapped[str | None] = mapped_column(String(300))
