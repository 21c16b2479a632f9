"""More of /v1: subscription changes, invoice previews, schedules, prices, refunds and lists.

Registered on v1.bp by @endpoint when this module is imported (app.py imports it); each
function parses and validates its parameters with Stripe's errors and calls a domain module.
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any

from . import changes, lists, prices, refunds, schedules, tax
from .context import current_store
from .errors import StripeError, exclusive
from .objects import Obj
from .params import (
    Params,
    array,
    boolean,
    integer,
    mapping,
    metadata,
    new_metadata,
    reject_unknown,
    required_integer,
    required_string,
    string,
)
from .v1 import _cancellation_details, _origin, _retrieve, endpoint


def _choice(params: Params, key: str, choices: tuple[str, ...], path: str = "") -> str | None:
    value = string(params, key, path)
    name = f"{path}[{key}]" if path else key
    if value is not None and value not in choices:
        raise StripeError(f"Invalid {name}: must be one of {', '.join(choices)}", param=name)
    return value


def _item_changes(params: Params, key: str = "items", path: str = "") -> list[changes.ItemChange] | None:
    entries = array(params, key, path)
    if entries is None:
        return None
    base = f"{path}[{key}]" if path else key
    parsed = []
    for index, entry in enumerate(entries):
        where = f"{base}[{index}]"
        if not isinstance(entry, dict):
            raise StripeError("Invalid object", param=where)
        reject_unknown(entry, ("id", "price", "quantity", "deleted"), where)
        parsed.append(
            changes.ItemChange(
                index=index,
                id=string(entry, "id", where),
                price=string(entry, "price", where),
                quantity=integer(entry, "quantity", where, minimum=0),
                deleted=bool(boolean(entry, "deleted", where)),
            )
        )
    return parsed


def _timestamp_or_clear(params: Params, key: str, path: str = "") -> Any:
    """An integer timestamp, None for "" (clear it), or changes.UNSET when absent."""
    if key not in params:
        return changes.UNSET
    if params[key] == "":
        return None
    return integer(params, key, path)


@endpoint("/subscriptions/<subscription_id>", "POST")
def update_subscription(params: Params, subscription_id: str) -> Obj:
    reject_unknown(
        params,
        (
            "items",
            "proration_behavior",
            "proration_date",
            "payment_behavior",
            "cancel_at",
            "cancel_at_period_end",
            "pause_collection",
            "default_payment_method",
            "metadata",
            "cancellation_details",
            "trial_end",
            "discounts",
            "automatic_tax",
        ),
    )
    pause: Any = changes.UNSET
    if "pause_collection" in params:
        raw = mapping(params, "pause_collection")
        if raw:
            reject_unknown(raw, ("behavior", "resumes_at"), "pause_collection")
            pause = {
                "behavior": string(raw, "behavior", "pause_collection", required=True),
                "resumes_at": integer(raw, "resumes_at", "pause_collection"),
            }
        else:
            pause = None
    default_pm: Any = changes.UNSET
    if "default_payment_method" in params:
        default_pm = string(params, "default_payment_method")
    update = changes.SubscriptionUpdate(
        items=_item_changes(params),
        proration_behavior=_choice(params, "proration_behavior", changes.PRORATION_BEHAVIORS),
        proration_date=integer(params, "proration_date"),
        payment_behavior=_choice(params, "payment_behavior", changes.PAYMENT_BEHAVIORS),
        cancel_at=_timestamp_or_clear(params, "cancel_at"),
        cancel_at_period_end=boolean(params, "cancel_at_period_end"),
        pause_collection=pause,
        default_payment_method=default_pm,
        metadata=metadata(params),
        cancellation_details=_cancellation_details(params),
        trial_end=integer(params, "trial_end"),
        discounts=array(params, "discounts"),
        automatic_tax=_automatic_tax(params),
        given=set(params),
    )
    return changes.update_subscription(current_store(), subscription_id, update, _origin())


def _automatic_tax(params: Params) -> bool | None:
    """automatic_tax[enabled] (Stripe Tax, sandbox/tax.py), or None when not given."""
    given = mapping(params, "automatic_tax")
    if given is None:
        return None
    reject_unknown(given, ("enabled", "liability"), "automatic_tax")
    enabled = boolean(given, "enabled", "automatic_tax")
    if enabled is None:
        raise StripeError("Missing required param: automatic_tax[enabled].", param="automatic_tax[enabled]")
    return enabled


@endpoint("/invoices/create_preview", "POST")
def create_preview(params: Params) -> Obj:
    automatic_tax = _automatic_tax(params)
    params.pop("automatic_tax", None)
    invoice = _create_preview(params)
    if automatic_tax is not None and automatic_tax != invoice["automatic_tax"]["enabled"]:
        tax.retax(current_store(), invoice, automatic_tax)
    if invoice["automatic_tax"]["enabled"]:
        tax.require_tax_behavior(current_store(), tax.line_price_ids(invoice))
    return invoice


def _create_preview(params: Params) -> Obj:
    reject_unknown(
        params, ("customer", "subscription", "subscription_details", "schedule", "schedule_details", "discounts")
    )
    if "schedule" in params or "schedule_details" in params:
        # A schedule's next invoice: the renewal with the items of the phase in effect then.
        for other in ("subscription", "subscription_details"):
            if other in params:
                raise StripeError(
                    f"You cannot preview the upcoming invoice for a schedule and pass `{other}`.", param=other
                )
        details = mapping(params, "schedule_details") or {}
        reject_unknown(details, ("phases", "end_behavior", "proration_behavior"), "schedule_details")
        _choice(details, "proration_behavior", changes.PRORATION_BEHAVIORS, "schedule_details")
        schedule_id = string(params, "schedule")
        if schedule_id is None:
            raise StripeError(
                "The sandbox previews existing schedules: pass schedule (with schedule_details to preview new phases).",
                code="parameter_missing",
                param="schedule",
            )
        return schedules.preview_invoice(
            current_store(),
            schedule_id,
            customer_id=string(params, "customer"),
            phases=_phase_inputs(details, "schedule_details"),
            end_behavior=_choice(details, "end_behavior", schedules.END_BEHAVIORS, "schedule_details"),
        )
    details = mapping(params, "subscription_details") or {}
    path = "subscription_details"
    reject_unknown(details, ("items", "proration_date", "proration_behavior", "cancel_at_period_end"), path)
    return changes.preview_invoice(
        current_store(),
        customer_id=string(params, "customer"),
        subscription_id=string(params, "subscription"),
        items=_item_changes(details, "items", path),
        proration_date=integer(details, "proration_date", path),
        proration_behavior=_choice(details, "proration_behavior", changes.PRORATION_BEHAVIORS, path),
        cancel_at_period_end=boolean(details, "cancel_at_period_end", path),
        discount_entries=array(params, "discounts"),
    )


# -- subscription schedules -----------------------------------------------------------------------


@endpoint("/subscription_schedules", "POST")
def create_subscription_schedule(params: Params) -> Obj:
    reject_unknown(params, ("from_subscription",))
    subscription = string(params, "from_subscription")
    if subscription is None:
        raise StripeError(
            "The sandbox creates schedules from an existing subscription: pass from_subscription.",
            code="parameter_missing",
            param="from_subscription",
        )
    return schedules.create_from_subscription(current_store(), subscription, _origin())


@endpoint("/subscription_schedules/<schedule_id>", "GET")
def retrieve_subscription_schedule(params: Params, schedule_id: str) -> Obj:
    return _retrieve("subscription_schedule", schedule_id, params, "schedule")


@endpoint("/subscription_schedules/<schedule_id>", "POST")
def update_subscription_schedule(params: Params, schedule_id: str) -> Obj:
    reject_unknown(params, ("phases", "end_behavior", "metadata", "proration_behavior"))
    _choice(params, "proration_behavior", changes.PRORATION_BEHAVIORS)
    phases = _phase_inputs(params)
    return schedules.update_schedule(
        current_store(),
        schedule_id,
        phases=phases,
        end_behavior=_choice(params, "end_behavior", schedules.END_BEHAVIORS),
        metadata=metadata(params),
        origin=_origin(),
    )


def _phase_inputs(params: Params, prefix: str = "") -> list[schedules.PhaseInput] | None:
    """A schedule's `phases` as given (to update a schedule, or to preview one with schedule_details)."""
    raw_phases = array(params, "phases", prefix)
    if raw_phases is None:
        return None
    phases = []
    for index, raw in enumerate(raw_phases):
        path = f"{prefix}[phases][{index}]" if prefix else f"phases[{index}]"
        if not isinstance(raw, dict):
            raise StripeError("Invalid object", param=path)
        reject_unknown(raw, ("items", "start_date", "end_date"), path)
        items = []
        for j, item in enumerate(array(raw, "items", path) or []):
            where = f"{path}[items][{j}]"
            if not isinstance(item, dict):
                raise StripeError("Invalid object", param=where)
            reject_unknown(item, ("price", "quantity"), where)
            price = required_string(item, "price", where)
            items.append((price, integer(item, "quantity", where, minimum=0) or 1))
        start: int | str | None = string(raw, "start_date", path)
        if start is not None and start != "now":
            start = integer(raw, "start_date", path)
        phases.append(schedules.PhaseInput(items=items, start_date=start, end_date=integer(raw, "end_date", path)))
    return phases


