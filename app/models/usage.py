"""Usage-based billing: the usage events an organization recorded, its running total per meter and
billing period, the reports of billed usage to Stripe's meter events, and the API keys of the usage API."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class UsageEvent(Model):
    """One usage event, stored before it is acknowledged. (organization_id, idempotency_key) is unique:
    a repeated key is acknowledged without being counted again. billable_quantity is NULL until the
    worker's tally (app/services/usage_tally.py) counts the event into its period's total and sets it to
    the part past what the tier includes (decided under the period's row, so two events never both
    claim the same included units); an event under a hard limit is counted as it is stored (billable 0).
    report_id is set when the billable part is in a report to Stripe."""

    __tablename__ = "usage_event"
    __table_args__ = (
        UniqueConstraint("organization_id", "idempotency_key", name="uq_usage_event_idempotency_key"),
        CheckConstraint("quantity >= 0", name="ck_usage_event_quantity"),
        CheckConstraint(
            "billable_quantity >= 0 AND billable_quantity <= quantity", name="ck_usage_event_billable_quantity"
        ),
        Index("ix_usage_event_organization_meter_time", "organization_id", "meter", "occurred_at"),
        Index(
            "ix_usage_event_untallied",
            "organization_id",
            "meter",
            "period_start",
            postgresql_where=text("billable_quantity IS NULL"),
            sqlite_where=text("billable_quantity IS NULL"),
        ),
        Index(
            "ix_usage_event_unreported",
            "recorded_at",
            postgresql_where=text("report_id IS NULL AND billable_quantity > 0"),
            sqlite_where=text("report_id IS NULL AND billable_quantity > 0"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="RESTRICT"))
    meter: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int] = mapped_column(BigInteger)
    billable_quantity: Mapped[int | None] = mapped_column(BigInteger)  # NULL: not tallied yet
    idempotency_key: Mapped[str] = mapped_column(String(255))
    occurred_at: Mapped[datetime] = mapped_column(Timestamp)
    period_start: Mapped[datetime] = mapped_column(Timestamp)
    period_end: Mapped[datetime] = mapped_column(Timestamp)
    recorded_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("usage_report.id", ondelete="RESTRICT"))


class UsagePeriodTotal(Model):
    """An organization's tallied usage of one meter in one billing period (and the billed part of it):
    the row the worker's tally adds each event to (and a recording under a hard limit, which must judge
    the limit as it stores), so billable parts, limits and warnings are decided one at a time."""

    __tablename__ = "usage_period_total"

    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organization.id", ondelete="RESTRICT"), primary_key=True, autoincrement=False
    )
    meter: Mapped[str] = mapped_column(String(50), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    period_end: Mapped[datetime] = mapped_column(Timestamp)
    total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    billable: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageReportStatus(StrEnum):
    PENDING = "pending"  # built, not yet accepted by Stripe (or its answer was lost): sent again as is
    SENT = "sent"  # Stripe accepted it
    FAILED = "failed"  # Stripe refused it (synchronously, or later through an error report)


class UsageReport(Model):
    """Billed usage of one customer and meter, summed over a short window, reported as one Stripe meter
    event. `identifier` is derived from the report's id and stable across retries, so Stripe counts a
    report it already accepted once however often it is sent."""

    __tablename__ = "usage_report"
    __table_args__ = (
        UniqueConstraint("identifier", name="uq_usage_report_identifier"),
        CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_usage_report_status"),
        CheckConstraint("quantity > 0", name="ck_usage_report_quantity"),
        Index("ix_usage_report_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="RESTRICT"))
    meter: Mapped[str] = mapped_column(String(50))
    customer_id: Mapped[str] = mapped_column(String(255))
    identifier: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int] = mapped_column(BigInteger)
    timestamp: Mapped[datetime] = mapped_column(Timestamp)
    status: Mapped[str] = mapped_column(String(16), default=UsageReportStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ApiKey(Model):
    """A key an organization's own services use to record usage (POST /api/v1/usage). Only its SHA-256
    is kept (the key is 256 random bits, shown once); `prefix` is its first characters, for telling keys
    apart; last_used_at is updated at most once a minute."""

    __tablename__ = "api_key"
    __table_args__ = (UniqueConstraint("key_hash", name="uq_api_key_hash"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    created_by_user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)
