"""The columns, constraints and indexes that stripe_event and whop_event share: each stores every
verified webhook delivery of its provider, with the same statuses, before it is applied. Only the
provider's event-time column (`created_column`) differs. The tables are made by the migrations; the
constraint and index names follow each table's name, as they did before this mixin."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Boolean, CheckConstraint, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

from app.models.types import BigId, Timestamp, utcnow


class ProviderEventColumns:
    """Mixed into StripeEvent and WhopEvent (which name their table and their event-time column)."""

    created_column: ClassVar[str]  # the provider's event time, in unix seconds (webhook_store)

    @declared_attr.directive
    @classmethod
    def __table_args__(cls) -> tuple[Any, ...]:
        table: str = cls.__tablename__  # type: ignore[attr-defined]
        return (
            CheckConstraint("status IN ('pending', 'processed', 'failed', 'ignored')", name=f"ck_{table}_status"),
            Index(f"ix_{table}_status_received_at", "status", "received_at"),
            Index(
                f"ix_{table}_pending_object_key",
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
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # The provider's object the event is about (e.g. "subscription:sub_...", "membership:mem_..."):
    # its job is keyed, locked and coalesced on it.
    object_key: Mapped[str | None] = mapped_column(String(300))
