"""Billing Meters: meters, v1 meter events (deduplicated by `identifier` for 24 hours) and meter
event summaries, as Stripe has them; and the metered prices of the plan catalogue's [meters.*].

- `GET /v1/billing/meters`, `GET /v1/billing/meters/:id`, `POST /v1/billing/meters`.
- `POST /v1/billing/meter_events`: validated synchronously (an active meter with the event_name, the
  customer in payload[stripe_customer_id], a numeric payload[value], a timestamp within the past 35
  days and at most 5 minutes ahead of the customer's time). An identifier seen in the last 24 hours
  is refused with a 400 ("An event already exists with identifier ..."), as Stripe refuses it.
- `GET /v1/billing/meters/:id/event_summaries?customer=&start_time=&end_time=[&value_grouping_window=
  hour|day]`: the aggregated value of the customer's events with start_time <= timestamp < end_time.

Registered on v1.bp by @endpoint when imported (app.py imports it); `seed` runs at start-up beside
billing.seed_catalogue.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from flask import Blueprint, Response

from . import billing, objects, simtime
from .context import current_store
from .errors import StripeError, missing
from .objects import Obj
from .params import Params, integer, mapping, reject_unknown, required_integer, required_string, string
from .store import Store
from .v1 import authenticate, endpoint

IDENTIFIER_WINDOW = 24 * 3600
OLDEST = 35 * simtime.DAY
FUTURE = 5 * 60
AGGREGATIONS = ("sum", "count", "last")
WINDOWS = {"hour": 3600, "day": simtime.DAY}


def meter(display_name: str, event_name: str, aggregation: str, now: int) -> Obj:
    return {
        "id": objects.new_id("mtr_"),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "default_aggregation": {"formula": aggregation},
        "display_name": display_name,
        "event_name": event_name,
        "event_time_window": None,
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {"event_payload_key": "value"},
    }


# -- the catalogue's meters and metered prices ------------------------------------------------------


def seed(store: Store, path: Path, tax_behavior: str = "exclusive") -> list[Obj]:
    """One meter per [meters.<key>] (by event_name) and its metered monthly price (lookup_key,
    unit_amount = sandbox_unit_amount, default 1), and with a yearly_lookup_key a metered yearly price
    on the same meter and product (sandbox_yearly_unit_amount, default the monthly one: a unit costs the
    same whichever interval bills it). Running it again changes nothing."""
    with path.open("rb") as file:
        catalogue = tomllib.load(file)
    seeded = []
    for key, entry in (catalogue.get("meters") or {}).items():
        event_name, lookup_key = entry.get("event_name"), entry.get("lookup_key")
        if not event_name or not lookup_key:
            raise ValueError(f"[meters.{key}] needs event_name and lookup_key")
        now = simtime.now()
        found = active_meter(store, str(event_name))
        if found is None:
            found = meter(str(entry.get("name", key)), str(event_name), str(entry.get("aggregation", "sum")), now)
            store.put(found)
        amount = int(entry.get("sandbox_unit_amount", 1))
        name = str(entry.get("name", key))
        price = _metered_price(store, found, str(lookup_key), name, amount, "month", None, now, tax_behavior)
        seeded.append(price)
        if entry.get("yearly_lookup_key"):
            yearly_amount = int(entry.get("sandbox_yearly_unit_amount", amount))
            yearly = str(entry["yearly_lookup_key"])
            seeded.append(
                _metered_price(store, found, yearly, name, yearly_amount, "year", price["product"], now, tax_behavior)
            )
    return seeded


def _metered_price(
    store: Store,
    found: Obj,
    lookup_key: str,
    name: str,
    amount: int,
    interval: str,
    product_id: str | None,
    now: int,
    tax_behavior: str,
) -> Obj:
    """The metered price with this lookup key, made (or remade, if its amount, meter or interval changed)."""
    price = next((p for p in store.all("price") if p["lookup_key"] == lookup_key), None)
    wanted = (amount, found["id"], interval, tax_behavior)
    if (
        price is not None
        and (
            price["unit_amount"],
            price["recurring"]["meter"],
            price["recurring"]["interval"],
            price["tax_behavior"],
        )
        != wanted
    ):
        store.put({**price, "active": False, "lookup_key": None})
        price = None
    if price is None:
        product = objects.product(name, None, now) if product_id is None else store.get(product_id)
        assert product is not None
        price = objects.price(product["id"], lookup_key, name, amount, now, tax_behavior)
        price["recurring"].update(usage_type="metered", meter=found["id"], interval=interval)
        if product.get("default_price") is None or product_id is None:
            product["default_price"] = price["id"]
        store.put(product)
        store.put(price)
    return price


def active_meter(store: Store, event_name: str) -> Obj | None:
    meters = store.all("billing.meter")
    return next((m for m in meters if m["event_name"] == event_name and m["status"] == "active"), None)


# -- meters -------------------------------------------------------------------------------------------


@endpoint("/billing/meters", "POST")
def create_meter(params: Params) -> Obj:
    reject_unknown(params, ("display_name", "event_name", "default_aggregation", "customer_mapping", "value_settings"))
    display_name = required_string(params, "display_name")
    event_name = required_string(params, "event_name")
    aggregation = mapping(params, "default_aggregation")
    if aggregation is None:
        raise missing("default_aggregation")
    formula = string(aggregation, "formula", "default_aggregation", required=True)
    if formula not in AGGREGATIONS:
        raise StripeError(
            f"Invalid default_aggregation[formula]: must be one of {', '.join(AGGREGATIONS)}",
            param="default_aggregation[formula]",
        )
    store = current_store()
    if active_meter(store, event_name) is not None:
        raise StripeError(f"An active meter with event_name '{event_name}' already exists.", param="event_name")
    created = meter(display_name, event_name, str(formula), simtime.now())
    store.put(created)
    return created


@endpoint("/billing/meters", "GET")
def list_meters(params: Params) -> Obj:
    reject_unknown(params, ("status", "limit", "starting_after", "ending_before"))
    status = string(params, "status")
    meters = [m for m in current_store().all("billing.meter") if status is None or m["status"] == status]
    return objects.list_object(meters, "/v1/billing/meters")


@endpoint("/billing/meters/<meter_id>", "GET")
def retrieve_meter(params: Params, meter_id: str) -> Obj:
    reject_unknown(params, ())
    return billing.load(current_store(), "billing.meter", meter_id, "id")


# -- meter events -------------------------------------------------------------------------------------


def _value(payload: Params) -> Decimal:
    raw = payload.get("value")
    if raw is None:
        raise StripeError("Missing required param: payload[value].", code="parameter_missing", param="payload[value]")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise StripeError(f"Invalid payload[value]: the value must be a number, not '{raw}'.", param="payload[value]")
    return value


def _identifier_key(identifier: str) -> str:
    return "mevid_" + hashlib.sha256(identifier.encode()).hexdigest()[:40]


@endpoint("/billing/meter_events", "POST")
def create_meter_event(params: Params) -> Obj:
    reject_unknown(params, ("event_name", "payload", "identifier", "timestamp"))
    event_name = required_string(params, "event_name")
    payload = mapping(params, "payload")
    if payload is None:
        raise missing("payload")
    store = current_store()
    identifier = string(params, "identifier") or objects.new_id("", 32)
    checked = check_event(store, event_name, payload, integer(params, "timestamp"), identifier)
    if seen_identifier(store, identifier):
        raise StripeError(f"An event already exists with identifier {identifier}.", param="identifier")
    event = record_event(store, checked, payload, identifier)
    return {k: v for k, v in event.items() if k != "id"}


def check_event(
    store: Store, event_name: str, payload: Params, timestamp: int | None, identifier: str
) -> tuple[Obj, str, Decimal, int]:
    """A meter event's validation, v1 and v2 alike: (meter, customer, value, timestamp) or a StripeError."""
    found = active_meter(store, event_name)
    if found is None:
        raise StripeError(f"No active meter was found with event_name '{event_name}'.", param="event_name")
    customer_id = payload.get("stripe_customer_id")
    if not isinstance(customer_id, str) or not customer_id:
        raise StripeError(
            "Missing required param: payload[stripe_customer_id].",
            code="parameter_missing",
            param="payload[stripe_customer_id]",
        )
    billing.load(store, "customer", customer_id, "payload[stripe_customer_id]", 400)
    value = _value(payload)
    with simtime.time_of(store, customer_id):
        now = simtime.now()
    timestamp = now if timestamp is None else timestamp
    if timestamp < now - OLDEST:
        raise StripeError("Timestamp must be within the past 35 calendar days.", param="timestamp")
    if timestamp > now + FUTURE:
        raise StripeError("Timestamp must not be more than 5 minutes in the future.", param="timestamp")
    if len(identifier) > 100:
        raise StripeError("Invalid identifier: must be at most 100 characters.", param="identifier")
    return found, customer_id, value, timestamp


