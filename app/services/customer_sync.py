"""Stripe's customer kept equal to the account, both ways. Ours to Stripe: when the owner's email or the
billing email address changes, the worker sets the customer's `email` (outbox consumers in jobs.py,
retried, with an idempotency key per domain event). Stripe's to ours: `customer.updated` (an address
changed in the customer portal, say) re-reads the customer and applies its email as the billing email
address; its address and tax IDs live only at Stripe, so the billing page's cached reads are dropped.
Reconcile names customers whose email or tax IDs differ from what the account expects (`differences`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import select

from app.extensions import db
from app.models import BillingProvider, Organization, StripeEventStatus, User, UserRole
from app.services import billing_page, domain_events
from app.services.billing_common import EventOutcomes, ProviderObjectMissing
from app.services.notifications import organization_and_owner
from app.services.webhook_store import VerifiedEvent


class CustomerCalls(Protocol):
    """Implemented by BillingService."""

    def read_customer_tax(self, customer_id: str) -> dict[str, Any]: ...

    def update_customer(self, customer_id: str, fields: Mapping[str, Any], *, key: str) -> None: ...


def expected_email(organization_id: int | None, *, owner_id: int | None = None) -> tuple[str, str] | None:
    """The Stripe customer of an organization and the email it should carry (the billing email address,
    else the owner's), or None when Stripe does not bill it (or owner_id is given and is not the owner)."""
    found = organization_and_owner(organization_id)
    if found is None:
        return None
    organization, owner = found
    if organization.billed_by_whop or not organization.billing_customer_id:
        return None
    if owner_id is not None and owner.id != owner_id:
        return None
    return organization.billing_customer_id, organization.billing_email or owner.email


def push_email(organization_id: int | None, stripe: CustomerCalls, *, key: str, owner_id: int | None = None) -> None:
    """The worker's half of a change of the owner's email or the billing email: Stripe's customer follows."""
    found = expected_email(organization_id, owner_id=owner_id)
    if found is not None:
        stripe.update_customer(found[0], {"email": found[1]}, key=key)


def apply_customer_events(customer_id: str, events: list[VerifiedEvent], stripe: CustomerCalls) -> EventOutcomes:
    """customer.updated: the customer as Stripe holds it now (read with no transaction open) gives the
    billing email address; an address or tax ID changed in the portal shows on the next page view."""
    db.session.rollback()
    try:
        customer = stripe.read_customer_tax(customer_id)
    except ProviderObjectMissing:
        return {e.event_id: (StripeEventStatus.IGNORED, f"not ours: no customer {customer_id}") for e in events}
    row = db.session.execute(
        select(Organization, User)
        .join(User, (User.organization_id == Organization.id) & (User.role == UserRole.OWNER))
        .where(Organization.billing_provider == BillingProvider.STRIPE, Organization.billing_customer_id == customer_id)
        .with_for_update(of=Organization)
    ).first()
    if row is None:
        return {e.event_id: (StripeEventStatus.PROCESSED, "no organization for this customer") for e in events}
    organization, owner = row
    email = str(customer.get("email") or "").strip().lower() or None
    outcome = "customer read: nothing to change"
    if email and email != (organization.billing_email or owner.email).lower():
        kept = None if email == owner.email.lower() else email
        domain_events.record(
            "organization.billing_email_from_stripe",
            organization_id=organization.id,
            source=events[-1].source,
            billing_email=kept,
            previous=organization.billing_email,
        )
        organization.billing_email = kept
        outcome = f"billing email set to Stripe's customer email ({'the owner' if kept is None else 'another'})"
    billing_page.forget_reads(organization.id)
    return {e.event_id: (StripeEventStatus.PROCESSED, outcome) for e in events}


def differences(organization: Organization, owner_email: str, customer: Mapping[str, Any]) -> list[str]:
    """What reconcile reports of a Stripe customer: an email other than the one the account sends
    receipts to, and tax IDs Stripe could not verify."""
    found = []
    expected = (organization.billing_email or owner_email).lower()
    if str(customer.get("email") or "").lower() != expected:
        found.append(f"customer email {customer.get('email')!r} is not {expected!r}")
    for tax_id in (customer.get("tax_ids") or {}).get("data") or []:
        status = (tax_id.get("verification") or {}).get("status")
        if status not in ("verified", "pending"):
            found.append(f"tax ID {tax_id.get('value')} is {status}")
    return found
