"""The free plan: a tier of the catalogue with no price (plans.toml). Signing up to it creates the
organization at once through SignupService, with no checkout and no payment provider; the tier's limits
apply as any tier's do. The owner upgrades from the billing page through Checkout (BillingService opens
it for the organization and its Stripe customer, made then), and a paid plan is downgraded to free by
canceling its subscription at the period's end with a note on the subscription (`downgrade_to`); when
Stripe ends that subscription the organization falls back to the free plan instead of ending.

Nothing here talks to Stripe."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import current_app

from app.models import BillingStatus, Organization
from app.services.billing_common import ENDED, committed, plan_catalogue
from app.services.plans import Tier
from app.services.signup_service import ProvisionOutcome, SignupService

# The subscription metadata key that says "when this subscription ends, the organization is on this
# (free) tier", set by BillingService.downgrade_to_free with cancel_at_period_end, cleared by resume.
DOWNGRADE_TO = "downgrade_to"


def free_tier() -> Tier | None:
    return plan_catalogue().free_tier()


def on_free_plan(organization: Organization) -> bool:
    """The organization is on the free plan: its tier is the free one and no subscription bills it."""
    tier = free_tier()
    return tier is not None and organization.tier == tier.key and not organization.billing_subscription_id


def may_start_paid_subscription(organization: Organization) -> bool:
    """A checkout may open a new subscription for the organization: its last one ended, or it is free."""
    return organization.billing_status in ENDED or on_free_plan(organization)


def sign_up(*, email: str, organization_name: str, owner_name: str, password: str, tier: Tier) -> ProvisionOutcome:
    """A signup to the free plan: stored as every signup is (SignupService supersedes the email's open
    attempt), then completed at once in one short transaction."""
    signup = SignupService.create_pending_signup_record(
        email=email,
        organization_name=organization_name,
        owner_name=owner_name,
        password=password,
        tier=tier.key,
        addons={},
        ttl=timedelta(minutes=current_app.config["CHECKOUT_SESSION_TTL_MINUTES"]),
    )
    with committed():
        return SignupService.complete_free_signup(signup.pending_signup_id, source="web")


def downgrade_target(metadata: dict[str, str]) -> Tier | None:
    """The free tier a subscription's metadata says the organization moves to when it ends."""
    tier = plan_catalogue().tier(metadata.get(DOWNGRADE_TO) or "")
    return tier if tier is not None and tier.is_free else None


def fall_to_free(
    organization: Organization,
    *,
    subscription_id: str,
    status: BillingStatus,
    metadata: dict[str, str],
    ended_at: Any,
    record: Callable[..., None],
) -> bool:
    """A subscription the owner downgraded to free has ended: the organization stays, on the free tier,
    with no subscription (its Stripe customer is kept for a later upgrade). Returns whether it did."""
    tier = downgrade_target(metadata)
    if tier is None or status not in ENDED or organization.billing_subscription_id != subscription_id:
        return False
    record(
        "organization.plan_changed",
        previous=organization.tier,
        tier=tier.key,
        reason="downgraded to the free plan",
        ended_subscription_id=subscription_id,
    )
    if organization.addons:
        record("organization.addons_changed", previous=organization.addon_quantities(), addons={})
        organization.addons.clear()
    organization.tier = tier.key
    organization.billing_status = BillingStatus.ACTIVE
    organization.billing_subscription_id = None
    organization.cancel_at_period_end = False
    organization.current_period_end = None
    organization.trial_end = None
    organization.past_due_since = None
    organization.collection_paused = None
    organization.collection_resumes_at = None
    organization.unmapped_items = None
    organization.ended_at = ended_at
    return True
