"""Paid checkouts no organization may keep, on the database side: a second paid signup for an email
that already has an account, and a resubscription paid while the organization already had a live
subscription. BillingService cancels the subscription and refunds its payment at the provider (with
idempotency keys derived from our ids, with no transaction open); this module says what is to be
settled, records the settlement exactly once (a conditional write) with its domain event, and picks
the payment a refund goes to."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from app.extensions import db
from app.models import PendingSignup, ResubscribeCheckout, ResubscribeStatus
from app.models.types import utcnow
from app.services import domain_events
from app.services.billing_common import PaymentProviderUnavailable, committed, id_of
from app.services.signup_service import SignupService


@dataclass(frozen=True)
class ToSettle:
    """A subscription to cancel and refund, the idempotency key of doing so, and how to record it."""

    subscription_id: str
    key: str
    record: Callable[[dict[str, Any], str], None]  # (settlement, source), in its own transaction


def signup_conflict(pending_signup_id: uuid.UUID | str) -> ToSettle | dict[str, Any] | None:
    """What settling a conflicting signup takes; its settlement if it is settled; None if it has
    nothing to settle. Ends the transaction."""
    try:
        pending = SignupService.pending_signup(pending_signup_id)
        if pending is None or pending.stripe_subscription_id is None:
            return None
        if pending.settlement is not None:
            return dict(pending.settlement)
        pending_id, checkout_session_id, email = pending.id, pending.checkout_session_id, pending.email
        subscription_id = pending.stripe_subscription_id
    finally:
        db.session.rollback()

    def record(settlement: dict[str, Any], source: str) -> None:
        with committed():
            settled = db.session.execute(
                update(PendingSignup)
                .where(PendingSignup.id == pending_id, PendingSignup.settled_at.is_(None))
                .values(settled_at=utcnow(), settlement=settlement)
                .returning(PendingSignup.id)
            ).scalar_one_or_none()
            if settled is not None:
                domain_events.record(
                    "signup.conflict_refunded",
                    source=source,
                    pending_signup_id=str(pending_id),
                    email=email,
                    checkout_session_id=checkout_session_id,
                    **settlement,
                )

    return ToSettle(subscription_id, f"signup-{pending_id}-conflict", record)


def surplus_subscription(checkout_session_id: str) -> ToSettle | dict[str, Any] | None:
    """The same for a resubscription paid while the organization already had a live subscription."""
    try:
        row = db.session.execute(
            select(ResubscribeCheckout).where(ResubscribeCheckout.checkout_session_id == checkout_session_id)
        ).scalar_one_or_none()
        if (
            row is None
            or row.stripe_subscription_id is None
            or row.status not in (ResubscribeStatus.SURPLUS, ResubscribeStatus.REFUNDED)
        ):
            return None
        if row.settlement is not None:
            return dict(row.settlement)
        organization_id, subscription_id = row.organization_id, row.stripe_subscription_id
    finally:
        db.session.rollback()

    def record(settlement: dict[str, Any], source: str) -> None:
        with committed():
            settled = db.session.execute(
                update(ResubscribeCheckout)
                .where(
                    ResubscribeCheckout.checkout_session_id == checkout_session_id,
                    ResubscribeCheckout.status == ResubscribeStatus.SURPLUS,
                )
                .values(status=ResubscribeStatus.REFUNDED, settlement=settlement, updated_at=utcnow())
                .returning(ResubscribeCheckout.id)
            ).scalar_one_or_none()
            if settled is not None:
                domain_events.record(
                    "organization.surplus_subscription_refunded",
                    organization_id=organization_id,
                    source=source,
                    checkout_session_id=checkout_session_id,
                    **settlement,
                )

    return ToSettle(subscription_id, f"org-{organization_id}-surplus-{checkout_session_id}", record)


def refund_target(invoice: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The refund of what a paid invoice took: to its payment intent, or else its charge."""
    payment = next(
        (
            entry.get("payment") or {}
            for entry in (invoice.get("payments") or {}).get("data") or []
            if entry.get("status") in (None, "paid")
        ),
        {},
    )
    target: dict[str, Any] = {}
    if id_of(payment.get("payment_intent")):
        target["payment_intent"] = str(id_of(payment.get("payment_intent")))
    elif id_of(payment.get("charge")):
        target["charge"] = str(id_of(payment.get("charge")))
    else:
        raise PaymentProviderUnavailable(f"invoice {invoice.get('id')} was paid but names no payment to refund")
    target["metadata"] = {"reason": key}
    return target
