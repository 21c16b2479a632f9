"""What a signup's "Cancel and return" link finds: Checkout's cancel link is shown on its page even after
the payment went through (the customer pressed Back), so the return reads the checkout's real state
before it says anything about charges. Stripe is read through what the caller hands in (BillingService)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from app.extensions import db
from app.models import PendingSignup, SignupStatus
from app.services.billing_common import BillingError, StripeReads
from app.services.signup_service import SignupService


class ReturnState(StrEnum):
    OPEN = "open"  # not paid: nothing was charged, the form is offered again with what was typed
    PROVISIONED = "provisioned"  # paid, and the organization exists
    PAID = "paid"  # paid at Stripe, the account not made yet: the success page makes it
    UNKNOWN = "unknown"  # Stripe could not be asked


@dataclass(frozen=True)
class CanceledCheckout:
    state: ReturnState
    pending: PendingSignup | None
    checkout_session_id: str | None = None


def canceled_checkout(pending_signup_id: uuid.UUID | str | None, stripe: StripeReads) -> CanceledCheckout:
    """The state of the signup (and its checkout) this browser started, as the cancel link finds it."""
    pending = SignupService.pending_signup(pending_signup_id)
    if pending is None:
        return CanceledCheckout(ReturnState.OPEN, None)
    if pending.status == SignupStatus.COMPLETED:
        return CanceledCheckout(ReturnState.PROVISIONED, pending, pending.checkout_session_id)
    session_id = pending.checkout_session_id
    if not session_id or not session_id.startswith("cs_"):
        return CanceledCheckout(ReturnState.OPEN, pending)
    db.session.commit()  # no transaction is held while Stripe answers
    try:
        session = stripe.retrieve_checkout_session(session_id, expand_subscription=False)
    except BillingError:
        return CanceledCheckout(ReturnState.UNKNOWN, pending, session_id)
    if session.get("status") == "complete":
        return CanceledCheckout(ReturnState.PAID, pending, session_id)
    return CanceledCheckout(ReturnState.OPEN, pending, session_id)
