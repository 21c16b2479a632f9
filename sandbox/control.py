"""Test controls under /_sandbox: not Stripe endpoints, no authentication, JSON in and out.

They let a test suite (or a developer) see and bend the sandbox from outside, the way Stripe's
own internals, its dashboard or `stripe listen` would:

- the request log: every /v1 request with its decoded parameters and response status;
- faults: make the next matching /v1 requests fail (HTTP 500, 404, a dropped connection, or a 429 as
  Stripe's rate limiter or its object lock answers, with Retry-After and Stripe-Should-Retry), or
  succeed and then lose their response (`lost_response`: Stripe did it, the client timed out);
- latency: delay every /v1 response (a Stripe brownout) without blocking other requests;
- delivery settings: push or hold, URL, secrets, API version, concurrency, duplicates,
  reordering and delay; and pulling held events with their signed headers;
- changing a stored object directly, optionally with the event Stripe would send.

The hooks in init_app() run for every request under /v1/ before the API's own handling, so
v1.py stays unaware of them.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from . import billing, meter_stream, meters, objects, tax
from .config import DeliveryConfig, LiveDelivery
from .context import current_settings, current_store
from .errors import StripeError
from .params import decode
from .worker import render_payload, signature_header_for

bp = Blueprint("sandbox_control", __name__, url_prefix="/_sandbox")

FAULT_KINDS = ("connection", "server", "missing", "rate_limit", "lock_timeout", "lost_response", "invalid_request")
# Stripe's 429s: too many requests (code rate_limit) or another request holding the object's lock.
_THROTTLES = {
    "rate_limit": "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits.",
    "lock_timeout": "This object cannot be accessed right now because another API request or Stripe process "
    "is currently accessing it. If you see this error intermittently, retry the request.",
}
MAX_LATENCY_SECONDS = 600.0
MAX_TAKE = 1000
# Path segments that name a collection, for the "No such <kind>" message of a "missing" fault.
_KINDS = {
    "checkout/sessions": "checkout.session",
    "billing_portal/sessions": "billing_portal.session",
    "test_helpers/test_clocks": "test_helpers.test_clock",
}


class ControlError(Exception):
    """A bad control request: HTTP 400 (or `status`) with {"error": {"message": …}}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Fault:
    id: int
    method: str | None  # None: any method
    path: str | None
    path_regex: str | None
    kind: str
    times: int  # how many more matching requests fail
    retry_after: int | None = None  # a 429's Retry-After header, in seconds (None: no header)
    should_retry: bool | None = None  # a 429's Stripe-Should-Retry header (None: no header)
    body_contains: str | None = None  # only requests whose body holds this text (None: any body)

    def matches(self, method: str, path: str, body: str = "") -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.body_contains is not None and self.body_contains not in body:
            return False
        if self.path is not None:
            return self.path == path
        assert self.path_regex is not None
        return re.fullmatch(self.path_regex, path) is not None

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": self.id, "method": self.method, "kind": self.kind, "times": self.times}
        if self.path is not None:
            shown["path"] = self.path
        else:
            shown["path_regex"] = self.path_regex
        if self.kind in _THROTTLES:
            shown.update(retry_after=self.retry_after, should_retry=self.should_retry)
        if self.body_contains is not None:
            shown["body_contains"] = self.body_contains
        return shown


