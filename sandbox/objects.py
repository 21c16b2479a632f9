"""Stripe object shapes (API version 2026-10-28.endive), built as plain dicts.

Only the fields this product's flows touch carry real values; the rest hold the values Stripe
gives an object created the same way in test mode, so code reading them sees the right types.
"""

from __future__ import annotations

import calendar
import copy
import secrets
import string
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

API_VERSION = "2026-10-28.endive"
CURRENCY = "usd"

# Fields Stripe only returns when asked for with expand[]=…, per object type. Separately, keys
# starting with "_" are the sandbox's own bookkeeping and are never shown.
INCLUDABLE = {"checkout.session": ("line_items",), "invoice": ("payments",), "customer": ("tax_ids",)}

_ALPHABET = string.ascii_letters + string.digits

Obj = dict[str, Any]


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def add_month(timestamp: int) -> int:
    """Same day next month, clamped to the month's end (Jan 31 -> Feb 28), as Stripe bills."""
    start = datetime.fromtimestamp(timestamp, UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def first_period_end(line_items: list[Obj], now: int) -> int:
    """The end of a new subscription's first period: one billing interval of its (first) price, so a
    yearly price's runs a year."""
    recurring = (line_items[0]["price"].get("recurring") or {}) if line_items else {}
    interval, count = recurring.get("interval") or "month", int(recurring.get("interval_count") or 1)
    if interval not in ("month", "year"):
        return now + count * (7 if interval == "week" else 1) * 86400
    end = now
    for _ in range(count * (12 if interval == "year" else 1)):
        end = add_month(end)
    return end


def money(cents: int) -> str:
    """An amount in cents as a customer reads it: $1,234.50."""
    return f"${cents / 100:,.2f}"


def public(obj: Obj, include: Collection[str] = ()) -> Obj:
    """A deep copy of the object as Stripe shows it, with the includable fields asked for."""
    hidden = set(INCLUDABLE.get(obj["object"], ())) - set(include)
    shown = {k: v for k, v in obj.items() if not k.startswith("_") and k not in hidden}
    result: Obj = _without_bookkeeping(shown)
    return result


def _without_bookkeeping(value: Any) -> Any:
    """A deep copy without "_" keys at any depth (a price embedded in a subscription item, say).
    Metadata is the customer's own data and is copied whole, "_" keys included."""
    if isinstance(value, dict):
        return {
            k: copy.deepcopy(v) if k == "metadata" else _without_bookkeeping(v)
            for k, v in value.items()
            if not k.startswith("_")
        }
    if isinstance(value, list):
        return [_without_bookkeeping(v) for v in value]
    return copy.deepcopy(value)


def list_object(data: list[Obj], url: str, has_more: bool = False) -> Obj:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def previous_attributes(before: Obj, after: Obj) -> Obj:
    """What changed, as event.data.previous_attributes: old values of changed keys, recursing
    into hashes (Stripe lists only the changed sub-keys) but not into lists. A key that was
    added shows as null; one that was removed shows its old value."""
    changed: Obj = {}
    for key in {**before, **after}:  # both objects' keys, in their order
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        changed[key] = previous_attributes(old, new) if isinstance(old, dict) and isinstance(new, dict) else old
    return changed


# -- catalogue ------------------------------------------------------------------------------


def product(name: str, description: str | None, now: int) -> Obj:
    return {
        "id": new_id("prod_", 14),
        "object": "product",
        "active": True,
        "created": now,
        "default_price": None,
        "description": description,
        "images": [],
        "livemode": False,
        "marketing_features": [],
        "metadata": {},
        "name": name,
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "type": "service",
        "unit_label": None,
        "updated": now,
        "url": None,
    }


def price(
    product_id: str, lookup_key: str, nickname: str, unit_amount: int, now: int, tax_behavior: str = "unspecified"
) -> Obj:
    return {
        "id": new_id("price_"),
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": now,
        "currency": CURRENCY,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": {},
        "nickname": nickname,
        "product": product_id,
        "recurring": {
            "interval": "month",
            "interval_count": 1,
            "meter": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        },
        "tax_behavior": tax_behavior,
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(unit_amount),
    }


def plan(price: Obj) -> Obj:
    """The legacy Plan view of a recurring price, still present on subscription items."""
    recurring = price["recurring"]
    return {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": price["billing_scheme"],
        "created": price["created"],
        "currency": price["currency"],
        "interval": recurring["interval"],
        "interval_count": recurring["interval_count"],
        "livemode": False,
        "metadata": price["metadata"],
        "meter": None,
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": recurring["usage_type"],
    }


# -- customers and Checkout ---------------------------------------------------------------------


def customer(email: str | None, name: str | None, now: int) -> Obj:
    return {
        "id": new_id("cus_", 14),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": now,
        "currency": CURRENCY,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "invoice_prefix": new_id("", 8).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": {},
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "tax_ids": list_object([], "/v1/customers/tax_ids"),  # includable: expand=["tax_ids"]
        "test_clock": None,
    }


def checkout_line_item(price: Obj, quantity: int | None) -> Obj:
    amount = price["unit_amount"] * (quantity or 0)  # a metered price's usage is billed later
    return {
        "id": new_id("li_"),
        "object": "item",
        "adjustable_quantity": None,
        "amount_discount": 0,
        "amount_subtotal": amount,
        "amount_tax": 0,
        "amount_total": amount,
        "currency": price["currency"],
        "description": price["nickname"],
        "metadata": {},
        "price": price,
        "quantity": quantity,
    }


def checkout_session(
    *,
    line_items: list[Obj],
    amount_total: int,
    success_url: str | None,
    cancel_url: str | None,
    customer: str | None,
    customer_email: str | None,
    client_reference_id: str | None,
    metadata: dict[str, str],
    subscription_metadata: dict[str, str],
    trial_period_days: int | None,
    missing_payment_method: str | None,
    payment_method_collection: str,
    allow_promotion_codes: bool | None,
    expires_at: int,
    public_url: str,
    now: int,
) -> Obj:
    session_id = new_id("cs_test_", 58)
    return {
        "id": session_id,
        "object": "checkout.session",
        "adaptive_pricing": None,
        "after_expiration": None,
        "allow_promotion_codes": allow_promotion_codes,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {
            "enabled": False,
            "liability": None,
            "provider": None,
            "status": None,
        },
        "billing_address_collection": None,
        "cancel_url": cancel_url,
        "client_reference_id": client_reference_id,
        "client_secret": None,
        "collected_information": None,
        "consent": None,
        "consent_collection": None,
        "created": now,
        "currency": CURRENCY,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer,
        "customer_account": None,
        "customer_creation": None if customer else "always",
        "customer_details": None,
        "customer_email": customer_email,
        "discounts": [],
        "expires_at": expires_at,
        "integration_identifier": None,
        "invoice": None,
        "invoice_creation": None,
        "line_items": list_object(line_items, f"/v1/checkout/sessions/{session_id}/line_items"),
        "livemode": False,
        "locale": None,
        "managed_payments": None,
        "metadata": metadata,
        "mode": "subscription",
        "origin_context": None,
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": payment_method_collection,
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "permissions": None,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "open",
        "submit_type": None,
        "subscription": None,
        "success_url": success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0, "breakdown": None},
        "ui_mode": "hosted_page",
        "url": f"{public_url}/checkout/{session_id}",
        "wallet_options": None,
        # subscription_data is not part of a Session object; kept for when the Session is paid.
        "_subscription_data": {
            "metadata": subscription_metadata,
            "trial_period_days": trial_period_days,
            "missing_payment_method": missing_payment_method,
        },
    }