def seen_identifier(store: Store, identifier: str) -> bool:
    """Whether a meter event (v1 or the v2 stream) had this identifier in the last 24 hours."""
    seen = store.get(_identifier_key(identifier))
    return seen is not None and seen["created"] > simtime.now() - IDENTIFIER_WINDOW


def record_event(store: Store, checked: tuple[Obj, str, Decimal, int], payload: Params, identifier: str) -> Obj:
    found, customer_id, value, timestamp = checked
    created = simtime.now()
    store.put({"id": _identifier_key(identifier), "object": "_meter_event_identifier", "created": created})
    event = {
        "id": objects.new_id("_mev_"),  # Stripe's meter events have no id: kept for the store only
        "object": "billing.meter_event",
        "created": created,
        "event_name": found["event_name"],
        "identifier": identifier,
        "livemode": False,
        "payload": {str(k): str(v) for k, v in payload.items()},
        "timestamp": timestamp,
        "_meter": found["id"],
        "_customer": customer_id,
        "_value": str(value),
    }
    store.put(event)
    return event


# -- summaries ----------------------------------------------------------------------------------------


def aggregate(store: Store, meter_obj: Obj, customer_id: str, start: int, end: int) -> float:
    """The meter's aggregation of the customer's events with start <= timestamp < end."""
    events = [
        e
        for e in store.all_where("billing.meter_event", "_customer", [customer_id])
        if e["_meter"] == meter_obj["id"] and start <= e["timestamp"] < end and not e.get("_rejected")
    ]
    formula = meter_obj["default_aggregation"]["formula"]
    if formula == "count":
        return float(len(events))
    if formula == "last":
        latest = max(events, key=lambda e: (e["timestamp"], e["created"]), default=None)
        return float(Decimal(latest["_value"])) if latest else 0.0
    return float(sum((Decimal(e["_value"]) for e in events), Decimal(0)))


