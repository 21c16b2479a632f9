"""Receipts: one email for every paid invoice, through the outbox, exactly once (whichever of the
success page and the invoice.paid webhook comes first), with the amount, tax, period, card and the
hosted invoice and PDF links; sent to the billing email address the owner chose."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from tests.conftest import (
    SandboxAccount,
    SmtpSink,
    checkout_session_id,
    csrf_token,
    email_text,
    query,
    run_jobs,
    start_signup,
)

HOUR = 3600


def receipts_to(smtp_server: SmtpSink, address: str) -> list[Any]:
    return [m for m in smtp_server.to(address) if str(m["Subject"]).startswith("Your Ledgerline receipt")]


@pytest.mark.parametrize("order", ["redirect_first", "webhook_first"])
def test_every_paid_invoice_gets_one_receipt(
    make_app: Any, offline_stripe: SandboxAccount, smtp_server: SmtpSink, order: str
) -> None:
    app: Flask = make_app(STRIPE_TEST_CLOCKS=True)
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client))
    session = offline_stripe.pay(session_id, promotion_code="LAUNCH20")

    def redirect() -> None:
        response = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
        assert response.headers["Location"] == "/app"

    if order == "redirect_first":
        redirect()
        offline_stripe.deliver(client)
    else:
        offline_stripe.deliver(client)
        redirect()
    run_jobs(app)
    run_jobs(app)  # nothing more: each receipt is sent once
    subscription = offline_stripe.subscription(session["subscription"])
    invoice = offline_stripe.api("GET", f"/v1/invoices/{subscription['latest_invoice']}")
    [receipt] = receipts_to(smtp_server, "ada@example.com")
    text = email_text(receipt)
    assert "$23.20" in str(receipt["Subject"])  # $29.00 less 20% (LAUNCH20)
    assert "Amount paid: $23.20" in text and "Tax: $0.00" in text and "Discount: -$5.80" in text
    assert "Paid with: Visa ending in 4242" in text and "Period: " in text
    assert invoice["hosted_invoice_url"] in text and invoice["invoice_pdf"] in text
    assert f"invoice {invoice['number']}" in text

    # The owner sends receipts to the finance team; the renewal's receipt goes there, once.
    response = client.post(
        "/billing/billing-email",
        data={"csrf_token": csrf_token(client, "/billing/"), "billing_email": " Finance@Example.com "},
        follow_redirects=True,
    )
    assert "Receipts will be sent to finance@example.com." in response.get_data(as_text=True)
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email == "finance@example.com"
    # The worker gives Stripe's customer the same address, once.
    run_jobs(app)
    run_jobs(app)
    [(args, update)] = offline_stripe.calls_to("customers.update")
    assert args == (session["customer"],) and update["params"] == {"email": "finance@example.com"}
    assert update["options"]["idempotency_key"].startswith("customer-email-")
    assert offline_stripe.api("GET", f"/v1/customers/{session['customer']}")["email"] == "finance@example.com"
    customer = offline_stripe.api("GET", f"/v1/customers/{session['customer']}")
    period_end = subscription["items"]["data"][0]["current_period_end"]
    offline_stripe.advance_clock(customer["test_clock"], period_end + 2 * HOUR)
    offline_stripe.deliver(client)
    offline_stripe.deliver(client)  # a redelivery changes nothing
    run_jobs(app)
    [renewal] = receipts_to(smtp_server, "finance@example.com")
    renewed = offline_stripe.api(
        "GET", f"/v1/invoices/{offline_stripe.subscription(subscription['id'])['latest_invoice']}"
    )
    assert renewed["id"] != invoice["id"] and renewed["hosted_invoice_url"] in email_text(renewal)
    assert len(receipts_to(smtp_server, "ada@example.com")) == 1


def test_a_trial_or_a_free_plan_gets_no_receipt(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, tier="pro", addon_extra_seats="0"))
    offline_stripe.pay(session_id, outcome="trial")
    client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    offline_stripe.deliver(client)
    start_signup(app.test_client(), tier="free", addon_extra_seats="0", email="grace@example.com")
    run_jobs(app)
    assert receipts_to(smtp_server, "ada@example.com") == receipts_to(smtp_server, "grace@example.com") == []


def test_a_billing_email_must_be_an_address(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    checkout = checkout_session_id(start_signup(client))
    offline_stripe.pay(checkout)
    client.get(f"/billing/complete-signup-from-stripe?session_id={checkout}")
    page = client.post(
        "/billing/billing-email",
        data={"csrf_token": csrf_token(client, "/billing/"), "billing_email": "not an address"},
        follow_redirects=True,
    ).get_data(as_text=True)
    assert "Enter an email address" in page
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email is None
