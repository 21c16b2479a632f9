"""Typed reading of the Stripe objects a webhook event carries (``data.object``) and of the objects
re-read from Stripe, before anything is applied: msgspec Structs with the fields this product uses.

A signed event can still carry an object we cannot use (a missing or non-string id, a NUL character,
a wrong type). Converting it here fails with `MalformedObject`, whose message says which field and
why; the event is then stored as failed with that reason (no 500, nothing applied) and can be
replayed after a fix. Unknown fields are ignored: Stripe adds fields without notice.

Pure: no I/O, no SDK."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# Stripe ids: a prefix and letters, digits or underscores; nothing that could smuggle NUL or
# whitespace into a key, a log line or a query.
StripeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{3,255}$")]
# Any other text: PostgreSQL cannot store NUL in text or JSONB.
Text = Annotated[str, Meta(pattern=r"^[^\x00]*$", max_length=5000)]
Metadata = dict[Annotated[str, Meta(pattern=r"^[^\x00]{1,40}$")], Text]
Timestamp = Annotated[int, Meta(ge=0)]


class MalformedObject(ValueError):
    """The object cannot be read as the event type promises; the message names the field."""


class _Object(Struct, forbid_unknown_fields=False, kw_only=True):
    pass


class Expandable(_Object, kw_only=True):
    """An expandable field that came expanded: only its id matters here."""

    id: StripeId


class CheckoutSession(_Object, kw_only=True):
    id: StripeId
    object: Literal["checkout.session"] = "checkout.session"
    metadata: Metadata = {}
    client_reference_id: Text | None = None
    customer: StripeId | Expandable | None = None
    subscription: StripeId | Expandable | None = None
    status: Text | None = None
    payment_status: Text | None = None

    @property
    def purpose(self) -> str | None:
        return self.metadata.get("purpose")


class Price(_Object, kw_only=True):
    id: StripeId
    lookup_key: Text | None = None
    product: StripeId | Expandable | None = None


class SubscriptionItem(_Object, kw_only=True):
    id: StripeId
    price: Price
    # Metered items carry no quantity (null): valid, and read as 0.
    quantity: Annotated[int, Meta(ge=0)] | None = None
    current_period_start: Timestamp | None = None
    current_period_end: Timestamp | None = None


class SubscriptionItems(_Object, kw_only=True):
    data: list[SubscriptionItem] = []


class Subscription(_Object, kw_only=True):
    id: StripeId
    object: Literal["subscription"] = "subscription"
    status: Text
    customer: StripeId | Expandable | None = None
    metadata: Metadata = {}
    items: SubscriptionItems = msgspec.field(default_factory=SubscriptionItems)
    cancel_at_period_end: bool | None = None
    cancel_at: Timestamp | None = None
    canceled_at: Timestamp | None = None
    ended_at: Timestamp | None = None
    trial_end: Timestamp | None = None


class SubscriptionDetails(_Object, kw_only=True):
    subscription: StripeId | Expandable | None = None


class InvoiceParent(_Object, kw_only=True):
    subscription_details: SubscriptionDetails | None = None


class Invoice(_Object, kw_only=True):
    id: StripeId
    object: Literal["invoice"] = "invoice"
    customer: StripeId | Expandable | None = None
    subscription: StripeId | Expandable | None = None
    parent: InvoiceParent | None = None
    amount_due: int | None = None
    amount_paid: int | None = None
    currency: Text | None = None
    attempt_count: int | None = None
    next_payment_attempt: Timestamp | None = None
    hosted_invoice_url: Text | None = None


class Customer(_Object, kw_only=True):
    id: StripeId
    email: Text | None = None


class TaxIdVerification(_Object, kw_only=True):
    status: Literal["pending", "verified", "unverified", "unavailable"]


class TaxId(_Object, kw_only=True):
    id: StripeId
    object: Literal["tax_id"] = "tax_id"
    customer: StripeId | Expandable | None = None
    type: Text
    verification: TaxIdVerification | None = None


StripeObject = CheckoutSession | Subscription | Invoice | Customer | TaxId


def id_of(value: str | Expandable | None) -> str | None:
    return value.id if isinstance(value, Expandable) else value


def read(kind: type[Any], obj: Any) -> Any:
    """``obj`` (parsed JSON) as ``kind``, or MalformedObject naming what is wrong."""
    try:
        return msgspec.convert(obj, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise MalformedObject(f"malformed {kind.__name__} object: {_readable(str(exc))}") from None


def read_for_event(event_type: str, obj: Any) -> StripeObject:
    kind = OBJECT_FOR_EVENT_PREFIX.get(event_type.rsplit(".", 1)[0])
    if kind is None:
        raise MalformedObject(f"no object type is known for {event_type}")
    result: StripeObject = read(kind, obj)
    return result


def subscription_for_state(subscription: dict[str, Any]) -> dict[str, Any]:
    """A re-read subscription checked, with metered items' null quantity read as 0, for
    SubscriptionState.from_stripe (which compares quantities)."""
    read(Subscription, subscription)
    items = (subscription.get("items") or {}).get("data") or []
    return {
        **subscription,
        "items": {
            **(subscription.get("items") or {}),
            "data": [{**item, "quantity": item.get("quantity") or 0} for item in items],
        },
    }


def _readable(message: str) -> str:
    return message.replace("\x00", "\\x00")[:300]


OBJECT_FOR_EVENT_PREFIX: dict[str, type[Any]] = {
    "checkout.session": CheckoutSession,
    "customer.subscription": Subscription,
    "invoice": Invoice,
    "customer": Customer,
    "customer.tax_id": TaxId,
}
