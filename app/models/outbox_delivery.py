from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class OutboxDelivery(Model):
    """One consumer's finished handling of one domain event (for an email: the SMTP server accepted
    it). The unique pair is what makes a redelivered event a no-op for that consumer."""

    __tablename__ = "outbox_delivery"
    __table_args__ = (UniqueConstraint("domain_event_id", "consumer", name="uq_outbox_delivery_event_consumer"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    domain_event_id: Mapped[int] = mapped_column(ForeignKey("domain_event.id", ondelete="RESTRICT"))
    consumer: Mapped[str] = mapped_column(String(100))
    delivered_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
