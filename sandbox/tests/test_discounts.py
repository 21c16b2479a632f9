"""Coupons, promotion codes and their discounts: made through the API, redeemed on the Checkout page,
carried by the subscription and applied to its invoices for as long as the coupon's duration says."""

from __future__ import annotations

import uuid

import pytest
import stripe

from sandbox.tests.conftest import Sandbox, create_session, pay
from sandbox.tests.test_clock import T0, advance, clock_customer, period, subscribe

DAY = 86400


def code_for(sandbox: Sandbox, **coupon: object) -> str:
    made = sandbox.client.v1.coupons.create(params=coupon)  # type: ignore[arg-type]
    code = f"SAVE{uuid.uuid4().hex[:6].upper()}"
    promo = sandbox.client.v1.promotion_codes.create(
        params={"promotion": {"type": "coupon", "coupon": made.id}, "code": code}
    )
    assert promo.id.startswith("promo_") and promo.code == code and promo.active and promo.times_redeemed == 0
    return code


def test_coupons_and_promotion_codes_have_stripes_shapes_and_errors(sandbox: Sandbox) -> None:
    coupon = sandbox.client.v1.coupons.create(
        params={"percent_off": 25, "duration": "repeating", "duration_in_months": 3}
    )
    assert (coupon.object, coupon.percent_off, coupon.duration, coupon.duration_in_months) == (
        "coupon",
        25,
        "repeating",
        3,
    )
    assert coupon.valid and coupon.times_redeemed == 0 and coupon.amount_off is None
    assert sandbox.client.v1.coupons.retrieve(coupon.id).id == coupon.id
    with pytest.raises(stripe.InvalidRequestError, match="exactly one of percent_off or amount_off"):
        sandbox.client.v1.coupons.create(params={"duration": "once"})
    with pytest.raises(stripe.InvalidRequestError, match="currency"):
        sandbox.client.v1.coupons.create(params={"amount_off": 500, "duration": "once"})
    with pytest.raises(stripe.InvalidRequestError, match="duration_in_months"):
        sandbox.client.v1.coupons.create(params={"percent_off": 10, "duration": "repeating"})
    code = code_for(sandbox, amount_off=500, currency="usd", duration="forever")
    listed = sandbox.client.v1.promotion_codes.list(
        params={"code": code.lower(), "active": True, "expand": ["data.promotion.coupon"]}
    )
    [found] = listed.data
    assert found.code == code and found.promotion.coupon.amount_off == 500
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        sandbox.client.v1.promotion_codes.create(params={"coupon": found.promotion.coupon.id, "code": code})
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sandbox.client.v1.promotion_codes.retrieve("promo_missing")
    assert missing.value.code == "resource_missing"


def test_a_code_on_checkout_discounts_the_invoices_while_it_lasts(sandbox: Sandbox, prices: dict[str, str]) -> None:
    clock_id, customer = clock_customer(sandbox)
    code = code_for(sandbox, percent_off=20, duration="repeating", duration_in_months=2)
    session = create_session(
        sandbox,
        prices,
        customer=customer,
        customer_email=None,
        allow_promotion_codes=True,
        line_items=[{"price": prices["starter_monthly"], "quantity": 1}],
    )
    page = pay(sandbox, session.id, billingName="Grace Hopper", promotionCode="NOPE")
    assert page.status_code == 400 and "This code is invalid." in page.text
    assert pay(sandbox, session.id, billingName="Grace Hopper", promotionCode=code.lower()).status_code == 303
    done = sandbox.client.v1.checkout.sessions.retrieve(session.id)
    sub = sandbox.client.v1.subscriptions.retrieve(done.subscription, params={"expand": ["discounts.source.coupon"]})
    [discount] = sub.discounts
    assert discount.object == "discount" and discount.id.startswith("di_")
    assert discount.source.coupon.percent_off == 20
    assert discount.start == T0 and discount.end is not None and discount.subscription == sub.id
    first = sandbox.client.v1.invoices.retrieve(sub.latest_invoice)
    assert (first.subtotal, first.total, first.amount_paid) == (1900, 1520, 1520)
    assert [(a.amount, a.discount) for a in first.total_discount_amounts] == [(380, discount.id)]
    assert first.lines.data[0].discount_amounts[0].amount == 380
    [promo] = sandbox.client.v1.promotion_codes.list(params={"code": code}).data
    assert promo.times_redeemed == 1

    # Two months of 20% off (the first invoice and one renewal), then the full price.
    period_end = sub["items"].data[0].current_period_end
    advance(sandbox, clock_id, period_end + 2 * 3600)
    second = sandbox.client.v1.invoices.retrieve(sandbox.client.v1.subscriptions.retrieve(sub.id).latest_invoice)
    assert (second.total, second.amount_paid, second.discounts) == (1520, 1520, [discount.id])
    period_end = sandbox.client.v1.subscriptions.retrieve(sub.id)["items"].data[0].current_period_end
    advance(sandbox, clock_id, period_end + 2 * 3600)
    third = sandbox.client.v1.invoices.retrieve(sandbox.client.v1.subscriptions.retrieve(sub.id).latest_invoice)
    assert (third.total, third.amount_paid, third.discounts) == (1900, 1900, [])


