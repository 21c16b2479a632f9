"""What the domain modules share (load, emit, Origin, metadata merging, timed jobs), and seeding
the catalogue, Checkout and its asynchronous settlement, cancelling subscriptions, portal sessions.

Every function here expects to run inside one Store.transaction() opened by its caller (an API
request, a hosted page or the worker), so an operation and the events it emits commit together.
"""

from __future__ import annotations

import copy
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import invoicing, objects, simtime
from .errors import StripeError, exclusive, inactive_price, no_such
from .objects import Obj
from .store import Store

ENDED = ("canceled", "incomplete_expired")
FEEDBACK = (
    "customer_service",
    "low_quality",
    "missing_features",
    "other",
    "switched_service",
    "too_complex",
    "too_expensive",
    "unused",
)


@dataclass(frozen=True)
class Origin:
    """The API request behind an event (its `request` field); the default means automatic."""

    request_id: str | None = None
    idempotency_key: str | None = None


AUTOMATIC = Origin()


@dataclass(frozen=True)
class SandboxCard:
    number: str
    outcome: str  # succeeds | declined | async_succeeds | async_fails | charge_fails
    description: str


SANDBOX_CARDS = (
    SandboxCard("4242424242424242", "succeeds", "Succeeds."),
    SandboxCard("4000000000000002", "declined", "Is declined."),
    SandboxCard("4000000000003220", "async_succeeds", "Settles later and succeeds."),
    SandboxCard("4000008400001629", "async_fails", "Settles later and fails."),
    SandboxCard("4000000000000341", "charge_fails", "Attaches; every charge fails."),
)


UNKNOWN_CARD = "This sandbox only accepts the test cards listed above."


def sandbox_card(number: str) -> SandboxCard | None:
    """The test card with this number (digits only), or None for any other number."""
    return next((c for c in SANDBOX_CARDS if c.number == number), None)


class PaymentError(Exception):
    """A payment a hosted page refuses; the message is shown to the customer."""


def emit(
    store: Store,
    type: str,
    obj: Obj,
    previous: Obj | None = None,
    origin: Origin = AUTOMATIC,
) -> None:
    event = objects.event(type, obj, previous, origin.request_id, origin.idempotency_key, simtime.now())
    store.put(event)
    store.enqueue_delivery(event["id"], time.time())


def load(store: Store, kind: str, object_id: str, param: str = "id", status: int = 404) -> Obj:
    obj = store.get(object_id)
    if obj is None or obj["object"] != kind:
        raise no_such(kind, object_id, param, status)
    return obj


def merge_metadata(obj: Obj, given: dict[str, str] | None) -> None:
    """An update's `metadata`, as Stripe applies it: merged key by key, a "" value removes its
    key, and `metadata=""` (given as {}) clears it all."""
    if given is not None:
        merged = {**obj["metadata"], **given} if given else {}
        obj["metadata"] = {k: v for k, v in merged.items() if v != ""}


# -- catalogue ------------------------------------------------------------------------------


def seed_catalogue(store: Store, path: Path) -> list[Obj]:
    """One active monthly USD price (and product) per lookup key in the plan catalogue, plus a
    yearly price on the same product for an entry with a `yearly_lookup_key`.

    Re-running is a no-op unless the file changed: a new name is applied in place, a new amount
    gets a new price that takes over the lookup key (Stripe prices are immutable)."""
    with path.open("rb") as file:
        catalogue = tomllib.load(file)
    seeded = []
    for section in ("tiers", "addons"):
        for key, entry in catalogue.get(section, {}).items():
            if "lookup_key" not in entry:
                raise ValueError(f"[{section}.{key}] has no lookup_key")
            role = "tier" if section == "tiers" else "addon"
            amount = int(entry.get("sandbox_unit_amount", 1000))
            monthly = _seed_price(store, entry, str(entry["lookup_key"]), amount, "month", role, None)
            seeded.append(monthly)
            if "yearly_lookup_key" in entry:
                yearly_amount = int(entry.get("sandbox_yearly_unit_amount", 10 * amount))
                seeded.append(
                    _seed_price(
                        store, entry, str(entry["yearly_lookup_key"]), yearly_amount, "year", role, monthly["product"]
                    )
                )
    return seeded


