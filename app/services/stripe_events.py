"""Stripe's events, applied to organizations: the table of the event types this product acts on, how
each is keyed to the object it is about, and the handlers the worker runs for a batch of events about
one object. A subscription or checkout event only says when to look: the handler re-reads the object
from Stripe (through the StripeReads BillingService hands in) and applies what Stripe holds now.
Verifying a delivery's signature stays in BillingService, the one user of Stripe's SDK."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import msgspec
from flask import current_app
from sqlalchemy import select, update

from app.extensions import db
from app.models import BillingProvider, Organization, OrganizationAddon, SignupStatus, StripeEventStatus
from app.models.types import utcnow
from app.services import (
    customer_sync,
    domain_events,
    provisioning,
    stripe_objects,
    tax_id_events,
    trials,
    usage_reports,
)
from app.services.billing_common import (
    API_VERSION_FORMAT,
    EVENT_TYPE,
    CheckoutSessionNotFound,
    EventOutcomes,
    PaymentProviderUnavailable,
    ProviderObjectMissing,
    StripeReads,
    WebhookRejected,
    checkout_is_paid,
)
from app.services.signup_service import SignupService
from app.services.stripe_objects import MalformedObject
from app.services.webhook_intake import RESYNC_SOURCE
from app.services.webhook_store import VerifiedEvent

# What a Stripe event's id looks like (its type and API version: billing_common).
STRIPE_EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,251}")
HANDLED_STRIPE_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_failed",
        "invoice.payment_action_required",
        usage_reports.ERROR_REPORT_EVENT,
        usage_reports.NO_METER_EVENT,
        "customer.updated",
        *tax_id_events.EVENT_TYPES,
    }
)
INVOICE_PAYMENT_STATUS = {
    "invoice.paid": "paid",
    "invoice.payment_failed": "failed",
    "invoice.payment_action_required": "action_required",
}


def ignore_reason(event: VerifiedEvent) -> str | None:
    expected_livemode = str(current_app.config["STRIPE_SECRET_KEY"]).startswith(("sk_live_", "rk_live_"))
    if event.livemode != expected_livemode:
        return f"livemode mismatch: event is {'live' if event.livemode else 'test'} mode, our key is not"
    if event.type not in HANDLED_STRIPE_EVENTS:
        return f"unhandled event type {event.type}"
    if event.type.startswith("checkout.session."):
        metadata = event.body["data"]["object"].get("metadata")
        # Metadata that is not an object is left for the typed reading to refuse (failed, with why).
        if isinstance(metadata, dict | None) and (metadata or {}).get("purpose") not in ("signup", "resubscribe"):
            return "not ours: not a checkout this app created"
    return None


def object_key(event: VerifiedEvent) -> str:
    if event.type == usage_reports.ERROR_REPORT_EVENT:  # a thin event about a meter
        return f"meter:{usage_reports.related_meter(event.body)}"
    if event.type == usage_reports.NO_METER_EVENT:  # a thin event about events no meter has
        return "meter:none"
    obj = stripe_objects.read_for_event(event.type, event.body["data"]["object"])
    if isinstance(obj, stripe_objects.CheckoutSession):
        return f"checkout:{obj.id}"
    if isinstance(obj, stripe_objects.Subscription):
        return f"subscription:{obj.id}"
    if isinstance(obj, stripe_objects.Customer):
        return f"customer:{obj.id}"  # with its invoices' events: one customer's events apply one at a time
    customer = stripe_objects.id_of(obj.customer)
    if customer is None:
        raise MalformedObject(f"malformed {type(obj).__name__} object: it names no customer")
    return f"customer:{customer}"


def apply_batch(object_key: str, events: list[VerifiedEvent], stripe: StripeReads) -> EventOutcomes:
    kind, _, object_id = object_key.partition(":")
    if kind == "subscription":
        return apply_subscription_events(object_id, events, stripe)
    if kind == "checkout":
        return apply_checkout_events(object_id, events, stripe)
    if kind == "meter":
        # Stripe's asynchronous rejections of meter events (error reports, no meter found): each read back
        # (no transaction open), then recorded.
        read = [(event.event_id, stripe.retrieve_event(event.event_id)) for event in events]
        return {
            event_id: (StripeEventStatus.PROCESSED, usage_reports.apply_error_report(full)) for event_id, full in read
        }
    if kind == "customer":
        # Payments are facts with their own invoice ids: each event is recorded in turn (no read).
        # customer.updated re-reads the customer first, with no transaction open (customer_sync.py).
        updated = [event for event in events if event.type == "customer.updated"]
        outcomes = customer_sync.apply_customer_events(object_id, updated, stripe) if updated else {}
        # A tax ID's verification finished: the billing page's cached reads are dropped (tax_id_events.py).
        tax_ids = [event for event in events if event.type in tax_id_events.EVENT_TYPES]
        outcomes |= tax_id_events.apply_tax_id_events(object_id, tax_ids) if tax_ids else {}
        return outcomes | {
            event.event_id: (StripeEventStatus.PROCESSED, record_invoice(event.body["data"]["object"], event))
            for event in events
            if event not in updated and event not in tax_ids
        }
    raise MalformedObject(f"no object kind {kind!r}")


def apply_subscription_events(subscription_id: str, events: list[VerifiedEvent], stripe: StripeReads) -> EventOutcomes:
    """customer.subscription.* events: the organization follows Stripe's current subscription,
    read now, whatever order the events came in and whatever their timestamps say (so neither
    ordering nor either clock matters); the events only say when to look."""
    for _read in range(3):
        # What the organization looked like before Stripe is read: if an owner's action or
        # provisioning changes it while the read is in flight, the read may be older than what it
        # holds, so it is read again (compare-and-swap; no clock involved).
        seen = organization_version(subscription_id)
        db.session.rollback()
        try:
            subscription = stripe.retrieve_subscription(subscription_id)
        except ProviderObjectMissing:
            reason = f"not ours: this Stripe account has no subscription {subscription_id}"
            return {event.event_id: (StripeEventStatus.IGNORED, reason) for event in events}
        subscription = stripe_objects.subscription_for_state(subscription)
        organization = lock_organization_for_subscription(subscription)
        now_held = held_version(organization) if organization else None
        if now_held == seen:
            break
        db.session.rollback()
    else:
        raise PaymentProviderUnavailable("the organization kept changing while Stripe was read; retrying later")
    if organization is None:
        metadata = subscription.get("metadata") or {}
        if metadata.get("pending_signup_id") or metadata.get("purpose") == "resubscribe":
            waiting = "no organization for this subscription yet; provisioning reads it from Stripe"
            return {event.event_id: (StripeEventStatus.PROCESSED, waiting) for event in events}
        reason = "not ours: no organization holds this subscription and it carries no signup of this app"
        return {event.event_id: (StripeEventStatus.IGNORED, reason) for event in events}
    source = events[-1].source if events else RESYNC_SOURCE  # no event: reconcile asked for a re-read
    changes = provisioning.apply_subscription_read(organization, subscription, source=source)
    summary = "applied Stripe's current subscription: " + (", ".join(changes) or "no change")
    outcomes: EventOutcomes = {}
    for event in events:
        if event.type == "customer.subscription.trial_will_end":
            outcome = record_trial_will_end(event.body["data"]["object"], event)
        elif event is events[-1]:
            outcome = summary
        else:
            outcome = f"coalesced into {events[-1].event_id}: {summary}"
        outcomes[event.event_id] = (StripeEventStatus.PROCESSED, outcome)
    return outcomes


def apply_checkout_events(session_id: str, events: list[VerifiedEvent], stripe: StripeReads) -> EventOutcomes:
    """checkout.session.* events: Stripe's current Checkout Session decides (paid: provision through
    the same code as the success redirect; expired or failed: close the signup)."""

    def every(status: StripeEventStatus, outcome: str) -> EventOutcomes:
        return {event.event_id: (status, outcome) for event in events}

    try:
        checkout = stripe.retrieve_checkout_session(session_id, expand_subscription=False)
    except CheckoutSessionNotFound:
        return every(StripeEventStatus.IGNORED, f"not ours: this Stripe account has no checkout {session_id}")
    session = stripe_objects.read(stripe_objects.CheckoutSession, checkout)
    if session.purpose not in ("signup", "resubscribe"):
        return every(StripeEventStatus.IGNORED, "not ours: not a checkout this app created")
    source = events[-1].source
    if checkout_is_paid(checkout):
        try:
            # Nothing is written yet: the connection goes back to the pool while Stripe is read.
            outcome = provisioning.provision_checkout_session(
                checkout, stripe, source=source, release_before_stripe=True
            )
        except CheckoutSessionNotFound as exc:
            return every(StripeEventStatus.IGNORED, f"not ours: {exc}")
        return every(StripeEventStatus.PROCESSED, f"{outcome.state} (organization {outcome.organization_id})")
    # An expiry is final at Stripe: the event says so even if a read raced ahead of it.
    if checkout.get("status") == "expired" or any(event.type == "checkout.session.expired" for event in events):
        return every(
            StripeEventStatus.PROCESSED, close_checkout(checkout, SignupStatus.EXPIRED, "checkout expired", source)
        )
    if any(event.type == "checkout.session.async_payment_failed" for event in events):
        return every(
            StripeEventStatus.PROCESSED, close_checkout(checkout, SignupStatus.FAILED, "payment failed", source)
        )
    return every(StripeEventStatus.PROCESSED, "awaiting payment")


def organization_version(subscription_id: str) -> tuple[Any, ...] | None:
    """What an organization holds from its subscription, as a version: its row's updated_at and its
    add-on rows (a seat change writes only those), so a write to either while Stripe is read is seen."""
    row = db.session.execute(
        select(Organization.id, Organization.updated_at).where(
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_subscription_id == subscription_id,
        )
    ).first()
    if row is None:
        return None
    addons = db.session.execute(
        select(OrganizationAddon.addon_key, OrganizationAddon.quantity, OrganizationAddon.provider_item_id)
        .where(OrganizationAddon.organization_id == row[0])
        .order_by(OrganizationAddon.addon_key)
    ).all()
    return (row[0], row[1], tuple(tuple(addon) for addon in addons))


def held_version(organization: Organization) -> tuple[Any, ...]:
    addons = sorted((a.addon_key, a.quantity, a.provider_item_id) for a in organization.addons)
    return (organization.id, organization.updated_at, tuple(addons))


def lock_organization_for_subscription(subscription: dict[str, Any]) -> Organization | None:
    def find() -> Organization | None:
        return provisioning.lock_organization_where(
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_subscription_id == subscription["id"],
        )

    organization = find()
    if organization is not None:
        return organization
    # Not ours yet: wait for any provisioning of it in flight by taking the same lock it holds,
    # then look again. If there is none, provisioning will read the subscription itself later.
    # Provisioning reads Stripe before it locks, so an event in that window bumps a counter that
    # makes it read again.
    metadata = subscription.get("metadata") or {}
    if metadata.get("purpose") == "resubscribe" and str(metadata.get("organization_id") or "").isdigit():
        db.session.execute(
            update(Organization)
            .where(Organization.id == int(metadata["organization_id"]))
            .values(subscription_events_seen=Organization.subscription_events_seen + 1)
        )
    elif metadata.get("pending_signup_id"):
        SignupService.lock_pending_signup(metadata["pending_signup_id"])
        SignupService.note_subscription_event(metadata["pending_signup_id"])
    return find()


def record_invoice(invoice: dict[str, Any], event: VerifiedEvent) -> str:
    """invoice.paid / invoice.payment_failed / invoice.payment_action_required: the payment state,
    and a domain event that dunning notices hang on."""
    organization = db.session.execute(
        select(Organization)
        .where(
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_customer_id == invoice.get("customer"),
        )
        .with_for_update()
    ).scalar_one_or_none()
    if organization is None:
        return "no organization for this customer yet"
    payment_status = INVOICE_PAYMENT_STATUS[event.type]
    if organization.last_invoice_id == invoice["id"] and organization.last_payment_status == "paid":
        return "stale: this invoice is already paid"
    if organization.payment_as_of is not None and event.created < organization.payment_as_of:
        return "stale: a newer invoice event was applied"
    organization.last_invoice_id = invoice["id"]
    organization.last_payment_status = payment_status
    organization.payment_as_of = event.created
    if payment_status == "paid":
        organization.last_payment_at = utcnow()
    domain_events.record(
        f"billing.payment_{'succeeded' if payment_status == 'paid' else payment_status}",
        organization_id=organization.id,
        source=event.source,
        invoice_id=invoice["id"],
        amount_due=invoice.get("amount_due"),
        amount_paid=invoice.get("amount_paid"),
        currency=invoice.get("currency"),
        attempt_count=invoice.get("attempt_count"),
        next_payment_attempt=invoice.get("next_payment_attempt"),
        hosted_invoice_url=invoice.get("hosted_invoice_url"),
    )
    return f"payment {payment_status} recorded"


def record_trial_will_end(subscription: dict[str, Any], event: VerifiedEvent) -> str:
    organization_id = db.session.execute(
        select(Organization.id).where(
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_subscription_id == subscription["id"],
        )
    ).scalar_one_or_none()
    if organization_id is None:
        return "no organization for this subscription"
    domain_events.record(
        "subscription.trial_will_end",
        organization_id=organization_id,
        source=event.source,
        trial_end=subscription.get("trial_end"),
        ends_without_card=trials.ends_without_card(subscription),  # the email says what happens then
    )
    return "trial ending recorded"


def close_checkout(checkout: dict[str, Any], status: SignupStatus, reason: str, source: str) -> str:
    if (checkout.get("metadata") or {}).get("purpose") == "resubscribe":
        return f"resubscribe checkout {reason}"
    return SignupService.close_pending_signup(
        checkout_session_id=checkout["id"],
        reference_id=checkout.get("client_reference_id"),
        status=status,
        reason=reason,
        source=source,
    )


class _EventId(msgspec.Struct):
    id: str


_EVENT_ID = msgspec.json.Decoder(_EventId)


def event_id_of(text: str) -> str | None:
    """A delivery's top-level "id" (a thin event's too), read without building the event: msgspec
    skips every other field, where json.loads builds the whole body (about 13 µs for a 1.5 kB
    subscription event, 1 µs this way). None when the body is no JSON object with a string id."""
    try:
        return _EVENT_ID.decode(text).id
    except msgspec.DecodeError:
        return None


def parse_event(text: str) -> VerifiedEvent:
    """A delivery's body (already verified) read as a Stripe event; anything else is refused with a 400."""
    try:
        body = json.loads(text)
    except ValueError:
        raise WebhookRejected("body is not JSON") from None
    if isinstance(body, dict) and body.get("object") == "v2.core.event":
        return _thin_event(text, body)
    if not (
        isinstance(body, dict)
        and body.get("object") == "event"
        and isinstance(body.get("id"), str)
        and STRIPE_EVENT_ID.fullmatch(body["id"])
        and isinstance(body.get("type"), str)
        and EVENT_TYPE.fullmatch(body["type"])
        and type(body.get("created")) is int
        and 0 <= body["created"] < 2**63
        and isinstance(body.get("livemode"), bool)
        and isinstance(body.get("data"), dict)
        and isinstance(body["data"].get("object"), dict)
    ):
        raise WebhookRejected("body is not a Stripe event")
    api_version = body.get("api_version")
    return VerifiedEvent(
        provider="stripe",
        event_id=body["id"],
        type=body["type"],
        created=body["created"],
        livemode=body["livemode"],
        api_version=api_version if isinstance(api_version, str) and API_VERSION_FORMAT.fullmatch(api_version) else None,
        raw=text,
        body=body,
    )


def _thin_event(text: str, body: dict[str, Any]) -> VerifiedEvent:
    """A thin event (an event destination's delivery: its type, ids and the object it is about, no
    data; the applier reads the event back from Stripe). Only the thin types this product handles: an
    error report names its meter; no_meter_found has none to name."""
    created = body.get("created")
    try:
        stamp = int(datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp())
    except ValueError:
        stamp = -1
    if not (
        isinstance(body.get("id"), str)
        and STRIPE_EVENT_ID.fullmatch(body["id"])
        and body.get("type") in usage_reports.METER_ERROR_EVENTS
        and 0 <= stamp < 2**63
        and isinstance(body.get("livemode"), bool)
        and (body["type"] == usage_reports.NO_METER_EVENT or usage_reports.related_meter(body))
    ):
        raise WebhookRejected("body is not a Stripe event")
    return VerifiedEvent("stripe", body["id"], body["type"], stamp, body["livemode"], None, text, body)
