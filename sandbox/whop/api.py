"""The Whop double's HTTP face, one blueprint under /whop: the REST API at /whop/api/v1 (bearer key,
JSON, Whop's error body), the hosted checkout and management pages, and /whop/_sandbox controls."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from flask import Blueprint, Response, abort, current_app, jsonify, redirect, render_template, request

from .delivery import Deliveries
from .state import CARD_OK, CardDeclined, WhopError, World

bp = Blueprint("whop_sandbox", __name__, url_prefix="/whop", template_folder="templates")


def _world() -> World:
    world: World = current_app.extensions["whop_sandbox_world"]
    return world


def _deliveries() -> Deliveries:
    deliveries: Deliveries = current_app.extensions["whop_sandbox_deliveries"]
    return deliveries


def init_app(app: Any, world: World, deliveries: Deliveries) -> None:
    app.extensions["whop_sandbox_world"] = world
    app.extensions["whop_sandbox_deliveries"] = deliveries
    app.register_blueprint(bp)


@bp.errorhandler(WhopError)
def _whop_error(exc: WhopError) -> tuple[Response, int]:
    return jsonify(exc.body()), exc.status


# --- API -------------------------------------------------------------------------------------------


def _authenticate() -> None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header.removeprefix("Bearer ").strip():
        raise WhopError(401, "unauthorized", "Missing or invalid API key (Authorization: Bearer <key>)")


def _json_body() -> dict[str, Any]:
    if not request.data:
        return {}
    try:
        body = json.loads(request.data)
    except ValueError:
        raise WhopError(400, "invalid_request_error", "The body is not JSON") from None
    if not isinstance(body, dict):
        raise WhopError(400, "invalid_request_error", "The body must be a JSON object")
    return {key: value for key, value in body.items() if value is not None}


def _idempotent(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> Response:
    """POST/PATCH with an Idempotency-Key: the first success is stored and replayed for the same
    request; the same key on another request is a 409."""
    body = _json_body()
    key = request.headers.get("Idempotency-Key")
    world = _world()
    fingerprint = f"{request.method} {request.path} {json.dumps(body, sort_keys=True)}"
    if key:
        with world.lock:
            stored = world.idempotency.get((request.path, key)) or next(
                (v for (path, k), v in world.idempotency.items() if k == key), None
            )
            if stored is not None:
                if stored[0] != fingerprint:
                    raise WhopError(409, "idempotency_error", "This Idempotency-Key was used for another request")
                response = jsonify(stored[2])
                response.status_code = stored[1]
                response.headers["Idempotent-Replayed"] = "true"
                return response
            result = handler(body)
            world.idempotency[(request.path, key)] = (fingerprint, 200, json.loads(json.dumps(result)))
    else:
        result = handler(body)
    return jsonify(result)


@bp.post("/api/v1/checkout_configurations")
def create_checkout_configuration() -> Response:
    _authenticate()
    return _idempotent(_world().create_checkout)


@bp.get("/api/v1/checkout_configurations/<checkout_id>")
def retrieve_checkout_configuration(checkout_id: str) -> Response:
    _authenticate()
    return jsonify(_world().checkout(checkout_id))


@bp.get("/api/v1/plans/<plan_id>")
def retrieve_plan(plan_id: str) -> Response:
    _authenticate()
    return jsonify(_world().plan(plan_id))


@bp.get("/api/v1/memberships")
def list_memberships() -> Response:
    _authenticate()
    args = {key: [v for v in request.args.getlist(key)] for key in request.args}
    return jsonify(_world().list_memberships(args))


@bp.get("/api/v1/payments")
def list_payments() -> Response:
    _authenticate()
    args = {key: [v for v in request.args.getlist(key)] for key in request.args}
    return jsonify(_world().list_payments(args))


@bp.get("/api/v1/memberships/<membership_id>")
def retrieve_membership(membership_id: str) -> Response:
    _authenticate()
    return jsonify(World.public_membership(_world().membership(membership_id)))


@bp.patch("/api/v1/memberships/<membership_id>")
def update_membership(membership_id: str) -> Response:
    _authenticate()
    world = _world()
    return _idempotent(lambda body: World.public_membership(world.update_membership(membership_id, body)))


@bp.post("/api/v1/memberships/<membership_id>/cancel")
def cancel_membership(membership_id: str) -> Response:
    _authenticate()
    world = _world()
    return _idempotent(lambda body: World.public_membership(world.cancel_membership(membership_id, body)))


@bp.post("/api/v1/payments/<payment_id>/refund")
def refund_payment(payment_id: str) -> Response:
    _authenticate()
    world = _world()
    return _idempotent(lambda body: world.refund_payment(payment_id, body))


# --- hosted pages ----------------------------------------------------------------------------------


@bp.route("/checkout/<checkout_id>", methods=["GET", "POST"])
def checkout_page(checkout_id: str) -> Any:
    world = _world()
    try:
        if checkout_id.startswith("plan_"):  # a plan's own purchase_url: a checkout with no metadata
            checkout = world.create_checkout({"plan_id": checkout_id})
            return redirect(checkout["purchase_url"], code=303)
        checkout = world.checkout(checkout_id)
        plan = world.plan(checkout["plan"]["id"])
    except WhopError:
        abort(404)
    form = {key: request.form.get(key, "").strip() for key in ("email", "name", "card", "expiry", "cvc")}
    if request.method == "GET":
        return render_template("whop_checkout.html", checkout=checkout, plan=plan, form=form, error=None)
    error = _check_card_form(form)
    if error is None:
        try:
            membership = world.pay_checkout(
                checkout_id,
                email=form["email"].lower(),
                name=form["name"],
                card=form["card"].replace(" ", ""),
                expiry=form["expiry"],
            )
        except CardDeclined as exc:
            error = str(exc)
    if error is not None:
        page = render_template("whop_checkout.html", checkout=checkout, plan=plan, form=form, error=error)
        return page, 400
    payment_id = next(
        (p["id"] for p in reversed(world.payments.values()) if p["membership_id"] == membership["id"]), None
    )
    if not checkout["redirect_url"]:
        return render_template("whop_paid.html", membership=membership, plan=plan)
    query = {"status": "success", "checkout_configuration_id": checkout_id, "membership_id": membership["id"]}
    if payment_id:
        query["payment_id"] = payment_id
    return redirect(_with_query(checkout["redirect_url"], query), code=303)


def _check_card_form(form: dict[str, str]) -> str | None:
    card = form["card"].replace(" ", "")
    if "@" not in form["email"] or "." not in form["email"].rsplit("@", 1)[-1]:
        return "Enter a valid email address."
    if not form["name"]:
        return "Enter the name on the card."
    if not (card.isdigit() and len(card) == 16):
        return "Enter a 16-digit card number."
    if card not in (CARD_OK, "4000000000000002"):
        return "Use a sandbox test card: 4242 4242 4242 4242 (succeeds) or 4000 0000 0000 0002 (declined)."
    expiry = form["expiry"].replace(" ", "")
    if not (len(expiry) == 5 and expiry[2] == "/" and expiry[:2].isdigit() and expiry[3:].isdigit()):
        return "Enter the expiry as MM/YY."
    if not 1 <= int(expiry[:2]) <= 12:
        return "The expiry month is not valid."
    if not (form["cvc"].isdigit() and len(form["cvc"]) in (3, 4)):
        return "Enter the 3- or 4-digit CVC."
    return None


def _with_query(url: str, query: dict[str, str]) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{urlencode(query)}" if parts.query else urlencode(query)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, parts.fragment))


@bp.route("/manage/<membership_id>", methods=["GET", "POST"])
def manage_page(membership_id: str) -> Any:
    """The buyer's management page (a membership's manage_url): cancel at period end, or undo it."""
    world = _world()
    try:
        membership = world.membership(membership_id)
    except WhopError:
        abort(404)
    if request.method == "POST":
        action = request.form.get("action")
        try:
            if action == "cancel":
                world.cancel_membership(membership_id, {"cancel_at_period_end": True})
            elif action == "uncancel":
                world.update_membership(membership_id, {"cancel_at_period_end": False})
            else:
                abort(400)
        except WhopError as exc:
            return render_template("whop_manage.html", membership=membership, error=exc.message), 400
        return redirect(request.path, code=303)
    return render_template("whop_manage.html", membership=membership, error=None)


# --- sandbox controls (not Whop paths) -------------------------------------------------------------

LATENCY = "whop_sandbox_latency"


@bp.before_request
def _slow_api() -> None:
    """The latency set by /_sandbox/latency, before every API answer (not the pages or controls)."""
    seconds = float(current_app.extensions.get(LATENCY, 0))
    if seconds and request.path.startswith("/whop/api/"):
        time.sleep(seconds)


@bp.post("/_sandbox/latency")
def set_latency() -> Response:
    """Every API answer waits this long first (body {"seconds": 0-60}; 0 turns it off)."""
    seconds = _json_body().get("seconds", 0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds <= 60:
        raise WhopError(400, "invalid_request_error", "seconds must be a number from 0 to 60")
    current_app.extensions[LATENCY] = float(seconds)
    return jsonify(seconds=float(seconds))


@bp.get("/_sandbox/deliveries")
def deliveries() -> Response:
    """Recent events, newest first, with their delivery state (?limit=, 100)."""
    limit = request.args.get("limit", 100, type=int)
    settings = _deliveries().describe_settings()
    return jsonify(**settings, deliveries=_deliveries().listing(limit))


@bp.post("/_sandbox/deliveries/take")
def take_deliveries() -> Response:
    """Waiting events, oldest first (body {"limit": 1-1000}, default 100), signed for delivery now:
    {"events": [{"id", "type", "payload", "headers"}]}, the shape of the Stripe sandbox's take."""
    limit = _json_body().get("limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise WhopError(400, "invalid_request_error", "limit must be a whole number from 1 to 1000")
    return jsonify(events=_deliveries().take(limit))


@bp.post("/_sandbox/delivery")
def configure_delivery() -> Response | tuple[Response, int]:
    """Change mode (push | hold), webhook_url, secrets or retry_seconds while running."""
    try:
        return jsonify(_deliveries().configure(_json_body()))
    except ValueError as exc:
        return jsonify(error={"type": "invalid_request_error", "message": str(exc)}), 400


@bp.post("/_sandbox/memberships/<membership_id>/period_end")
def period_end(membership_id: str) -> Response:
    """Let the current period end: renew (outcome=paid | failed) or, if set to cancel, expire."""
    outcome = str(_json_body().get("outcome", "paid"))
    return jsonify(World.public_membership(_world().end_period(membership_id, outcome)))


@bp.post("/_sandbox/memberships/<membership_id>/deactivate")
def deactivate(membership_id: str) -> Response:
    """End a membership now, as Whop does after failed retries or a dispute (membership.deactivated)."""
    body = _json_body()
    status = str(body.get("status", "canceled"))
    if status not in ("canceled", "expired"):
        raise WhopError(400, "invalid_request_error", "status must be canceled or expired")
    membership = _world().deactivate(membership_id, status=status, reason=body.get("reason"))
    return jsonify(World.public_membership(membership))