def customer_details(email: str, name: str) -> Obj:
    return {
        "address": None,
        "business_name": None,
        "email": email,
        "individual_name": None,
        "name": name,
        "phone": None,
        "tax_exempt": "none",
        "tax_ids": [],
    }


# -- subscriptions and invoices ---------------------------------------------------------------


def subscription(
    *,
    customer_id: str,
    line_items: list[Obj],
    metadata: dict[str, str],
    trial_days: int | None,
    status: str,
    now: int,
) -> Obj:
    sub_id = new_id("sub_")
    trial_end = now + trial_days * 86400 if trial_days else None
    period_end = trial_end or first_period_end(line_items, now)
    items = [subscription_item(sub_id, item["price"], item["quantity"], (now, period_end), now) for item in line_items]
    return {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": trial_end or now,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic"},
        "billing_schedules": [],
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "feedback_option": None, "reason": None},
        "collection_method": "charge_automatically",
        "created": now,
        "currency": CURRENCY,
        "customer": customer_id,
        "customer_account": None,
        "days_until_due": None,
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {
            "account_tax_ids": None,
            "custom_fields": None,
            "description": None,
            "footer": None,
            "issuer": {"type": "self"},
        },
        "items": list_object(items, f"/v1/subscription_items?subscription={sub_id}"),
        "latest_invoice": None,
        "livemode": False,
        "managed_payments": None,
        "metadata": metadata,
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": now,
        "status": status,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": trial_end,
        "trial_settings": {"end_behavior": {"billing_cycle_anchor": None, "missing_payment_method": "create_invoice"}},
        "trial_start": now if trial_end else None,
    }


def metered(price: Obj) -> bool:
    """A metered price (recurring[usage_type]=metered): billed in arrears from its meter, no quantity."""
    return bool(price.get("recurring") and price["recurring"].get("usage_type") == "metered")


