"""Provisioning, on the database side: a completed checkout becomes an organization (handed to
SignupService) or re-subscribes one whose subscription ended, exactly once whoever asks first (the
success redirect, a webhook, reconcile); and a subscription read from Stripe is applied to an
organization. Stripe is read only through the StripeReads BillingService hands in, never while a row
is locked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import joinedload

from app import clock
from app.extensions import db
from app.models import (
    BillingProvider,
    Organization,
    ResubscribeCheckout,
    ResubscribeStatus,
    SignupStatus,
    User,
    UserRole,
)
from app.models.types import utcnow
from app.services import domain_events, free_plan, price_lookup
from app.services.billing_common import (
    CheckoutSessionNotFound,
    StripeReads,
    checkout_is_paid,
    committed,
    found,
    id_of,
    portable_insert,
)
from app.services.signup_service import ProvisionOutcome, ProvisionState, SignupService
from app.services.subscription_state import SubscriptionState, apply_subscription_state


def provision_checkout_session(
    session: str | Mapping[str, Any], stripe: StripeReads, *, source: str, release_before_stripe: bool = False
) -> ProvisionOutcome:
    """Provision a completed checkout exactly once, whoever asks first: the success redirect (with
    the session id) or a webhook (with the session object). Writes in the caller's transaction.

    Stripe is read before any row is locked; the pending signup is then locked only for the few
    statements that create the account. release_before_stripe: the caller owns the transaction
    and nothing is written yet, so the connection goes back to the pool while Stripe answers. A
    subscription event that arrived in between bumps the signup's subscription_events_seen; the
    read is then done again, so the organization never starts older than an event already seen."""
    if isinstance(session, str):
        session_id, reference, given = session, None, None
    else:
        session_id, reference, given = session["id"], session.get("client_reference_id"), dict(session)
        if (given.get("metadata") or {}).get("purpose") == "resubscribe":
            return provision_resubscription(given, stripe, source=source, release_before_stripe=release_before_stripe)
    for attempt in range(3):
        pending = found(SignupService.find_pending_signup_for_checkout(session_id, reference_id=reference))
        if pending.status == SignupStatus.COMPLETED:
            return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
        events_seen = pending.subscription_events_seen
        if release_before_stripe:
            db.session.rollback()
        checkout, subscription = read_checkout(stripe, session_id, given if attempt == 0 else None)
        pending = found(SignupService.lock_pending_signup_for_checkout(session_id, reference_id=reference))
        if pending.status == SignupStatus.COMPLETED:
            return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
        if pending.subscription_events_seen == events_seen or attempt == 2:
            break
        if release_before_stripe:
            db.session.rollback()
    if pending is None:  # pragma: no cover - the loop returns or raises first
        raise CheckoutSessionNotFound("We could not find a signup for that checkout.")
    if not checkout_is_paid(checkout) or not isinstance(subscription, dict):
        return ProvisionOutcome(ProvisionState.AWAITING_PAYMENT, pending.id)
    state = price_lookup.subscription_state(subscription)
    if not checkout.get("invoice"):  # the first invoice, for the payment recorded with the signup
        checkout = {**checkout, "invoice": subscription.get("latest_invoice")}
    return SignupService.complete_pending_signup_from_checkout(pending, checkout, state, source=source)


def read_checkout(
    stripe: StripeReads, session_id: str, given: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checkout and its subscription, as Stripe has them now (a given session object whose
    subscription is already expanded is used as it is)."""
    if given is not None and isinstance(given.get("subscription"), dict):
        return given, given["subscription"]
    if given is None:
        checkout = stripe.retrieve_checkout_session(session_id, expand_subscription=True)
        subscription = checkout.get("subscription")
        return checkout, subscription if isinstance(subscription, dict) else None
    if given.get("subscription"):
        return given, stripe.retrieve_subscription(str(given["subscription"]))
    return given, None


