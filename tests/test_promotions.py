"""Promotion codes: Checkout's own code field at signup and upgrade (allow_promotion_codes), the
discount on the subscription and its invoices, the billing page showing it and when it ends, and
`flask billing check-prices` checking the codes the marketing pages name (plans.toml)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask

from app.services import promotions
from tests.conftest import SandboxAccount, checkout_session_id, csrf_token, query, start_signup


def test_a_code_entered_at_signup_discounts_the_plan_and_the_billing_page_says_until_when(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["allow_promotion_codes"] == "true"
    session = offline_stripe.pay(session_id, promotion_code="launch20")  # codes are case-insensitive
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    subscription = offline_stripe.api("GET", f"/v1/subscriptions/{session['subscription']}", {"expand": ["discounts"]})
    [discount] = subscription["discounts"]
    invoice = offline_stripe.api("GET", f"/v1/invoices/{subscription['latest_invoice']}")
    assert (invoice["subtotal"], invoice["total"], invoice["amount_paid"]) == (1900, 1520, 1520)
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("starter", "active")

    page = client.get("/billing/").get_data(as_text=True)
    assert 'id="discount"' in page and "LAUNCH20" in page and "20% off" in page
    ends = promotions_end_words(discount["end"])
    assert f'<span class="discount-ends">{ends}</span>' in page

    # A plan change keeps the discount, and its preview shows it (Stripe's preview applies it).
    preview = client.post(
        "/billing/plan/preview",
        data={"csrf_token": csrf_token(client, "/billing/plan"), "tier": "pro", "interval": "month"},
        follow_redirects=True,
    )
    text = preview.get_data(as_text=True)
    assert preview.status_code == 200 and "Discount (promotion code)" in text, text[-1500:]
    [(_, preview_call)] = offline_stripe.calls_to("invoices.create_preview")[-1:]
    assert preview_call["params"]["subscription"] == subscription["id"]


def promotions_end_words(end: int) -> str:
    return f"{datetime.fromtimestamp(end, UTC):%d %B %Y}".lstrip("0")


def test_an_unknown_code_is_refused_on_checkout_and_nothing_is_discounted(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    session_id = checkout_session_id(start_signup(app.test_client(), addon_extra_seats="0"))
    refused = offline_stripe.http.post(
        f"{offline_stripe.url}/checkout/{session_id}",
        data={
            "email": "ada@example.com",
            "cardNumber": "4242 4242 4242 4242",
            "cardExpiry": "12 / 34",
            "cardCvc": "123",
            "billingName": "Ada Lovelace",
            "promotionCode": "NOSUCHCODE",
        },
        allow_redirects=False,
        timeout=30,
    )
    assert refused.status_code == 400 and "This code is invalid." in refused.text
    assert offline_stripe.session(session_id)["status"] == "open"


def test_an_upgrade_checkout_takes_codes_too(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    start_signup(client, tier="free", addon_extra_seats="0")
    data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": "a" * 32, "tier": "starter"}
    assert client.post("/billing/resubscribe", data=data).status_code == 303
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["allow_promotion_codes"] == "true"


def test_codes_can_be_left_out_of_checkout(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(PROMOTION_CODES_AT_CHECKOUT=False)
    checkout_session_id(start_signup(app.test_client()))
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["allow_promotion_codes"] == "false"


def test_check_prices_checks_the_codes_the_marketing_pages_name(
    make_app: Any, offline_stripe: SandboxAccount, tmp_path: Path
) -> None:
    app = make_app()
    result = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    assert result.exit_code == 0, result.output
    assert "LAUNCH20" in result.output and "20% off for 3 months" in result.output

    catalogue = tmp_path / "plans.toml"
    text = Path(app.config["PLAN_CATALOGUE_FILE"]).read_text(encoding="utf-8")
    catalogue.write_text(text + '\n[promotion_codes.GONE50]\nnamed_on = "the spring campaign page"\n', "utf-8")
    missing = make_app(PLAN_CATALOGUE_FILE=str(catalogue)).test_cli_runner().invoke(args=["billing", "check-prices"])
    assert missing.exit_code == 1
    assert "No active promotion code at Stripe for: GONE50 (the spring campaign page)" in missing.output


def test_coupons_are_described_as_people_say_them() -> None:
    assert promotions.describe_coupon({"percent_off": 20, "duration": "repeating", "duration_in_months": 3}) == (
        "20% off for 3 months"
    )
    assert promotions.describe_coupon({"amount_off": 1000, "currency": "usd", "duration": "once"}) == "$10.00 off once"
    assert promotions.describe_coupon({"percent_off": 12.5, "duration": "forever"}) == "12.5% off forever"
    code = {"promotion": {"type": "coupon", "coupon": {"percent_off": 50, "duration": "once"}}}
    assert promotions.describe_code(code) == "50% off once"
