"""The contract: every object the sandbox returns has the shape stripe-python declares, whole.

For each Stripe object the sandbox returns, the test creates one through the sandbox and checks
every field of the JSON it returns against the type hints of the corresponding stripe-python
class (stripe.Subscription, stripe.Invoice, ... and their nested classes), resolving Optional,
Union, Literal, List, Dict, ListObject and expandable `str | Object` fields. A field stripe does
not declare is a failure, so the sandbox cannot invent fields; a field stripe declares that the
object (or a nested hash of it) lacks is a failure too, so the sandbox returns every field
Stripe's API reference lists, unless NOT_BY_DEFAULT names it as one Stripe itself leaves out of
a default response; and the fields the app reads (APP_READS, from app/services) must be present.
"""

from __future__ import annotations

import ast
import decimal
import importlib
import inspect
import types
import typing
from functools import cache
from typing import Any

import requests
import stripe
from stripe._list_object import ListObject
from stripe._stripe_object import StripeObject, UntypedStripeObject

from sandbox.tests.conftest import Sandbox, paid_subscription
from sandbox.tests.test_clock import T0, clock_customer, subscribe
from sandbox.tests.test_tax import BERLIN, taxed_checkout

# What app/services reads from each object (grep for .get("…") and ["…"] on Stripe payloads).
APP_READS: dict[str, set[str]] = {
    "checkout.session": {
        "id",
        "client_reference_id",
        "metadata",
        "status",
        "payment_status",
        "subscription",
        "customer",
        "invoice",
    },
    "subscription": {
        "id",
        "status",
        "items",
        "customer",
        "cancel_at_period_end",
        "cancel_at",
        "trial_end",
        "canceled_at",
        "ended_at",
        "metadata",
        "latest_invoice",
        "pause_collection",
        "schedule",
        "default_payment_method",
    },
    "subscription_item": {"id", "price", "quantity", "current_period_end", "current_period_start"},
    "price": {"id", "lookup_key", "unit_amount", "currency", "recurring", "product", "active", "nickname"},
    "invoice": {
        "id",
        "customer",
        "amount_due",
        "amount_paid",
        "currency",
        "attempt_count",
        "next_payment_attempt",
        "hosted_invoice_url",
        "invoice_pdf",
        "status",
        "number",
        "created",
        "lines",
        "total",
        "subtotal",
        "period_end",
        "parent",
    },
    "line_item": {"amount", "description", "period", "parent", "pricing", "quantity"},
    "customer": {"id", "email", "name", "invoice_settings", "test_clock"},
    "payment_method": {"id", "card", "customer", "type"},
    "refund": {"id", "amount", "status", "charge", "payment_intent", "reason", "metadata"},
    "event": {"id", "type", "created", "livemode", "data", "api_version", "request"},
    "billing_portal.session": {"id", "url", "customer", "return_url"},
    "test_helpers.test_clock": {"id", "frozen_time", "status"},
    "subscription_schedule": {"id", "status", "phases", "current_phase", "subscription", "end_behavior"},
}
CLASSES: dict[str, type[StripeObject]] = {
    "coupon": stripe.Coupon,
    "promotion_code": stripe.PromotionCode,
    "discount": stripe.Discount,
    "tax_id": stripe.TaxId,
    "item": stripe.LineItem,
    "checkout.session": stripe.checkout.Session,
    "subscription": stripe.Subscription,
    "subscription_item": stripe.SubscriptionItem,
    "price": stripe.Price,
    "product": stripe.Product,
    "plan": stripe.Plan,
    "invoice": stripe.Invoice,
    "line_item": stripe.InvoiceLineItem,
    "invoice_payment": stripe.InvoicePayment,
    "customer": stripe.Customer,
    "payment_method": stripe.PaymentMethod,
    "payment_intent": stripe.PaymentIntent,
    "charge": stripe.Charge,
    "refund": stripe.Refund,
    "event": stripe.Event,
    "billing_portal.session": stripe.billing_portal.Session,
    "test_helpers.test_clock": stripe.test_helpers.TestClock,
    "subscription_schedule": stripe.SubscriptionSchedule,
}