def subscription_item(subscription_id: str, price: Obj, quantity: int | None, period: tuple[int, int], now: int) -> Obj:
    quantity = None if metered(price) else quantity
    return {
        "id": new_id("si_", 14),
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": now,
        "current_period_end": period[1],
        "current_period_start": period[0],
        "discounts": [],
        "metadata": {},
        "plan": plan(price),
        "price": price,
        "quantity": quantity,
        "subscription": subscription_id,
        "tax_rates": [],
    }


def price_pricing(price: Obj) -> Obj:
    """The `pricing` of an invoice line or invoice item billed at a price."""
    return {
        "type": "price_details",
        "price_details": {"price": price["id"], "product": price["product"]},
        "unit_amount_decimal": price["unit_amount_decimal"],
    }


def invoice_line(
    *,
    invoice_id: str | None,
    amount: int,
    currency: str,
    description: str,
    subscription_id: str,
    subscription_item: str,
    period: Obj,
    pricing: Obj,
    quantity: int,
    invoice_item: str | None = None,
    proration: bool = False,
    discountable: bool = True,
) -> Obj:
    """A line of a subscription's invoice: a recurring charge, or an invoice item's line."""
    return {
        "id": new_id("il_"),
        "object": "line_item",
        "amount": amount,
        "currency": currency,
        "description": description,
        "discount_amounts": [],
        "discountable": discountable,
        "discounts": [],
        "invoice": invoice_id,
        "livemode": False,
        "metadata": {},
        "parent": {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": invoice_item,
                "proration": proration,
                "proration_details": {"credited_items": None},
                "subscription": subscription_id,
                "subscription_item": subscription_item,
            },
        },
        "period": period,
        "pretax_credit_amounts": [],
        "pricing": pricing,
        "quantity": quantity,
        "quantity_decimal": None if quantity is None else str(quantity),
        "subscription": subscription_id,
        "subtotal": amount,
        "taxes": [],
    }


def invoice(customer: Obj, subscription: Obj, now: int) -> Obj:
    """The first invoice of a new subscription, finalized and awaiting payment."""
    invoice_id = new_id("in_")
    trialing = subscription["status"] == "trialing"
    lines = []
    for item in subscription["items"]["data"]:
        price = item["price"]
        quantity = item["quantity"] or 0  # a metered item: its usage (renewals bill the period's)
        amount = 0 if trialing else price["unit_amount"] * quantity
        what = f"Trial period for {price['nickname']}" if trialing else price["nickname"]
        lines.append(
            invoice_line(
                invoice_id=invoice_id,
                amount=amount,
                currency=price["currency"],
                description=f"{quantity} × {what}",
                subscription_id=subscription["id"],
                subscription_item=item["id"],
                period={"start": item["current_period_start"], "end": item["current_period_end"]},
                pricing=price_pricing(price),
                quantity=quantity,
            )
        )
    total = sum(line["amount"] for line in lines)
    return {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe sandbox",
        "account_tax_ids": None,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": False,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": subscription["automatic_tax"]["enabled"],
            "liability": None,
            "provider": None,
            "status": None,
        },
        "billing_reason": "subscription_create",
        "collection_method": "charge_automatically",
        "created": now,
        "currency": CURRENCY,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_account": None,
        "customer_address": customer.get("address"),
        "customer_email": customer["email"],
        "customer_name": customer["name"],
        "customer_phone": None,
        "customer_shipping": None,
        "customer_tax_exempt": customer.get("tax_exempt", "none"),
        "customer_tax_ids": [],
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": now,
        "ending_balance": 0,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": list_object(lines, f"/v1/invoices/{invoice_id}/lines"),
        "livemode": False,
        "metadata": {},
        "number": f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}",
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": subscription["metadata"],
                "subscription": subscription["id"],
                "subscription_proration_date": None,
            },
        },
        "on_behalf_of": None,
        "period_end": now,
        "period_start": now,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "open",
        "status_transitions": {
            "finalized_at": now,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
    }


# -- portal and events ------------------------------------------------------------------------


def portal_session(customer_id: str, return_url: str | None, public_url: str, now: int) -> Obj:
    session_id = new_id("bps_")
    return {
        "id": session_id,
        "object": "billing_portal.session",
        "configuration": "bpc_sandbox_default",
        "created": now,
        "customer": customer_id,
        "customer_account": None,
        "flow": None,
        "livemode": False,
        "locale": None,
        "on_behalf_of": None,
        "return_url": return_url,
        "url": f"{public_url}/portal/{session_id}",
    }


def event(
    type: str,
    snapshot: Obj,
    previous: Obj | None,
    request_id: str | None,
    idempotency_key: str | None,
    now: int,
) -> Obj:
    data: Obj = {"object": public(snapshot)}
    if previous is not None:
        data["previous_attributes"] = _without_bookkeeping(previous)
    return {
        "id": new_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": now,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": type,
    }
