"""Whop's events and memberships, applied to organizations: the database side of Whop billing.

Whop is read only through the WhopReads handed in (the adapter in whop_billing.py, which BillingService
holds); nothing here imports Whop's SDK or the authority. The organization always follows Whop's
current membership, read when an event says to look, so neither arrival order nor either clock
matters (docs/system/BILLING.md, "Whop")."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from flask import current_app
from sqlalchemy import select

from app import clock
from app.extensions import db
from app.models import BillingProvider, BillingStatus, Organization, SignupStatus, StripeEventStatus
from app.models.types import utcnow
from app.services import domain_events, provisioning
from app.services.billing_common import (
    API_VERSION_FORMAT,
    EVENT_TYPE,
    CheckoutSessionNotFound,
    EventOutcomes,
    ProviderObjectMissing,
    WebhookRejected,
    WhopReads,
    as_uuid,
    found,
    plan_catalogue,
)
from app.services.signup_service import ProvisionOutcome, ProvisionState, SignupService
from app.services.stripe_objects import MalformedObject
from app.services.subscription_state import apply_subscription_state
from app.services.webhook_intake import RESYNC_SOURCE
from app.services.webhook_store import VerifiedEvent
from app.services.whop_state import (
    membership_as_of,
    minor_units,
    money_currency,
    parse_time,
    subscription_state_from_whop,
)

WHOP_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
WHOP_OBJECT_ID = re.compile(r"[A-Za-z0-9_]{1,255}")
WHOP_MEMBERSHIP_ID = re.compile(r"mem_[A-Za-z0-9_]{1,200}")
# Membership statuses that pay for a signup (a trial included).
WHOP_PAID_STATUSES = frozenset({"active", "trialing", "completed", "canceling"})
# The Whop events that move an organization's billing; every other type is stored and ignored.
WHOP_HANDLED_EVENTS = frozenset(
    {
        "membership.activated",
        "membership.deactivated",
        "membership.updated",
        "membership.cancel_at_period_end_changed",
        "payment.succeeded",
        "payment.failed",
        "invoice.paid",
        "invoice.past_due",
    }
)


def ignore_reason(event: VerifiedEvent) -> str | None:
    account = event.body.get("account_id")
    if account and account != current_app.config.get("WHOP_COMPANY_ID"):
        return f"event for another Whop account ({str(account)[:40]})"
    if event.type not in WHOP_HANDLED_EVENTS:
        return f"unhandled event type {event.type}"
    return None


def object_key(event: VerifiedEvent) -> str:
    data = event.body["data"]
    if event.type.startswith("membership."):
        membership_id = data.get("id")
    elif event.type.startswith("payment."):
        membership_id = data.get("membership_id")
    else:
        member = data.get("member")
        member_id = member.get("id") if isinstance(member, dict) else None
        if not isinstance(member_id, str) or not WHOP_OBJECT_ID.fullmatch(member_id):
            raise MalformedObject("malformed Whop invoice: it names no member")
        return f"member:{member_id}"
    if membership_id is None and event.type.startswith("payment."):
        # A payment that made no membership: a card declined at checkout. It is about its own payment.
        payment_id = data.get("id")
        if isinstance(payment_id, str) and WHOP_OBJECT_ID.fullmatch(payment_id):
            return f"payment:{payment_id}"
    if not isinstance(membership_id, str) or not WHOP_OBJECT_ID.fullmatch(membership_id):
        raise MalformedObject(f"malformed Whop {event.type.split('.')[0]}: it names no membership")
    return f"membership:{membership_id}"


def apply_batch(object_key: str, events: list[VerifiedEvent], whop: WhopReads) -> EventOutcomes:
    kind, _, object_id = object_key.partition(":")
    if kind == "membership":
        return apply_membership_events(object_id, events, whop)
    if kind == "payment":
        return apply_checkout_payment_events(events)
    return apply_member_events(object_id, events)


def apply_checkout_payment_events(events: list[VerifiedEvent]) -> EventOutcomes:
    """A payment that names no membership: Whop declined the card at checkout, so no membership was
    made and nothing changes here; the outcome says what happened (the signup stays open: the
    customer can try another card on the same checkout)."""
    outcomes: EventOutcomes = {}
    for event in events:
        payment = event.body["data"]
        if event.type != "payment.failed":
            outcomes[event.event_id] = (
                StripeEventStatus.IGNORED,
                "a Whop payment naming no membership: nothing to apply",
            )
            continue
        reason = str(payment.get("failure_message") or "the payment failed")[:200]
        code = payment.get("decline_code")
        signup = (payment.get("metadata") or {}).get("pending_signup_id")
        outcome = f"declined at Whop's checkout: {reason}" + (f" ({str(code)[:60]})" if code else "")
        outcome += "; no membership was made" + (f", signup {str(signup)[:40]} stays open" if signup else "")
        outcomes[event.event_id] = (StripeEventStatus.PROCESSED, outcome)
    return outcomes


def apply_membership_read(organization: Organization, membership: Mapping[str, Any], *, source: str) -> list[str]:
    """The organization takes a membership just read from Whop (an event's re-read, an owner's action,
    reconcile): it is as new as Whop's own timestamp or our clock, whichever is later."""
    state = subscription_state_from_whop(membership, plan_catalogue())
    changes = apply_subscription_state(organization, state, source=source)
    organization.billing_as_of = max(organization.billing_as_of or 0, membership_as_of(membership) or 0, clock.now())
    return changes