@endpoint("/subscription_schedules/<schedule_id>/release", "POST")
def release_subscription_schedule(params: Params, schedule_id: str) -> Obj:
    reject_unknown(params, ("preserve_cancel_date",))
    return schedules.release(current_store(), schedule_id, _origin())


@endpoint("/subscription_schedules/<schedule_id>/cancel", "POST")
def cancel_subscription_schedule(params: Params, schedule_id: str) -> Obj:
    reject_unknown(params, ("invoice_now", "prorate"))
    return schedules.cancel(current_store(), schedule_id, _origin())


# -- prices -----------------------------------------------------------------------------------


@endpoint("/prices", "POST")
def create_price(params: Params) -> Obj:
    reject_unknown(
        params,
        (
            "currency",
            "unit_amount",
            "recurring",
            "product",
            "product_data",
            "lookup_key",
            "transfer_lookup_key",
            "nickname",
            "metadata",
            "active",
            "tax_behavior",
        ),
    )
    recurring = mapping(params, "recurring")
    interval, interval_count, usage_type, meter = None, 1, None, None
    if recurring is not None:
        reject_unknown(recurring, ("interval", "interval_count", "usage_type", "meter"), "recurring")
        interval = string(recurring, "interval", "recurring", required=True)
        interval_count = integer(recurring, "interval_count", "recurring", minimum=1) or 1
        usage_type, meter = string(recurring, "usage_type", "recurring"), string(recurring, "meter", "recurring")
    product_data = mapping(params, "product_data")
    product_name = None
    if product_data is not None:
        reject_unknown(product_data, ("name",), "product_data")
        product_name = string(product_data, "name", "product_data", required=True)
    currency = required_string(params, "currency")
    unit_amount = required_integer(params, "unit_amount", minimum=0)
    active = boolean(params, "active")
    return prices.create_price(
        current_store(),
        prices.PriceCreate(
            currency=currency,
            unit_amount=unit_amount,
            interval=interval,
            interval_count=interval_count,
            product=string(params, "product"),
            product_name=product_name,
            lookup_key=string(params, "lookup_key"),
            transfer_lookup_key=bool(boolean(params, "transfer_lookup_key")),
            nickname=string(params, "nickname"),
            metadata=new_metadata(params),
            active=True if active is None else active,
            usage_type=usage_type or "licensed",
            meter=meter,
            tax_behavior=string(params, "tax_behavior") or "unspecified",
        ),
    )