def provision_resubscription(
    checkout: dict[str, Any], stripe: StripeReads, *, source: str, release_before_stripe: bool = False
) -> ProvisionOutcome:
    """Attach a paid resubscribe checkout's subscription to its organization, if the organization
    is still without a live subscription. Otherwise the subscription is surplus: it is recorded
    (`organization.surplus_subscription`) to be canceled and refunded after the commit. Stripe is
    read first; the organization is locked only for the statements that decide."""
    organization_id = int((checkout.get("metadata") or {}).get("organization_id", "0") or 0)
    for attempt in range(3):
        organization = db.session.get(Organization, organization_id, populate_existing=True)
        if organization is None:
            raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
        subscription_id = id_of(checkout.get("subscription"))
        if subscription_id and organization.billing_subscription_id == subscription_id:
            return ProvisionOutcome(ProvisionState.ALREADY_PROVISIONED, None, organization.id)
        if not checkout_is_paid(checkout) or not subscription_id:
            return ProvisionOutcome(ProvisionState.AWAITING_PAYMENT, None, organization.id)
        events_seen = organization.subscription_events_seen
        if release_before_stripe:
            db.session.rollback()
        given = checkout.get("subscription")
        subscription = (
            given if isinstance(given, dict) and attempt == 0 else stripe.retrieve_subscription(subscription_id)
        )
        organization = lock_organization(organization_id)
        if organization is None:
            raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
        if organization.subscription_events_seen == events_seen or attempt == 2:
            break
        if release_before_stripe:
            db.session.rollback()
    if organization is None:  # pragma: no cover - the loop returns or raises first
        raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
    if organization.billing_subscription_id == subscription_id:
        return ProvisionOutcome(ProvisionState.ALREADY_PROVISIONED, None, organization.id)
    record = resubscribe_checkout_row(checkout, organization_id)
    if not free_plan.may_start_paid_subscription(organization) or record.status in (
        ResubscribeStatus.SURPLUS,
        ResubscribeStatus.REFUNDED,
    ):
        if record.status not in (ResubscribeStatus.SURPLUS, ResubscribeStatus.REFUNDED):
            record.status = ResubscribeStatus.SURPLUS
            record.stripe_subscription_id = subscription_id
            domain_events.record(
                "organization.surplus_subscription",
                organization_id=organization.id,
                source=source,
                checkout_session_id=checkout["id"],
                stripe_subscription_id=subscription_id,
                live_subscription_id=organization.billing_subscription_id,
            )
        return ProvisionOutcome(ProvisionState.SURPLUS, None, organization.id, settlement=record.settlement)
    record.status = ResubscribeStatus.ATTACHED
    record.stripe_subscription_id = subscription_id
    now_billed_by_stripe(organization, subscription)
    apply_subscription_read(organization, subscription, source=source)
    return ProvisionOutcome(ProvisionState.PROVISIONED, None, organization.id)