def lock_organization(membership_id: str | None) -> Organization | None:
    if not membership_id:
        return None
    return provisioning.lock_organization_where(
        Organization.billing_provider == BillingProvider.WHOP, Organization.billing_subscription_id == membership_id
    )


def apply_membership_events(membership_id: str, events: list[VerifiedEvent], whop: WhopReads) -> EventOutcomes:
    """membership.* and payment.* events about one membership: the organization follows Whop's
    current membership, read now (so neither arrival order nor either clock matters), and each
    payment's state is recorded. With no organization yet, a membership carrying one of our
    pending signups provisions it (whoever comes first: this or the redirect)."""

    def every(status: StripeEventStatus, outcome: str) -> EventOutcomes:
        return {event.event_id: (status, outcome) for event in events}

    try:
        membership = whop.retrieve_membership(membership_id)
    except ProviderObjectMissing:
        return every(StripeEventStatus.IGNORED, f"not ours: this Whop account has no membership {membership_id}")
    source = events[-1].source if events else RESYNC_SOURCE  # no event: reconcile asked for a re-read
    organization = lock_organization(membership_id)
    provisioned = ""
    if organization is None:
        metadata = membership.get("metadata") or {}
        if metadata.get("purpose") != "signup" or not metadata.get("pending_signup_id"):
            return every(StripeEventStatus.IGNORED, "not ours: no organization holds this membership")
        try:
            provision = provision_membership(membership, source=source)
        except CheckoutSessionNotFound as exc:
            return every(StripeEventStatus.IGNORED, f"not provisioned: {exc}")
        provisioned = f"{provision.state} (organization {provision.organization_id})"
        organization = lock_organization(membership_id)
        if organization is None:  # awaiting payment, or the signup went to another membership
            return every(StripeEventStatus.PROCESSED, provisioned)
    changes = apply_membership_read(organization, membership, source=source)
    summary = provisioned or "applied Whop's current membership: " + (", ".join(changes) or "no change")
    outcomes: EventOutcomes = {}
    for event in events:
        outcome = summary
        if event.type.startswith("payment."):
            payment = event.body["data"]
            outcome = record_payment_state(
                organization,
                paid=event.type == "payment.succeeded",
                payment_id=str(payment.get("id")),
                as_of=whop_time(payment.get("updated_at")) or event.created,
                event=event,
                amount=minor_units(payment.get("total")),
                currency=money_currency(payment.get("total"), payment.get("currency")),
                renewal=payment.get("billing_reason") != "subscription_create",
            )
        outcomes[event.event_id] = (StripeEventStatus.PROCESSED, outcome)
    return outcomes


def apply_member_events(member_id: str, events: list[VerifiedEvent]) -> EventOutcomes:
    """invoice.paid / invoice.past_due: found by the buyer's member id, when it names one
    Whop-billed organization (a member may own several; their memberships' events then decide)."""
    matches = (
        db.session.execute(
            select(Organization.id).where(
                Organization.billing_provider == BillingProvider.WHOP, Organization.billing_customer_id == member_id
            )
        )
        .scalars()
        .all()
    )
    if len(matches) != 1:
        reason = "no single organization for this member" if matches else "no organization for this member"
        return {event.event_id: (StripeEventStatus.IGNORED, reason) for event in events}
    organization = db.session.get_one(Organization, matches[0], with_for_update=True, populate_existing=True)
    outcomes: EventOutcomes = {}
    for event in events:
        invoice = event.body["data"]
        outcomes[event.event_id] = (
            StripeEventStatus.PROCESSED,
            record_payment_state(
                organization,
                paid=event.type == "invoice.paid",
                payment_id=str((invoice.get("payment") or {}).get("id") or invoice.get("id")),
                as_of=whop_time(invoice.get("updated_at")) or event.created,
                event=event,
                amount=invoice_amount(invoice),
                currency=(invoice.get("current_plan") or {}).get("currency"),
                renewal=True,
                invoice_id=str(invoice.get("id")),
            ),
        )
    return outcomes


def invoice_amount(invoice: Mapping[str, Any]) -> int | None:
    """A Whop invoice's amount (cents): its total if it gives one, else the sum of its lines."""
    if invoice.get("total") is not None:
        return minor_units(invoice.get("total"))
    lines = [minor_units(line.get("total")) for line in invoice.get("line_items") or [] if isinstance(line, Mapping)]
    return sum(line for line in lines if line is not None) if lines and None not in lines else None


