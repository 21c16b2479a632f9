"""`customer.tax_id.updated`: Stripe finished checking a tax ID it had as `pending` (verified, unverified
or unavailable). The status lives only at Stripe and the billing page reads it there (tax.py), so the
event drops the page's cached reads (the next view shows the new status, and the next invoice's tax,
which a verified EU VAT ID can change to reverse charge) and records the outcome on the organization.
The event's object is enough: nothing is re-read."""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.models import BillingProvider, Organization, StripeEventStatus
from app.services import billing_page, domain_events, stripe_objects
from app.services.billing_common import EventOutcomes
from app.services.webhook_store import VerifiedEvent

EVENT_TYPES = frozenset({"customer.tax_id.updated"})


def apply_tax_id_events(customer_id: str, events: list[VerifiedEvent]) -> EventOutcomes:
    organization = db.session.execute(
        select(Organization).where(
            Organization.billing_provider == BillingProvider.STRIPE, Organization.billing_customer_id == customer_id
        )
    ).scalar_one_or_none()
    if organization is None:
        return {e.event_id: (StripeEventStatus.PROCESSED, "no organization for this customer") for e in events}
    outcomes: EventOutcomes = {}
    for event in events:
        tax_id = stripe_objects.read(stripe_objects.TaxId, event.body["data"]["object"])
        previous = ((event.body["data"].get("previous_attributes") or {}).get("verification") or {}).get("status")
        status = tax_id.verification.status if tax_id.verification else None
        domain_events.record(
            "organization.tax_id_verification",
            organization_id=organization.id,
            source=event.source,
            tax_id=tax_id.id,
            type=tax_id.type,
            status=status,
            previous=previous,
        )
        outcomes[event.event_id] = (StripeEventStatus.PROCESSED, f"tax ID {tax_id.id} is {status} at Stripe")
    billing_page.forget_reads(organization.id)
    return outcomes
