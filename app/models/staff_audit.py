from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, JsonDocument, Timestamp, utcnow


class StaffAuditEntry(Model):
    """One staff action in the operations console (or a staff grant from the command line): who, when,
    what, on which organization, the reason typed, and the billing before and after. Append-only: the
    app has no path that updates or deletes a row, and the database refuses both (a trigger). Ids are
    kept without foreign keys so no deletion elsewhere ever rewrites a row."""

    __tablename__ = "staff_audit"
    __table_args__ = (
        UniqueConstraint("request_key", name="uq_staff_audit_request_key"),
        Index("ix_staff_audit_organization_id", "organization_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    staff_user_id: Mapped[int | None] = mapped_column(BigId)
    staff_email: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    organization_id: Mapped[int | None] = mapped_column(BigId)
    target: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    before: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    after: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    outcome: Mapped[str] = mapped_column(String(500))
    request_key: Mapped[str | None] = mapped_column(String(200))
