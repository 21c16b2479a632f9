"""Taxes: the settings (STRIPE_AUTOMATIC_TAX, PRICES_SHOWN_WITH_TAX), the sandbox's Stripe Tax (its rate
table, tax IDs and their verification, reverse charge and exemption), Checkout collecting the billing
address and tax IDs, and the billing page showing and editing them."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from config import TestConfig
from tests.conftest import BERLIN_BUSINESS, SandboxAccount, checkout_session_id, csrf_token, query, start_signup


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
    assert '<span id="next-invoice-tax">(including $3.61 tax)</span>' in page and "$22.61" in page

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
    assert ">DE123456789<" not in page and '<span id="next-invoice-tax">(including $3.80 tax)</span>' in page
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
    assert '<span id="next-invoice-tax">(including $3.80 tax)</span>' in page

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
