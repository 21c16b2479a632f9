"""What reconcile reads from the database and compares with what the providers hold: the billing
each organization holds, the stored events, the signups and resubscriptions behind subscriptions we
do not hold, and what is left to settle. Every function here ends its transaction before returning,
so BillingService can ask Stripe or Whop next with nothing held. The comparison rules themselves
are pure (reconcile.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select

from app import clock
from app.extensions import db
from app.models import (
    BillingProvider,
    Organization,
    PendingSignup,
    ResubscribeCheckout,
    ResubscribeStatus,
    StripeEvent,
    User,
    UserRole,
)
from app.services import billing_page, customer_sync, price_lookup
from app.services import reconcile as reconciliation
from app.services.billing_common import BillingError, as_uuid, id_of, plan_catalogue
from app.services.billing_details import ActiveDiscount, SubscriptionFacts
from app.services.subscription_state import SubscriptionState
from app.services.tax import CustomerTax
from app.services.whop_state import subscription_state_from_whop


@dataclass
class HeldByStripe:
    """What the database holds about Stripe-billed organizations, for one reconcile read."""

    organizations: dict[str, int]  # subscription id -> organization id, of the organizations compared
    held_ids: set[str]  # every Stripe subscription any organization holds
    stored_events: set[str]
    related: set[str] = field(default_factory=set)  # the ids an event must name to concern this run


def held_billing(organization: Organization, subscription_id: str) -> reconciliation.HeldBilling:
    return reconciliation.HeldBilling(
        organization_id=organization.id,
        subscription_id=subscription_id,
        status=organization.billing_status,
        tier=organization.tier,
        addons=organization.addon_quantities(),
        cancel_at_period_end=organization.cancel_at_period_end,
        current_period_end=organization.current_period_end,
        collection_paused=organization.collection_paused,
    )


def billed_by_whop(organization_id: int) -> bool:
    try:
        provider = db.session.execute(
            select(Organization.billing_provider).where(Organization.id == organization_id)
        ).scalar_one_or_none()
    finally:
        db.session.rollback()
    return provider == BillingProvider.WHOP


def held_by_stripe(organization_id: int | None, since: int) -> HeldByStripe:
    try:
        query = select(Organization).where(
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_subscription_id.is_not(None),
        )
        if organization_id is not None:
            query = query.where(Organization.id == organization_id)
        organizations = {str(org.billing_subscription_id): org.id for org in db.session.execute(query).scalars()}
        if organization_id is not None and not organizations:
            raise BillingError(f"organization {organization_id} has no subscription to reconcile")
        held_ids = {
            str(subscription_id)
            for subscription_id in db.session.execute(
                select(Organization.billing_subscription_id).where(
                    Organization.billing_provider == BillingProvider.STRIPE,
                    Organization.billing_subscription_id.is_not(None),
                )
            ).scalars()
        }
        stored_events = set(
            db.session.execute(select(StripeEvent.event_id).where(StripeEvent.stripe_created >= since)).scalars()
        )
        customer_ids = {
            str(customer_id)
            for customer_id in db.session.execute(
                select(Organization.billing_customer_id).where(Organization.id == organization_id)
            ).scalars()
            if customer_id and organization_id is not None
        }
    finally:
        db.session.rollback()
    return HeldByStripe(organizations, held_ids, stored_events, set(organizations) | customer_ids)


def compare_with_stripe(
    held: HeldByStripe, listed: Mapping[str, dict[str, Any]], orphan_candidates: list[dict[str, Any]]
) -> tuple[list[reconciliation.SubscriptionDrift], dict[str, str], dict[str, str]]:
    """Each compared organization against its subscription as listed; and, for the subscriptions no
    organization holds, the status of the signup each names and our resubscribe checkouts behind
    them. Prices the subscriptions reveal are remembered (committed here)."""
    drifts: list[reconciliation.SubscriptionDrift] = []
    try:
        for subscription_id, org_id in held.organizations.items():
            organization = db.session.get(Organization, org_id)
            if organization is None:
                continue
            state = price_lookup.subscription_state(listed[subscription_id], organization)
            drift = reconciliation.diff_subscription(held_billing(organization, subscription_id), state)
            if drift:
                drifts.append(reconciliation.SubscriptionDrift(organization.id, subscription_id, drift))
        pending_ids = [
            str((sub.get("metadata") or {}).get("pending_signup_id"))
            for sub in orphan_candidates
            if (sub.get("metadata") or {}).get("pending_signup_id")
        ]
        pending = {
            str(row.id): row.status
            for row in db.session.execute(
                select(PendingSignup.id, PendingSignup.status).where(
                    PendingSignup.id.in_([key for key in (as_uuid(p) for p in pending_ids) if key])
                )
            )
        }
        resubscribes = {
            str(row.stripe_subscription_id): row.checkout_session_id
            for row in db.session.execute(
                select(ResubscribeCheckout).where(
                    ResubscribeCheckout.stripe_subscription_id.in_([sub["id"] for sub in orphan_candidates])
                )
            ).scalars()
        }
        db.session.commit()  # the prices the states remembered
    except BaseException:
        db.session.rollback()
        raise
    return drifts, pending, resubscribes


def is_our_resubscribe_checkout(checkout_session_id: str) -> bool:
    try:
        return (
            db.session.execute(
                select(ResubscribeCheckout.id).where(ResubscribeCheckout.checkout_session_id == checkout_session_id)
            ).scalar_one_or_none()
            is not None
        )
    finally:
        db.session.rollback()


def held_whop_memberships(organization_id: int | None) -> dict[str, int]:
    """Membership id -> organization id, of the Whop-billed organizations to compare."""
    try:
        query = select(Organization.id, Organization.billing_subscription_id).where(
            Organization.billing_provider == BillingProvider.WHOP, Organization.billing_subscription_id.is_not(None)
        )
        if organization_id is not None:
            query = query.where(Organization.id == organization_id)
        return {str(row.billing_subscription_id): row.id for row in db.session.execute(query)}
    finally:
        db.session.rollback()


def compare_with_whop(
    held: Mapping[str, int], listed: Mapping[str, dict[str, Any]]
) -> list[reconciliation.SubscriptionDrift]:
    drifts: list[reconciliation.SubscriptionDrift] = []
    try:
        for membership_id, org_id in held.items():
            organization = db.session.get(Organization, org_id)
            if organization is None or membership_id not in listed:
                continue
            state: SubscriptionState = subscription_state_from_whop(listed[membership_id], plan_catalogue())
            fields = reconciliation.diff_subscription(held_billing(organization, membership_id), state)
            if fields:
                drifts.append(reconciliation.SubscriptionDrift(organization.id, membership_id, fields, "Whop"))
    finally:
        db.session.rollback()
    return drifts


def unsettled(organization_id: int | None) -> list[reconciliation.Unsettled]:
    """Conflicting signups and surplus resubscriptions whose cancel and refund are not both done."""
    try:
        found = []
        if organization_id is None:
            found += [
                reconciliation.Unsettled("signup", str(row.id), str(row.stripe_subscription_id))
                for row in db.session.execute(
                    select(PendingSignup.id, PendingSignup.stripe_subscription_id).where(
                        PendingSignup.stripe_subscription_id.is_not(None), PendingSignup.settled_at.is_(None)
                    )
                )
            ]
        query = select(ResubscribeCheckout.checkout_session_id, ResubscribeCheckout.stripe_subscription_id).where(
            ResubscribeCheckout.status == ResubscribeStatus.SURPLUS
        )
        if organization_id is not None:
            query = query.where(ResubscribeCheckout.organization_id == organization_id)
        found += [
            reconciliation.Unsettled("resubscribe", row.checkout_session_id, str(row.stripe_subscription_id))
            for row in db.session.execute(query)
        ]
        return found
    finally:
        db.session.rollback()


def event_references(event: Mapping[str, Any]) -> set[str]:
    """The subscription and customer ids an event's object names."""
    obj = (event.get("data") or {}).get("object") or {}
    references = {id_of(obj.get(name)) for name in ("subscription", "customer")}
    if obj.get("object") == "subscription":
        references.add(id_of(obj.get("id")))
    return {reference for reference in references if reference}


