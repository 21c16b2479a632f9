"""The /v1 HTTP API: authentication, idempotency, expansion and the endpoints themselves.

Each endpoint is a function from decoded parameters to a Stripe object. The @endpoint wrapper
does what every Stripe endpoint shares: parse the form or query string, take `expand`, run the
operation in one transaction, replay or record an Idempotency-Key, and render JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from . import billing, checkout, clock, customers, invoicing, lists, objects, prices, simtime
from .context import current_settings, current_store
from .errors import StripeError, missing
from .objects import Obj
from .params import (
    Params,
    array,
    boolean,
    decode,
    integer,
    mapping,
    metadata,
    new_metadata,
    reject_unknown,
    required_integer,
    required_string,
    string,
)
from .store import Store

bp = Blueprint("api", __name__, url_prefix="/v1")

IDEMPOTENCY_WINDOW = 24 * 3600  # Stripe forgets keys after 24 hours
EXPANDABLE = {
    "customer",
    "subscription",
    "latest_invoice",
    "invoice",
    "product",
    "default_price",
    "price",
    "payment_intent",
    "charge",
    "latest_charge",
    "payment_method",
    "default_payment_method",
    "schedule",
    "test_clock",
}


def _json(body: Obj, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=2), status=status, mimetype="application/json")


def _request_id() -> str:
    if "request_id" not in g:
        g.request_id = objects.new_id("req_", 14)
    request_id: str = g.request_id
    return request_id


# -- cross-cutting ----------------------------------------------------------------------------


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.register_error_handler(StripeError, _stripe_error)
    app.register_error_handler(HTTPException, _http_error)
    app.after_request(_stripe_headers)


def _stripe_error(error: StripeError) -> Response:
    return _json(error.body(), error.status)


def _http_error(error: HTTPException) -> HTTPException | Response:
    # Under /v1 every failure answers in Stripe's format; elsewhere Flask's HTML page stays.
    if not request.path.startswith("/v1/"):
        return error
    if error.code in (404, 405):
        return _stripe_error(
            StripeError(
                f"Unrecognized request URL ({request.method}: {request.path}). Please"
                " see https://stripe.com/docs or we can help at https://support.stripe.com/.",
                status=404,
            )
        )
    status = error.code or 500
    kind = "api_error" if status >= 500 else "invalid_request_error"
    return _stripe_error(StripeError(str(error.description), status=status, type=kind))


def _stripe_headers(response: Response) -> Response:
    if request.path.startswith("/v1/"):
        response.headers["Request-Id"] = _request_id()
        response.headers["Stripe-Version"] = request.headers.get("Stripe-Version", objects.API_VERSION)
    return response


@bp.before_request
def _authenticate() -> None:
    # Bearer auth from the SDKs; Basic auth from `curl -u sk_test_…:`.
    auth = request.authorization
    key = ""
    if auth is not None:
        key = (auth.token if auth.type == "bearer" else auth.username) or ""
    if not key:
        raise StripeError(
            "You did not provide an API key. You need to provide your API key in the"
            " Authorization header, using Bearer auth (e.g. 'Authorization: Bearer"
            " YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details,"
            " or we can help at https://support.stripe.com/.",
            status=401,
            type="authentication_error",
        )
    if not key.startswith("sk_test_"):
        shown = f"{key[:8]}{'*' * 4}{key[-4:]}" if len(key) > 12 else key
        raise StripeError(
            f"Invalid API Key provided: {shown}. The sandbox only accepts test-mode secret keys (sk_test_…).",
            status=401,
            type="authentication_error",
        )


def endpoint(rule: str, method: str) -> Callable[[Callable[..., Obj]], Callable[..., Obj]]:
    def register(view: Callable[..., Obj]) -> Callable[..., Obj]:
        @functools.wraps(view)
        def handle(**path_args: str) -> Response:
            pairs = list((request.form if method == "POST" else request.args).items(multi=True))
            params = decode(pairs)
            expand = [str(p) for p in array(params, "expand") or []]
            params.pop("expand", None)
            key = request.headers.get("Idempotency-Key") if method == "POST" else None
            store = current_store()
            with store.transaction():
                if key:
                    replay = _replay(store, key, sorted(pairs))
                    if replay:
                        return replay
                with simtime.time_of(store, _clock_subject(path_args, params)):
                    body = json.dumps(_present(store, view(params, **path_args), expand), indent=2)
                if key:
                    store.save_idempotent_result(
                        key,
                        endpoint=f"{method} {request.path}",
                        fingerprint=_fingerprint(sorted(pairs)),
                        request_id=_request_id(),
                        status=200,
                        body=body,
                        created=time.time(),
                    )
            return Response(body, mimetype="application/json")

        bp.add_url_rule(rule, f"{method.lower()}_{view.__name__}", handle, methods=[method])
        return view

    return register


def _clock_subject(path_args: dict[str, str], params: Params) -> str | None:
    """The object whose test clock (if any) gives this request its time: the object in the
    path, else the first of the `customer`, `subscription`, `from_subscription`, `invoice`,
    `payment_intent` or `charge` parameters. Checkout Sessions keep the wall clock, because
    their expiry is real time for the person paying."""
    if request.path.startswith("/v1/checkout/"):
        return None
    if path_args:
        return next(iter(path_args.values()))
    for key in ("customer", "subscription", "from_subscription", "invoice", "payment_intent", "charge"):
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _fingerprint(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _replay(store: Store, key: str, pairs: list[tuple[str, str]]) -> Response | None:
    """The stored response for a repeated Idempotency-Key, or an error if it was reused for a
    different request. Only successful responses are stored (Stripe doesn't keep validation
    failures, so a corrected retry with the same key goes through)."""
    saved = store.idempotent_result(key, time.time() - IDEMPOTENCY_WINDOW)
    if saved is None:
        return None
    endpoint = f"{request.method} {request.path}"
    if saved["endpoint"] != endpoint:
        raise StripeError(
            "Keys for idempotent requests can only be used for the same endpoint they were first"
            f" used for ('{saved['endpoint']}' vs '{endpoint}'). Try using a key other than"
            f" '{key}' if you meant to execute a different request.",
            type="idempotency_error",
        )
    if saved["fingerprint"] != _fingerprint(pairs):
        raise StripeError(
            "Keys for idempotent requests can only be used with the same parameters they were"
            f" first used with. Try using a key other than '{key}' if you meant to execute a"
            " different request.",
            type="idempotency_error",
        )
    response = Response(saved["body"], status=saved["status"], mimetype="application/json")
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Original-Request"] = saved["request_id"]
    return response


def _origin() -> billing.Origin:
    return billing.Origin(_request_id(), request.headers.get("Idempotency-Key"))


# -- expansion --------------------------------------------------------------------------------


def _present(store: Store, obj: Obj, expand: list[str]) -> Obj:
    """The object as the API returns it, with `expand` paths such as "subscription",
    "line_items" or "items.data.price.product" (and "data.product" on lists) filled in."""
    if obj["object"] == "list":
        for path in expand:
            if not path.startswith("data."):
                raise _cannot_expand(path)
        inner = [path.removeprefix("data.") for path in expand]
        return {**obj, "data": [_present(store, item, inner) for item in obj["data"]]}
    shown = objects.public(obj, include={path.split(".")[0] for path in expand})
    for path in expand:
        _expand(store, shown, path.split("."), path)
    return shown


def _expand(store: Store, obj: Obj, parts: list[str], path: str) -> None:
    field, rest = parts[0], parts[1:]
    if obj.get("object") == "list":
        if field != "data":
            raise _cannot_expand(path)
        for item in obj["data"]:
            if rest:
                _expand(store, item, rest, path)
        return
    value = obj.get(field)
    # A nested hash (invoice_settings in invoice_settings.default_payment_method) is a way through.
    passing_through = bool(rest) and isinstance(value, dict) and "object" not in value
    expandable = field in EXPANDABLE or field in objects.INCLUDABLE.get(obj.get("object", ""), ())
    if not expandable and not passing_through:
        raise _cannot_expand(path)
    if isinstance(value, str):
        target = store.get(value)
        value = obj[field] = objects.public(target) if target else value
    if rest and isinstance(value, dict):
        _expand(store, value, rest, path)


def _cannot_expand(path: str) -> StripeError:
    return StripeError(f"This property cannot be expanded ({path}).", param="expand")


# -- endpoints --------------------------------------------------------------------------------


@endpoint("/prices", "GET")
def list_prices(params: Params) -> Obj:
    reject_unknown(params, ("lookup_keys", "active", "limit", "starting_after"))
    lookup_keys = array(params, "lookup_keys")
    return prices.list_prices(
        current_store(),
        lookup_keys=[str(k) for k in lookup_keys] if lookup_keys is not None else None,
        active=boolean(params, "active"),
        page=lists.page_params(params),
    )


@endpoint("/checkout/sessions", "POST")
def create_checkout_session(params: Params) -> Obj:
    reject_unknown(
        params,
        (
            "mode",
            "line_items",
            "success_url",
            "cancel_url",
            "customer",
            "customer_email",
            "client_reference_id",
            "metadata",
            "subscription_data",
            "expires_at",
            "allow_promotion_codes",
            "payment_method_collection",
        ),
    )
    mode = string(params, "mode", required=True)
    if mode != "subscription":
        raise StripeError(
            f"The sandbox only supports mode=subscription Checkout Sessions, not '{mode}'.",
            param="mode",
        )
    items = array(params, "line_items")
    if not items:
        raise missing("line_items")
    line_items = []
    for index, item in enumerate(items):
        path = f"line_items[{index}]"
        if not isinstance(item, dict):
            raise StripeError("Invalid object", param=path)
        reject_unknown(item, ("price", "quantity"), path)
        line_items.append((required_string(item, "price", path), required_integer(item, "quantity", path, minimum=1)))
    subscription_data = mapping(params, "subscription_data") or {}
    reject_unknown(subscription_data, ("metadata", "trial_period_days", "trial_settings"), "subscription_data")
    trial_days = integer(subscription_data, "trial_period_days", "subscription_data", minimum=1)
    collection = string(params, "payment_method_collection") or "always"
    if collection not in ("always", "if_required"):
        raise StripeError(
            f"Invalid payment_method_collection: must be one of always or if_required, not {collection!r}.",
            param="payment_method_collection",
        )
    checkout_request = checkout.CheckoutRequest(
        line_items=line_items,
        success_url=string(params, "success_url"),
        cancel_url=string(params, "cancel_url"),
        customer=string(params, "customer"),
        customer_email=string(params, "customer_email"),
        client_reference_id=string(params, "client_reference_id"),
        metadata=new_metadata(params),
        subscription_metadata=new_metadata(subscription_data, path="subscription_data"),
        trial_period_days=trial_days,
        expires_at=integer(params, "expires_at"),
        allow_promotion_codes=boolean(params, "allow_promotion_codes"),
        payment_method_collection=collection,
        missing_payment_method=_missing_payment_method(subscription_data),
    )
    return checkout.create_checkout_session(current_store(), checkout_request, current_settings().public_url)


def _missing_payment_method(subscription_data: Params) -> str | None:
    """subscription_data[trial_settings][end_behavior][missing_payment_method] on Checkout."""
    path = "subscription_data[trial_settings]"
    settings = mapping(subscription_data, "trial_settings", "subscription_data")
    if settings is None:
        return None
    reject_unknown(settings, ("end_behavior",), path)
    behavior = mapping(settings, "end_behavior", path) or {}
    reject_unknown(behavior, ("missing_payment_method",), f"{path}[end_behavior]")
    value = string(behavior, "missing_payment_method", f"{path}[end_behavior]", required=True)
    if value not in clock.MISSING_PAYMENT_METHOD:
        raise StripeError(
            f"Invalid missing_payment_method: must be one of {', '.join(clock.MISSING_PAYMENT_METHOD)}",
            param=f"{path}[end_behavior][missing_payment_method]",
        )
    return value


@endpoint("/checkout/sessions/<session_id>", "GET")
def retrieve_checkout_session(params: Params, session_id: str) -> Obj:
    reject_unknown(params, ())
    return checkout.get_checkout_session(current_store(), session_id)


@endpoint("/checkout/sessions/<session_id>/expire", "POST")
def expire_checkout_session(params: Params, session_id: str) -> Obj:
    reject_unknown(params, ())
    return checkout.expire_checkout_session(current_store(), session_id, _origin())


@endpoint("/billing_portal/sessions", "POST")
def create_portal_session(params: Params) -> Obj:
    reject_unknown(params, ("customer", "return_url"))
    customer = required_string(params, "customer")
    return billing.create_portal_session(
        current_store(), customer, string(params, "return_url"), current_settings().public_url
    )


@endpoint("/subscriptions/<subscription_id>", "GET")
def retrieve_subscription(params: Params, subscription_id: str) -> Obj:
    return _retrieve("subscription", subscription_id, params)


@endpoint("/subscriptions/<subscription_id>", "DELETE")
def cancel_subscription(params: Params, subscription_id: str) -> Obj:
    reject_unknown(params, ("cancellation_details",))
    return billing.cancel_subscription(
        current_store(),
        subscription_id,
        cancellation_details=_cancellation_details(params),
        origin=_origin(),
    )


def _cancellation_details(params: Params) -> dict[str, str] | None:
    details = mapping(params, "cancellation_details")
    if details is None:
        return None
    reject_unknown(details, ("comment", "feedback"), "cancellation_details")
    return {k: string(details, k, "cancellation_details") or "" for k in details}


def _retrieve(kind: str, object_id: str, params: Params, param: str = "id") -> Obj:
    """GET /v1/<kind>s/:id: no parameters; 404 naming `param` for an unknown id."""
    reject_unknown(params, ())
    return billing.load(current_store(), kind, object_id, param)


@endpoint("/customers/<customer_id>", "GET")
def retrieve_customer(params: Params, customer_id: str) -> Obj:
    return _retrieve("customer", customer_id, params)


@endpoint("/invoices/<invoice_id>", "GET")
def retrieve_invoice(params: Params, invoice_id: str) -> Obj:
    return _retrieve("invoice", invoice_id, params)


@endpoint("/events/<event_id>", "GET")
def retrieve_event(params: Params, event_id: str) -> Obj:
    return _retrieve("event", event_id, params)


# -- customers, payment methods, payments and invoices ---------------------------------------------


def _default_payment_method(params: Params) -> str | None:
    settings = mapping(params, "invoice_settings")
    if settings is None:
        return None
    reject_unknown(settings, ("default_payment_method",), "invoice_settings")
    value = settings.get("default_payment_method")
    if value is not None and not isinstance(value, str):
        raise StripeError("Invalid string", param="invoice_settings[default_payment_method]")
    return value


@endpoint("/customers", "POST")
def create_customer(params: Params) -> Obj:
    reject_unknown(params, ("email", "name", "metadata", "test_clock", "payment_method", "invoice_settings"))
    return customers.create(
        current_store(),
        email=string(params, "email"),
        name=string(params, "name"),
        metadata=new_metadata(params),
        test_clock=string(params, "test_clock"),
        payment_method=string(params, "payment_method"),
        default_payment_method=_default_payment_method(params),
        origin=_origin(),
    )


@endpoint("/customers/<customer_id>", "POST")
def update_customer(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("email", "name", "metadata", "invoice_settings"))
    return customers.update(
        current_store(),
        customer_id,
        email=params["email"] if params.get("email") == "" else string(params, "email"),
        name=params["name"] if params.get("name") == "" else string(params, "name"),
        metadata=metadata(params),
        default_payment_method=_default_payment_method(params),
        origin=_origin(),
    )


@endpoint("/customers/<customer_id>/payment_methods", "GET")
def list_customer_payment_methods(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("type", "limit", "starting_after"))
    _card_type_only(params)
    billing.load(current_store(), "customer", customer_id, "customer")
    return invoicing.customer_payment_methods(current_store(), customer_id, lists.page_params(params))


@endpoint("/payment_methods", "GET")
def list_payment_methods(params: Params) -> Obj:
    reject_unknown(params, ("customer", "type", "limit", "starting_after"))
    _card_type_only(params)
    customer = required_string(params, "customer")
    billing.load(current_store(), "customer", customer, "customer", 400)
    listed = invoicing.customer_payment_methods(current_store(), customer, lists.page_params(params))
    return {**listed, "url": "/v1/payment_methods"}


def _card_type_only(params: Params) -> None:
    kind = string(params, "type")
    if kind not in (None, "card"):
        raise StripeError(f"The sandbox only has card payment methods, not {kind!r}.", param="type")


@endpoint("/payment_methods/<payment_method_id>", "GET")
def retrieve_payment_method(params: Params, payment_method_id: str) -> Obj:
    return _retrieve("payment_method", payment_method_id, params)


@endpoint("/payment_methods/<payment_method_id>/attach", "POST")
def attach_payment_method(params: Params, payment_method_id: str) -> Obj:
    """Attach a PaymentMethod (or, as on Stripe, a new one made from a test token such as
    pm_card_chargeCustomerFail) to a customer; it does not become a default."""
    reject_unknown(params, ("customer",))
    customer_id = required_string(params, "customer")
    store = current_store()
    customer = billing.load(store, "customer", customer_id, "customer", 400)
    return invoicing.resolve_payment_method(store, payment_method_id, customer, "payment_method")


@endpoint("/invoices", "GET")
def list_invoices(params: Params) -> Obj:
    reject_unknown(params, ("customer", "subscription", "status", "limit", "starting_after"))
    status = string(params, "status")
    if status not in (None, "draft", "open", "paid", "uncollectible", "void"):
        raise StripeError(f"Invalid status: {status}", param="status")
    return invoicing.list_invoices(
        current_store(),
        customer=string(params, "customer"),
        subscription=string(params, "subscription"),
        status=status,
        page=lists.page_params(params),
    )


@endpoint("/invoices/<invoice_id>/pay", "POST")
def pay_invoice(params: Params, invoice_id: str) -> Obj:
    reject_unknown(params, ("payment_method",))
    return invoicing.pay(current_store(), invoice_id, string(params, "payment_method"), _origin())


@endpoint("/invoice_payments", "GET")
def list_invoice_payments(params: Params) -> Obj:
    reject_unknown(params, ("invoice",))
    invoice = required_string(params, "invoice")
    return invoicing.invoice_payments(current_store(), invoice)


@endpoint("/subscriptions/<subscription_id>/resume", "POST")
def resume_subscription(params: Params, subscription_id: str) -> Obj:
    reject_unknown(params, ("billing_cycle_anchor",))
    anchor = string(params, "billing_cycle_anchor") or "now"
    if anchor != "now":
        raise StripeError(
            "The sandbox resumes subscriptions with billing_cycle_anchor=now only.", param="billing_cycle_anchor"
        )
    return clock.resume(current_store(), subscription_id, _origin())


# -- test clocks ----------------------------------------------------------------------------------


@endpoint("/test_helpers/test_clocks", "POST")
def create_test_clock(params: Params) -> Obj:
    reject_unknown(params, ("frozen_time", "name"))
    frozen_time = required_integer(params, "frozen_time")
    return clock.create(current_store(), frozen_time, string(params, "name"), _origin())


@endpoint("/test_helpers/test_clocks", "GET")
def list_test_clocks(params: Params) -> Obj:
    reject_unknown(params, ("limit", "starting_after"))
    return clock.list_clocks(current_store(), lists.page_params(params))


@endpoint("/test_helpers/test_clocks/<clock_id>", "GET")
def retrieve_test_clock(params: Params, clock_id: str) -> Obj:
    reject_unknown(params, ())
    return clock.load(current_store(), clock_id, "test_clock")


@endpoint("/test_helpers/test_clocks/<clock_id>", "DELETE")
def delete_test_clock(params: Params, clock_id: str) -> Obj:
    reject_unknown(params, ())
    return clock.delete(current_store(), clock_id, _origin())


@endpoint("/test_helpers/test_clocks/<clock_id>/advance", "POST")
def advance_test_clock(params: Params, clock_id: str) -> Obj:
    reject_unknown(params, ("frozen_time",))
    frozen_time = required_integer(params, "frozen_time")
    return clock.advance(current_store(), clock_id, frozen_time, _origin())


# Endpoints for changing subscriptions, previews, schedules, prices, refunds and lists.
from . import endpoints  # noqa: E402,F401  (registers on bp; needs the helpers above)
