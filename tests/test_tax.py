"""Taxes: the settings (STRIPE_AUTOMATIC_TAX, PRICES_SHOWN_WITH_TAX), the sandbox's Stripe Tax (its rate
table, tax IDs and their verification, reverse charge and exemption), Checkout collecting the billing
address and tax IDs, and the billing page showing and editing them."""

from __future__ import annotations

import html
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from config import TestConfig
from tests.conftest import (
    BERLIN_BUSINESS,
    SandboxAccount,
    checkout_session_id,
    csrf_token,
    email_text,
    query,
    run_jobs,
    start_signup,
)


def test_tax_settings_come_from_the_environment_and_default_to_off_and_exclusive() -> None:
    config = TestConfig({"TEST_DATABASE_URL": "postgresql://x/y"})
    assert (config.STRIPE_AUTOMATIC_TAX, config.PRICES_SHOWN_WITH_TAX) == (False, "exclusive")
    config = TestConfig({"STRIPE_AUTOMATIC_TAX": "1", "PRICES_SHOWN_WITH_TAX": "Inclusive"})
    assert (config.STRIPE_AUTOMATIC_TAX, config.PRICES_SHOWN_WITH_TAX) == (True, "inclusive")
    with pytest.raises(ValueError, match="PRICES_SHOWN_WITH_TAX"):
        TestConfig({"PRICES_SHOWN_WITH_TAX": "both"})