class StripeReconcileReads(Protocol):
    """Reconcile's Stripe reads, implemented by BillingService (each raises BillingError)."""

    def list_subscriptions_for_reconcile(self) -> dict[str, dict[str, Any]]: ...

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def list_events_for_reconcile(self, since: int, types: list[str]) -> list[dict[str, Any]]: ...

    def checkout_session_for_subscription(self, subscription_id: str) -> str | None: ...

    def read_customer_tax(self, customer_id: str) -> dict[str, Any]: ...

    def read_subscription_for_page(self, subscription_id: str) -> dict[str, Any]: ...


def read_stripe_side(
    stripe: StripeReconcileReads, since_days: int, organization_id: int | None, handled_events: frozenset[str]
) -> reconciliation.ReconcileReport:
    """Stripe's side of reconcile: every subscription (or the one organization's), compared with what
    the database holds; orphans, unsettled conflicts, and events of the last `since_days` never stored.
    The database is read first and no transaction is open while Stripe answers."""
    since = clock.now() - since_days * 86400
    report = reconciliation.ReconcileReport()
    held = held_by_stripe(organization_id, since)
    listed = stripe.list_subscriptions_for_reconcile() if organization_id is None else {}
    for subscription_id in held.organizations:
        if subscription_id not in listed:
            listed[subscription_id] = stripe.retrieve_subscription(subscription_id)
    events = stripe.list_events_for_reconcile(since, sorted(handled_events))
    if organization_id is not None:
        events = [event for event in events if event_references(event) & held.related]
    orphan_candidates = [sub for sub_id, sub in listed.items() if sub_id not in held.held_ids]
    report.subscriptions, pending, resubscribes = compare_with_stripe(held, listed, orphan_candidates)
    if organization_id is None:
        # Our resubscribe checkouts behind subscriptions we do not hold yet (the checkout row is ours
        # before its subscription is known).
        for sub in orphan_candidates:
            if (sub.get("metadata") or {}).get("purpose") != "resubscribe" or sub["id"] in resubscribes:
                continue
            session_id = stripe.checkout_session_for_subscription(sub["id"])
            if session_id is not None and is_our_resubscribe_checkout(session_id):
                resubscribes[sub["id"]] = session_id
    report.orphans = reconciliation.find_orphans(orphan_candidates, held.held_ids, pending, resubscribes)
    report.unsettled = unsettled(organization_id)
    report.missing_events = reconciliation.find_missing_events(events, held.stored_events, handled_events)
    customers(stripe, organization_id, report)
    return report


