"""What the domain modules share (load, emit, Origin, metadata merging, the hosted pages' test
cards, timed jobs), and seeding the catalogue, cancelling subscriptions, portal sessions. It
imports no other domain module: they all build on it.

Every function here expects to run inside one Store.transaction() opened by its caller (an API
request, a hosted page or the worker), so an operation and the events it emits commit together.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import objects, simtime
from .errors import StripeError, no_such
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
    outcome: str  # succeeds | declined | async_succeeds | async_fails | charge_fails | authenticates
    description: str


SANDBOX_CARDS = (
    SandboxCard("4242424242424242", "succeeds", "Succeeds."),
    SandboxCard("4000000000000002", "declined", "Is declined."),
    SandboxCard("4000000000003220", "async_succeeds", "Settles later and succeeds."),
    SandboxCard("4000008400001629", "async_fails", "Settles later and fails."),
    SandboxCard("4000000000000341", "charge_fails", "Attaches; every charge fails."),
    SandboxCard(
        "4000002760003184",
        "authenticates",
        "Asks for 3-D Secure: succeeds on a hosted page; charges made without you wait for you.",
    ),
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


def seed_catalogue(store: Store, path: Path, tax_behavior: str = "exclusive") -> list[Obj]:
    """One active monthly USD price (and product) per lookup key in the plan catalogue, plus a
    yearly price on the same product for an entry with a `yearly_lookup_key`, each with the
    `tax_behavior` given (SANDBOX_PRICE_TAX_BEHAVIOR, by default PRICES_SHOWN_WITH_TAX or exclusive).

    Re-running is a no-op unless the file changed: a new name is applied in place, a new amount
    gets a new price that takes over the lookup key (Stripe prices are immutable)."""
    with path.open("rb") as file:
        catalogue = tomllib.load(file)
    seeded = []
    for section in ("tiers", "addons"):
        for key, entry in catalogue.get(section, {}).items():
            if "lookup_key" not in entry:
                if section == "tiers":
                    continue  # a free tier: nothing is sold, so Stripe has no price for it
                raise ValueError(f"[{section}.{key}] has no lookup_key")
            role = "tier" if section == "tiers" else "addon"
            amount = int(entry.get("sandbox_unit_amount", 1000))
            monthly = _seed_price(store, entry, str(entry["lookup_key"]), amount, "month", role, None, tax_behavior)
            seeded.append(monthly)
            if "yearly_lookup_key" in entry:
                yearly_amount = int(entry.get("sandbox_yearly_unit_amount", 10 * amount))
                seeded.append(
                    _seed_price(
                        store,
                        entry,
                        str(entry["yearly_lookup_key"]),
                        yearly_amount,
                        "year",
                        role,
                        monthly["product"],
                        tax_behavior,
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
    tax_behavior: str = "exclusive",
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
    wanted = (amount, interval, tax_behavior)
    if current and (current["unit_amount"], current["recurring"]["interval"], current["tax_behavior"]) != wanted:
        store.put({**current, "active": False, "lookup_key": None})
        current = None
    price = current or objects.price(product["id"], lookup_key, name, amount, now, tax_behavior)
    price["recurring"]["interval"] = interval
    price["nickname"] = name
    price["_catalogue"] = {"role": role, "interval": interval}  # for the portal's plan switcher
    if interval == "month" or product["default_price"] is None:
        product["default_price"] = price["id"]
    store.put(product)
    store.put(price)
    return price


# -- timed jobs -------------------------------------------------------------------------------

# Timed jobs that other modules own (checkout.py, clock.py, schedules.py), registered when they
# are imported (this module cannot import them: they build on it; app.py imports them all):
# kind -> handler(store, ref, now).
JOB_HANDLERS: dict[str, Callable[[Store, str, int], None]] = {}


def run_job(store: Store, kind: str, ref: str, now: int) -> None:
    """A timed transition scheduled earlier; each is a no-op if the state moved on meanwhile."""
    if kind in JOB_HANDLERS:
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
