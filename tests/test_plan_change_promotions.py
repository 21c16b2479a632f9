"""A promotion code entered on a plan change: looked up at Stripe and checked before anything is
previewed (unknown, inactive, expired, another customer's, first-time only, below its minimum
amount, on a change at the period's end: each refused with nothing changed), shown in the preview
with Stripe's discount, applied with the change in the same subscription update (once, however
often it is confirmed), in place of the subscription's discount; left empty, the discount the
subscription has carries on."""

from __future__ import annotations

import html
import uuid
from typing import Any

import pytest
from flask import Flask

from app.services.promotions import change_discounts, refusal_for_change
from tests.conftest import SandboxAccount, checkout_session_id, query, start_signup
from tests.test_plan_changes import Owner, Stack, amount, ticket_of
from tests.test_promotions import promotions_end_words


@pytest.fixture
def stack(app: Flask, offline_stripe: SandboxAccount) -> Stack:
    return Stack(app, offline_stripe)


def unique(name: str) -> str:
    """A code no other test made: the sandbox account outlives a test, and active codes are unique."""
    return f"{name}{uuid.uuid4().hex[:6].upper()}"


def make_code(
    stack: Stack, code: str, *, percent_off: int = 25, months: int = 3, **restrictions: Any
) -> dict[str, Any]:
    coupon = stack.stripe("POST", "/coupons", percent_off=percent_off, duration="repeating", duration_in_months=months)
    return stack.stripe(
        "POST", "/promotion_codes", promotion={"type": "coupon", "coupon": coupon["id"]}, code=code, **restrictions
    )


def preview_with_code(owner: Owner, tier: str, code: str, interval: str = "month") -> Any:
    return owner.post("/billing/plan/preview", tier=tier, interval=interval, promotion_code=code)


def change_previews(stack: Stack) -> list[dict[str, Any]]:
    """The app's invoice previews of a change (not the billing page's upcoming invoice)."""
    made = stack.requests_to("POST", "/v1/invoices/create_preview")
    return [p for p in made if "subscription_details" in p["params"]]


def discount_line(page: str) -> int:
    """The preview's "Discount (promotion code)" line, in cents (negative)."""
    return amount(page, "preview-discount")


def test_a_code_on_an_upgrade_is_previewed_then_applied_once_and_the_invoice_matches_the_preview(stack: Stack) -> None:
    promo = make_code(stack, unique("SWITCH"))
    owner = stack.sign_up("starter", extra_seats=0)
    assert 'name="promotion_code"' in owner.client.get("/billing/plan").get_data(as_text=True)

    response = preview_with_code(owner, "pro", f" {promo['code'].lower()} ")  # trimmed, any case
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == 200, page[-2000:]
    assert 'id="preview-promotion"' in page and promo["code"] in page and "25% off for 3 months" in page
    [previewed] = change_previews(stack)
    assert previewed["params"]["discounts"] == [{"promotion_code": promo["id"]}]
    discount, today = discount_line(page), amount(page, "preview-today")
    assert discount < 0 and today > 0

    ticket = ticket_of(response)
    first, second = owner.confirm(ticket), owner.confirm(ticket)  # a double submit
    assert (first.status_code, second.status_code) == (303, 303)
    [update] = [u for u in owner.updates() if "items" in u["params"]]
    assert update["params"]["discounts"] == [{"promotion_code": promo["id"]}]

    subscription = stack.stripe("GET", f"/subscriptions/{owner.subscription_id}", expand=["discounts"])
    [applied] = subscription["discounts"]
    assert applied["promotion_code"] == promo["id"] and applied["end"]
    assert stack.stripe("GET", f"/promotion_codes/{promo['id']}")["times_redeemed"] == 1
    invoice = stack.stripe("GET", f"/invoices/{subscription['latest_invoice']}")
    assert invoice["billing_reason"] == "subscription_update"
    assert -sum(share["amount"] for share in invoice["total_discount_amounts"]) == discount  # to the cent
    assert (invoice["total"], invoice["amount_paid"]) == (today, today)

    billing = html.unescape(owner.client.get("/billing/").get_data(as_text=True))
    assert promo["code"] in billing and "25% off" in billing
    assert f'<span class="discount-ends">{promotions_end_words(applied["end"])}</span>' in billing


def test_a_new_code_replaces_the_signup_discount_and_an_empty_field_keeps_it(
    stack: Stack, offline_stripe: SandboxAccount
) -> None:
    client = stack.app.test_client()
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    session = offline_stripe.pay(session_id, promotion_code="LAUNCH20")
    client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    [row] = query(stack.app, "SELECT * FROM organization WHERE billing_subscription_id = :s", s=session["subscription"])
    owner = Owner(stack, client, row.id, row.billing_subscription_id)
    [launch] = owner.subscription()["discounts"]

    # Empty field: no `discounts` sent, the LAUNCH20 discount carries into the change.
    response, ticket = owner.preview_plan("pro")
    assert response.status_code == 200 and "discounts" not in change_previews(stack)[-1]["params"]
    assert owner.confirm(ticket).status_code == 303
    assert owner.subscription()["discounts"] == [launch]
    assert all("discounts" not in u["params"] for u in owner.updates())

    # A code entered: it takes the old discount's place.
    promo = make_code(stack, unique("BIGGER"), percent_off=40)
    response = preview_with_code(owner, "business", promo["code"])
    assert response.status_code == 200, response.get_data(as_text=True)[-2000:]
    assert owner.confirm(ticket_of(response)).status_code == 303
    [replaced] = stack.stripe("GET", f"/subscriptions/{owner.subscription_id}", expand=["discounts"])["discounts"]
    assert replaced["id"] != launch and replaced["promotion_code"] == promo["id"]


