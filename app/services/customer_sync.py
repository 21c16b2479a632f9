"""Stripe's customer kept equal to the account, both ways (docs/system/BILLING.md, "Customer details").

Ours to Stripe (the account is the source of truth for these):
- the email: the billing email address, else the owner's (`push_email`, on
  `organization.billing_email_changed` and the owner's `user.email_changed`);
- the organization's name (`push_name`, on `organization.renamed`): always in the customer's
  `metadata[organization_name]`, and in its `name` (what invoices are addressed to) unless the
  customer holds a name of its own (`keeps_own_name`): Stripe's `business_name`; a `name` that is no
  longer the one we last gave it (changed in the portal or the Dashboard); or, on a customer we never
  named, a tax ID (the business name typed with it at Checkout is saved as `name`, and the invoices
  must show that legal name beside it). Then `name` is left as it is.
Each push is the worker's (outbox consumers in jobs.py, and reconcile's `webhooks:sync_customer` job),
retried, with an idempotency key per trigger and what is sent; nothing is sent when Stripe already
holds it.

Stripe's to ours: `customer.updated` (the portal, say) re-reads the customer and applies its email as
the billing email address; its name, address and tax IDs are Stripe's to keep (the billing page's
cached reads are dropped). Applying it records no event that pushes back, so nothing bounces.

Reconcile (`customer_drift`): an email or organization name Stripe's customer does not carry is
repaired by the push above; tax IDs Stripe could not verify are reported (`unverified_tax_ids`)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import select

from app.extensions import db
from app.models import BillingProvider, DomainEvent, Organization, StripeEventStatus, User, UserRole
from app.services import billing_page, domain_events, queue
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
    """The worker's half of a change of the owner's email or the billing email: Stripe's customer follows,
    with the address the account holds when this runs (a later change queued behind it sends its own)."""
    found = expected_email(organization_id, owner_id=owner_id)
    if found is not None:
        fields = {"email": found[1]}
        stripe.update_customer(found[0], fields, key=_keyed(key, fields))


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


ORGANIZATION_NAME = "organization_name"  # the key of the organization's name in the customer's metadata
RENAMED = "organization.renamed"
SYNC_TASK = "webhooks:sync_customer"  # reconcile's repair, registered in jobs.py
SYNC_QUEUE = "webhooks"


def tax_ids(customer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = customer.get("tax_ids")
    rows = found.get("data") if isinstance(found, Mapping) else found
    return [row for row in rows or [] if isinstance(row, Mapping)]


def keeps_own_name(customer: Mapping[str, Any]) -> bool:
    """Whether the customer's `name` is its own rather than the organization's: Stripe's `business_name`
    is set; or its name is no longer the organization name we last gave it (changed in the portal, the
    Dashboard, or at a later Checkout); or we never named it and it has a tax ID (the business name typed
    with the tax ID at Checkout is the legal name its invoices show beside it). A customer we never
    named and without a tax ID (Checkout's, named after the card holder) takes the organization's."""
    if customer.get("business_name"):
        return True
    name = customer.get("name")
    given = (customer.get("metadata") or {}).get(ORGANIZATION_NAME)
    if given is None:
        return bool(name) and bool(tax_ids(customer))
    return bool(name) and name != given


def name_fields(organization_name: str, customer: Mapping[str, Any]) -> dict[str, Any]:
    """What Stripe's customer must be sent to carry the organization's name ({} when it does)."""
    fields: dict[str, Any] = {}
    if (customer.get("metadata") or {}).get(ORGANIZATION_NAME) != organization_name:
        fields["metadata"] = {ORGANIZATION_NAME: organization_name}
    if not keeps_own_name(customer) and customer.get("name") != organization_name:
        fields["name"] = organization_name
    return fields


def _keyed(key: str, fields: Mapping[str, Any]) -> str:
    """The idempotency key of one push: the trigger's key and what is sent (a retry after a later
    change sends other fields, which Stripe refuses under a key already used)."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key}-{digest}"


