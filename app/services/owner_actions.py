"""The owner's actions on a subscription, on the database side: which are allowed (cancel, resume,
downgrade to free; staff's edits bring their own rule), the organization read before Stripe is asked
(the transaction ended, nothing written) and Stripe's answer applied after, in a short transaction.
BillingService makes the Stripe call in between; a resubscription's checkout is prepared here too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import current_app

from app.extensions import db
from app.models import Organization, User
from app.services import free_plan, provisioning, tax
from app.services.billing_common import CANCELLABLE, REQUEST_TOKEN, SubscriptionActionNotAllowed, committed
from app.services.plans import Tier

Refusal = Callable[[Organization], str | None]


def check_form(request_token: str) -> None:
    if not REQUEST_TOKEN.match(request_token or ""):
        raise SubscriptionActionNotAllowed("That form has expired. Reload the page and try again.")


def cancel_refusal(at_period_end: bool) -> Refusal:
    def allowed(organization: Organization) -> str | None:
        if organization.billing_status not in CANCELLABLE:
            return "There is no active subscription to cancel."
        if at_period_end and organization.cancel_at_period_end:
            return "Your plan is already set to end at the end of the billing period."
        return None

    return allowed


def resume_refusal(organization: Organization) -> str | None:
    if not organization.cancel_at_period_end or organization.billing_status not in CANCELLABLE:
        return "There is no scheduled cancellation to undo."
    return None


def downgrade_refusal(tier: Tier | None) -> Refusal:
    def allowed(organization: Organization) -> str | None:
        if tier is None or organization.billed_by_whop or organization.billing_status not in CANCELLABLE:
            return "There is no paid plan to downgrade to the free plan."
        return None

    return allowed


def subscription_to_change(organization_id: int, allowed: Refusal) -> tuple[str, bool]:
    """The subscription the action changes and whether Whop bills it; the connection goes back before
    Stripe is asked (nothing is written)."""
    try:
        organization = db.session.get(Organization, organization_id, populate_existing=True)
        if organization is None or not organization.billing_subscription_id:
            raise SubscriptionActionNotAllowed("This organization has no subscription.")
        refusal = allowed(organization)
        if refusal:
            raise SubscriptionActionNotAllowed(refusal)
        return organization.billing_subscription_id, organization.billed_by_whop
    finally:
        db.session.rollback()


def apply_answer(organization_id: int, subscription: dict[str, Any], actor_user_id: int) -> list[str]:
    """Stripe's answer applied to the organization, if it still holds that subscription."""
    with committed():
        organization = provisioning.lock_organization(organization_id)
        changes: list[str] = []
        if organization is not None and organization.billing_subscription_id == subscription["id"]:
            changes = provisioning.apply_subscription_read(organization, subscription, source=f"user:{actor_user_id}")
    return changes


def resubscriber(organization_id: int, actor_user_id: int) -> tuple[str | None, str, str]:
    """The organization's Stripe customer (None: a free organization, whose customer is made next), its
    name and the owner's email, for a new subscription's checkout; the transaction is ended."""
    try:
        organization = db.session.get(Organization, organization_id, populate_existing=True)
        if organization is None or not free_plan.may_start_paid_subscription(organization):
            raise SubscriptionActionNotAllowed("This organization already has a subscription.")
        # An organization that Whop billed moves to card billing with a Stripe customer of its own
        # (Whop's member id is no Stripe customer); its Whop history stays where it is. A free
        # organization has no customer yet: it is made below.
        customer_id = provisioning.stripe_customer_of(organization) if organization.billing_customer_id else None
        return customer_id, organization.name, db.session.get(User, actor_user_id).email  # type: ignore[union-attr]
    finally:
        db.session.rollback()


def resubscribe_params(organization_id: int, customer_id: str, line_items: Any) -> dict[str, Any]:
    """The Checkout Session of a resubscription, on the customer given (an email: Checkout makes one)."""
    metadata = {"purpose": "resubscribe", "organization_id": str(organization_id)}
    base = current_app.config["APP_BASE_URL"]
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": line_items,
        "client_reference_id": f"organization-{organization_id}",
        "allow_promotion_codes": current_app.config["PROMOTION_CODES_AT_CHECKOUT"],
        "metadata": metadata,
        "subscription_data": {"metadata": metadata},
        "success_url": f"{base}/billing/checkout-complete?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{base}/billing/",
    }
    params.update({"customer_email": customer_id} if "@" in customer_id else {"customer": customer_id})
    params.update(tax.checkout_params(existing_customer="customer" in params))
    return params