REFUSALS = {
    "unknown": "The promotion code {code} is not valid.",
    "inactive": "The promotion code {code} is not valid.",
    "expired": "The promotion code {code} has expired.",
    "another customer's": "The promotion code {code} is for another customer.",
    "first-time only": "The promotion code {code} is only for new customers, at signup.",
    "minimum amount": "The promotion code {code} needs a plan of at least $10,000.00.",
    "on a downgrade": "A promotion code applies to a change made now",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_code_that_cannot_be_used_is_refused_with_nothing_changed(stack: Stack, case: str) -> None:
    owner = stack.sign_up("business" if case == "on a downgrade" else "starter", extra_seats=0)
    code = unique("CODE")
    words = REFUSALS[case].format(code=code)
    if case == "inactive":
        make_code(stack, code, active="false")
    elif case == "expired":
        now = stack.stripe("GET", f"/subscriptions/{owner.subscription_id}")["created"]
        make_code(stack, code, expires_at=now - 60)
    elif case == "another customer's":
        other = stack.stripe("POST", "/customers", email="someone@example.com")
        make_code(stack, code, customer=other["id"])
    elif case == "first-time only":
        make_code(stack, code, restrictions={"first_time_transaction": "true"})
    elif case == "minimum amount":
        make_code(stack, code, restrictions={"minimum_amount": 1_000_000, "minimum_amount_currency": "usd"})
    elif case != "unknown":
        make_code(stack, code)
    before = owner.subscription()

    response = preview_with_code(owner, "starter" if case == "on a downgrade" else "pro", code)
    assert response.status_code == 303 and response.headers["Location"].endswith("/billing/plan")
    page = html.unescape(owner.client.get("/billing/plan").get_data(as_text=True))
    assert words in page and "Nothing was changed." in page
    assert not [p for p in change_previews(stack) if "discounts" in p["params"]]
    assert owner.updates() == []
    after = owner.subscription()
    assert (after["items"], after["discounts"]) == (before["items"], before["discounts"])


def test_the_offline_stripe_refuses_a_restricted_code_on_a_preview_as_stripe_does(stack: Stack) -> None:
    """The app's checks are not the only guard: Stripe (the sandbox) refuses such a code on the
    preview and the update too."""
    owner = stack.sign_up("starter", extra_seats=0)
    other = stack.stripe("POST", "/customers", email="someone@example.com")
    theirs = make_code(stack, unique("THEIRS"), customer=other["id"])
    with pytest.raises(AssertionError, match="not valid for this customer"):
        stack.stripe(
            "POST",
            "/invoices/create_preview",
            subscription=owner.subscription_id,
            discounts=[{"promotion_code": theirs["id"]}],
        )
    with pytest.raises(AssertionError, match="not valid for this customer"):
        stack.stripe("POST", f"/subscriptions/{owner.subscription_id}", discounts=[{"promotion_code": theirs["id"]}])
    assert owner.subscription()["discounts"] == []


def test_each_reason_a_code_cannot_be_used_on_a_change_is_said_in_words() -> None:
    coupon = {"percent_off": 10, "duration": "once", "valid": True, "redeem_by": None}
    good = {"id": "promo_1", "code": "OK", "active": True, "promotion": {"coupon": coupon}, "restrictions": {}}

    def refusal(code: dict[str, Any] | None, amount: int = 4900, currency: str = "usd") -> str | None:
        return refusal_for_change(code, " ok ", customer_id="cus_1", amount=amount, currency=currency, now=1000)

    assert refusal(good) is None and refusal({**good, "customer": "cus_1"}) is None
    assert refusal(None) == refusal({**good, "active": False}) == "The promotion code OK is not valid."
    expired = "The promotion code OK has expired."
    assert refusal({**good, "expires_at": 1000}) == expired
    assert refusal({**good, "promotion": {"coupon": {**coupon, "redeem_by": 999}}}) == expired
    assert refusal({**good, "promotion": {"coupon": {**coupon, "valid": False}}}) == expired
    assert refusal({**good, "max_redemptions": 2, "times_redeemed": 2}) == "The promotion code OK has been used up."
    assert refusal({**good, "customer": {"id": "cus_2"}}) == "The promotion code OK is for another customer."
    minimum = {**good, "restrictions": {"minimum_amount": 5000, "minimum_amount_currency": "usd"}}
    assert refusal(minimum) == "The promotion code OK needs a plan of at least $50.00."
    assert refusal(minimum, amount=5000) is None and refusal(minimum, currency="eur") is None
    assert (
        change_discounts("promo_1") == {"discounts": [{"promotion_code": "promo_1"}]} and change_discounts(None) == {}
    )
