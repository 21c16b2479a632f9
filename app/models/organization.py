from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship, synonym

from app.extensions import Model
from app.models.types import BigId, JsonDocument, Timestamp, utcnow


class BillingProvider(StrEnum):
    """Who bills an organization: Stripe (a subscription) or Whop (a membership)."""

    STRIPE = "stripe"
    WHOP = "whop"


class BillingStatus(StrEnum):
    """Stripe's subscription statuses, which an organization's billing status follows (a Whop
    membership's status is mapped onto them: app/services/whop_state.py)."""

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
        CheckConstraint("billing_provider IN ('stripe', 'whop')", name="ck_organization_billing_provider"),
        UniqueConstraint("billing_subscription_id", name="uq_organization_billing_subscription_id"),
        # A Stripe customer belongs to one organization; a Whop member (one per buyer) may own several.
        Index(
            "uq_organization_stripe_customer",
            "billing_customer_id",
            unique=True,
            postgresql_where=text("billing_provider = 'stripe'"),
            sqlite_where=text("billing_provider = 'stripe'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tier: Mapped[str] = mapped_column(String(50))
    billing_status: Mapped[str] = mapped_column(String(32))
    # The provider's ids: Stripe customer (cus_) and subscription (sub_), or Whop member (mber_) and
    # membership (mem_).
    billing_provider: Mapped[str] = mapped_column(String(16), default=BillingProvider.STRIPE, server_default="stripe")
    billing_customer_id: Mapped[str | None] = mapped_column(String(255))
    billing_subscription_id: Mapped[str | None] = mapped_column(String(255))
    signup_checkout_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    current_period_end: Mapped[datetime | None] = mapped_column(Timestamp)
    trial_end: Mapped[datetime | None] = mapped_column(Timestamp)
    canceled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    past_due_since: Mapped[datetime | None] = mapped_column(Timestamp)
    # The provider's time (unix seconds) of the subscription state held above; orders webhook deliveries.
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
    # The owner requires two-factor sign-in of every member: one without it is sent to set it up.
    require_two_factor: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Where receipts go, when the owner chose an address other than their own (app/services/receipts.py).
    billing_email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)

    addons: Mapped[list[OrganizationAddon]] = relationship(
        back_populates="organization", cascade="all, delete-orphan", order_by="OrganizationAddon.addon_key"
    )

    # The names these had when Stripe was the only provider, kept for code written before the rename
    # (the columns are gone). New code uses billing_customer_id / billing_subscription_id.
    stripe_customer_id: Mapped[str | None] = synonym("billing_customer_id")
    stripe_subscription_id: Mapped[str | None] = synonym("billing_subscription_id")

    @property
    def billed_by_whop(self) -> bool:
        return self.billing_provider == BillingProvider.WHOP

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
    provider_item_id: Mapped[str | None] = mapped_column(String(255))  # a Stripe subscription item (si_)

    organization: Mapped[Organization] = relationship(back_populates="addons")
