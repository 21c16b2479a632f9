from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, JsonDocument, Timestamp, utcnow


class DomainEvent(Model):
    """An append-only record of something that happened (organization.created, ...). On PostgreSQL a
    trigger rejects UPDATE and DELETE."""

    __tablename__ = "domain_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    organization_id: Mapped[int | None] = mapped_column(ForeignKey("organization.id", ondelete="RESTRICT"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="RESTRICT"))
    data: Mapped[dict[str, Any]] = mapped_column(JsonDocument, default=dict)
    source: Mapped[str | None] = mapped_column(String(255))
    occurred_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