# Fields stripe-python declares that a default response does not carry, by class (qualified name).
# The authority is Stripe's OpenAPI spec (github.com/stripe/openapi): a property missing from an
# object's `required` list is one Stripe leaves out unless asked for or unless its feature is in
# use, and the spec's example objects (openapi/fixtures3.json) omit every field below. Reasons:
INCLUDABLE = "includable: only with expand[]=<field> (the reference says 'not included by default')"
CONDITIONAL = "only present when its feature is in use (the spec does not require it)"
CONNECT = "Connect / Accounts v2 only (a platform acting for a connected account)"
PREVIEW = "a preview or newer feature the spec marks optional (not on a default response)"
DELETED = "only on the stub a DELETE returns"
NOT_BY_DEFAULT: dict[str, dict[str, str]] = {
    "Customer": {
        **dict.fromkeys(("cash_balance", "invoice_credit_balance", "sources", "subscriptions", "tax"), INCLUDABLE),
        "tax_ids": INCLUDABLE,
        **dict.fromkeys(("business_name", "individual_name"), CONDITIONAL),  # Accounts v2 customers' names
        "customer_account": CONNECT,
    },
    "Invoice": {
        **dict.fromkeys(("payments", "confirmation_secret"), INCLUDABLE),
        **dict.fromkeys(("amount_paid_off_stripe", "status_details", "threshold_reason"), CONDITIONAL),
    },
    "checkout.Session": {
        "line_items": INCLUDABLE,
        **dict.fromkeys(("return_url", "redirect_on_completion"), CONDITIONAL),  # ui_mode embedded only
        **dict.fromkeys(("optional_items", "tax_id_collection", "name_collection"), CONDITIONAL),
        **dict.fromkeys(("allowed_payment_method_types", "excluded_payment_method_types"), PREVIEW),
        **dict.fromkeys(("branding_settings", "presentment_details"), PREVIEW),
    },
    "Subscription": dict.fromkeys(("presentment_details", "status_details"), PREVIEW),
    "SubscriptionItem": dict.fromkeys(("billed_until", "current_trial"), PREVIEW),
    "SubscriptionSchedule": {"pause_schedules": PREVIEW},
    "SubscriptionSchedule.Phase": {"trial": PREVIEW},
    "Price": dict.fromkeys(("currency_options", "tiers"), INCLUDABLE),
    "Plan": {"tiers": INCLUDABLE},
    "Product": {"tax_details": PREVIEW},
    "Coupon": dict.fromkeys(("applies_to", "currency_options"), INCLUDABLE),
    "PromotionCode.Restrictions": {"currency_options": INCLUDABLE},
    "LineItem": dict.fromkeys(("discounts", "taxes"), INCLUDABLE),  # a Checkout line item
    "PaymentIntent": {
        **dict.fromkeys(("payment_details", "payment_record", "presentment_details", "hooks"), PREVIEW),
        "allowed_payment_method_types": PREVIEW,
    },
    "PaymentIntent.AmountDetails.Tip": {"amount": CONDITIONAL},  # a tip collected in person
    "PaymentIntent.PaymentMethodOptions.Card": dict.fromkeys(  # each only when asked for at confirmation
        (
            "capture_method",
            "request_extended_authorization",
            "request_incremental_authorization",
            "request_multicapture",
            "request_overcapture",
            "require_cvc_recollection",
            "setup_credential_usage",
            "setup_future_usage",
            "statement_descriptor_suffix_kana",
            "statement_descriptor_suffix_kanji",
            "stored_credential_usage",
        ),
        CONDITIONAL,
    ),
    "Subscription.BillingMode": {"updated_at": CONDITIONAL},  # set when the mode is changed
    "SubscriptionSchedule.BillingMode": {"updated_at": CONDITIONAL},
    "Charge.FraudDetails": dict.fromkeys(("stripe_report", "user_report"), CONDITIONAL),  # once reported
    "InvoicePayment.Payment": dict.fromkeys(("charge", "payment_intent", "payment_record"), CONDITIONAL),  # by type
    "PaymentIntent.AmountDetails": dict.fromkeys(
        ("discount_amount", "error", "line_items", "shipping", "tax"), CONDITIONAL
    ),  # Level 2/3 amount details given at creation
    "Charge": {
        "refunds": INCLUDABLE,
        **dict.fromkeys(("authorization_code", "level3", "presentment_details", "radar_options"), CONDITIONAL),
        "transfer": CONNECT,
    },
    "Charge.Outcome": dict.fromkeys(("risk_level", "risk_score", "rule"), CONDITIONAL),  # Radar for Fraud Teams
    "Charge.PaymentMethodDetails.Card": {
        **dict.fromkeys(("capture_before", "description", "iin", "issuer", "moto"), CONDITIONAL),
        **dict.fromkeys(("electronic_commerce_indicator", "setup_credential_usage"), CONDITIONAL),
        "stored_credential_usage": CONDITIONAL,
    },
    "PaymentMethod": {"radar_options": CONDITIONAL},
    "PaymentMethod.Card": dict.fromkeys(("description", "iin", "issuer"), CONDITIONAL),  # issuing-partner data
    "Refund": {
        **dict.fromkeys(("description", "failure_reason", "failure_balance_transaction"), CONDITIONAL),
        **dict.fromkeys(("instructions_email", "next_action", "pending_reason", "presentment_details"), CONDITIONAL),
    },
    "Refund.DestinationDetails.Card": dict.fromkeys(("reference", "reference_status", "reference_type"), CONDITIONAL),
    "Event": {"account": CONNECT, "context": CONNECT},
    # The account liable for tax or issuing the invoice: named only when its type is "account".
    **{
        name: {"account": CONNECT}
        for name in (
            "Invoice.AutomaticTax.Liability",
            "Invoice.Issuer",
            "Subscription.AutomaticTax.Liability",
            "Subscription.InvoiceSettings.Issuer",
            "SubscriptionSchedule.DefaultSettings.AutomaticTax.Liability",
            "SubscriptionSchedule.DefaultSettings.InvoiceSettings.Issuer",
            "SubscriptionSchedule.Phase.InvoiceSettings.Issuer",
            "checkout.Session.AutomaticTax.Liability",
        )
    },
    "TaxId.Owner": dict.fromkeys(("account", "application"), CONNECT),  # named only for an owner of that type
    "Event.Data": {"previous_attributes": CONDITIONAL},  # *.updated events only
    "billing_portal.Session.Flow": dict.fromkeys(("customer_update", "subscription_pause"), CONDITIONAL),
    "billing_portal.Session": {"after_expiration": CONDITIONAL},  # a portal session from a Checkout flow
    "test_helpers.TestClock.StatusDetails": {"advancing": CONDITIONAL},  # while advancing only
    "*": {"deleted": DELETED},
}
# Hashes with one key per payment method type: only the type in use (or configured) is present, as
# the reference says of each ("If this is a `card` PaymentMethod, this hash contains ...").
ONE_KEY_PER_TYPE = frozenset(
    {
        "PaymentMethod",
        "Charge.PaymentMethodDetails",
        "Refund.DestinationDetails",
        "PaymentIntent.PaymentMethodOptions",
        "PaymentIntent.NextAction",
        "checkout.Session.PaymentMethodOptions",
        "Invoice.PaymentSettings.PaymentMethodOptions",
        "Subscription.PaymentSettings.PaymentMethodOptions",
    }
)


