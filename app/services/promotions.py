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