def resubscribe_checkout_row(checkout: Mapping[str, Any], organization_id: int) -> ResubscribeCheckout:
    """The checkout's row, locked; created if the checkout was opened before rows were kept."""
    db.session.execute(
        portable_insert(ResubscribeCheckout)
        .values(
            checkout_session_id=checkout["id"],
            organization_id=organization_id,
            tier="unknown",
            status=ResubscribeStatus.OPEN,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["checkout_session_id"])
    )
    return db.session.execute(
        select(ResubscribeCheckout)
        .where(ResubscribeCheckout.checkout_session_id == checkout["id"])
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def apply_subscription_read(organization: Organization, subscription: dict[str, Any], *, source: str) -> list[str]:
    """Apply a subscription just read from Stripe: it is as new as our clock says it is now."""
    state = price_lookup.subscription_state(subscription, organization)
    changes = free_plan_changes(organization, state, source=source)
    if changes is None:
        changes = apply_subscription_state(organization, state, source=source)
    # It moves on every read applied, even within the second of the last (a webhook right after a
    # page read): it versions the billing page's cached reads (billing_page.py), which must not outlive it.
    organization.billing_as_of = max((organization.billing_as_of or 0) + 1, clock.now())
    return changes


def free_plan_changes(organization: Organization, state: SubscriptionState, *, source: str) -> list[str] | None:
    """A subscription downgraded to free that has ended moves the organization to the free plan
    (free_plan.py) instead of ending it; None when that is not the case."""
    recorded: list[str] = []

    def record(name: str, **data: Any) -> None:
        domain_events.record(name, organization_id=organization.id, source=source, **data)
        recorded.append(name)

    fell = free_plan.fall_to_free(
        organization,
        subscription_id=state.subscription_id,
        status=state.status,
        metadata=state.metadata,
        ended_at=state.ended_at,
        record=record,
    )
    return recorded if fell else None


def lock_organization(organization_id: int) -> Organization | None:
    """The organization and its add-ons, locked for a few statements (never across a Stripe call)."""
    return lock_organization_where(Organization.id == organization_id)


def lock_organization_where(*conditions: Any) -> Organization | None:
    """The one organization matching ``conditions``, locked, with its add-ons in the same query (applying
    a provider's subscription compares them); read afresh, whatever the session held."""
    return (
        db.session.execute(
            select(Organization)
            .options(joinedload(Organization.addons))
            .where(*conditions)
            .with_for_update(of=Organization)
            .execution_options(populate_existing=True)
        )
        .unique()
        .scalar_one_or_none()
    )


def now_billed_by_stripe(organization: Organization, subscription: Mapping[str, Any]) -> None:
    """An organization whose Whop membership ended comes back by card: Stripe bills it from now on."""
    if organization.billed_by_whop:
        organization.billing_provider = BillingProvider.STRIPE
        organization.billing_customer_id = id_of(subscription.get("customer"))
        organization.billing_as_of = None


def stripe_customer_of(organization: Organization) -> str:
    """Who pays a resubscription at Stripe: the organization's Stripe customer, or, when it has none
    (it was billed by Whop), its owner's email, for which Checkout makes a new customer."""
    if organization.billing_provider == BillingProvider.STRIPE and organization.billing_customer_id:
        return organization.billing_customer_id
    owner = db.session.execute(
        select(User.email).where(User.organization_id == organization.id, User.role == UserRole.OWNER)
    ).scalar_one()
    return str(owner)


def remember_customer(organization_id: int, customer_id: str) -> str:
    """The Stripe customer just made for an organization that had none; if another request made one
    first (the same idempotency key makes it the same customer), the one recorded is kept."""
    with committed():
        db.session.execute(
            update(Organization)
            .where(Organization.id == organization_id, Organization.billing_customer_id.is_(None))
            .values(billing_customer_id=customer_id, updated_at=utcnow())
        )
        held = db.session.get(Organization, organization_id, populate_existing=True)
        return (held.billing_customer_id if held else None) or customer_id


def record_resubscribe_checkout(
    organization_id: int, tier_key: str, checkout_session_id: str, actor_user_id: int
) -> list[str]:
    """Record a resubscribe checkout just opened. The organization's older open ones are expired and
    their ids returned, to be closed at Stripe, so two tabs cannot both pay."""
    with committed():
        inserted = db.session.execute(
            portable_insert(ResubscribeCheckout)
            .values(
                checkout_session_id=checkout_session_id,
                organization_id=organization_id,
                tier=tier_key,
                status=ResubscribeStatus.OPEN,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["checkout_session_id"])
            .returning(ResubscribeCheckout.id)
        ).scalar_one_or_none()
        superseded: list[str] = []
        if inserted is not None:
            # Only older checkouts: of two created at once, the newer survives.
            superseded = list(
                db.session.execute(
                    update(ResubscribeCheckout)
                    .where(
                        ResubscribeCheckout.organization_id == organization_id,
                        ResubscribeCheckout.status == ResubscribeStatus.OPEN,
                        ResubscribeCheckout.id < inserted,
                    )
                    .values(status=ResubscribeStatus.EXPIRED, updated_at=utcnow())
                    .returning(ResubscribeCheckout.checkout_session_id)
                ).scalars()
            )
            domain_events.record(
                "organization.resubscribe_started",
                organization_id=organization_id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                tier=tier_key,
                checkout_session_id=checkout_session_id,
                superseded_checkout_session_ids=superseded,
            )
    return superseded
