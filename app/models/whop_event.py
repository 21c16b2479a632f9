from __future__ import annotations

from typing import ClassVar

from sqlalchemy import BigInteger
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.provider_event import ProviderEventColumns


class WhopEvent(ProviderEventColumns, Model):
    """Every verified Whop webhook delivery, stored as stripe_event stores Stripe's (same columns, same
    statuses): `event_id` is the delivery's `webhook-id`, which Whop keeps across retries, so the unique
    constraint makes Whop's handling idempotent too. `whop_created` is the envelope's `timestamp` in
    unix seconds."""

    __tablename__ = "whop_event"
    created_column: ClassVar[str] = "whop_created"

    whop_created: Mapped[int] = mapped_column(BigInteger)