@endpoint("/billing/meters/<meter_id>/event_summaries", "GET")
def list_event_summaries(params: Params, meter_id: str) -> Obj:
    allowed = ("customer", "start_time", "end_time", "value_grouping_window", "limit", "starting_after")
    reject_unknown(params, (*allowed, "ending_before"))
    store = current_store()
    meter_obj = billing.load(store, "billing.meter", meter_id, "id")
    customer_id = required_string(params, "customer")
    billing.load(store, "customer", customer_id, "customer", 400)
    start = required_integer(params, "start_time", minimum=0)
    end = required_integer(params, "end_time", minimum=0)
    if end <= start:
        raise StripeError("end_time must be after start_time.", param="end_time")
    window = string(params, "value_grouping_window")
    if window is not None and window not in WINDOWS:
        raise StripeError("Invalid value_grouping_window: must be one of hour, day", param="value_grouping_window")
    step = WINDOWS[window] if window else end - start
    summaries: list[Any] = []
    for window_start in range(start, end, step):
        window_end = min(window_start + step, end)
        summaries.append(
            {
                "id": "mtrusg_" + hashlib.sha256(f"{meter_id}{customer_id}{window_start}".encode()).hexdigest()[:24],
                "object": "billing.meter_event_summary",
                "aggregated_value": aggregate(store, meter_obj, customer_id, window_start, window_end),
                "end_time": window_end,
                "livemode": False,
                "meter": meter_id,
                "start_time": window_start,
            }
        )
    return objects.list_object(summaries, f"/v1/billing/meters/{meter_id}/event_summaries")


# -- usage on the invoices a renewal produces (invoicing.renewal_invoice) -----------------------------


def with_usage(store: Store, subscription: Obj, period: tuple[int, int]) -> Obj:
    """The subscription as its renewal invoice bills it. A metered item is billed in arrears: its line
    carries the customer's usage of the period that ended (the meter's aggregation of the events with
    start <= timestamp < end, as its event summaries give it) as the quantity, that period as the
    line's period, and unit_amount x quantity as the amount. Other items bill the new period."""
    items = []
    for item in subscription["items"]["data"]:
        meter_id = item["price"]["recurring"].get("meter") if objects.metered(item["price"]) else None
        if not meter_id:
            items.append(item)
            continue
        meter_obj = billing.load(store, "billing.meter", meter_id, "meter")
        used = round(aggregate(store, meter_obj, subscription["customer"], *period))
        items.append({**item, "quantity": used, "current_period_start": period[0], "current_period_end": period[1]})
    return {**subscription, "items": {**subscription["items"], "data": items}}