def _seed_price(
    store: Store,
    entry: dict[str, Any],
    lookup_key: str,
    amount: int,
    interval: str,
    role: str,
    product_id: str | None,
) -> Obj:
    name = str(entry.get("name", lookup_key))
    description = str(entry["description"]) if "description" in entry else None
    now = simtime.now()
    current = next((p for p in store.all("price") if p["lookup_key"] == lookup_key), None)
    if product_id is None and current:
        product_id = current["product"]
    product = store.get(product_id) if product_id else objects.product(name, description, now)
    assert product is not None
    if (product["name"], product["description"]) != (name, description):
        product.update(name=name, description=description, updated=now)
    if current and (current["unit_amount"], current["recurring"]["interval"]) != (amount, interval):
        store.put({**current, "active": False, "lookup_key": None})
        current = None
    price = current or objects.price(product["id"], lookup_key, name, amount, now)
    price["recurring"]["interval"] = interval
    price["nickname"] = name
    price["_catalogue"] = {"role": role, "interval": interval}  # for the portal's plan switcher
    if interval == "month" or product["default_price"] is None:
        product["default_price"] = price["id"]
    store.put(product)
    store.put(price)
    return price


# -- Checkout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckoutRequest:
    line_items: list[tuple[str, int]]  # (price id, quantity)
    success_url: str | None
    cancel_url: str | None
    customer: str | None
    customer_email: str | None
    client_reference_id: str | None
    metadata: dict[str, str]
    subscription_metadata: dict[str, str]
    trial_period_days: int | None
    expires_at: int | None
    allow_promotion_codes: bool | None
    payment_method_collection: str = "always"
    missing_payment_method: str | None = None  # subscription_data[trial_settings][end_behavior]


def create_checkout_session(store: Store, req: CheckoutRequest, public_url: str) -> Obj:
    now = simtime.now()
    if req.customer and req.customer_email:
        raise exclusive("customer", "customer_email", "customer_email")
    if req.customer:
        load(store, "customer", req.customer, "customer", 400)
    if req.expires_at is not None and not now + 1800 <= req.expires_at <= now + 86400:
        too_soon = req.expires_at < now + 1800
        raise StripeError(
            "The `expires_at` timestamp must be "
            + ("at least 30 minutes" if too_soon else "less than 24 hours")
            + " from Checkout Session creation.",
            param="expires_at",
        )
    items = []
    for index, (price_id, quantity) in enumerate(req.line_items):
        param = f"line_items[{index}][price]"
        price = load(store, "price", price_id, param, 400)
        if not price["active"]:
            raise inactive_price(param)
        items.append(objects.checkout_line_item(price, quantity))
    session = objects.checkout_session(
        line_items=items,
        # With a free trial nothing is due today.
        amount_total=0 if req.trial_period_days else sum(i["amount_total"] for i in items),
        success_url=req.success_url,
        cancel_url=req.cancel_url,
        customer=req.customer,
        customer_email=req.customer_email,
        client_reference_id=req.client_reference_id,
        metadata=req.metadata,
        subscription_metadata=req.subscription_metadata,
        trial_period_days=req.trial_period_days,
        missing_payment_method=req.missing_payment_method,
        payment_method_collection=req.payment_method_collection,
        allow_promotion_codes=req.allow_promotion_codes,
        expires_at=req.expires_at or now + 86400,
        public_url=public_url,
        now=now,
    )
    store.put(session)
    store.add_job("expire_session", session["id"], session["expires_at"])
    return session


def get_checkout_session(store: Store, session_id: str) -> Obj:
    session = load(store, "checkout.session", session_id, "session")
    return _expire_if_due(store, session, simtime.now())


def _expire_if_due(store: Store, session: Obj, now: int) -> Obj:
    # Expiry is applied lazily on read as well as by the worker, so nobody sees a stale "open".
    if session["status"] == "open" and session["expires_at"] <= now:
        return _expire(store, session, AUTOMATIC)
    return session


def _expire(store: Store, session: Obj, origin: Origin) -> Obj:
    session.update(status="expired", url=None)
    store.put(session)
    emit(store, "checkout.session.expired", session, origin=origin)
    return session


def expire_checkout_session(store: Store, session_id: str, origin: Origin) -> Obj:
    session = get_checkout_session(store, session_id)
    if session["status"] != "open":
        raise StripeError(
            'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout'
            f" Session has a status of `{session['status']}`."
        )
    return _expire(store, session, origin)