def record_payment_state(
    organization: Organization,
    *,
    paid: bool,
    payment_id: str,
    as_of: int,
    event: VerifiedEvent,
    amount: Any,
    currency: Any,
    renewal: bool,
    invoice_id: str | None = None,
) -> str:
    if organization.payment_as_of is not None and as_of < organization.payment_as_of:
        return "stale: a newer payment event was applied"
    status = "paid" if paid else "failed"
    first_record = (organization.last_invoice_id, organization.last_payment_status) != (payment_id, status)
    organization.last_invoice_id = payment_id
    organization.last_payment_status = status
    organization.payment_as_of = as_of
    if paid:
        organization.last_payment_at = utcnow()
    moved = ""
    live = organization.billing_status in (BillingStatus.ACTIVE, BillingStatus.TRIALING)
    if not paid and renewal and live:
        moved = BillingStatus.PAST_DUE
    elif paid and organization.billing_status == BillingStatus.PAST_DUE:
        moved = BillingStatus.ACTIVE
    if moved and (organization.billing_as_of is None or as_of >= organization.billing_as_of):
        domain_events.record(
            "organization.billing_status_changed",
            organization_id=organization.id,
            source=event.source,
            previous=organization.billing_status,
            status=moved,
        )
        organization.past_due_since = utcnow() if moved == BillingStatus.PAST_DUE else None
        organization.billing_status = moved
        organization.billing_as_of = as_of
    if first_record:
        domain_events.record(
            f"billing.payment_{'succeeded' if paid else 'failed'}",
            organization_id=organization.id,
            source=event.source,
            invoice_id=invoice_id or payment_id,
            amount_due=None if paid else amount,
            amount_paid=amount if paid else None,
            currency=currency,
            attempt_count=None,
            next_payment_attempt=None,
            hosted_invoice_url=None,
        )
    return f"payment {status} recorded" + (f"; billing status {moved}" if moved else "")


def provision_membership(membership: Mapping[str, Any], *, source: str) -> ProvisionOutcome:
    """Provision the signup a Whop membership pays for, exactly once, whoever asks first (the
    redirect or membership.activated): the pending signup is locked, as for Stripe, and handed to
    SignupService.complete_pending_signup_from_checkout. Runs in the caller's transaction."""
    reference = str((membership.get("metadata") or {}).get("pending_signup_id") or "")
    pending = found(SignupService.lock_pending_signup(reference) if as_uuid(reference) else None)
    if pending.status == SignupStatus.COMPLETED:
        return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
    if membership.get("status") not in WHOP_PAID_STATUSES:
        return ProvisionOutcome(ProvisionState.AWAITING_PAYMENT, pending.id)
    state = subscription_state_from_whop(membership, plan_catalogue())
    if state.tier != pending.tier:
        # A membership of another plan (a cheaper one, say) carrying this signup's id never provisions
        # the tier the signup chose.
        raise CheckoutSessionNotFound(f"That Whop membership is for another plan than the {pending.tier} plan chosen.")
    price = membership.get("renewal_price") or {}
    checkout = {
        "id": pending.checkout_session_id or f"whop:{membership['id']}",
        "customer": state.customer_id,
        "payment_status": "no_payment_required" if state.status == BillingStatus.TRIALING else "paid",
        # What the first payment charged (a trial charges nothing), for the welcome receipt.
        "amount_total": 0 if state.status == BillingStatus.TRIALING else minor_units(price),
        "currency": str(price.get("currency") or "usd"),
    }
    outcome = SignupService.complete_pending_signup_from_checkout(
        pending, checkout, state, source=source, billing_provider=BillingProvider.WHOP
    )
    if outcome.state == ProvisionState.PROVISIONED and outcome.organization_id is not None:
        organization = db.session.get_one(Organization, outcome.organization_id)
        organization.billing_as_of = membership_as_of(membership) or clock.now()
    return outcome


def whop_time(value: Any) -> int | None:
    moment = parse_time(value)
    return int(moment.timestamp()) if moment else None


def parse_event(text: str, webhook_id: str, webhook_timestamp: int) -> VerifiedEvent:
    """A verified Whop delivery: the envelope (`type`, `timestamp`, `api_version`, `data`) keyed by the
    signed webhook-id, which Whop keeps across retries of one delivery."""
    try:
        body = json.loads(text)
    except ValueError:
        raise WebhookRejected("body is not JSON") from None
    if not (
        WHOP_EVENT_ID.fullmatch(webhook_id)
        and isinstance(body, dict)
        and isinstance(body.get("type"), str)
        and EVENT_TYPE.fullmatch(body["type"])
        and isinstance(body.get("data"), dict)
    ):
        raise WebhookRejected("body is not a Whop event")
    created = webhook_timestamp
    if isinstance(body.get("timestamp"), str):
        try:
            created = int(datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError):
            created = webhook_timestamp
    api_version = body.get("api_version")
    return VerifiedEvent(
        provider="whop",
        event_id=webhook_id,
        type=body["type"],
        created=created,
        livemode=not current_app.config.get("WHOP_API_BASE"),
        api_version=api_version if isinstance(api_version, str) and API_VERSION_FORMAT.fullmatch(api_version) else None,
        raw=text,
        body=body,
    )
