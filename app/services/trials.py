"""Trials without a card. A tier with `trial_without_card = true` (plans.toml) starts its trial through
Checkout with `payment_method_collection=if_required`, so no card is asked for, and the subscription
carries `trial_settings.end_behavior.missing_payment_method=cancel`: a trial that reaches its end with
no payment method is canceled by Stripe (the organization's access ends as for any ended subscription,
and the owner starts it again by paying through Checkout from the billing page). Before it ends the
owner is reminded: Stripe's `customer.subscription.trial_will_end` (three days before) becomes an email,
and every page shows the owner a banner in the last TRIAL_REMINDER_DAYS days (or from that event on);
the owner adds a card in the customer portal from the billing page, and the trial then converts as any
trial with a card does.

Nothing here talks to Stripe."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from app import clock
from app.extensions import db
from app.models import BillingStatus, DomainEvent, Organization
from app.services.plans import PlanCatalogue, Tier

# What Stripe does at the end of a trial with no payment method: `cancel` (not `pause`): an ended
# subscription is what the access policy, the billing page and resubscription already handle, and a
# paused one would keep a subscription that can only be resumed through the API.
MISSING_PAYMENT_METHOD = "cancel"
TRIAL_REMINDER_DAYS = 3  # as Stripe's trial_will_end, which comes three days before the trial ends


def checkout_subscription_data(tier: Tier) -> dict[str, Any]:
    """The trial's part of a signup Checkout Session's subscription_data."""
    if not tier.trial_days:
        return {}
    data: dict[str, Any] = {"trial_period_days": tier.trial_days}
    if tier.trial_without_card:
        data["trial_settings"] = {"end_behavior": {"missing_payment_method": MISSING_PAYMENT_METHOD}}
    return data


def checkout_collection(tier: Tier) -> Any:
    """The Checkout Session's payment_method_collection: only if required for a card-less trial."""
    return {"payment_method_collection": "if_required"} if tier.trial_days and tier.trial_without_card else {}


def reminder(organization: Organization, catalogue: PlanCatalogue, now: datetime | None = None) -> datetime | None:
    """When the trial ends, if the organization is in the last TRIAL_REMINDER_DAYS days of a trial that
    started without a card (the banner); otherwise None."""
    tier = catalogue.tier(organization.tier)
    trial_end = organization.trial_end
    if organization.billing_status != BillingStatus.TRIALING or trial_end is None or tier is None:
        return None
    if not tier.trial_without_card:
        return None
    trial_end = trial_end if trial_end.tzinfo else trial_end.replace(tzinfo=UTC)
    now = now or clock.utcnow()
    if now <= trial_end <= now + timedelta(days=TRIAL_REMINDER_DAYS):
        return trial_end
    # Stripe's own word that this trial ends soon (its clock, a test clock included, decides).
    noticed = db.session.execute(
        select(DomainEvent.data)
        .where(DomainEvent.organization_id == organization.id, DomainEvent.name == "subscription.trial_will_end")
        .order_by(DomainEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if noticed is not None and noticed.get("trial_end") == int(trial_end.timestamp()):
        return trial_end
    return None


def ends_without_card(subscription: dict[str, Any]) -> str | None:
    """What the subscription does at its trial's end with no payment method (cancel, pause), if set."""
    settings = subscription.get("trial_settings") or {}
    behavior = (settings.get("end_behavior") or {}).get("missing_payment_method")
    return str(behavior) if behavior in ("cancel", "pause") else None