def class_name(cls: type) -> str:
    """stripe.checkout.Session.Flow -> "checkout.Session.Flow"; stripe.Invoice.Issuer -> "Invoice.Issuer"."""
    package = [part for part in cls.__module__.split(".")[1:] if not part.startswith("_")]
    return ".".join([*package, cls.__qualname__])


def _leaves_out(cls: type, field: str, hint: Any) -> bool:
    """Whether a response may lack this declared field (NOT_BY_DEFAULT, ONE_KEY_PER_TYPE)."""
    name = class_name(cls)
    if field in NOT_BY_DEFAULT.get(name, {}) or field in NOT_BY_DEFAULT["*"]:
        return True
    if name in ONE_KEY_PER_TYPE:
        return any(isinstance(arm, type) and issubclass(arm, StripeObject) for arm in typing.get_args(hint))
    return False


# -- resolving stripe-python's type hints ---------------------------------------------------------


@cache
def _module_namespace(name: str) -> dict[str, Any]:
    """A module's globals plus what it imports only under TYPE_CHECKING (its forward refs)."""
    module = importlib.import_module(name)
    namespace = dict(vars(module))
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), name, "exec"), namespace)  # noqa: S102
    return namespace


@cache
def fields_of(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, globalns=_module_namespace(cls.__module__), localns=dict(vars(cls)))
    return {k: v for k, v in hints.items() if not k.startswith("_") and k != "OBJECT_NAME"}