def test_a_once_coupon_discounts_only_the_first_invoice(sandbox: Sandbox, prices: dict[str, str]) -> None:
    clock_id, customer = clock_customer(sandbox)
    code = code_for(sandbox, amount_off=1000, currency="usd", duration="once")
    session = create_session(
        sandbox,
        prices,
        customer=customer,
        customer_email=None,
        allow_promotion_codes=True,
        line_items=[{"price": prices["starter_monthly"], "quantity": 1}],
    )
    assert pay(sandbox, session.id, billingName="Grace Hopper", promotionCode=code).status_code == 303
    sub = sandbox.client.v1.subscriptions.retrieve(
        sandbox.client.v1.checkout.sessions.retrieve(session.id).subscription
    )
    assert sandbox.client.v1.invoices.retrieve(sub.latest_invoice).total == 900
    assert sub.discounts == []  # used up
    advance(sandbox, clock_id, sub["items"].data[0].current_period_end + 2 * 3600)
    renewed = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert sandbox.client.v1.invoices.retrieve(renewed.latest_invoice).total == 1900


def test_a_code_is_ignored_where_checkout_does_not_allow_codes(sandbox: Sandbox, prices: dict[str, str]) -> None:
    code = code_for(sandbox, percent_off=50, duration="forever")
    session = create_session(sandbox, prices)
    page = pay(sandbox, session.id, promotionCode=code)
    assert page.status_code == 303
    sub = sandbox.client.v1.subscriptions.retrieve(
        sandbox.client.v1.checkout.sessions.retrieve(session.id).subscription
    )
    assert sub.discounts == [] and sandbox.client.v1.invoices.retrieve(sub.latest_invoice).total == 3900  # undiscounted


