"""What an organization's billing status lets its people do. One decision, used by the one guard that
every signed-in page goes through (app/access.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from app import clock
from app.models import BillingStatus, Organization


class AccessLevel(StrEnum):
    FULL = "full"
    GRACE = "grace"  # full access, with a banner asking for a payment fix
    BLOCKED = "blocked"  # only the billing page


class Remedy(StrEnum):
    NONE = "none"
    PORTAL = "portal"  # update the payment method or pay the open invoice
    RESUBSCRIBE = "resubscribe"  # start a new subscription through Checkout
    WAIT = "wait"  # a payment is still being confirmed


@dataclass(frozen=True)
class AccessDecision:
    level: AccessLevel
    remedy: Remedy = Remedy.NONE
    message: str = ""
    grace_ends_at: datetime | None = None

    @property
    def allowed(self) -> bool:
        return self.level != AccessLevel.BLOCKED


STATUS_WORDS = {
    BillingStatus.TRIALING: "Free trial",
    BillingStatus.ACTIVE: "Active",
    BillingStatus.PAST_DUE: "Payment overdue",
    BillingStatus.UNPAID: "Unpaid",
    BillingStatus.CANCELED: "Canceled",
    BillingStatus.INCOMPLETE: "Waiting for the first payment",
    BillingStatus.INCOMPLETE_EXPIRED: "First payment never completed",
    BillingStatus.PAUSED: "Paused",
}


def decide_access(organization: Organization, *, grace_days: int, now: datetime | None = None) -> AccessDecision:
    now = now or clock.utcnow()
    status = organization.billing_status
    if status in (BillingStatus.ACTIVE, BillingStatus.TRIALING):
        return AccessDecision(AccessLevel.FULL)
    if status == BillingStatus.PAST_DUE:
        since = organization.past_due_since or organization.updated_at or now
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        grace_ends_at = since + timedelta(days=grace_days)
        if now < grace_ends_at:
            return AccessDecision(
                AccessLevel.GRACE,
                Remedy.PORTAL,
                f"Your last payment failed. Update your payment method before {grace_ends_at:%d %B %Y} to keep access.",
                grace_ends_at,
            )
        return AccessDecision(
            AccessLevel.BLOCKED,
            Remedy.PORTAL,
            "Your payment is overdue and the grace period has ended. Update your payment method to continue.",
            grace_ends_at,
        )
    if status == BillingStatus.UNPAID:
        return AccessDecision(
            AccessLevel.BLOCKED, Remedy.PORTAL, "Your invoices are unpaid. Pay them in the billing portal to continue."
        )
    if status == BillingStatus.PAUSED:
        return AccessDecision(
            AccessLevel.BLOCKED,
            Remedy.PORTAL,
            "Your trial ended without a payment method. Add one in the billing portal to continue.",
        )
    if status == BillingStatus.INCOMPLETE:
        return AccessDecision(
            AccessLevel.BLOCKED,
            Remedy.PORTAL,
            "Your first payment has not gone through yet. Complete it in the billing portal, or wait if it is "
            "still being confirmed.",
        )
    return AccessDecision(
        AccessLevel.BLOCKED,
        Remedy.RESUBSCRIBE,
        "Your subscription has ended. Choose a plan to start a new one.",
    )
