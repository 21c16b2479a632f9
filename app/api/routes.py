"""The usage API, for an organization's own services: `POST /api/v1/usage` records one usage event
or a batch, authenticated by an API key (`Authorization: Bearer llk_...`), never by a session or a
CSRF token. The events go to BillingService.record_usage_batch (one event is a batch of one, with
the organization read with the key, or remembered from an earlier request with it and checked as the
events are stored: app/services/api_keys.py); this module only parses and answers.

One event: {"meter", "quantity", "idempotency_key", "timestamp"?} (the key may instead come in an
`Idempotency-Key` header). 201 recorded, 200 a repeated key (not counted again), or the event's
4xx with {"error": {"code", "message"}} (429 past a hard limit, with the limit, what is used, the
reset time and Retry-After).

A batch: {"events": [up to 100 events]} answers 200 with one result per event, in order:
{"index", "status" (its HTTP status), "outcome" (recorded, duplicate or rejected), "id" or "error"}.
The batch is one transaction, stored set-based (app/services/usage_store.py: a few statements and one
commit whatever its size): a bad event is rejected without losing the others.

Requests come in through the machine entry (app/machine_entry.py), a WSGI dispatcher in front of Flask
that answers them with `answer` and no request context; anything unusual reaches the Flask route below,
a machine route (app/machine_routes.py: no session, CSRF, rate-limit or sign-in hooks), which gives
the same answer.
"""

from __future__ import annotations

from collections import Counter
from operator import itemgetter
from typing import Any, NamedTuple

from flask import Blueprint, jsonify, request
from werkzeug.wrappers import Response

from app import clock
from app.extensions import csrf
from app.services import api_keys, usage
from app.services.billing_service import BillingService

bp = Blueprint("api", __name__)
csrf.exempt(bp)
MAX_BATCH = 100


class Answer(NamedTuple):
    """The usage API's answer to a request: its status, its JSON body and any headers of its own."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _error(status: int, code: str, message: str, **extra: Any) -> Answer:
    return Answer(status, {"error": {"code": code, "message": message, **extra}}, {})


@bp.post("/usage")
def record_usage() -> tuple[Response, int]:
    """The Flask route: what the machine entry (app/machine_entry.py) hands over, and any unusual request."""
    body = request.get_json(silent=True)
    result = answer(request.headers.get("Authorization", ""), body, request.headers.get("Idempotency-Key"))
    response = jsonify(result.body)
    response.headers.update(result.headers)
    return response, result.status


def answer(authorization: str, body: Any, idempotency_key: str | None) -> Answer:
    """The answer to a usage request: the Authorization header, the parsed JSON body (None when it is
    not JSON) and the Idempotency-Key header (in an application context)."""
    scheme, _, sent = authorization.partition(" ")
    secret = sent.strip() if scheme.lower() == "bearer" else None
    caller = api_keys.remembered(secret) or api_keys.authenticate(secret)
    if caller is None:
        return _unauthorized()
    if isinstance(body, dict) and "events" in body:
        events = body["events"]
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH:
            return _error(400, "invalid_batch", f"events must be a list of 1 to {MAX_BATCH} usage events.")
        recorded = _recorded(secret, caller, events)
        if recorded is None:
            return _unauthorized()
        results = [_answer({"index": index}, outcome) for index, outcome in enumerate(recorded)]
        counted = Counter(map(itemgetter("outcome"), results))
        summary = {
            "results": results,
            "recorded": counted["recorded"],
            "duplicates": counted["duplicate"],
            "rejected": counted["rejected"],
        }
        return Answer(200, summary, {})
    if not isinstance(body, dict):
        return _error(400, "invalid_request", 'Send a JSON object: one usage event, or {"events": [...]}.')
    if "idempotency_key" not in body and idempotency_key:
        body = {**body, "idempotency_key": idempotency_key}
    recorded = _recorded(secret, caller, [body])
    if recorded is None:
        return _unauthorized()
    result = _answer({}, recorded[0])
    status = int(result.pop("status"))
    headers = {"Retry-After": str(result["retry_after"])} if "retry_after" in result else {}
    return Answer(status, result, headers)


def _unauthorized() -> Answer:
    refused = _error(401, "invalid_api_key", "Send a live API key as 'Authorization: Bearer <key>'.")
    return refused._replace(headers={"WWW-Authenticate": 'Bearer realm="usage"'})


def _recorded(secret: str | None, caller: api_keys.ApiCaller, events: list[Any]) -> list[usage.Recorded] | None:
    """Each event's outcome, in order: the JSON objects recorded together (BillingService.record_usage_batch,
    with the organization as read with the key), anything else refused. None: the key is no longer live
    (a remembered key, found revoked by the recording's own check)."""
    objects = [event for event in events if isinstance(event, dict)]
    try:
        stored = BillingService.record_usage_batch(caller.organization_id, objects, account=caller.account)
    except usage.AccountChanged:  # nothing was stored: read the key and its organization again
        fresh = api_keys.authenticate(secret)
        if fresh is None:
            return None
        stored = BillingService.record_usage_batch(fresh.organization_id, objects, account=fresh.account)
    if len(stored) == len(events):  # every event an object (the usual case)
        return stored
    recorded = iter(stored)
    return [next(recorded) if isinstance(event, dict) else _not_an_object() for event in events]


def _not_an_object() -> usage.UsageRejected:
    return usage.UsageRejected("an event must be a JSON object")


def _answer(where: dict[str, Any], recorded: usage.Recorded) -> dict[str, Any]:
    if type(recorded) is usage.RecordedUsage:
        where["status"], where["outcome"] = (200, "duplicate") if recorded.duplicate else (201, "recorded")
        where["id"], where["meter"], where["quantity"] = recorded.event_id, recorded.meter, recorded.quantity
        where["timestamp"] = usage.iso(recorded.occurred_at)
        return where  # a dict of its own for each event (the caller's `where`), filled in place
    if isinstance(recorded, usage.UsageLimitReached):
        retry_after = max(1, int(recorded.resets_at.timestamp() - clock.timestamp()))
        error = {"code": recorded.code, "message": str(recorded), "limit": recorded.limit, "used": recorded.used}
        error["resets_at"] = recorded.resets_at.isoformat()
        return {**where, "status": recorded.status, "outcome": "rejected", "error": error, "retry_after": retry_after}
    if isinstance(recorded, usage.UsageRejected):
        error = {"code": recorded.code, "message": str(recorded)}
        return {**where, "status": recorded.status, "outcome": "rejected", "error": error}
    raise TypeError(f"not a usage outcome: {recorded!r}")