def test_checkout_collects_address_and_tax_id_and_the_billing_page_shows_and_edits_them(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(STRIPE_AUTOMATIC_TAX=True)
    client = app.test_client()
    note = "Prices are shown before tax; sales tax or VAT is added from your billing address."
    assert f'<p class="hint" id="tax-note">{note}</p>' in client.get("/auth/signup").get_data(as_text=True)
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["automatic_tax"] == {"enabled": "true"}
    assert call["params"]["billing_address_collection"] == "required"
    assert call["params"]["tax_id_collection"] == {"enabled": "true"}
    session = offline_stripe.pay(session_id, tax_details=BERLIN_BUSINESS)
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    invoice = offline_stripe.api("GET", f"/v1/invoices/{session['invoice']}")
    assert (invoice["subtotal"], invoice["total_taxes"][0]["amount"], invoice["total"]) == (1900, 361, 2261)

    page = client.get("/billing/").get_data(as_text=True)
    assert "Friedrichstr. 1, 10117 Berlin, DE" in page
    assert '<span class="tax-id-value">DE123456789</span> (<span class="tax-id-status">verified</span>)' in page
    assert '<span id="next-invoice-tax">($19.00 + $3.61 tax)</span>' in page and "$22.61" in page

    # A plan change's preview shows the tax Stripe adds to what is charged today.
    preview = client.post(
        "/billing/plan/preview",
        data={"csrf_token": csrf_token(client, "/billing/plan"), "tier": "pro", "interval": "month"},
        follow_redirects=True,
    ).get_data(as_text=True)
    assert "<tr><td>Tax</td><td>$" in preview and 'id="tax-note"' in client.get("/billing/plan").get_data(as_text=True)

    token = csrf_token(client, "/billing/")
    moved = {"action": "address", "csrf_token": token, "request_token": "b" * 32, "city": "Paris", "country": "fr"}
    assert client.post("/billing/tax-details", data=moved).status_code == 303
    customer = offline_stripe.api("GET", f"/v1/customers/{session['customer']}")
    assert (customer["address"]["city"], customer["address"]["country"]) == ("Paris", "FR")
    page = client.get("/billing/").get_data(as_text=True)
    # A French business with a verified VAT ID: reverse charge, no tax on the next invoice.
    assert "Paris, FR" in page and 'id="next-invoice-tax"' not in page

    added = {"action": "add_tax_id", "csrf_token": token, "request_token": "c" * 32, "type": "eu_vat"}
    assert client.post("/billing/tax-details", data={**added, "value": "FR 111 111 111"}).status_code == 303
    page = client.get("/billing/").get_data(as_text=True)
    assert '<span class="tax-id-value">FR111111111</span> (<span class="tax-id-status">not verified</span>)' in page
    bad = client.post("/billing/tax-details", data={**added, "request_token": "d" * 32, "value": "12"})
    assert "That is not a valid EU VAT number." in client.get(bad.headers["Location"]).get_data(as_text=True)
    tax_ids = offline_stripe.api("GET", f"/v1/customers/{session['customer']}/tax_ids")["data"]
    german = next(t["id"] for t in tax_ids if t["value"] == "DE123456789")
    removed = {"action": "remove_tax_id", "csrf_token": token, "request_token": "e" * 32, "tax_id": german}
    assert client.post("/billing/tax-details", data=removed).status_code == 303
    page = client.get("/billing/").get_data(as_text=True)
    # Only the unverified French ID is left: French VAT (20%) on the next invoice.
    assert ">DE123456789<" not in page and '<span id="next-invoice-tax">($19.00 + $3.80 tax)</span>' in page
    assert [r.name for r in query(app, "SELECT name FROM domain_event WHERE name LIKE 'organization.tax%'")] == [
        "organization.tax_details_changed"
    ] * 3


def test_without_the_setting_checkout_asks_for_no_tax_details(app: Flask, offline_stripe: SandboxAccount) -> None:
    assert 'id="tax-note"' not in app.test_client().get("/auth/signup").get_data(as_text=True)
    checkout_session_id(start_signup(app.test_client()))
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert not {"automatic_tax", "billing_address_collection", "tax_id_collection"} & set(call["params"])


def test_a_pending_vat_id_shows_as_being_verified_until_stripes_event_says_it_is_verified(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(STRIPE_AUTOMATIC_TAX=True)
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    paris = {**BERLIN_BUSINESS, "billingLocality": "Paris", "billingPostalCode": "75001", "billingCountry": "FR"}
    session = offline_stripe.pay(session_id, tax_details={**paris, "taxId": "FR222222222"})
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    offline_stripe.deliver(client)
    # Stripe is still checking the VAT ID: shown as such, and French VAT (20%) until it is verified.
    page = client.get("/billing/").get_data(as_text=True)
    assert '<span class="tax-id-value">FR222222222</span> (<span class="tax-id-status">being verified</span>)' in page
    assert '<span id="next-invoice-tax">($19.00 + $3.80 tax)</span>' in page

    [tax_id] = offline_stripe.api("GET", f"/v1/customers/{session['customer']}/tax_ids")["data"]
    verified = offline_stripe.http.post(f"{offline_stripe.url}/_sandbox/tax_ids/{tax_id['id']}/verification", json={})
    assert verified.json()["verification"]["status"] == "verified"
    # The page's reads are cached: until the event arrives it still says what it last read.
    assert 'class="tax-id-status">being verified<' in client.get("/billing/").get_data(as_text=True)
    assert offline_stripe.deliver(client) == [("customer.tax_id.updated", 200)]
    page = client.get("/billing/").get_data(as_text=True)
    assert '<span class="tax-id-value">FR222222222</span> (<span class="tax-id-status">verified</span>)' in page
    assert 'id="next-invoice-tax"' not in page  # a verified EU VAT ID of a French business: reverse charge
    [event] = query(app, "SELECT data FROM domain_event WHERE name = 'organization.tax_id_verification'")
    assert (event.data["tax_id"], event.data["status"], event.data["previous"]) == (tax_id["id"], "verified", "pending")
    [row] = query(app, "SELECT status, outcome FROM stripe_event WHERE type = 'customer.tax_id.updated'")
    assert (row.status, row.outcome) == ("processed", f"tax ID {tax_id['id']} is verified at Stripe")


# -- prices shown with tax (PRICES_SHOWN_WITH_TAX) and the prices' tax_behavior ---------------------

CATALOGUE_PRICES = {  # lookup key -> (amount, interval), as plans.toml seeds them
    "starter_monthly": (1900, "month"),
    "starter_yearly": (19000, "year"),
    "pro_monthly": (4900, "month"),
    "pro_yearly": (49000, "year"),
    "business_monthly": (9900, "month"),
    "business_yearly": (99000, "year"),
    "extra_seat_monthly": (500, "month"),
    "extra_seat_yearly": (5000, "year"),
}


def catalogue_at(
    offline_stripe: SandboxAccount, tmp_path: Path, tax_behavior: str, **only: str
) -> tuple[Path, dict[str, str]]:
    """plans.toml with lookup keys of its own (no meter), each on a new sandbox price with this
    tax_behavior (`only` overrides it per lookup key); returns the file and lookup key -> price id."""
    suffix = uuid.uuid4().hex[:8]
    text = Path("plans.toml").read_text(encoding="utf-8")
    text = text[: text.index("[meters.api_calls]")] + text[text.index("[promotion_codes.") :]
    made = {}
    for key, (amount, interval) in CATALOGUE_PRICES.items():
        text = text.replace(f'"{key}"', f'"{key}_{suffix}"')
        params = {
            "currency": "usd",
            "unit_amount": amount,
            "recurring": {"interval": interval},
            "product_data": {"name": key},
            "lookup_key": f"{key}_{suffix}",
            "tax_behavior": only.get(key, tax_behavior),
        }
        made[key] = offline_stripe.api("POST", "/v1/prices", params)["id"]
    path = tmp_path / f"plans-{suffix}.toml"
    path.write_text(text, encoding="utf-8")
    return path, made


def test_check_prices_reports_a_price_whose_tax_behavior_does_not_fit_prices_shown_with_tax(
    make_app: Any, offline_stripe: SandboxAccount, tmp_path: Path
) -> None:
    def check(**settings: Any) -> Any:
        return make_app(**settings).test_cli_runner().invoke(args=["billing", "check-prices"])

    # The seeded catalogue is exclusive: right for the default setting, wrong for inclusive.
    fits = check(STRIPE_AUTOMATIC_TAX=True)
    assert fits.exit_code == 0, fits.output
    assert "tax_behavior=exclusive" in fits.output
    wrong = check(STRIPE_AUTOMATIC_TAX=True, PRICES_SHOWN_WITH_TAX="inclusive")
    assert wrong.exit_code == 1
    assert "Prices that do not fit the tax settings:" in wrong.output
    starter = offline_stripe.api("GET", "/v1/prices", {"lookup_keys": ["starter_monthly"]})["data"][0]["id"]
    assert (
        f"tier starter: price {starter} (starter_monthly) has tax_behavior=exclusive, but"
        " PRICES_SHOWN_WITH_TAX=inclusive" in wrong.output
    )
    assert "meter api_calls: price" in wrong.output  # the metered price is checked too
    # Without Stripe Tax, tax_behavior is not read: nothing to report.
    assert check(PRICES_SHOWN_WITH_TAX="inclusive").exit_code == 0

    # A price with no tax_behavior is refused by Stripe Tax whatever the setting.
    catalogue, made = catalogue_at(offline_stripe, tmp_path, "inclusive", extra_seat_yearly="unspecified")
    bare = check(STRIPE_AUTOMATIC_TAX=True, PRICES_SHOWN_WITH_TAX="inclusive", PLAN_CATALOGUE_FILE=str(catalogue))
    assert bare.exit_code == 1
    assert f"add-on extra_seats: price {made['extra_seat_yearly']} (extra_seat_yearly_" in bare.output
    assert "has no tax_behavior (unspecified): Stripe Tax refuses it. Set it to inclusive" in bare.output
    assert bare.output.count("price_") - bare.output.count("tax_behavior=") == 1  # only that one is reported


def test_inclusive_prices_are_charged_as_shown_with_the_tax_inside_from_signup_to_plan_change(
    make_app: Any, offline_stripe: SandboxAccount, smtp_server: Any, tmp_path: Path
) -> None:
    catalogue, _ = catalogue_at(offline_stripe, tmp_path, "inclusive")
    app = make_app(STRIPE_AUTOMATIC_TAX=True, PRICES_SHOWN_WITH_TAX="inclusive", PLAN_CATALOGUE_FILE=str(catalogue))
    client = app.test_client()
    signup = client.get("/auth/signup").get_data(as_text=True)
    assert '<p class="hint" id="tax-note">Prices include tax.</p>' in signup
    assert re.search(r'id="price-starter-month">\$19\.00 / month including tax<', signup), signup

    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0", email="incl@example.com"))
    session = offline_stripe.pay(session_id, tax_details=BERLIN_BUSINESS, promotion_code="LAUNCH20")
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    offline_stripe.deliver(client)
    # $19.00 less LAUNCH20's 20% is $15.20, and that is what is paid: German VAT is inside it.
    invoice = offline_stripe.api("GET", f"/v1/invoices/{session['invoice']}")
    [vat] = invoice["total_taxes"]
    assert (invoice["total"], invoice["amount_paid"], vat["amount"], vat["tax_behavior"]) == (
        1520,
        1520,
        243,
        "inclusive",
    )
    assert invoice["total_excluding_tax"] == 1520 - 243

    page = client.get("/billing/").get_data(as_text=True)
    # The next invoice (still 20% off): the sticker price less the discount, the tax inside it.
    assert '$15.20 <span id="next-invoice-tax">(including $2.43 tax)</span>' in page, page
    run_jobs(app)
    [receipt] = [
        m for m in smtp_server.to("incl@example.com") if str(m["Subject"]).startswith("Your Ledgerline receipt")
    ]
    text = email_text(receipt)
    assert "Including tax: $2.43" in text and "Amount paid: $15.20" in text and "  Tax:" not in text

    # The plan change's preview says what is charged today and how much of it is tax; the invoice
    # the change makes charges exactly that.
    token = csrf_token(client, "/billing/plan")
    preview = client.post(
        "/billing/plan/preview", data={"csrf_token": token, "tier": "pro", "interval": "month"}, follow_redirects=True
    ).get_data(as_text=True)
    today = int(re.search(r'id="preview-today" data-amount="(\d+)"', preview).group(1))  # type: ignore[union-attr]
    included = re.search(r'<tr class="tax-included"><td>Including tax</td><td>\$(\d+)\.(\d\d)</td></tr>', preview)
    assert included, preview
    tax_today = int(included.group(1)) * 100 + int(included.group(2))
    assert f"(including ${tax_today // 100}.{tax_today % 100:02d} tax) is charged today" in preview
    assert "<tr><td>Tax</td>" not in preview  # nothing is added on top
    ticket = re.search(r'name="ticket" type="hidden" value="([^"]+)"', preview).group(1)  # type: ignore[union-attr]
    token = csrf_token(client, "/billing/")
    assert (
        client.post("/billing/change/confirm", data={"csrf_token": token, "ticket": html.unescape(ticket)}).status_code
        == 303
    )
    subscription = offline_stripe.api("GET", f"/v1/subscriptions/{session['subscription']}")
    charged = offline_stripe.api("GET", f"/v1/invoices/{subscription['latest_invoice']}")
    assert charged["amount_due"] == charged["total"] == today > 0
    assert sum(t["amount"] for t in charged["total_taxes"]) == tax_today

    # Reverse charge (a French business with a verified VAT ID): Stripe keeps what an inclusive price
    # charges and none of it is tax, so the next invoice is Pro's $49.00 less 20%, with no tax line.
    moved = {"action": "address", "csrf_token": token, "request_token": "f" * 32, "city": "Paris", "country": "FR"}
    assert client.post("/billing/tax-details", data=moved).status_code == 303
    page = client.get("/billing/").get_data(as_text=True)
    assert re.search(r'id="next-invoice">\s*\$39\.20 on ', page) and 'id="next-invoice-tax"' not in page, page
    upcoming = offline_stripe.api("POST", "/v1/invoices/create_preview", {"subscription": session["subscription"]})
    assert [(t["taxability_reason"], t["amount"]) for t in upcoming["total_taxes"]] == [("reverse_charge", 0)]
    assert upcoming["total"] == 3920