def customers(
    stripe: StripeReconcileReads, organization_id: int | None, report: reconciliation.ReconcileReport
) -> None:
    """Each Stripe-billed organization's customer (one read each, its tax IDs included) against what
    the account gives it (email, organization name: `customer_drifts`), its tax IDs' verification
    (`customers`), and what the billing page shows of its tax IDs and discounts (`page_drifts`)."""
    query = (
        select(Organization, User.email)
        .join(User, (User.organization_id == Organization.id) & (User.role == UserRole.OWNER))
        .where(Organization.billing_provider == BillingProvider.STRIPE, Organization.billing_customer_id.is_not(None))
        .order_by(Organization.id)
    )
    if organization_id is not None:
        query = query.where(Organization.id == organization_id)
    rows = [(organization, email) for organization, email in db.session.execute(query).all()]
    for organization, _ in rows:
        db.session.expunge(organization)  # kept as read: nothing is loaded again while Stripe answers
    db.session.rollback()
    renamed = customer_sync.renamed_organizations([organization.id for organization, _ in rows])
    for organization, owner_email in rows:
        customer_id = str(organization.billing_customer_id)
        who = f"organization {organization.id} ({customer_id})"
        try:
            customer = stripe.read_customer_tax(customer_id)
        except BillingError as exc:
            report.customers.append(f"{who}: not read: {exc}")
            continue
        report.customers += [f"{who}: {d}" for d in customer_sync.unverified_tax_ids(customer)]
        fields = customer_sync.customer_drift(organization, owner_email, customer, renamed=organization.id in renamed)
        if fields:
            drift = [reconciliation.FieldDrift(name, ours, theirs) for name, ours, theirs in fields]
            report.customer_drifts.append(reconciliation.CustomerDrift(organization.id, customer_id, drift))
        report.page_drifts += page_drifts(stripe, organization, customer)


def _tax_ids_shown(found: CustomerTax) -> list[str]:
    return [f"{row.value} ({row.status})" for row in found.tax_ids]


def _discounts_shown(discounts: list[ActiveDiscount]) -> list[str]:
    return [f"{d.code or d.name or 'discount'} ({d.duration}, until {d.ends_at or 'the end'})" for d in discounts]


def page_drifts(
    stripe: StripeReconcileReads, organization: Organization, customer: dict[str, Any]
) -> list[reconciliation.PageDrift]:
    """The billing page's cached tax IDs and discounts (when it has any cached: otherwise its next view
    reads Stripe) against Stripe's: the customer just read, and the subscription read as the page reads
    it (with its discounts expanded). The database keeps no copy of either."""
    found: list[reconciliation.PageDrift] = []
    tax_shown = billing_page.shown(organization, "tax")
    if isinstance(tax_shown, CustomerTax):
        ours, theirs = _tax_ids_shown(tax_shown), _tax_ids_shown(CustomerTax.from_stripe(customer))
        if ours != theirs:
            found.append(reconciliation.PageDrift(organization.id, "tax IDs", ours, theirs))
    facts = billing_page.shown(organization, "subscription")
    if isinstance(facts, SubscriptionFacts) and organization.billing_subscription_id:
        try:
            subscription = stripe.read_subscription_for_page(str(organization.billing_subscription_id))
        except BillingError:
            return found  # not compared this time; the page's cache expires on its own
        ours = _discounts_shown(facts.discounts)
        theirs = _discounts_shown(SubscriptionFacts.from_stripe(subscription).discounts)
        if ours != theirs:
            found.append(reconciliation.PageDrift(organization.id, "discounts", ours, theirs))
    return found