def test_a_coupon_applied_by_a_subscription_update_discounts_the_next_invoices(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    assert sub.discounts == []
    coupon = sandbox.client.v1.coupons.create(params={"percent_off": 50, "duration": "forever"})
    updated = sandbox.client.v1.subscriptions.update(
        sub.id, params={"discounts": [{"coupon": coupon.id}], "expand": ["discounts"]}
    )
    [discount] = updated.discounts
    assert discount.source.coupon == coupon.id and discount.promotion_code is None and discount.subscription == sub.id
    assert sandbox.client.v1.coupons.retrieve(coupon.id).times_redeemed == 1
    with pytest.raises(stripe.InvalidRequestError, match="cannot be applied twice"):
        sandbox.client.v1.subscriptions.update(
            sub.id, params={"discounts": [{"discount": discount.id}, {"coupon": coupon.id}]}
        )
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sandbox.client.v1.subscriptions.update(sub.id, params={"discounts": [{"coupon": "nope"}]})
    assert missing.value.code == "resource_missing"
    advance(sandbox, clock_id, period(updated)[1] + 2 * 3600)
    renewed = sandbox.client.v1.subscriptions.retrieve(sub.id)
    invoice = sandbox.client.v1.invoices.retrieve(renewed.latest_invoice)
    assert (invoice.subtotal, invoice.total, invoice.discounts) == (1900, 950, [discount.id])
    cleared = sandbox.client.v1.subscriptions.update(sub.id, params={"discounts": ""})
    assert cleared.discounts == []


def test_a_preview_takes_discounts_in_place_of_the_subscriptions_and_redeems_nothing(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    code = code_for(sandbox, percent_off=50, duration="forever")
    [promo] = sandbox.client.v1.promotion_codes.list(params={"code": code}).data
    change = {
        "items": [{"id": sub["items"].data[0].id, "price": prices["pro_monthly"]}],
        "proration_behavior": "always_invoice",
    }
    plain = sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id, "subscription_details": change})  # type: ignore[arg-type]
    discounted = sandbox.client.v1.invoices.create_preview(
        params={"subscription": sub.id, "subscription_details": change, "discounts": [{"promotion_code": promo.id}]}  # type: ignore[typeddict-item]
    )
    assert plain.total_discount_amounts == [] and plain.total > 0
    [share] = discounted.total_discount_amounts
    assert share.amount == round(plain.subtotal / 2) and discounted.total == plain.total - share.amount
    assert sandbox.client.v1.promotion_codes.retrieve(promo.id).times_redeemed == 0
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).discounts == []


def test_codes_restricted_to_a_customer_or_a_minimum_amount_are_refused_elsewhere(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    other = sandbox.client.v1.customers.create(params={"email": "other@example.com"})
    coupon = sandbox.client.v1.coupons.create(params={"percent_off": 10, "duration": "once"})
    theirs = sandbox.client.v1.promotion_codes.create(
        params={"promotion": {"type": "coupon", "coupon": coupon.id}, "customer": other.id}
    )
    dear = sandbox.client.v1.promotion_codes.create(
        params={
            "promotion": {"type": "coupon", "coupon": coupon.id},
            "restrictions": {"minimum_amount": 100_000, "minimum_amount_currency": "usd"},
        }
    )
    assert theirs.customer == other.id and dear.restrictions.minimum_amount == 100_000
    assert dear.restrictions.minimum_amount_currency == "usd"
    with pytest.raises(stripe.InvalidRequestError, match="not valid for this customer"):
        sandbox.client.v1.subscriptions.update(sub.id, params={"discounts": [{"promotion_code": theirs.id}]})
    with pytest.raises(stripe.InvalidRequestError, match="minimum amount"):
        sandbox.client.v1.invoices.create_preview(
            params={"subscription": sub.id, "discounts": [{"promotion_code": dear.id}]}  # type: ignore[typeddict-item]
        )
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).discounts == []


def test_discounts_wait_with_a_pending_update_and_apply_when_its_invoice_is_paid(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    sandbox.client.v1.subscriptions.update(sub.id, params={"default_payment_method": "pm_card_chargeCustomerFail"})
    code = code_for(sandbox, percent_off=20, duration="forever")
    [promo] = sandbox.client.v1.promotion_codes.list(params={"code": code}).data
    pending = sandbox.client.v1.subscriptions.update(
        sub.id,
        params={
            "items": [{"id": sub["items"].data[0].id, "price": prices["pro_monthly"]}],
            "proration_behavior": "always_invoice",
            "payment_behavior": "pending_if_incomplete",
            "discounts": [{"promotion_code": promo.id}],
        },
    )
    invoice = sandbox.client.v1.invoices.retrieve(pending.latest_invoice)
    assert invoice.status == "open" and invoice.total_discount_amounts[0].amount > 0
    assert pending.discounts == [] and len(pending.pending_update.discounts) == 1
    sandbox.client.v1.invoices.pay(invoice.id, params={"payment_method": "pm_card_visa"})
    paid = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert paid.discounts == pending.pending_update.discounts and paid.pending_update is None