@endpoint("/prices/<price_id>", "GET")
def retrieve_price(params: Params, price_id: str) -> Obj:
    return _retrieve("price", price_id, params, "price")


@endpoint("/prices/<price_id>", "POST")
def update_price(params: Params, price_id: str) -> Obj:
    reject_unknown(params, ("active", "lookup_key", "transfer_lookup_key", "nickname", "metadata", "tax_behavior"))
    return prices.update_price(
        current_store(),
        price_id,
        active=boolean(params, "active"),
        lookup_key=string(params, "lookup_key") or "" if "lookup_key" in params else prices.UNSET,
        transfer_lookup_key=bool(boolean(params, "transfer_lookup_key")),
        nickname=string(params, "nickname") or "" if "nickname" in params else prices.UNSET,
        metadata=metadata(params),
        tax_behavior=string(params, "tax_behavior"),
    )


# -- refunds ---------------------------------------------------------


@endpoint("/refunds", "POST")
def create_refund(params: Params) -> Obj:
    reject_unknown(params, ("payment_intent", "charge", "amount", "reason", "metadata"))
    return refunds.create_refund(
        current_store(),
        payment_intent=string(params, "payment_intent"),
        charge=string(params, "charge"),
        amount=integer(params, "amount", minimum=1),
        reason=string(params, "reason"),
        metadata=new_metadata(params),
        origin=_origin(),
    )


@endpoint("/refunds/<refund_id>", "GET")
def retrieve_refund(params: Params, refund_id: str) -> Obj:
    return _retrieve("refund", refund_id, params, "refund")


@endpoint("/refunds", "GET")
def list_refunds(params: Params) -> Obj:
    reject_unknown(params, ("payment_intent", "charge", "created", "limit", "starting_after", "ending_before"))
    wanted = {"payment_intent": string(params, "payment_intent"), "charge": string(params, "charge")}
    created = lists.created_filter(params)
    return lists.listing(
        current_store(), "refund", "/v1/refunds", params, lambda r: lists.matches(r, **wanted) and created(r)
    )


