"""A signup's checkout, on our side: the pending signup a checkout pays for (whichever provider takes
the payment), the Stripe Checkout Session's parameters for it, what a checkout that could not be made
leaves behind, and what can be paid through Whop. BillingService opens the checkout at the provider."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import current_app

from app import clock
from app.extensions import cache
from app.services import price_lookup, tax, trials
from app.services.billing_common import BillingError, UnknownTierError
from app.services.plans import Tier
from app.services.signup_service import NewPendingSignup, SignupService


def store_signup(
    tier: Tier, addons: Mapping[str, int], *, email: str, organization_name: str, owner_name: str, password: str
) -> NewPendingSignup:
    """The pending signup a checkout pays for, whichever provider takes the payment (SignupService
    supersedes the email's open one); it is valid for CHECKOUT_SESSION_TTL_MINUTES."""
    return SignupService.create_pending_signup_record(
        email=email,
        organization_name=organization_name,
        owner_name=owner_name,
        password=password,
        tier=tier.key,
        addons=dict(addons),
        ttl=timedelta(minutes=current_app.config["CHECKOUT_SESSION_TTL_MINUTES"]),
    )


def metadata(reference: str) -> dict[str, str]:
    return {"purpose": "signup", "pending_signup_id": reference}


def session_params(tier: Tier, line_items: Any, reference: str, payer: Mapping[str, Any]) -> dict[str, Any]:
    """The subscription-mode Checkout Session of a signup, paid by `payer` (an email, or a customer)."""
    config = current_app.config
    ttl = timedelta(minutes=config["CHECKOUT_SESSION_TTL_MINUTES"])
    subscription_data: Any = {"metadata": metadata(reference), **trials.checkout_subscription_data(tier)}
    return {
        **payer,
        **trials.checkout_collection(tier),
        **tax.checkout_params(existing_customer="customer" in payer),
        "mode": "subscription",
        "line_items": line_items,
        "client_reference_id": reference,
        "allow_promotion_codes": config["PROMOTION_CODES_AT_CHECKOUT"],
        "metadata": metadata(reference),
        "subscription_data": subscription_data,
        "success_url": f"{config['APP_BASE_URL']}/billing/complete-signup-from-stripe"
        "?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": f"{config['APP_BASE_URL']}/auth/signup?checkout=canceled",
        "expires_at": clock.now() + int(ttl.total_seconds()),
    }


def checkout_failed(
    signup: NewPendingSignup, reason: Exception, tier: Tier, addons: Mapping[str, int], interval: str
) -> None:
    """The signup is marked failed, and the prices it used are forgotten: a cached price Stripe no
    longer accepts must not fail the next attempt too."""
    SignupService.mark_signup_failed(signup.pending_signup_id, f"checkout not created: {reason}")
    cache.delete_many(*(f"stripe-price:{key}" for key in price_lookup.lookup_key_quantities(tier, addons, interval)))


def whop_payable(tier: Tier, whop_configured: bool) -> Tier:
    """The tier, if it can be paid through Whop right now."""
    if not whop_configured or not tier.whop_plan_id:
        raise UnknownTierError(f"{tier.name} cannot be paid through Whop; choose card payment.")
    return tier


def check_whop_choices(addons: Mapping[str, int], interval: str) -> None:
    """Whop sells the tier alone, monthly: add-ons are bought by card."""
    if any(quantity for quantity in addons.values()):
        raise BillingError("Add-ons can only be bought with card payment; remove them to pay through Whop.")
    if interval != "month":
        raise BillingError("Whop plans are billed monthly; choose monthly billing to pay through Whop.")
