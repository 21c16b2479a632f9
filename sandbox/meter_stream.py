"""The v2 meter event stream: Stripe's high-throughput way of sending meter events.

- `POST /v2/billing/meter_event_session` (the secret key): a session whose `authentication_token` is
  valid for 15 minutes (`expires_at`).
- `POST /v2/billing/meter_event_stream` (the session's token as the bearer key, JSON
  `{"events": [{event_name, identifier?, timestamp?, payload}]}`, 1 to 100 events): answered `{}`.
  The request's shape is checked at once (Stripe's v2 error shape, 400); each event is then validated
  as v1 validates it (meters.check_event), but a refusal is asynchronous, as Stripe's is: the event is
  left out of the meter's usage and a `v1.billing.meter.error_report_triggered` names it
  (meters.error_report). An event for an event_name no active meter has is not counted, and one
  `v1.billing.meter.no_meter_found` per request names such events (meters.no_meter_found).
  An identifier already used (by v1 or the stream) within 24 hours is dropped: counted once.
- A missing or unknown token is a 401 (authentication_error); an expired one a 401 of type
  `temporary_session_expired` (stripe-python raises TemporarySessionExpiredError).

Sessions live on the wall clock (not on test clocks). The control endpoint
`POST /_sandbox/meters/expire_sessions` ends every session now, to test renewal.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, request

from . import meters, objects
from .context import current_store
from .errors import StripeError
from .store import Store
from .v1 import authenticate

SESSION_SECONDS = 15 * 60
MAX_EVENTS = 100

bp = Blueprint("meter_stream", __name__, url_prefix="/v2/billing")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _token_key(token: str) -> str:
    return "_mes_token_" + token


@bp.post("/meter_event_session")
def create_session() -> Response:
    authenticate()
    now = time.time()
    token = objects.new_id("mes_tok_", 40)
    session = {
        "id": objects.new_id("mes_", 24),
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": _iso(now),
        "expires_at": _iso(now + SESSION_SECONDS),
        "livemode": False,
    }
    store = current_store()
    with store.transaction():
        store.put({"id": _token_key(token), "object": "_meter_event_session", "expires": now + SESSION_SECONDS})
    return _json(session)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(int(timestamp), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def expire_sessions(store: Store) -> int:
    sessions = store.all("_meter_event_session")
    for session in sessions:
        store.put({**session, "expires": 0})
    return len(sessions)


def _check_token() -> None:
    auth = request.authorization
    token = (auth.token if auth is not None and auth.type == "bearer" else "") or ""
    session = current_store().get(_token_key(token)) if token else None
    if session is None:
        raise StripeError(
            "The meter event stream needs a meter event session's authentication_token as the bearer key.",
            status=401,
            type="authentication_error",
        )
    if session["expires"] <= time.time():
        raise StripeError(
            "The meter event session has expired: create a new one (POST /v2/billing/meter_event_session).",
            status=401,
            type="temporary_session_expired",
            code="billing_meter_event_session_expired",
        )


def _invalid(message: str, param: str) -> StripeError:
    return StripeError(message, status=400, type="invalid_request_error", code="invalid_request", param=param)


def _shape(body: Any) -> list[dict[str, Any]]:
    """The request's events, or a 400 naming what is wrong with the request as a whole."""
    if not isinstance(body, dict) or set(body) - {"events"}:
        raise _invalid("The body must be a JSON object with only `events`.", "events")
    events = body.get("events")
    if not isinstance(events, list) or not events:
        raise _invalid("events must be a list of 1 to 100 meter events.", "events")
    if len(events) > MAX_EVENTS:
        raise _invalid(f"events can hold at most {MAX_EVENTS} meter events; {len(events)} were sent.", "events")
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict) or set(event) - {"event_name", "identifier", "timestamp", "payload"}:
            raise _invalid(f"{where} must hold only event_name, identifier, timestamp and payload.", where)
        if not isinstance(event.get("event_name"), str) or not event["event_name"]:
            raise _invalid(f"{where}.event_name is required.", f"{where}.event_name")
        payload = event.get("payload")
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise _invalid(f"{where}.payload must be an object of strings.", f"{where}.payload")
        if "identifier" in event and not isinstance(event["identifier"], str):
            raise _invalid(f"{where}.identifier must be a string.", f"{where}.identifier")
        if "timestamp" in event and _timestamp(event["timestamp"]) is None:
            raise _invalid(f"{where}.timestamp must be an RFC 3339 time.", f"{where}.timestamp")
    return events


def _timestamp(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp())


@bp.post("/meter_event_stream")
def create_stream_events() -> Response:
    _check_token()
    events = _shape(request.get_json(silent=True))
    store = current_store()
    with store.transaction():
        no_meter: list[tuple[str, str]] = []
        for event in events:
            _take(store, event, no_meter)
        if no_meter:
            meters.no_meter_found(store, no_meter)
    return _json({})


def _take(store: Store, event: dict[str, Any], no_meter: list[tuple[str, str]]) -> None:
    """One streamed event: counted, dropped as a duplicate, or refused asynchronously (an event_name no
    meter has is added to `no_meter`: one v1.billing.meter.no_meter_found names them)."""
    identifier = event.get("identifier") or objects.new_id("", 32)
    if meters.seen_identifier(store, identifier):
        return
    payload, timestamp = event["payload"], _timestamp(event.get("timestamp"))
    try:
        checked = meters.check_event(store, event["event_name"], payload, timestamp, identifier)
    except StripeError as refusal:
        found = meters.active_meter(store, event["event_name"])
        if found is None:
            no_meter.append((identifier, event["event_name"]))
            return
        rejected = (found, str(payload.get("stripe_customer_id") or ""), Decimal(0), timestamp or 0)
        meters.record_event(store, rejected, payload, identifier)
        meters.error_report(store, [identifier], refusal.code or "invalid_meter_event", refusal.message)
        return
    meters.record_event(store, checked, payload, identifier)
