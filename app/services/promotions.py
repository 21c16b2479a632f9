"""Promotion codes, as the product reads them: the words for a Stripe coupon ("20% off for 3 months")
used by `flask billing check-prices` and the billing page. Coupons and promotion codes are managed in
Stripe (the Dashboard or the API); customers enter a code in Checkout's own promotion code field
(`allow_promotion_codes`, on by PROMOTION_CODES_AT_CHECKOUT) at signup and at an upgrade or a new
subscription. Nothing here talks to Stripe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.services.pricing import format_money


def coupon_of(promotion_code: Mapping[str, Any]) -> Mapping[str, Any]:
    """A promotion code's coupon: `promotion.coupon` (current API versions, expanded) or `coupon`."""
    promotion = promotion_code.get("promotion") or {}
    coupon = promotion.get("coupon") if isinstance(promotion, Mapping) else None
    if not isinstance(coupon, Mapping):
        coupon = promotion_code.get("coupon")
    return coupon if isinstance(coupon, Mapping) else {}


def describe_coupon(coupon: Mapping[str, Any]) -> str:
    """ "20% off for 3 months", "$10.00 off once", "50% off forever"."""
    if coupon.get("percent_off") is not None:
        off = f"{float(coupon['percent_off']):g}% off"
    elif coupon.get("amount_off") is not None:
        off = f"{format_money(int(coupon['amount_off']), coupon.get('currency'))} off"
    else:
        return "a discount"
    duration = coupon.get("duration")
    if duration == "repeating":
        months = int(coupon.get("duration_in_months") or 0)
        return f"{off} for {months} month{'s' if months != 1 else ''}"
    return f"{off} {'forever' if duration == 'forever' else 'once'}"


def describe_code(promotion_code: Mapping[str, Any]) -> str:
    return describe_coupon(coupon_of(promotion_code))


def refusal_for_change(
    promotion_code: Mapping[str, Any] | None,
    entered: str,
    *,
    customer_id: str | None,
    amount: int,
    currency: str,
    now: int,
) -> str | None:
    """Why a code entered on a plan change cannot be used, in the owner's words, or None when it can.
    `amount` is what the new plan costs per its billing period (held against a minimum amount).
    Stripe checks the same when the change is made; this says so before anything is previewed."""
    shown = entered.strip().upper()
    if promotion_code is None or not promotion_code.get("active"):
        return f"The promotion code {shown} is not valid."
    coupon = coupon_of(promotion_code)
    expires_at, redeem_by = promotion_code.get("expires_at"), coupon.get("redeem_by")
    if (expires_at and int(expires_at) <= now) or (redeem_by and int(redeem_by) <= now) or coupon.get("valid") is False:
        return f"The promotion code {shown} has expired."
    limit = promotion_code.get("max_redemptions")
    if limit is not None and int(promotion_code.get("times_redeemed") or 0) >= int(limit):
        return f"The promotion code {shown} has been used up."
    owner = promotion_code.get("customer")
    owner_id = owner if isinstance(owner, str) or owner is None else owner.get("id")
    if owner_id and owner_id != customer_id:
        return f"The promotion code {shown} is for another customer."
    restrictions = promotion_code.get("restrictions") or {}
    if restrictions.get("first_time_transaction"):
        # Stripe's rule: only a customer without invoices; a subscription has had one at least.
        return f"The promotion code {shown} is only for new customers, at signup."
    minimum = restrictions.get("minimum_amount")
    minimum_currency = str(restrictions.get("minimum_amount_currency") or currency).lower()
    if minimum and minimum_currency == currency.lower() and amount < int(minimum):
        return f"The promotion code {shown} needs a plan of at least {format_money(int(minimum), minimum_currency)}."
    return None


def change_discounts(promotion_code_id: str | None) -> Any:  # Stripe params, spread into the SDK's TypedDicts
    """The `discounts` of a plan change's preview and update: the entered code's discount in place of
    those the subscription has (Stripe replaces the list); none given keeps them (no `discounts`)."""
    return {"discounts": [{"promotion_code": promotion_code_id}]} if promotion_code_id else {}