def pay_checkout_session(
    store: Store,
    session_id: str,
    *,
    card_number: str,
    email: str,
    name: str,
    async_delay: float,
    card_expiry: tuple[int, int] = (12, 2034),
) -> Obj:
    """Complete a Session with a sandbox card: create the customer, its payment method, the
    subscription and invoice, emit the events Stripe emits, and schedule the settlement of an
    asynchronous payment. card_number may be empty for a trial Session whose
    payment_method_collection is if_required. A customer on a test clock gets everything at
    the clock's frozen time."""
    session = get_checkout_session(store, session_id)
    if session["status"] != "open":
        raise PaymentError(f"This Checkout Session is {session['status']}; it can no longer be paid.")
    trial_days = session["_subscription_data"]["trial_period_days"]
    card = sandbox_card(card_number)
    if card is None and not (card_number == "" and card_optional(session)):
        raise PaymentError(UNKNOWN_CARD)
    if card and (card.outcome == "declined" or (card.outcome == "charge_fails" and not trial_days)):
        raise PaymentError(invoicing.DECLINED)
    with simtime.time_of(store, session["customer"]):
        return _complete_checkout(store, session, card, email, name, async_delay, card_expiry)


def card_optional(session: Obj) -> bool:
    """A trial Session with payment_method_collection=if_required can complete without a card."""
    return bool(session["_subscription_data"]["trial_period_days"]) and (
        session["payment_method_collection"] == "if_required"
    )


def _complete_checkout(
    store: Store,
    session: Obj,
    card: SandboxCard | None,
    email: str,
    name: str,
    async_delay: float,
    card_expiry: tuple[int, int],
) -> Obj:
    now = simtime.now()
    sub_data = session["_subscription_data"]
    trial_days = sub_data["trial_period_days"]
    settles_later = card is not None and card.outcome.startswith("async") and not trial_days

    customer = store.get(session["customer"]) if session["customer"] else objects.customer(email, name, now)
    assert customer is not None
    method = None
    if card is not None:
        method = invoicing.create_payment_method(
            store,
            card.number,
            customer_id=customer["id"],
            name=name,
            email=email,
            exp_month=card_expiry[0],
            exp_year=card_expiry[1],
        )
        if customer["invoice_settings"]["default_payment_method"] is None:
            customer["invoice_settings"]["default_payment_method"] = method["id"]
    subscription = objects.subscription(
        customer_id=customer["id"],
        line_items=session["line_items"]["data"],
        metadata=sub_data["metadata"],
        trial_days=trial_days,
        status="trialing" if trial_days else "incomplete" if settles_later else "active",
        now=now,
    )
    subscription.update(
        test_clock=customer.get("test_clock"),
        default_payment_method=method["id"] if method else None,
    )
    if sub_data.get("missing_payment_method"):
        subscription["trial_settings"]["end_behavior"]["missing_payment_method"] = sub_data["missing_payment_method"]
    invoice = objects.invoice(customer, subscription, now)
    invoicing.decorate(invoice, customer, subscription)
    customer["next_invoice_sequence"] += 1
    subscription["latest_invoice"] = invoice["id"]
    if not settles_later:
        paid = invoicing.charge(store, invoice, method)
        assert paid, "cards whose charges fail are refused above"
    session.update(
        status="complete",
        payment_status=("no_payment_required" if trial_days else "unpaid" if settles_later else "paid"),
        customer=customer["id"],
        subscription=subscription["id"],
        customer_details=objects.customer_details(email, name),
        url=None,
    )
    for obj in (customer, subscription, invoice, session):
        store.put(obj)

    emit(store, "customer.subscription.created", subscription)
    if not settles_later:
        emit(store, "invoice.paid", invoice)
    emit(store, "checkout.session.completed", session)
    if settles_later and card is not None:  # (settles_later implies a card)
        store.add_job(f"settle_{card.outcome}", session["id"], time.time() + async_delay)
    return session


