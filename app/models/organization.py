from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import Model
from app.models.types import BigId, JsonDocument, Timestamp, utcnow


class BillingStatus(StrEnum):
    """Stripe's subscription statuses, which an organization's billing status follows."""

    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    PAUSED = "paused"


BILLING_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in BillingStatus)


class Organization(Model):
    __tablename__ = "organization"
    __table_args__ = (
        CheckConstraint(f"billing_status IN ({BILLING_STATUS_VALUES})", name="ck_organization_billing_status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tier: Mapped[str] = mapped_column(String(50))
    billing_status: Mapped[str] = mapped_column(String(32))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    signup_checkout_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    current_period_end: Mapped[datetime | None] = mapped_column(Timestamp)
    trial_end: Mapped[datetime | None] = mapped_column(Timestamp)
    canceled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    past_due_since: Mapped[datetime | None] = mapped_column(Timestamp)
    # Stripe time (unix seconds) of the subscription state held above; orders webhook deliveries.
    billing_as_of: Mapped[int | None] = mapped_column(BigInteger)
    last_invoice_id: Mapped[str | None] = mapped_column(String(255))
    last_payment_status: Mapped[str | None] = mapped_column(String(32))
    last_payment_at: Mapped[datetime | None] = mapped_column(Timestamp)
    payment_as_of: Mapped[int | None] = mapped_column(BigInteger)
    # Stripe's pause_collection: its behavior (keep_as_draft, mark_uncollectible, void) while paused.
    collection_paused: Mapped[str | None] = mapped_column(String(32))
    collection_resumes_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Subscription items that map to no tier or add-on of the catalogue (reported, never dropped).
    unmapped_items: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDocument)
    # Bumped by a subscription event that found no organization holding its subscription yet; a
    # resubscription read from Stripe before the bump is read again (no lock is held across the read).
    subscription_events_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)

    addons: Mapped[list[OrganizationAddon]] = relationship(
        back_populates="organization", cascade="all, delete-orphan", order_by="OrganizationAddon.addon_key"
    )

    def addon_quantities(self) -> dict[str, int]:
        return {addon.addon_key: addon.quantity for addon in self.addons}


class OrganizationAddon(Model):
    __tablename__ = "organization_addon"
    __table_args__ = (
        UniqueConstraint("organization_id", "addon_key", name="uq_organization_addon_key"),
        CheckConstraint("quantity > 0", name="ck_organization_addon_quantity"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    addon_key: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int] = mapped_column(Integer)
    stripe_subscription_item_id: Mapped[str | None] = mapped_column(String(255))

    organization: Mapped[Organization] = relationship(back_populates="addons")
