"""The /v1 endpoints for prices (listing), Checkout Sessions, portal sessions, retrieving and
cancelling subscriptions, customers, payment methods, invoices and test clocks.

Registered on v1.bp by @endpoint when this module is imported (app.py imports it); each
function parses and validates its parameters with Stripe's errors and calls a domain module.
endpoints.py holds the rest of /v1.
"""

from __future__ import annotations

from typing import Any

from . import billing, checkout, clock, customers, invoicing, lists, prices, tax
from .context import current_settings, current_store
from .errors import StripeError, missing
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
            "automatic_tax",
            "billing_address_collection",
            "tax_id_collection",
            "customer_update",
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
        line_items.append((required_string(item, "price", path), integer(item, "quantity", path, minimum=1)))
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
        **_checkout_tax(params),
    )
    return checkout.create_checkout_session(current_store(), checkout_request, current_settings().public_url)


def _checkout_tax(params: Params) -> dict[str, Any]:
    """automatic_tax, billing_address_collection, tax_id_collection and customer_update (Stripe Tax)."""
    automatic = mapping(params, "automatic_tax") or {}
    reject_unknown(automatic, ("enabled", "liability"), "automatic_tax")
    collection = string(params, "billing_address_collection") or "auto"
    if collection not in ("auto", "required"):
        raise StripeError("Invalid billing_address_collection: must be one of auto or required", param=collection)
    tax_ids = mapping(params, "tax_id_collection") or {}
    reject_unknown(tax_ids, ("enabled", "required"), "tax_id_collection")
    update = mapping(params, "customer_update") or {}
    reject_unknown(update, ("address", "name", "shipping"), "customer_update")
    if update and not string(params, "customer"):
        raise StripeError("customer_update can only be used with customer.", param="customer_update")
    return {
        "automatic_tax": bool(boolean(automatic, "enabled", "automatic_tax")),
        "billing_address_collection": collection,
        "tax_id_collection": bool(boolean(tax_ids, "enabled", "tax_id_collection")),
        "customer_update": {k: str(v) for k, v in update.items()},
    }


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
    reject_unknown(
        params,
        ("email", "name", "metadata", "test_clock", "payment_method", "invoice_settings", "address", "tax_exempt"),
    )
    return customers.create(
        current_store(),
        email=string(params, "email"),
        name=string(params, "name"),
        metadata=new_metadata(params),
        test_clock=string(params, "test_clock"),
        payment_method=string(params, "payment_method"),
        default_payment_method=_default_payment_method(params),
        origin=_origin(),
        tax_details=_tax_details(params),
    )


def _tax_details(params: Params) -> tuple[Obj | None, str | None]:
    """address (a hash; "" clears it) and tax_exempt, for Stripe Tax (sandbox/tax.py)."""
    given = params.get("address")
    if given is not None and given != "":
        given = mapping(params, "address")
        reject_unknown(given or {}, ("city", "country", "line1", "line2", "postal_code", "state"), "address")
    return (None if given is None else (given or {})), string(params, "tax_exempt")


@endpoint("/customers/<customer_id>", "POST")
def update_customer(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("email", "name", "metadata", "invoice_settings", "address", "tax_exempt"))
    return customers.update(
        current_store(),
        customer_id,
        email=params["email"] if params.get("email") == "" else string(params, "email"),
        name=params["name"] if params.get("name") == "" else string(params, "name"),
        metadata=metadata(params),
        default_payment_method=_default_payment_method(params),
        origin=_origin(),
        tax_details=_tax_details(params),
    )


@endpoint("/customers/<customer_id>/payment_methods", "GET")
def list_customer_payment_methods(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("type", "limit", "starting_after"))
    _card_type_only(params)
    billing.load(current_store(), "customer", customer_id, "customer")
    return invoicing.customer_payment_methods(current_store(), customer_id, lists.page_params(params))


@endpoint("/customers/<customer_id>/tax_ids", "POST")
def create_tax_id(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("type", "value"))
    customer = billing.load(current_store(), "customer", customer_id, "customer")
    kind, value = required_string(params, "type"), required_string(params, "value")
    return tax.create_tax_id(current_store(), customer, kind, value, _origin())


@endpoint("/customers/<customer_id>/tax_ids", "GET")
def list_tax_ids(params: Params, customer_id: str) -> Obj:
    reject_unknown(params, ("limit", "starting_after", "ending_before"))
    billing.load(current_store(), "customer", customer_id, "customer")
    found = list(reversed(tax.tax_ids_of(current_store(), customer_id)))
    return lists.paginate(found, f"/v1/customers/{customer_id}/tax_ids", lists.page_params(params), "tax_id")


@endpoint("/customers/<customer_id>/tax_ids/<tax_id_id>", "GET")
def retrieve_tax_id(params: Params, customer_id: str, tax_id_id: str) -> Obj:
    reject_unknown(params, ())
    found = next((t for t in tax.tax_ids_of(current_store(), customer_id) if t["id"] == tax_id_id), None)
    if found is None:
        raise StripeError(f"No such tax ID: '{tax_id_id}'", status=404, code="resource_missing", param="id")
    return found


@endpoint("/customers/<customer_id>/tax_ids/<tax_id_id>", "DELETE")
def delete_tax_id(params: Params, customer_id: str, tax_id_id: str) -> Obj:
    reject_unknown(params, ())
    return tax.delete_tax_id(current_store(), customer_id, tax_id_id, _origin())


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
