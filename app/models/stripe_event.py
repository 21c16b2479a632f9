from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from sqlalchemy import BigInteger
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.provider_event import ProviderEventColumns


class StripeEventStatus(StrEnum):
    PENDING = "pending"  # stored and queued; the worker has not applied it yet
    PROCESSED = "processed"
    FAILED = "failed"
    IGNORED = "ignored"


SETTLED_STATUSES = (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)
# A delivery of an event in one of these states is a duplicate: it is stored and queued or settled.
RECORDED_STATUSES = (StripeEventStatus.PENDING, *SETTLED_STATUSES)


class StripeEvent(ProviderEventColumns, Model):
    """Every verified webhook delivery, stored before it is applied (in the same transaction, with the
    status it settles with); the unique event id is what makes webhook handling idempotent."""

    __tablename__ = "stripe_event"
    created_column: ClassVar[str] = "stripe_created"

    stripe_created: Mapped[int] = mapped_column(BigInteger)
