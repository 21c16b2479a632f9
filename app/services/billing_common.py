"""What every billing module shares: the errors a billing operation raises, the result types the
authority returns, the protocols through which siblings reach a provider without importing its SDK,
and small helpers (one short transaction, ids, portable INSERT ... ON CONFLICT).

Nothing here imports a payment SDK or app.services.billing_service: this is the floor of the billing
modules (docs/system/SERVICES.md, "Billing modules")."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from flask import current_app
from sqlalchemy.dialects import postgresql, sqlite

from app.extensions import db
from app.models import BillingStatus, PendingSignup, StripeEventStatus
from app.services.plan_change import When
from app.services.plans import PlanCatalogue
from app.services.webhook_store import EventModel, VerifiedEvent

CHECKOUT_SESSION_ID = re.compile(r"^cs_(test|live)_[A-Za-z0-9]{1,200}$")
REQUEST_TOKEN = re.compile(r"^[0-9a-f]{32}$")
# What an event's type and API version look like (Stripe's and Whop's alike). Anything else (NUL,
# control characters, lone surrogates) could not be stored, so even a validly signed event carrying it
# is refused with a 400.
EVENT_TYPE = re.compile(r"[A-Za-z0-9_.]{1,100}")
API_VERSION_FORMAT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CANCELLABLE = frozenset(
    {BillingStatus.ACTIVE, BillingStatus.TRIALING, BillingStatus.PAST_DUE, BillingStatus.UNPAID, BillingStatus.PAUSED}
)
# Statuses in which an organization has no live subscription and may start a new one.
ENDED = frozenset({BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED})


class BillingError(Exception):
    """A billing operation failed; the message can be shown to the person who asked for it."""


class BillingConfigurationError(RuntimeError):
    """A billing setting is missing or rejected. Operators fix this; customers see a generic 503."""


class UnknownTierError(BillingError):
    pass


class PriceUnavailableError(BillingError):
    pass


class PaymentProviderUnavailable(BillingError):
    pass


class ProviderThrottled(PaymentProviderUnavailable):
    """The provider asked us to slow down (Stripe's 429, or the shared request budget is used up):
    try again after `retry_after` seconds (None: it did not say). Not a failure of what was asked."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__("Our payment provider asked us to slow down; please try again in a moment.")
        self.retry_after = retry_after


class ProviderObjectMissing(PaymentProviderUnavailable):
    """The provider answered that the object does not exist (Stripe's resource_missing, Whop's 404)."""


class CheckoutSessionNotFound(BillingError):
    pass


class SubscriptionActionNotAllowed(BillingError):
    pass


class StaleForm(SubscriptionActionNotAllowed):
    """An owner's form submitted again after the subscription moved on (the back button, a second tab):
    the provider answered it from its idempotency cache; nothing changed now."""


class StalePreview(BillingError):
    """The subscription or a price changed since the preview was made; a fresh one is offered."""


class WebhookRejected(Exception):
    """A delivery that is not a verified event; answered 400 with this short reason, never stored."""


def delivery_text(payload: bytes) -> str:
    """A delivery's body as the text its signature covers; a body that is not UTF-8 is refused."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("body is not UTF-8") from None


class UnknownWebhookProvider(LookupError):
    pass


@dataclass(frozen=True)
class ChangeOutcome:
    applied: bool  # False: an earlier submit of the same preview is still being applied
    when: When
    action_url: str | None  # the hosted invoice, when the payment needs the customer
    duplicate: bool = False
    # An upgrade whose payment did not go through: why, in the owner's words. Nothing changed; the
    # change waits at Stripe (pending_update) and is made when its invoice (action_url) is paid.
    awaiting_payment: str | None = None


# What an owner is told when a form already used is submitted again (any provider).
STALE_FORM = (
    "That form was already used, so nothing was changed now. The page shows your plan as it is; "
    "choose again if you still want to change it."
)


@dataclass(frozen=True)
class CheckoutRedirect:
    url: str
    pending_signup_id: uuid.UUID
    checkout_session_id: str


@dataclass(frozen=True)
class WebhookResult:
    status_code: int
    body: dict[str, Any]


EventOutcomes = dict[str, tuple[StripeEventStatus, str]]


class WebhookProvider(Protocol):
    """A payment provider's webhooks. Register one with BillingService.register_webhook_provider();
    handle_webhook_event verifies, stores and queues its events, and the worker applies them, all the
    events about one object together (apply_batch)."""

    name: str

    @property
    def event_model(self) -> EventModel: ...

    def authenticate(self, payload: bytes, headers: Mapping[str, str]) -> str:
        """The delivery's body as text once its signature verifies with a configured secret; raises
        WebhookRejected (UnknownWebhookProvider when the provider is switched off)."""
        ...

    def event_id(self, text: str, headers: Mapping[str, str]) -> str | None:
        """The id an authenticated delivery's event is stored under, read without reading the event
        (None when it cannot be read so): only to know a redelivery of an event already settled."""
        ...

    def parse(self, text: str, headers: Mapping[str, str]) -> VerifiedEvent:
        """An authenticated delivery read as an event; raises WebhookRejected."""
        ...

    def ignore_reason(self, event: VerifiedEvent) -> str | None: ...

    def object_key(self, event: VerifiedEvent) -> str:
        """The object the event is about ("subscription:sub_..."); raises MalformedObject."""
        ...

    def apply_batch(self, object_key: str, events: list[VerifiedEvent]) -> EventOutcomes:
        """Apply the pending events about one object, in the caller's transaction; each event's id
        maps to the status it settles with and what happened."""
        ...


class StripeReads(Protocol):
    """The Stripe reads the appliers need, implemented by BillingService (the only module that calls
    Stripe). Each is called with no transaction open and raises PaymentProviderUnavailable (or
    ProviderObjectMissing, CheckoutSessionNotFound) as BillingService translates Stripe's errors."""

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session(self, session_id: str, *, expand_subscription: bool) -> dict[str, Any]: ...

    def retrieve_event(self, event_id: str) -> dict[str, Any]: ...

    def read_customer_tax(self, customer_id: str) -> dict[str, Any]: ...

    def update_customer(self, customer_id: str, fields: Mapping[str, Any], *, key: str) -> None: ...


class WhopReads(Protocol):
    """Whop's read the appliers need, implemented by the Whop adapter BillingService holds."""

    def retrieve_membership(self, membership_id: str) -> dict[str, Any]: ...


def plan_catalogue() -> PlanCatalogue:
    catalogue: PlanCatalogue = current_app.extensions["plan_catalogue"]
    return catalogue


@contextmanager
def committed() -> Iterator[None]:
    """The block's writes as one short transaction: committed when the block ends, rolled back (and
    the error raised again) when anything, even an interrupt, escapes it."""
    try:
        yield
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise


def found(pending: PendingSignup | None) -> PendingSignup:
    if pending is None:
        raise CheckoutSessionNotFound("We could not find a signup for that checkout.")
    return pending


def as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def id_of(value: Any) -> str | None:
    """An expandable Stripe field: an id, or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def portable_insert(model: Any) -> Any:
    """INSERT ... ON CONFLICT for the database in use (PostgreSQL; SQLite in a development run)."""
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    return insert(model)


def describe_failure(exc: BaseException) -> str:
    """The error and what caused it, for `flask billing events`: "PaymentProviderUnavailable: ... <-
    APIConnectionError: ..."."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 4:
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__
    return " <- ".join(parts)[:2000]


def checkout_is_paid(checkout: Mapping[str, Any]) -> bool:
    return checkout.get("status") == "complete" and checkout.get("payment_status") in ("paid", "no_payment_required")


def webhook_secrets(setting: str, what: str) -> list[str]:
    """The secrets a provider's deliveries may be signed with: the setting, comma-separated (several
    while a secret is rotated)."""
    secrets = _split_secrets(str(current_app.config.get(setting) or ""))
    if not secrets:
        raise BillingConfigurationError(f"{setting} is not set: {what} cannot be verified")
    return list(secrets)


@functools.lru_cache(maxsize=16)
def _split_secrets(value: str) -> tuple[str, ...]:
    """A comma-separated setting's secrets (read on every delivery: split once per value)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())