# -- asynchronous error reports: v1.billing.meter.error_report_triggered ---------------------------------
# Stripe rejects some meter events after accepting them and says so in a thin event (an event
# destination's payload: no `data`; the receiver reads the event back with GET /v2/core/events/:id).
# The control endpoint POST /_sandbox/meters/error_report (control.py) makes the sandbox do it.

v2_bp = Blueprint("v2", __name__, url_prefix="/v2")
v2_bp.before_request(authenticate)


def error_report(store: Store, identifiers: list[str], code: str, message: str) -> Obj:
    """Reject the meter events with these identifiers (they leave the summaries and the invoices) and
    emit one error report per meter, with them as its sample errors. Returns the last event."""
    by_meter: dict[str, list[Obj]] = {}
    for event in store.all("billing.meter_event"):
        if event["identifier"] in identifiers and not event.get("_rejected"):
            by_meter.setdefault(event["_meter"], []).append(event)
    if not by_meter:
        raise StripeError("No meter event has those identifiers.", param="identifiers")
    report: Obj = {}
    for meter_id, events in by_meter.items():
        for event in events:
            store.put({**event, "_rejected": code})
        related = {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"}
        samples = [(e["identifier"], e["timestamp"]) for e in events]
        report = _thin_report(store, "v1.billing.meter.error_report_triggered", related, samples, code, message)
    return report


def no_meter_found(store: Store, identifiers: list[tuple[str, str]]) -> Obj:
    """Streamed events (identifier, event_name) for an event_name no active meter has: not counted,
    named by one v1.billing.meter.no_meter_found (no related_object: there is no meter)."""
    now = simtime.now()
    names = sorted({name for _, name in identifiers})
    message = (
        f"No active meter was found with event_name '{names[0]}'."
        if len(names) == 1
        else (f"No active meter was found with event_name {', '.join(repr(n) for n in names)}.")
    )
    samples = [(identifier, now) for identifier, _ in identifiers]
    return _thin_report(store, "v1.billing.meter.no_meter_found", None, samples, "no_meter", message)


def _thin_report(
    store: Store, event_type: str, related: Obj | None, samples: list[tuple[str, int]], code: str, message: str
) -> Obj:
    """A meter error event (an error report or no_meter_found): stored whole, delivered thin."""
    stamps = [stamp for _, stamp in samples]
    report: Obj = {
        "id": objects.new_id("evt_test_", 24),
        "object": "v2.core.event",
        "type": event_type,
        "context": None,
        "created": _iso(simtime.now()),
        "livemode": False,
        "reason": None,
        "pending_webhooks": 1,
        "data": {
            "developer_message_summary": f"{len(samples)} meter event(s) were invalid: {message}",
            "reason": {
                "error_count": len(samples),
                "error_types": [
                    {
                        "code": code,
                        "error_count": len(samples),
                        "sample_errors": [
                            {"error_message": message, "request": {"identifier": identifier}}
                            for identifier, _ in samples[:10]
                        ],
                    }
                ],
            },
            "validation_start": _iso(min(stamps)),
            "validation_end": _iso(max(stamps) + 1),
        },
    }
    if related is not None:
        report["related_object"] = related
    store.put(report)
    store.enqueue_delivery(report["id"], time.time())
    return report


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@v2_bp.get("/core/events/<event_id>")
def retrieve_v2_event(event_id: str) -> Response:
    """GET /v2/core/events/:id: the event with its `data` (a thin delivery leaves it out)."""
    event = current_store().get(event_id)
    if event is None or event["object"] != "v2.core.event":
        body = {"error": {"type": "not_found", "code": "not_found", "message": f"No such event: '{event_id}'"}}
        return Response(json.dumps(body), status=404, mimetype="application/json")
    shown = {k: v for k, v in event.items() if k != "pending_webhooks"}
    return Response(json.dumps(shown, indent=2), mimetype="application/json")