def check(value: Any, hint: Any, path: str, cls: type | None = None, field: str = "") -> list[str]:  # noqa: PLR0912
    """Why `value` does not fit `hint` (empty if it does)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return []
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return [] if type(None) in args else [f"{path}: null, but {hint} is not optional"]
        attempts = [check(value, arm, path, cls, field) for arm in args if arm is not type(None)]
        return [] if any(not a for a in attempts) else min(attempts, key=len)
    if value is None:
        return [f"{path}: null, but stripe declares {hint} (not optional)"]
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {args}"]
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in check(v, args[0], f"{path}[{i}]")]
    if origin in (dict, typing.Dict) or (isinstance(origin, type) and issubclass(origin, UntypedStripeObject)):  # noqa: UP006
        if not isinstance(value, dict):
            return [f"{path}: expected a hash, got {type(value).__name__}"]
        inner = args[-1] if args else Any
        return [e for k, v in value.items() for e in check(v, inner, f"{path}.{k}")]
    if origin is not None and isinstance(origin, type) and issubclass(origin, ListObject):
        if not isinstance(value, dict) or value.get("object") != "list":
            return [f"{path}: expected a list object"]
        errors = [] if isinstance(value.get("has_more"), bool) else [f"{path}.has_more: not a boolean"]
        errors += [] if isinstance(value.get("url"), str) else [f"{path}.url: not a string"]
        unknown = set(value) - {"object", "data", "has_more", "url"}
        errors += [f"{path}.{k}: not part of a list object" for k in sorted(unknown)]
        return errors + [e for i, v in enumerate(value["data"]) for e in check(v, args[0], f"{path}.data[{i}]")]
    if hint is decimal.Decimal:
        encoding = getattr(cls, "_field_encodings", {}).get(field)
        ok = isinstance(value, str) and encoding == "decimal_string" and _is_decimal(value)
        return [] if ok else [f"{path}: expected a decimal string, got {value!r}"]
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
    if hint is int:
        return (
            []
            if isinstance(value, int) and not isinstance(value, bool)
            else [f"{path}: expected an integer, got {value!r}"]
        )
    if hint is float:
        return [] if isinstance(value, int | float) and not isinstance(value, bool) else [f"{path}: expected a number"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {type(value).__name__}"]
    if isinstance(hint, type) and issubclass(hint, StripeObject):
        if not isinstance(value, dict):
            return [f"{path}: expected a {hint.__qualname__} hash, got {type(value).__name__}"]
        return check_object(value, hint, path)
    return [f"{path}: the contract test cannot check type {hint!r}"]


def _is_decimal(value: str) -> bool:
    try:
        return decimal.Decimal(value).is_finite()
    except decimal.InvalidOperation:
        return False


def check_object(obj: dict[str, Any], cls: type, path: str) -> list[str]:
    declared = fields_of(cls)
    errors = []
    for key, value in obj.items():
        if key not in declared:
            errors.append(f"{path}.{key}: stripe-python's {cls.__qualname__} does not declare this field")
            continue
        errors += check(value, declared[key], f"{path}.{key}", cls, key)
    for key, hint in declared.items():
        if key not in obj and not _leaves_out(cls, key, hint):
            errors.append(f"{path}.{key}: stripe-python's {cls.__qualname__} declares it, the sandbox leaves it out")
    return errors


def check_stripe_object(obj: dict[str, Any], path: str | None = None) -> list[str]:
    """Check a top-level object by its `object` value, and the fields the app reads."""
    kind = obj["object"]
    where = path or kind
    errors = check_object(obj, CLASSES[kind], where)
    missing = APP_READS.get(kind, set()) - set(obj)
    errors += [f"{where}.{field}: the app reads it but the sandbox does not return it" for field in sorted(missing)]
    if kind == "subscription":
        for i, item in enumerate(obj["items"]["data"]):
            missing = APP_READS["subscription_item"] - set(item)
            errors += [f"{where}.items.data[{i}].{f}: read by the app, missing" for f in sorted(missing)]
    if kind == "invoice":
        for i, line in enumerate(obj["lines"]["data"]):
            missing = APP_READS["line_item"] - set(line)
            errors += [f"{where}.lines.data[{i}].{f}: read by the app, missing" for f in sorted(missing)]
    if kind == "event":
        errors += check_stripe_object(obj["data"]["object"], f"{where}({obj['type']}).data.object")
    return errors


# -- the objects, made through the sandbox -----------------------------------------------------------


def _get(sandbox: Sandbox, path: str, **params: Any) -> dict[str, Any]:
    response = requests.get(f"{sandbox.url}/v1/{path}", params=params, auth=("sk_test_contract", ""), timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _post(sandbox: Sandbox, path: str, data: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{sandbox.url}/v1/{path}", data=data, auth=("sk_test_contract", ""), timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_object_matches_stripe_pythons_types(sandbox: Sandbox, prices: dict[str, str]) -> None:
    session, sub = paid_subscription(sandbox, prices)
    customer = sub.customer
    # Stripe Tax, a tax ID still being verified and then verified, and a promotion code's discount: the
    # invoices below carry taxes and discounts, and the events their objects.
    _post(sandbox, f"customers/{customer}", {"address[country]": "FR", "address[city]": "Paris"})
    tax_id = _post(sandbox, f"customers/{customer}/tax_ids", {"type": "eu_vat", "value": "FR222222222"})
    verified = requests.post(f"{sandbox.url}/_sandbox/tax_ids/{tax_id['id']}/verification", json={}, timeout=10)
    assert verified.json()["verification"]["status"] == "verified"
    coupon = _post(sandbox, "coupons", {"percent_off": "20", "duration": "repeating", "duration_in_months": "3"})
    code = _post(sandbox, "promotion_codes", {"promotion[type]": "coupon", "promotion[coupon]": coupon["id"]})
    _post(
        sandbox,
        f"subscriptions/{sub.id}",
        {"automatic_tax[enabled]": "true", "discounts[0][promotion_code]": code["id"]},
    )
    taxed_session, _ = taxed_checkout(sandbox, prices, **BERLIN, businessName="Ada GmbH", taxId="DE123456782")
    seats = next(i for i in sub["items"].data if i.price.lookup_key == "extra_seat_monthly")
    _post(sandbox, f"subscriptions/{sub.id}", {"items[0][id]": seats.id, "items[0][quantity]": "4"})
    _post(sandbox, f"subscriptions/{sub.id}", {"pause_collection[behavior]": "keep_as_draft", "cancel_at": str(T0 * 2)})
    upgraded = _post(
        sandbox,
        f"subscriptions/{sub.id}",
        {
            "items[0][id]": sub["items"].data[0].id,
            "items[0][price]": prices["pro_monthly"],
            "proration_behavior": "always_invoice",
            "default_payment_method": "pm_card_visa",
        },
    )
    invoice = _get(sandbox, f"invoices/{upgraded['latest_invoice']}", **{"expand[]": "payments"})
    intent_id = invoice["payments"]["data"][0]["payment"]["payment_intent"]
    refund = _post(sandbox, "refunds", {"payment_intent": intent_id, "amount": "100", "reason": "duplicate"})
    schedule = _post(sandbox, "subscription_schedules", {"from_subscription": sub.id})
    end = sub["items"].data[0].current_period_end
    schedule = _post(
        sandbox,
        f"subscription_schedules/{schedule['id']}",
        {
            "phases[0][items][0][price]": prices["pro_monthly"],
            "phases[0][start_date]": str(sub["items"].data[0].current_period_start),
            "phases[0][end_date]": str(end),
            "phases[1][items][0][price]": prices["starter_monthly"],
        },
    )
    clock_id, clock_customer_id = clock_customer(sandbox)
    subscribe(sandbox, prices, clock_customer_id)
    # A metered item (the catalogue's meter): no quantity, billed from the meter's usage.
    [metered_price] = _get(sandbox, "prices", **{"lookup_keys[]": "api_calls_metered"})["data"]
    metered_customer = _post(sandbox, "customers", {"email": "meter@example.com"})["id"]
    metered = subscribe(
        sandbox,
        prices,
        metered_customer,
        line_items=[{"price": prices["starter_monthly"], "quantity": 1}, {"price": metered_price["id"]}],
    )
    usage = {"event_name": "sandbox_api_calls", "payload[stripe_customer_id]": metered_customer, "payload[value]": "7"}
    _post(sandbox, "billing/meter_events", usage)
    metered_preview = _post(sandbox, "invoices/create_preview", {"subscription": metered.id})
    assert [line["quantity"] for line in metered_preview["lines"]["data"]] == [1, 7]
    # To yearly billing: the metered item leaves the subscription (its proration line has no quantity).
    yearly = _get(sandbox, "prices", **{"lookup_keys[]": "starter_yearly"})["data"][0]["id"]
    metered_items = metered["items"].data
    to_yearly = _post(
        sandbox,
        "invoices/create_preview",
        {
            "subscription": metered.id,
            "subscription_details[items][0][id]": metered_items[0].id,
            "subscription_details[items][0][price]": yearly,
            "subscription_details[items][1][id]": metered_items[1].id,
            "subscription_details[items][1][deleted]": "true",
            "subscription_details[proration_behavior]": "always_invoice",
        },
    )
    new_price = _post(
        sandbox,
        "prices",
        {"currency": "usd", "unit_amount": "700", "recurring[interval]": "year", "product_data[name]": "X"},
    )

    objects_to_check: list[dict[str, Any]] = [
        _get(sandbox, f"checkout/sessions/{session.id}", **{"expand[]": ["line_items", "subscription"]}),
        _get(sandbox, f"checkout/sessions/{taxed_session.id}", **{"expand[]": ["line_items"]}),
        _get(
            sandbox,
            f"subscriptions/{sub.id}",
            **{"expand[]": ["latest_invoice", "customer", "default_payment_method", "discounts.promotion_code"]},
        ),
        _get(sandbox, f"customers/{customer}", **{"expand[]": "tax_ids"}),
        _get(sandbox, f"customers/{customer}/tax_ids/{tax_id['id']}"),
        _get(sandbox, f"coupons/{coupon['id']}"),
        _get(sandbox, f"promotion_codes/{code['id']}", **{"expand[]": "promotion.coupon"}),
        _get(sandbox, f"prices/{prices['starter_monthly']}", **{"expand[]": "product"}),
        new_price,
        invoice,
        _get(sandbox, f"invoices/{sub.latest_invoice}"),
        _post(
            sandbox,
            "invoices/create_preview",
            {
                "subscription": sub.id,
                "subscription_details[items][0][id]": seats.id,
                "subscription_details[items][0][quantity]": "9",
            },
        ),
        _get(sandbox, f"customers/{customer}"),
        _get(sandbox, f"payment_methods/{upgraded['default_payment_method']}"),
        _get(sandbox, f"payment_intents/{intent_id}", **{"expand[]": "latest_charge"}),
        refund,
        _get(sandbox, f"refunds/{refund['id']}", **{"expand[]": ["charge", "payment_intent"]}),
        _post(sandbox, "billing_portal/sessions", {"customer": customer, "return_url": "http://app.test/"}),
        _get(sandbox, f"test_helpers/test_clocks/{clock_id}"),
        _get(sandbox, f"subscription_schedules/{schedule['id']}"),
        _get(sandbox, f"subscriptions/{metered.id}", **{"expand[]": "latest_invoice"}),
        metered_preview,
        to_yearly,
    ]
    events = _get(sandbox, "events", limit="100")["data"]
    objects_to_check += events
    kinds = {o["object"] for o in objects_to_check} | {e["data"]["object"]["object"] for e in events}
    assert set(APP_READS) - {"subscription_item", "line_item"} <= kinds  # every object the app reads
    assert {"coupon", "promotion_code", "tax_id", "refund", "charge", "payment_intent"} <= kinds
    assert "customer.tax_id.updated" in {e["type"] for e in events}
    failures = [error for obj in objects_to_check for error in check_stripe_object(obj)]
    assert not failures, "\n".join(sorted(set(failures)))


def test_the_checker_catches_invented_and_mistyped_fields() -> None:
    price = {"id": "price_1", "object": "price", "active": "yes", "colour": "red", "unit_amount_decimal": "100"}
    errors = check_stripe_object(price)
    assert any("price.colour" in e and "does not declare" in e for e in errors)
    assert any("price.active: expected a boolean" in e for e in errors)
    assert not any("unit_amount_decimal" in e for e in errors)  # a decimal string, as declared
    assert any("expected a decimal string" in e for e in check_stripe_object({**price, "unit_amount_decimal": "None"}))
    assert any("price.lookup_key: the app reads it" in e for e in errors)
    # Completeness: a field stripe-python declares is missing unless Stripe leaves it out by default.
    assert any(e.startswith("price.billing_scheme: ") and "leaves it out" in e for e in errors)
    assert not any(e.startswith(("price.tiers:", "price.currency_options:", "price.deleted:")) for e in errors)
    card = {"id": "pm_1", "object": "payment_method", "type": "card"}
    assert not any("payment_method.sepa_debit" in e for e in check_stripe_object(card))  # not its type
    assert any("payment_method.customer:" in e for e in check_stripe_object(card))
    sub = {
        "id": "sub_1",
        "object": "subscription",
        "items": {"object": "list", "data": [{"id": 3}], "has_more": False, "url": "/"},
    }
    assert any("items.data[0].id: expected a string" in e for e in check_stripe_object(sub))


def test_events_never_show_the_sandboxs_bookkeeping(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    _post(sandbox, f"subscriptions/{sub.id}", {"default_payment_method": "pm_card_chargeCustomerFail"})
    _post(
        sandbox,
        f"subscriptions/{sub.id}",
        {
            "items[0][id]": sub["items"].data[0].id,
            "items[0][price]": prices["pro_monthly"],
            "proration_behavior": "always_invoice",
            "payment_behavior": "pending_if_incomplete",
        },
    )
    events = _get(sandbox, "events", type="customer.subscription.updated", limit="100")["data"]
    mine = [e for e in events if e["data"]["object"]["id"] == sub.id]
    assert any("pending_update" in e["data"]["previous_attributes"] for e in mine)
    assert "'_" not in repr(mine) and '"_' not in repr(mine)

    # Metadata is the customer's own: a key starting with "_" is kept, in objects and events.
    tagged = _post(sandbox, f"subscriptions/{sub.id}", {"metadata[_origin]": "import"})
    assert tagged["metadata"]["_origin"] == "import"
    events = _get(sandbox, "events", type="customer.subscription.updated", limit="1")["data"]
    assert events[0]["data"]["object"]["metadata"]["_origin"] == "import"
    assert events[0]["data"]["previous_attributes"]["metadata"] == {"_origin": None}