def push_name(organization_id: int | None, stripe: CustomerCalls, *, key: str) -> dict[str, Any]:
    """The worker's half of a rename: Stripe's customer is read (no transaction open) and sent the
    organization's name as name_fields says; nothing is sent when it carries it already."""
    found = organization_and_owner(organization_id)
    if found is None or found[0].billed_by_whop or not found[0].billing_customer_id:
        return {}
    organization = found[0]
    customer = stripe.read_customer_tax(str(organization.billing_customer_id))
    fields = name_fields(organization.name, customer)
    if fields:
        stripe.update_customer(str(organization.billing_customer_id), fields, key=_keyed(key, fields))
    return fields


def push_details(organization_id: int, stripe: CustomerCalls, *, key: str) -> str:
    """Reconcile's repair (the worker's `webhooks:sync_customer` job): the customer, read afresh, is sent
    whatever of the email and the organization's name it lacks, in one update."""
    found = organization_and_owner(organization_id)
    if found is None or found[0].billed_by_whop or not found[0].billing_customer_id:
        return "no Stripe customer to sync"
    organization, owner = found
    renamed = bool(renamed_organizations([organization.id]))
    customer = stripe.read_customer_tax(str(organization.billing_customer_id))
    given = (customer.get("metadata") or {}).get(ORGANIZATION_NAME)
    fields = name_fields(organization.name, customer) if renamed or given is not None else {}
    expected = organization.billing_email or owner.email
    if str(customer.get("email") or "").lower() != expected.lower():
        fields["email"] = expected
    if not fields:
        return "customer already in sync"
    stripe.update_customer(str(organization.billing_customer_id), fields, key=_keyed(key, fields))
    return f"customer sent {', '.join(sorted(fields))}"


def renamed_organizations(organization_ids: list[int]) -> set[int]:
    """Those of the organizations ever renamed (read; the transaction is ended)."""
    try:
        found = db.session.execute(
            select(DomainEvent.organization_id).where(
                DomainEvent.name == RENAMED, DomainEvent.organization_id.in_(organization_ids)
            )
        ).scalars()
        return {organization_id for organization_id in found if organization_id is not None}
    finally:
        db.session.rollback()


def queue_sync(organization_id: int, customer_id: str) -> bool:
    """Queue reconcile's repair in the caller's transaction: one waiting job per organization, run
    under the customer's lock (never beside the job applying its customer.updated)."""
    return queue.defer(
        SYNC_TASK,
        queue=SYNC_QUEUE,
        lock=f"stripe:customer:{customer_id}",
        queueing_lock=f"customer-sync:{organization_id}",
        organization_id=organization_id,
        request=uuid.uuid4().hex,
    )


def customer_drift(
    organization: Organization, owner_email: str, customer: Mapping[str, Any], *, renamed: bool
) -> list[tuple[str, Any, Any]]:
    """(field, ours, Stripe's) for what Stripe's customer should carry and does not: the email receipts
    go to, the organization's name in its metadata (once the organization was ever renamed or named
    there) and in its `name` (unless it keeps its own). Each is repaired by push_details."""
    found: list[tuple[str, Any, Any]] = []
    expected = organization.billing_email or owner_email
    if str(customer.get("email") or "").lower() != expected.lower():
        found.append(("email", expected, customer.get("email")))
    given = (customer.get("metadata") or {}).get(ORGANIZATION_NAME)
    if given is None and not renamed:
        return found  # never renamed: the name Checkout gave the customer stands until the first rename
    if given != organization.name:
        found.append((f"metadata.{ORGANIZATION_NAME}", organization.name, given))
    if not keeps_own_name(customer) and customer.get("name") != organization.name:
        found.append(("name", organization.name, customer.get("name")))
    return found


def unverified_tax_ids(customer: Mapping[str, Any]) -> list[str]:
    """Tax IDs Stripe could not verify: reported, never repaired (they are the customer's to correct)."""
    found = []
    for tax_id in tax_ids(customer):
        status = (tax_id.get("verification") or {}).get("status")
        if status not in ("verified", "pending"):
            found.append(f"tax ID {tax_id.get('value')} is {status}")
    return found
