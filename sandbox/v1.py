"""What every /v1 endpoint shares: the blueprint, authentication, idempotency, expansion,
Stripe's error responses, and the @endpoint wrapper that registers an endpoint on the blueprint.

Each endpoint is a function from decoded parameters to a Stripe object. The @endpoint wrapper
does what every Stripe endpoint shares: parse the form or query string, take `expand`, run the
operation in one transaction, replay or record an Idempotency-Key, and render JSON. The
endpoints live in api.py and endpoints.py, which build on this module and register themselves
when imported (app.py imports them before init_app() registers the blueprint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from . import billing, objects, simtime
from .context import current_store
from .errors import StripeError
from .objects import Obj
from .params import Params, array, decode, mapping, reject_unknown, string
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
    "discounts",  # a subscription's or invoice's discounts (ids), each expanded to its discount
    "promotion_code",
    "coupon",  # a promotion code's promotion.coupon, a discount's source.coupon
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
def authenticate() -> None:
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
    path, else the first of the `customer`, `subscription`, `schedule`, `from_subscription`, `invoice`,
    `payment_intent` or `charge` parameters. Checkout Sessions keep the wall clock, because
    their expiry is real time for the person paying."""
    if request.path.startswith("/v1/checkout/"):
        return None
    if path_args:
        return next(iter(path_args.values()))
    for key in ("customer", "subscription", "schedule", "from_subscription", "invoice", "payment_intent", "charge"):
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
        # An includable field of the expanded object (latest_invoice.payments) is shown when named.
        value = obj[field] = objects.public(target, include=set(rest[:1])) if target else value
    elif isinstance(value, list):  # a list of ids (discounts), each expanded, then what is under them
        obj[field] = [objects.public(found) if isinstance(v, str) and (found := store.get(v)) else v for v in value]
        for item in obj[field]:
            if rest and isinstance(item, dict):
                _expand(store, item, rest, path)
        return
    if rest and isinstance(value, dict):
        _expand(store, value, rest, path)


def _cannot_expand(path: str) -> StripeError:
    return StripeError(f"This property cannot be expanded ({path}).", param="expand")


# -- parameters and reads several endpoint modules share -------------------------------------


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