class Controls:
    """The mutable test controls of one running sandbox (faults and latency live in memory)."""

    def __init__(self, delivery: LiveDelivery) -> None:
        self.delivery = delivery
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._next_fault = 1
        self.latency = 0.0

    def arm(
        self,
        method: str | None,
        path: str | None,
        path_regex: str | None,
        kind: str,
        times: int,
        retry_after: int | None = None,
        should_retry: bool | None = None,
        body_contains: str | None = None,
    ) -> Fault:
        with self._lock:
            fault = Fault(
                self._next_fault, method, path, path_regex, kind, times, retry_after, should_retry, body_contains
            )
            self._next_fault += 1
            self._faults.append(fault)
            return fault

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def consume(self, method: str, path: str, body: str = "") -> Fault | None:
        """The first armed fault matching the request, used up once (removed when spent)."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, body):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None


def init_app(app: Flask, delivery: LiveDelivery) -> Controls:
    controls = Controls(delivery)
    app.config["SANDBOX_CONTROLS"] = controls
    app.before_request(_before_api_request)
    app.after_request(_after_api_request)
    app.register_blueprint(bp)
    return controls


def _controls() -> Controls:
    controls: Controls = current_app.config["SANDBOX_CONTROLS"]
    return controls


@bp.errorhandler(ControlError)
def _control_error(error: ControlError) -> tuple[Response, int]:
    return jsonify(error={"message": error.message}), error.status


# -- the /v1 hooks: request log, faults, latency ----------------------------------------------


def _is_api_request() -> bool:
    return request.path.startswith(("/v1/", "/v2/billing/")) or request.path == "/v1"


def _logged_params() -> Any:
    """The request's parameters as nested JSON: dicts for a[b]=, lists for a[0]= and a[]=."""
    if request.is_json:  # the v2 API's bodies
        return request.get_json(silent=True)
    source = request.form if request.method == "POST" else request.args
    return _nested(decode(source.items(multi=True)))


