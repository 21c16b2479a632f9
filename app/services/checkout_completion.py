"""A paid checkout's return to the app (the success URLs): the session id checked, the checkout
provisioned (or found provisioned) with no transaction held while the provider is asked, and a
checkout no organization may keep (a signup whose email already has an account, a resubscription
paid beside a live subscription) canceled and refunded before the page answers, so it can say what
happened. The provider is reached through the CheckoutCompletions BillingService implements."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from app.extensions import db
from app.services.billing_common import (
    CHECKOUT_SESSION_ID,
    CheckoutSessionNotFound,
    PaymentProviderUnavailable,
    committed,
)
from app.services.signup_service import ProvisionOutcome, ProvisionState


class CheckoutCompletions(Protocol):
    def retrieve_checkout_session(self, session_id: str, *, expand_subscription: bool) -> dict[str, Any]: ...

    def _provision_checkout_session(
        self, session: str | Mapping[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome: ...

    def settle_signup_conflict(self, pending_signup_id: uuid.UUID | str, *, source: str) -> dict[str, Any] | None: ...

    def settle_surplus_subscription(self, checkout_session_id: str, *, source: str) -> dict[str, Any] | None: ...


def check_session_id(session_id: str) -> None:
    if not CHECKOUT_SESSION_ID.match(session_id or ""):
        raise CheckoutSessionNotFound("That checkout link is not valid.")


def signup(billing: CheckoutCompletions, session_id: str) -> ProvisionOutcome:
    """A signup's checkout: provisioned, a conflict settled at once."""
    check_session_id(session_id)
    db.session.rollback()  # whatever the request read: no transaction is held while Stripe is asked
    with committed():
        outcome = billing._provision_checkout_session(session_id, source="web", release_before_stripe=True)
    return settle_conflict(billing, outcome)


def settle_conflict(billing: CheckoutCompletions, outcome: ProvisionOutcome) -> ProvisionOutcome:
    """A signup that could not become an account: its payment canceled and refunded now (Stripe or Whop)."""
    if outcome.state == ProvisionState.CONFLICT and outcome.pending_signup_id is not None:
        try:
            settlement = billing.settle_signup_conflict(outcome.pending_signup_id, source="web")
        except PaymentProviderUnavailable:
            settlement = None  # the worker's consumer of signup.conflict retries it, then reconcile
        outcome = dataclasses.replace(outcome, settlement=settlement)
    return outcome


def resubscription(billing: CheckoutCompletions, organization_id: int, session_id: str) -> ProvisionOutcome:
    """An organization's resubscription: provisioned if the checkout is the organization's, a surplus settled."""
    check_session_id(session_id)
    db.session.rollback()
    checkout = billing.retrieve_checkout_session(session_id, expand_subscription=True)
    if (checkout.get("metadata") or {}).get("organization_id") != str(organization_id):
        raise CheckoutSessionNotFound("That checkout belongs to another organization.")
    with committed():
        outcome = billing._provision_checkout_session(checkout, source="web", release_before_stripe=True)
    if outcome.state == ProvisionState.SURPLUS:
        try:
            settlement = billing.settle_surplus_subscription(session_id, source="web")
        except PaymentProviderUnavailable:
            settlement = None  # the worker's consumer of organization.surplus_subscription retries it
        outcome = dataclasses.replace(outcome, settlement=settlement)
    return outcome