@endpoint("/payment_intents/<intent_id>", "GET")
def retrieve_payment_intent(params: Params, intent_id: str) -> Obj:
    return _retrieve("payment_intent", intent_id, params, "intent")


@endpoint("/charges/<charge_id>", "GET")
def retrieve_charge(params: Params, charge_id: str) -> Obj:
    return _retrieve("charge", charge_id, params, "charge")


@endpoint("/charges", "GET")
def list_charges(params: Params) -> Obj:
    reject_unknown(params, ("customer", "payment_intent", "created", "limit", "starting_after", "ending_before"))
    wanted = {"customer": string(params, "customer"), "payment_intent": string(params, "payment_intent")}
    created = lists.created_filter(params)
    return lists.listing(
        current_store(), "charge", "/v1/charges", params, lambda c: lists.matches(c, **wanted) and created(c)
    )


# -- lists ----------------------------------------------------------------------------------------

EVENT_RETENTION_SECONDS = 30 * 86400  # GET /v1/events only returns the last 30 days
SUBSCRIPTION_STATUSES = (
    "active",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "trialing",
    "paused",
    "all",
    "ended",
)
PAGING = ("limit", "starting_after", "ending_before")


@endpoint("/events", "GET")
def list_events(params: Params) -> Obj:
    reject_unknown(params, ("type", "types", "created", "delivery_success", *PAGING))
    one_type = string(params, "type")
    types = [str(t) for t in array(params, "types") or []]
    if one_type and types:
        raise exclusive("type", "types", "types")
    delivery_success = boolean(params, "delivery_success")
    created = lists.created_filter(params)
    store = current_store()
    states = store.delivery_states() if delivery_success is not None else {}
    oldest = int(time.time()) - EVENT_RETENTION_SECONDS

    def wanted(event: Obj) -> bool:
        if event["created"] < oldest or not created(event):
            return False
        if one_type and not fnmatch.fnmatchcase(event["type"], one_type):  # Stripe allows "invoice.*"
            return False
        if types and event["type"] not in types:
            return False
        if delivery_success is not None:
            return (states.get(event["id"]) == "delivered") == delivery_success
        return True

    return lists.listing(store, "event", "/v1/events", params, wanted)


@endpoint("/subscriptions", "GET")
def list_subscriptions(params: Params) -> Obj:
    reject_unknown(params, ("customer", "price", "status", "created", *PAGING))
    status = _choice(params, "status", SUBSCRIPTION_STATUSES)
    price = string(params, "price")
    customer = string(params, "customer")
    created = lists.created_filter(params)

    def wanted(sub: Obj) -> bool:
        if status is None and sub["status"] == "canceled":
            return False  # by default, Stripe leaves out canceled subscriptions
        if status == "ended" and sub["status"] not in ("canceled", "incomplete_expired"):
            return False
        if status not in (None, "all", "ended") and sub["status"] != status:
            return False
        if price and all(item["price"]["id"] != price for item in sub["items"]["data"]):
            return False
        return lists.matches(sub, customer=customer) and created(sub)

    return lists.listing(current_store(), "subscription", "/v1/subscriptions", params, wanted)


@endpoint("/checkout/sessions", "GET")
def list_checkout_sessions(params: Params) -> Obj:
    reject_unknown(params, ("customer", "subscription", "status", "created", *PAGING))
    wanted = {
        "customer": string(params, "customer"),
        "subscription": string(params, "subscription"),
        "status": _choice(params, "status", ("open", "complete", "expired")),
    }
    created = lists.created_filter(params)
    return lists.listing(
        current_store(),
        "checkout.session",
        "/v1/checkout/sessions",
        params,
        lambda s: lists.matches(s, **wanted) and created(s),
    )


@endpoint("/customers", "GET")
def list_customers(params: Params) -> Obj:
    reject_unknown(params, ("email", "created", *PAGING))
    email = string(params, "email")
    created = lists.created_filter(params)
    return lists.listing(
        current_store(), "customer", "/v1/customers", params, lambda c: lists.matches(c, email=email) and created(c)
    )


@endpoint("/subscription_schedules", "GET")
def list_subscription_schedules(params: Params) -> Obj:
    reject_unknown(params, ("customer", "created", *PAGING))
    customer = string(params, "customer")
    created = lists.created_filter(params)
    return lists.listing(
        current_store(),
        "subscription_schedule",
        "/v1/subscription_schedules",
        params,
        lambda s: lists.matches(s, customer=customer) and created(s),
    )