def _settle(store: Store, session_id: str, succeeded: bool) -> None:
    session = load(store, "checkout.session", session_id)
    if session["payment_status"] != "unpaid":
        return
    subscription = load(store, "subscription", session["subscription"])
    invoice = load(store, "invoice", subscription["latest_invoice"])
    before = copy.deepcopy(subscription)
    now = simtime.now()
    if succeeded:
        session["payment_status"] = "paid"
        store.put(session)
        emit(store, "checkout.session.async_payment_succeeded", session)
        customer = load(store, "customer", invoice["customer"])
        invoicing.charge(store, invoice, invoicing.default_payment_method(store, subscription, customer))
        store.put(invoice)
        emit(store, "invoice.paid", invoice)
    else:
        emit(store, "checkout.session.async_payment_failed", session)
        invoice.update(attempt_count=1, attempted=True)
        store.put(invoice)
        emit(store, "invoice.payment_failed", invoice)
    if subscription["status"] == "incomplete":  # unless it was canceled meanwhile
        if succeeded:
            subscription["status"] = "active"
        else:
            subscription.update(status="incomplete_expired", ended_at=now)
        store.put(subscription)
        emit(
            store,
            "customer.subscription.updated",
            subscription,
            objects.previous_attributes(before, subscription),
        )


# Timed jobs that other modules own (clock.py, schedules.py), registered when they are imported
# (this module cannot import them: they build on it): kind -> handler(store, ref, now).
JOB_HANDLERS: dict[str, Callable[[Store, str, int], None]] = {}


def run_job(store: Store, kind: str, ref: str, now: int) -> None:
    """A timed transition scheduled earlier; each is a no-op if the state moved on meanwhile."""
    if kind == "expire_session":
        _expire_if_due(store, load(store, "checkout.session", ref), now)
    elif kind in ("settle_async_succeeds", "settle_async_fails"):
        _settle(store, ref, succeeded=kind == "settle_async_succeeds")
    elif kind in JOB_HANDLERS:
        JOB_HANDLERS[kind](store, ref, now)
    else:
        raise ValueError(f"unknown job kind {kind!r}")


# -- subscriptions ----------------------------------------------------------------------------


def apply_cancellation_details(subscription: Obj, details: dict[str, str] | None) -> None:
    if not details:
        return
    feedback = details.get("feedback")
    if feedback and feedback not in FEEDBACK:
        raise StripeError(
            f"Invalid cancellation_details[feedback]: must be one of {', '.join(FEEDBACK)}",
            param="cancellation_details[feedback]",
        )
    for key in ("comment", "feedback"):
        if key in details:
            subscription["cancellation_details"][key] = details[key] or None


def update_subscription(
    store: Store,
    subscription_id: str,
    *,
    cancel_at_period_end: bool | None = None,
    metadata: dict[str, str] | None = None,
    cancellation_details: dict[str, str] | None = None,
    origin: Origin = AUTOMATIC,
) -> Obj:
    """The simple updates; changes.update_subscription() is the whole of POST /v1/subscriptions/:id."""
    from . import changes  # noqa: PLC0415 (changes builds on this module)

    given = {
        name
        for name, value in (
            ("cancel_at_period_end", cancel_at_period_end),
            ("metadata", metadata),
            ("cancellation_details", cancellation_details),
        )
        if value is not None
    }
    update = changes.SubscriptionUpdate(
        cancel_at_period_end=cancel_at_period_end,
        metadata=metadata,
        cancellation_details=cancellation_details,
        given=given,
    )
    return changes.update_subscription(store, subscription_id, update, origin)


def cancel_subscription(
    store: Store,
    subscription_id: str,
    *,
    cancellation_details: dict[str, str] | None = None,
    origin: Origin = AUTOMATIC,
) -> Obj:
    subscription = load(store, "subscription", subscription_id)
    if subscription["status"] in ENDED:
        # Stripe treats an ended subscription as gone for this call (but still lets you read it).
        raise no_such("subscription", subscription_id, "id")
    now = simtime.now()
    apply_cancellation_details(subscription, cancellation_details)
    subscription.update(status="canceled", canceled_at=now, ended_at=now)
    subscription["cancellation_details"]["reason"] = "cancellation_requested"
    store.put(subscription)
    emit(store, "customer.subscription.deleted", subscription, origin=origin)
    return subscription


def customer_subscriptions(store: Store, customer_id: str) -> list[Obj]:
    return [s for s in reversed(store.all("subscription")) if s["customer"] == customer_id]


# -- customer portal --------------------------------------------------------------------------


def create_portal_session(store: Store, customer_id: str, return_url: str | None, public_url: str) -> Obj:
    load(store, "customer", customer_id, "customer", 400)
    session = objects.portal_session(customer_id, return_url, public_url, simtime.now())
    store.put(session)
    return session