def _nested(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    items = {key: _nested(item) for key, item in value.items()}
    if items and set(items) == {str(i) for i in range(len(items))}:
        return [items[str(i)] for i in range(len(items))]
    return items


def _log(status: int) -> None:
    store = current_store()
    store.log_request(
        method=request.method,
        path=request.path,
        params=json.dumps(_logged_params()),
        idempotency_key=request.headers.get("Idempotency-Key"),
        stripe_version=request.headers.get("Stripe-Version"),
        user_agent=request.headers.get("User-Agent"),
        status=status,
        at=time.time(),
        keep=current_settings().request_log_limit,
    )


def _before_api_request() -> Response | None:
    if not _is_api_request():
        return None
    fault = _controls().consume(request.method, request.path, request.get_data(as_text=True))
    if fault is None:
        return None
    if fault.kind == "lost_response":
        g.sandbox_lose_response = True  # handled as usual, then the connection drops (_after_api_request)
        return None
    if fault.kind == "connection":
        _log(0)
        g.sandbox_logged = True
        return _drop_connection()
    if fault.kind == "server":
        raise StripeError(
            "An unknown error occurred. (Injected by the sandbox: a 'server' fault.)",
            status=500,
            type="api_error",
        )
    if fault.kind in _THROTTLES:
        return _throttled(fault)
    if fault.kind == "invalid_request":  # the request refused as a whole, as Stripe refuses one it will not take
        raise StripeError(
            "Invalid request. (Injected by the sandbox: an 'invalid_request' fault.)", code="invalid_request"
        )
    kind, object_id = _path_object(request.path)
    raise StripeError(f"No such {kind}: '{object_id}'", status=404, code="resource_missing", param="id")


def _throttled(fault: Fault) -> Response:
    """A 429 as Stripe answers it: Stripe's error body (stripe-python raises RateLimitError), with the
    headers a client is meant to honour."""
    error = StripeError(_THROTTLES[fault.kind], status=429, code=fault.kind)
    response = jsonify(error.body())
    response.status_code = 429
    if fault.retry_after is not None:
        response.headers["Retry-After"] = str(fault.retry_after)
    if fault.should_retry is not None:
        response.headers["Stripe-Should-Retry"] = "true" if fault.should_retry else "false"
    return response


def _path_object(path: str) -> tuple[str, str]:
    """("subscription", "sub_123") for /v1/subscriptions/sub_123[/…], as a 404 would name it."""
    parts = [part for part in path.split("/")[2:] if part]
    for index in range(len(parts) - 1, 0, -1):
        if re.fullmatch(r"[a-z]+_\w*[A-Z0-9]\w*", parts[index]):  # an id, not a word like test_helpers
            collection = "/".join(parts[max(0, index - 2) : index])
            for prefix, kind in _KINDS.items():
                if collection.endswith(prefix):
                    return kind, parts[index]
            return parts[index - 1].removesuffix("s"), parts[index]
    return "object", parts[-1] if parts else ""


def _drop_connection() -> Response:
    """Close the TCP connection without an HTTP response, so the client sees the connection
    end (stripe-python raises APIConnectionError). The dev server hands the socket over in
    environ["werkzeug.socket"]; after shutdown() the response body raises ConnectionAbortedError,
    which werkzeug treats as a dropped connection and writes nothing."""
    sock = request.environ.get("werkzeug.socket")
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already gone
            sock.shutdown(socket.SHUT_RDWR)

    return Response(_NoResponse())


class _NoResponse:
    """A response body that ends the connection instead of producing bytes."""

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        raise ConnectionAbortedError("sandbox fault: connection closed without a response")


def _after_api_request(response: Response) -> Response:
    if not _is_api_request() or g.get("sandbox_logged"):
        return response
    _log(response.status_code)
    if g.get("sandbox_lose_response"):
        return _drop_connection()
    latency = _controls().latency
    if latency > 0:
        time.sleep(latency)  # this request's thread only; the server is threaded
    return response


# -- request log ------------------------------------------------------------------------------


@bp.get("/requests")
def list_requests() -> Response:
    """Logged /v1 requests with seq > ?after= (default 0), oldest first. `last_seq` is the
    marker for the next call: the newest seq when all are listed, else the last one listed
    (with ?limit=)."""
    after = _int_arg("after", 0)
    limit = _int_arg("limit", 0) or None
    store = current_store()
    with store.transaction():  # rows and last_seq from one instant
        last_seq = store.last_request_seq()
        rows = [row for row in store.logged_requests(after, limit or 1_000_000_000) if row["seq"] <= last_seq]
    listed = [
        {
            "seq": row["seq"],
            "method": row["method"],
            "path": row["path"],
            "params": json.loads(row["params"]),
            "idempotency_key": row["idempotency_key"],
            "stripe_version": row["stripe_version"],
            "user_agent": row["user_agent"],
            "status": row["status"],
        }
        for row in rows
    ]
    if limit is not None and listed and listed[-1]["seq"] < last_seq:
        last_seq = listed[-1]["seq"]  # truncated: continue from here
    return jsonify(requests=listed, last_seq=last_seq)


@bp.get("/requests/last_seq")
def last_request_seq() -> Response:
    return jsonify(last_seq=current_store().last_request_seq())


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ControlError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ControlError(f"{name} must not be negative")
    return value


# -- faults and latency -----------------------------------------------------------------------


def _json_body(*, required: bool = True) -> dict[str, Any]:
    if not request.get_data():
        if required:
            raise ControlError("Send a JSON object as the request body.")
        return {}
    try:
        body = json.loads(request.get_data())
    except ValueError:
        raise ControlError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ControlError("The request body must be a JSON object.")
    return body


@bp.post("/faults")
def arm_fault() -> tuple[Response, int]:
    body = _json_body()
    fields = {"method", "path", "path_regex", "kind", "times", "retry_after", "should_retry", "body_contains"}
    unknown = set(body) - fields
    if unknown:
        raise ControlError(f"Unknown field(s): {', '.join(sorted(unknown))}.")
    method = body.get("method")
    if method is not None and (not isinstance(method, str) or not method.isalpha()):
        raise ControlError("method must be an HTTP method such as 'POST' (or omitted for any).")
    path, path_regex = body.get("path"), body.get("path_regex")
    if (path is None) == (path_regex is None):
        raise ControlError("Give exactly one of path (exact) or path_regex (matched in full).")
    if path is not None and (not isinstance(path, str) or not path.startswith(("/v1/", "/v2/"))):
        raise ControlError("path must be a /v1/… or /v2/… path, such as '/v1/checkout/sessions'.")
    if path_regex is not None:
        if not isinstance(path_regex, str):
            raise ControlError("path_regex must be a string.")
        try:
            re.compile(path_regex)
        except re.error as exc:
            raise ControlError(f"path_regex is not a valid regular expression: {exc}.") from None
    kind = body.get("kind")
    if kind not in FAULT_KINDS:
        raise ControlError(f"kind must be one of {', '.join(FAULT_KINDS)}, not {kind!r}.")
    times = body.get("times", 1)
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ControlError("times must be a whole number of at least 1.")
    retry_after, should_retry = _throttle_headers(body, kind)
    body_contains = body.get("body_contains")
    if body_contains is not None and (not isinstance(body_contains, str) or not body_contains):
        raise ControlError("body_contains must be a non-empty string (the text a matching request's body holds).")
    fault = _controls().arm(
        method.upper() if method else None, path, path_regex, kind, times, retry_after, should_retry, body_contains
    )
    return jsonify(fault.as_dict()), 201


def _throttle_headers(body: dict[str, Any], kind: str) -> tuple[int | None, bool | None]:
    retry_after, should_retry = body.get("retry_after"), body.get("should_retry")
    if (retry_after is not None or should_retry is not None) and kind not in _THROTTLES:
        raise ControlError("retry_after and should_retry belong to a rate_limit or lock_timeout fault.")
    whole = isinstance(retry_after, int) and not isinstance(retry_after, bool)
    if retry_after is not None and (not whole or retry_after < 0):
        raise ControlError("retry_after must be a whole number of seconds (0 or more).")
    if should_retry is not None and not isinstance(should_retry, bool):
        raise ControlError("should_retry must be true or false.")
    return retry_after, should_retry


@bp.get("/faults")
def list_faults() -> Response:
    return jsonify(faults=[fault.as_dict() for fault in _controls().faults()])


@bp.delete("/faults")
def clear_faults() -> Response:
    _controls().clear_faults()
    return jsonify(faults=[])


@bp.get("/latency")
def get_latency() -> Response:
    return jsonify(seconds=_controls().latency)


@bp.post("/latency")
def set_latency() -> Response:
    body = _json_body()
    seconds = body.get("seconds")
    if set(body) != {"seconds"} or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ControlError('Send {"seconds": <number>}; 0 clears the delay.')
    if not 0 <= seconds <= MAX_LATENCY_SECONDS:
        raise ControlError(f"seconds must be from 0 to {MAX_LATENCY_SECONDS:g}.")
    _controls().latency = float(seconds)
    return jsonify(seconds=float(seconds))


# -- delivery ---------------------------------------------------------------------------------


@bp.get("/delivery")
def get_delivery() -> Response:
    return jsonify(_controls().delivery.get().as_dict())


@bp.post("/delivery")
def update_delivery() -> Response:
    try:
        config = _controls().delivery.update(_json_body())
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    return jsonify(config.as_dict())


@bp.post("/deliveries/take")
def take_deliveries() -> Response:
    """Pull waiting events (hold mode), oldest first, signed now with every secret, and mark
    them delivered, as `stripe listen` forwards events to a local endpoint."""
    body = _json_body(required=False)
    limit = body.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_TAKE:
        raise ControlError(f"limit must be a whole number from 1 to {MAX_TAKE}.")
    config = _controls().delivery.get()
    store = current_store()
    now = time.time()
    taken: list[dict[str, Any]] = []
    with store.transaction():
        for row in store.take_pending_deliveries(limit, now):
            event = store.get(row["event_id"])
            assert event is not None
            store.put({**event, "pending_webhooks": 0})
            copies = 2 if config.duplicates_now() else 1
            for copy in range(copies):
                taken.append(event)
                store.record_send(
                    event["id"],
                    via="take",
                    duplicate=copy > 0,
                    started_at=now,
                    finished_at=now,
                    status=None,
                    error=None,
                )
    if config.reorder:
        random.shuffle(taken)
    return jsonify(events=[_signed(event, config, int(now)) for event in taken])


def _signed(event: dict[str, Any], config: DeliveryConfig, timestamp: int) -> dict[str, Any]:
    payload = render_payload(event, config.api_version)
    return {
        "id": event["id"],
        "type": event["type"],
        "payload": payload,
        "headers": {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": signature_header_for(payload, config.secrets, timestamp),
        },
    }


@bp.post("/meters/error_report")
def meter_error_report() -> Response:
    """Stripe rejecting accepted meter events asynchronously: {"identifiers": [...], "code"?, "message"?}
    emits v1.billing.meter.error_report_triggered (a thin event) and drops them from the meter's usage."""
    body = _json_body()
    identifiers = body.get("identifiers")
    if not isinstance(identifiers, list) or not all(isinstance(i, str) for i in identifiers) or not identifiers:
        raise ControlError("identifiers must be a non-empty list of meter event identifiers.")
    code = str(body.get("code") or "meter_event_customer_not_found")
    message = str(body.get("message") or "No customer was found for the meter event's stripe_customer_id.")
    store = current_store()
    with store.transaction():
        event = meters.error_report(store, identifiers, code, message)
    return jsonify(id=event["id"])


@bp.post("/tax_ids/<tax_id_id>/verification")
def settle_tax_id_verification(tax_id_id: str) -> Response:
    """Stripe's check of a pending tax ID finishes: {"status": "verified" (default) | "unverified" |
    "unavailable"}; sends customer.tax_id.updated."""
    body = _json_body(required=False)
    status = body.get("status", "verified")
    store = current_store()
    try:
        with store.transaction():
            tax_id = tax.settle_verification(store, tax_id_id, str(status))
    except StripeError as error:
        raise ControlError(error.message, status=error.status) from None
    return jsonify(objects.public(tax_id))


@bp.post("/meters/expire_sessions")
def expire_meter_event_sessions() -> Response:
    """Every v2 meter event session's token expires now (the next stream request is refused)."""
    store = current_store()
    with store.transaction():
        expired = meter_stream.expire_sessions(store)
    return jsonify(expired=expired)


@bp.get("/deliveries")
def list_deliveries() -> Response:
    """What was sent to the webhook URL or taken, newest first (?limit=, 100)."""
    store = current_store()
    config = _controls().delivery.get()
    rows = store.deliveries(_int_arg("limit", 100))
    sends: dict[str, list[Any]] = {}
    for send in store.sends([row["event_id"] for row in rows]) if rows else []:
        sends.setdefault(send["event_id"], []).append(send)
    listed = []
    for row in rows:
        event = store.get(row["event_id"]) or {}
        mine = sends.get(row["event_id"], [])
        listed.append(
            {
                "event": row["event_id"],
                "type": event.get("type"),
                "created": event.get("created"),
                "state": row["state"],
                "attempts": row["attempts"],
                "last_status": row["last_status"],
                "last_error": row["last_error"],
                "next_attempt_at": row["next_attempt_at"] if row["state"] == "pending" else None,
                "delivered_at": row["delivered_at"],
                "sends": len(mine),
                "duplicates": sum(1 for send in mine if send["duplicate"]),
                "via": mine[-1]["via"] if mine else None,
            }
        )
    return jsonify(webhook_url=config.webhook_url, mode=config.mode, deliveries=listed)


# -- objects ----------------------------------------------------------------------------------


@bp.post("/objects/<object_id>")
def change_object(object_id: str) -> Response:
    """Merge top-level fields into a stored object, as Stripe's internals or its dashboard
    would change it; with "emit", also send that event with `previous_attributes`."""
    body = _json_body()
    emit = body.pop("emit", None) or request.args.get("emit")
    if emit is not None and (not isinstance(emit, str) or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", emit)):
        raise ControlError(f"emit must be an event type such as 'customer.subscription.updated', not {emit!r}.")
    for field in ("id", "object"):
        if field in body:
            raise ControlError(f"{field} cannot be changed.")
    hidden = [key for key in body if key.startswith("_")]
    if hidden:
        raise ControlError(f"Fields starting with '_' are the sandbox's bookkeeping: {', '.join(hidden)}.")
    store = current_store()
    with store.transaction():
        obj = store.get(object_id)
        if obj is None:
            raise ControlError(f"No such object: '{object_id}'", status=404)
        previous = {key: obj.get(key) for key, value in body.items() if obj.get(key) != value}
        obj.update(body)
        store.put(obj)
        if emit:
            billing.emit(store, emit, obj, previous if emit.endswith(".updated") else None)
    return jsonify(objects.public(obj))
