"""The primary billing test module. Stripe is the offline sandbox, reached over HTTP at the one seam
(STRIPE_API_BASE, see conftest.py); `pytest --stripe-live` runs test_signup_flow_end_to_end against a real
Stripe API instead (see test_live_flow.py for the live walker it hands over to)."""

from __future__ import annotations

import html
import re
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe
from flask import Flask

from app.services.billing_service import BillingService
from tests.conftest import (
    BERLIN_BUSINESS,
    PASSWORD,
    SandboxAccount,
    SmtpSink,
    checkout_session_id,
    csrf_token,
    email_text,
    post_and_apply,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    start_signup,
    stripe_event,
)
from tests.test_plan_changes import ticket_of

SIGNUP_EVENTS = ("organization.created", "user.created", "signup.completed")
HOUR = 3600


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Offline, both arrival orders are forced; live, Stripe decides the order.
    if metafunc.function.__name__ == "test_signup_flow_end_to_end":
        live = metafunc.config.getoption("--stripe-live")
        metafunc.parametrize("order", ["as delivered"] if live else ["redirect_first", "webhook_first"])


def promotion_code(stripe_api: SandboxAccount, name: str, **coupon: Any) -> dict[str, Any]:
    """A coupon and a promotion code for it, as managed in Stripe; the code is new to the account."""
    made = stripe_api.api("POST", "/v1/coupons", coupon)
    code = f"{name}{uuid.uuid4().hex[:6].upper()}"
    return stripe_api.api(
        "POST", "/v1/promotion_codes", {"promotion": {"type": "coupon", "coupon": made["id"]}, "code": code}
    )


def domain_event_counts(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


# --- The primary test ------------------------------------------------------------------------------


@pytest.mark.live
def test_signup_flow_end_to_end(request: pytest.FixtureRequest, order: str) -> None:
    """One organization's whole life: form → Stripe Checkout → provisioning (redirect and webhooks, in
    either order) → signed-in page → billing page; then, on the customer's Stripe test clock, a renewal,
    a renewal whose card fails, past_due with the owner notified, recovery by paying the open invoice,
    cancellation at the period end and the end of the subscription."""
    if request.config.getoption("--stripe-live"):
        from tests.test_live_flow import walk_live_signup

        walk_live_signup(request)
        return
    app: Flask = request.getfixturevalue("make_app")(STRIPE_TEST_CLOCKS=True)
    stripe_api: SandboxAccount = request.getfixturevalue("offline_stripe")
    client = app.test_client()

    # The form offers every plan of the catalogue.
    page = client.get("/auth/signup").get_data(as_text=True)
    assert all(name in page for name in ("Starter", "Pro", "Business", "Extra seats"))

    # Submitting it stores the intent and sends the browser to Stripe Checkout.
    response = start_signup(client)
    session_id = checkout_session_id(response)
    assert response.headers["Location"] == f"{stripe_api.url}/checkout/{session_id}"
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.email, pending.status, pending.checkout_session_id) == ("ada@example.com", "pending", session_id)
    assert pending.tier == "starter" and pending.addons == {"extra_seats": 2}
    assert pending.password_hash.startswith("scrypt:") and PASSWORD not in pending.password_hash

    [(_, call)] = stripe_api.calls_to("checkout.sessions.create")
    params = call["params"]
    assert params["mode"] == "subscription"
    assert params["line_items"] == [
        {"price": stripe_api.price_id("starter_monthly"), "quantity": "1"},
        {"price": stripe_api.price_id("extra_seat_monthly"), "quantity": "2"},
        {"price": stripe_api.price_id("api_calls_overage")},  # metered: no quantity (usage block below)
    ]
    # The customer was made first, on a test clock of its own, so that time can pass in its life.
    customer = stripe_api.api("GET", f"/v1/customers/{params['customer']}")
    assert customer["email"] == "ada@example.com" and customer["test_clock"].startswith("clock_")
    assert customer["metadata"] == {"purpose": "signup", "pending_signup_id": str(pending.id)}
    assert "customer_email" not in params
    assert params["client_reference_id"] == str(pending.id)
    assert params["metadata"] == {"purpose": "signup", "pending_signup_id": str(pending.id)}
    assert params["subscription_data"]["metadata"] == params["metadata"]
    assert (
        params["success_url"] == "http://localhost/billing/complete-signup-from-stripe?session_id={CHECKOUT_SESSION_ID}"
    )
    assert params["cancel_url"] == "http://localhost/auth/signup?checkout=canceled"
    assert call["options"] == {"idempotency_key": f"signup-checkout-{pending.id}"}

    # The customer pays on the hosted page, entering a promotion code in Checkout's own field (10% off
    # once: the first invoice); the redirect and Stripe's webhooks both arrive, in the order under test.
    assert params["allow_promotion_codes"] == "true"
    welcome = promotion_code(stripe_api, "WELCOME", percent_off=10, duration="once")
    session = stripe_api.pay(session_id, promotion_code=welcome["code"].lower())
    first_invoice = stripe_api.api(
        "GET", f"/v1/invoices/{stripe_api.subscription(session['subscription'])['latest_invoice']}"
    )
    assert first_invoice["total_discount_amounts"] and first_invoice["total"] == first_invoice["subtotal"] - sum(
        share["amount"] for share in first_invoice["total_discount_amounts"]
    )
    assert first_invoice["amount_paid"] == first_invoice["total"] < first_invoice["subtotal"]

    def redirect() -> Any:
        return client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")

    events = stripe_api.take_events()
    assert [event["type"] for event in events if event["type"].startswith(("customer.sub", "invoice", "checkout"))] == [
        "customer.subscription.created",
        "invoice.paid",
        "checkout.session.completed",
    ]

    def deliver_all() -> None:
        for event in events:
            response = client.post("/billing/webhooks/stripe", data=event["payload"], headers=event["headers"])
            assert response.status_code == 200, response.get_data(as_text=True)
        run_jobs(app)  # the worker applies what the requests stored

    if order == "redirect_first":
        landing = redirect()
        deliver_all()
    else:
        deliver_all()
        landing = redirect()
    assert landing.status_code == 303 and landing.headers["Location"] == "/app"
    deliver_all()  # a redelivery changes nothing

    [organization] = query(app, "SELECT * FROM organization")
    subscription = stripe_api.subscription(session["subscription"])
    assert organization.name == "Analytical Engines"
    assert (organization.tier, organization.billing_status) == ("starter", "active")
    assert organization.billing_customer_id == session["customer"]
    assert organization.billing_subscription_id == subscription["id"]
    assert organization.signup_checkout_session_id == session_id
    assert organization.current_period_end.timestamp() == subscription["items"]["data"][0]["current_period_end"]
    assert [(a.addon_key, a.quantity) for a in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 2)]
    [owner] = query(app, "SELECT * FROM user_account")
    assert (owner.email, owner.name, owner.role, owner.organization_id) == (
        "ada@example.com",
        "Ada Lovelace",
        "owner",
        organization.id,
    )
    assert owner.password_hash == pending.password_hash
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.status, pending.organization_id, pending.password_hash) == ("completed", organization.id, None)
    counts = domain_event_counts(app)
    assert [counts[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    assert {(row.type, row.status) for row in query(app, "SELECT type, status FROM stripe_event")} >= {
        ("customer.subscription.created", "processed"),
        ("invoice.paid", "processed"),
        ("checkout.session.completed", "processed"),
    }

    # Signed in, on a page that shows the organization, its plan and billing status.
    home = client.get("/app").get_data(as_text=True)
    assert "Analytical Engines" in home and "Starter" in home and "Active" in home

    # The billing page: plan, status, renewal date, add-ons, and the owner's actions.
    billing = client.get("/billing/").get_data(as_text=True)
    assert "Extra seats × 2" in billing and "Renews" in billing and 'id="cancel"' in billing

    # --- Time passes on the customer's test clock ---------------------------------------------------
    clock_id = customer["test_clock"]

    def deliver() -> list[str]:
        delivered = stripe_api.deliver(client)
        assert all(status == 200 for _, status in delivered), delivered
        return [event_type for event_type, _ in delivered]

    def organization_now() -> Any:
        [row] = query(app, "SELECT * FROM organization")
        return row

    # An upgrade whose payment needs the customer (the bank asks for 3-D Secure on charges made without
    # them): nothing is granted before it is paid. Stripe keeps the change pending
    # (pending_if_incomplete), the organization keeps Starter, and the owner is told why and where to
    # pay; paying on the invoice's page (authenticating) makes the change, and its webhook brings Pro.
    stripe_api.api(
        "POST", f"/v1/subscriptions/{subscription['id']}", {"default_payment_method": "pm_card_authenticationRequired"}
    )
    # The owner enters a promotion code with the change (15% off for a month): the preview shows its
    # discount, the change's invoice carries the same to the cent, and it waits with the change.
    switch = promotion_code(stripe_api, "SWITCH", percent_off=15, duration="repeating", duration_in_months=1)
    choice = {"csrf_token": csrf_token(client, "/billing/"), "tier": "pro", "interval": "month"}
    preview = client.post("/billing/plan/preview", data=choice | {"promotion_code": switch["code"]})
    preview_page = html.unescape(preview.get_data(as_text=True))
    assert preview.status_code == 200 and f"{switch['code']}</strong>: 15% off for 1 month" in preview_page
    discount_shown = int(re.search(r'id="preview-discount" data-amount="(-?\d+)"', preview_page).group(1))  # type: ignore[union-attr]
    today_shown = int(re.search(r'id="preview-today" data-amount="(-?\d+)"', preview_page).group(1))  # type: ignore[union-attr]
    confirm = {"csrf_token": csrf_token(client, "/billing/"), "ticket": ticket_of(preview)}
    page = html.unescape(client.post("/billing/change/confirm", data=confirm, follow_redirects=True).get_data(True))
    assert "did not go through: Your bank asks you to confirm this payment (3-D Secure)." in page
    pending = stripe_api.subscription(subscription["id"])
    upgrade_invoice = stripe_api.api("GET", f"/v1/invoices/{pending['latest_invoice']}")
    assert upgrade_invoice["status"] == "open" and upgrade_invoice["hosted_invoice_url"] in page
    assert pending["pending_update"] and pending["status"] == "active"
    assert -sum(share["amount"] for share in upgrade_invoice["total_discount_amounts"]) == discount_shown < 0
    assert upgrade_invoice["amount_due"] == today_shown
    assert pending["discounts"] == [] and len(pending["pending_update"]["discounts"]) == 1
    assert "invoice.payment_action_required" in deliver()
    assert (organization_now().tier, organization_now().billing_status) == ("starter", "active")
    assert 'id="plan">Starter<' in client.get("/billing/").get_data(as_text=True)
    stripe_api.pay_invoice_page(upgrade_invoice["hosted_invoice_url"], "4000 0027 6000 3184")
    assert {"invoice.paid", "customer.subscription.updated"} <= set(deliver())
    organization = organization_now()
    assert (organization.tier, organization.billing_status) == ("pro", "active")
    assert (organization.last_invoice_id, organization.last_payment_status) == (upgrade_invoice["id"], "paid")
    # Paid, the change and its code's discount are the subscription's; the billing page says until when.
    [switched] = stripe_api.api("GET", f"/v1/subscriptions/{subscription['id']}", {"expand": ["discounts"]})[
        "discounts"
    ]
    assert switched["promotion_code"] == switch["id"] and switched["end"]
    billing = html.unescape(client.get("/billing/").get_data(as_text=True))
    ends = f"{datetime.fromtimestamp(switched['end'], UTC):%d %B %Y}".lstrip("0")
    assert switch["code"] in billing and f'<span class="discount-ends">{ends}</span>' in billing
    # The subscription goes back to the customer's card for its renewals.
    stripe_api.api("POST", f"/v1/subscriptions/{subscription['id']}", {"default_payment_method": ""})
    deliver()

    # A renewal: Stripe invoices and charges the card on file; the organization's period moves on.
    period_end = subscription["items"]["data"][0]["current_period_end"]
    # The first invoice's payment is recorded once, whichever arrived first (its receipt hangs on it),
    # and the upgrade's, paid on its invoice page, once.
    payments_before = domain_event_counts(app)["billing.payment_succeeded"]
    assert payments_before == 2
    usage_in_period(app, stripe_api, clock_id, organization.id, [6_000, 4_300])  # Pro includes 10,000
    stripe_api.advance_clock(clock_id, period_end + 2 * HOUR)
    assert {"invoice.created", "invoice.finalized", "invoice.paid", "customer.subscription.updated"} <= set(deliver())
    renewed = stripe_api.subscription(subscription["id"])
    next_period_end = renewed["items"]["data"][0]["current_period_end"]
    assert next_period_end > period_end
    organization = organization_now()
    assert organization.billing_status == "active"
    assert organization.current_period_end.timestamp() == next_period_end
    assert (organization.last_invoice_id, organization.last_payment_status) == (renewed["latest_invoice"], "paid")
    assert domain_event_counts(app)["billing.payment_succeeded"] == payments_before + 1
    assert metered_line(stripe_api, renewed["latest_invoice"], period_end) == (300, 300 * 2)  # the overage only

    # The owner replaces the card in the customer portal with one whose charges fail; the next renewal
    # fails, the organization is past due, and the owner is told how much and where to pay.
    portal = client.post("/billing/portal", data={"csrf_token": csrf_token(client, "/billing/")})
    assert portal.status_code == 303
    stripe_api.update_card_in_portal(portal.headers["Location"], "4000 0000 0000 0341")
    deliver()
    usage_in_period(app, stripe_api, clock_id, organization.id, [9_999])  # a new period: within what is included
    stripe_api.advance_clock(clock_id, next_period_end + 2 * HOUR)
    assert "invoice.payment_failed" in deliver()
    failing = stripe_api.subscription(subscription["id"])
    open_invoice = stripe_api.api("GET", f"/v1/invoices/{failing['latest_invoice']}")
    assert (failing["status"], open_invoice["status"]) == ("past_due", "open")
    assert metered_line(stripe_api, open_invoice["id"], next_period_end) == (0, 0)
    organization = organization_now()
    assert (organization.billing_status, organization.last_payment_status) == ("past_due", "failed")
    assert organization.past_due_since is not None
    [notice] = query(app, "SELECT * FROM domain_event WHERE name = 'billing.payment_failed'")
    assert notice.organization_id == organization.id
    assert notice.data["invoice_id"] == open_invoice["id"]
    assert notice.data["amount_due"] == open_invoice["amount_due"] > 0
    assert notice.data["hosted_invoice_url"] == open_invoice["hosted_invoice_url"]
    assert notice.data["next_payment_attempt"] == open_invoice["next_payment_attempt"]
    assert "Payment overdue" in client.get("/billing/").get_data(as_text=True)
    # The owner is told by email (the worker's outbox), once, with the amount and where to pay.
    smtp_server: SmtpSink = request.getfixturevalue("smtp_server")
    run_jobs(app)
    [action_email, failed_email] = [
        m for m in smtp_server.to("ada@example.com") if "payment" in str(m["Subject"]).lower()
    ]
    assert upgrade_invoice["hosted_invoice_url"] in email_text(action_email)  # the upgrade's 3-D Secure
    text = email_text(failed_email)
    assert f"${open_invoice['amount_due'] / 100:,.2f}" in text and open_invoice["hosted_invoice_url"] in text

    # Recovery: the owner pays the open invoice on Stripe's hosted invoice page with a good card.
    stripe_api.pay_invoice_page(open_invoice["hosted_invoice_url"])
    assert {"invoice.paid", "customer.subscription.updated"} <= set(deliver())
    organization = organization_now()
    assert (organization.billing_status, organization.past_due_since) == ("active", None)
    assert (organization.last_invoice_id, organization.last_payment_status) == (open_invoice["id"], "paid")

    # Cancel at the period end: Stripe is told (with an idempotency key) and the organization follows.
    response = client.post(
        "/billing/cancel",
        data={"csrf_token": csrf_token(client, "/billing/"), "request_token": "a" * 32, "when": "period_end"},
    )
    assert response.status_code == 303
    [_upgrade, (args, call)] = stripe_api.calls_to("subscriptions.update")
    assert args == (subscription["id"],) and call["params"] == {"cancel_at_period_end": "true"}
    assert call["options"] == {"idempotency_key": f"org-{organization.id}-cancel-period-end-{'a' * 32}"}
    organization = organization_now()
    assert organization.cancel_at_period_end is True and organization.billing_status == "active"
    assert "Plan ends" in client.get("/billing/").get_data(as_text=True)
    # Stripe's webhook for that change agrees and records nothing twice.
    assert deliver() == ["customer.subscription.updated"]
    assert domain_event_counts(app)["subscription.cancellation_scheduled"] == 1

    # A stale form: the owner resumes, then submits the old cancel form again (the back button, a
    # second tab). Stripe answers it from its idempotency cache (the old answer); the product reads the
    # subscription as it is now, keeps it renewing, and says the form was already used.
    def owner_action(path: str, token: str, **fields: str) -> Any:
        data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": token, **fields}
        return client.post(path, data=data, follow_redirects=True)

    assert "Your plan will renew as usual." in owner_action("/billing/resume", "b" * 32).get_data(as_text=True)
    assert deliver() == ["customer.subscription.updated"]
    stale = owner_action("/billing/cancel", "a" * 32, when="period_end")
    assert "That form was already used, so nothing was changed now." in stale.get_data(as_text=True)
    assert organization_now().cancel_at_period_end is False
    assert stripe_api.subscription(subscription["id"])["cancel_at_period_end"] is False
    # A fresh form cancels at the period end again.
    assert "Your plan will end" in owner_action("/billing/cancel", "c" * 32, when="period_end").get_data(as_text=True)
    assert organization_now().cancel_at_period_end is True
    assert deliver() == ["customer.subscription.updated"]

    # The end: the period runs out, Stripe ends the subscription and nothing more is invoiced.
    final_period_end = stripe_api.subscription(subscription["id"])["items"]["data"][0]["current_period_end"]
    stripe_api.advance_clock(clock_id, final_period_end + 2 * HOUR)
    ended = deliver()
    assert "customer.subscription.deleted" in ended and "invoice.created" not in ended
    organization = organization_now()
    assert (organization.billing_status, organization.cancel_at_period_end) == ("canceled", False)
    assert organization.ended_at.timestamp() == final_period_end
    assert client.get("/app").headers["Location"] == "/billing/"  # access ends with the subscription
    run_jobs(app)
    assert [m["Subject"] for m in smtp_server.to("ada@example.com") if "ended" in str(m["Subject"]).lower()]
    counts = domain_event_counts(app)
    assert [counts[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    assert counts["billing.payment_failed"] == 1 and counts["billing.payment_action_required"] == 1
    assert counts["billing.payment_succeeded"] == payments_before + 2
    # A receipt for every paid invoice (the first, the upgrade, the renewal, the recovered one), each
    # exactly once, with what that invoice took.
    run_jobs(app)
    receipts = [m for m in smtp_server.to("ada@example.com") if str(m["Subject"]).startswith("Your Ledgerline receipt")]
    assert len(receipts) == counts["billing.payment_succeeded"] == 4
    invoices = stripe_api.api("GET", "/v1/invoices", {"customer": subscription["customer"], "limit": 100})["data"]
    paid = sorted(f"Amount paid: ${i['amount_paid'] / 100:,.2f}" for i in invoices if i["amount_paid"] > 0)
    said = [next(line for line in email_text(r).splitlines() if "Amount paid: $" in line).strip() for r in receipts]
    assert sorted(said) == paid
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} <= {"processed", "ignored"}

    taxed_customer_with_a_vat_id(app, stripe_api, smtp_server)  # Stripe Tax (issue 24): helper below


# --- Taxes (issue 24): one helper, called by the primary test ----------------------------------------


def taxed_customer_with_a_vat_id(app: Flask, stripe_api: SandboxAccount, smtp_server: SmtpSink) -> None:
    """With STRIPE_AUTOMATIC_TAX, a Berlin business signs up with its VAT ID: Checkout collects both, Stripe
    Tax adds 19% VAT, the billing page shows the address, the verified VAT ID and the tax on the next
    invoice, and the receipt the tax; moved to Paris with its German VAT ID it is reverse charged."""
    app.config["STRIPE_AUTOMATIC_TAX"] = True
    try:
        client = app.test_client()
        email = "finance@ada-gmbh.example"
        response = start_signup(client, email=email, organization_name="Ada GmbH", addon_extra_seats="0")
        session_id = checkout_session_id(response)
        [*_, (_, call)] = stripe_api.calls_to("checkout.sessions.create")
        assert call["params"]["automatic_tax"] == {"enabled": "true"}
        assert call["params"]["tax_id_collection"] == {"enabled": "true"}
        assert call["params"]["customer_update"] == {"address": "auto", "name": "auto"}
        session = stripe_api.pay(session_id, tax_details=BERLIN_BUSINESS)
        assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
        assert all(status == 200 for _, status in stripe_api.deliver(client))
        invoice = stripe_api.api("GET", f"/v1/invoices/{session['invoice']}")
        [vat] = invoice["total_taxes"]
        assert (vat["taxability_reason"], vat["amount"], invoice["total"]) == ("standard_rated", 361, 2261)
        assert invoice["customer_tax_ids"] == [{"type": "eu_vat", "value": "DE123456789"}]
        page = client.get("/billing/").get_data(as_text=True)
        assert "Friedrichstr. 1, 10117 Berlin, DE" in page and '<span class="tax-id-status">verified</span>' in page
        assert '<span id="next-invoice-tax">($19.00 + $3.61 tax)</span>' in page
        run_jobs(app)
        [receipt] = [m for m in smtp_server.to(email) if str(m["Subject"]).startswith("Your Ledgerline receipt")]
        assert "Tax: $3.61" in email_text(receipt) and "Amount paid: $22.61" in email_text(receipt)
        # Reverse charge: a business in another EU country with a verified VAT ID pays no VAT here.
        moved = {"action": "address", "csrf_token": csrf_token(client, "/billing/"), "request_token": "e" * 32}
        assert client.post("/billing/tax-details", data={**moved, "city": "Paris", "country": "FR"}).status_code == 303
        assert 'id="next-invoice-tax"' not in client.get("/billing/").get_data(as_text=True)
        preview = stripe_api.api("POST", "/v1/invoices/create_preview", {"subscription": session["subscription"]})
        assert [(t["taxability_reason"], t["amount"]) for t in preview["total_taxes"]] == [("reverse_charge", 0)]
        # Customer details: the owner renames the organization; the worker puts the new name on Stripe's
        # customer (its metadata) and keeps the business name typed with the VAT ID, which its invoices
        # show; our push comes back as customer.updated and nothing is pushed again; reconcile agrees.
        renamed = client.post(
            "/billing/organization-name",
            data={"csrf_token": csrf_token(client, "/billing/"), "name": "Ada Engines"},
            follow_redirects=True,
        )
        assert "The organization is now called Ada Engines." in renamed.get_data(as_text=True)
        run_jobs(app)
        customer = stripe_api.api("GET", f"/v1/customers/{session['customer']}")
        assert (customer["name"], customer["metadata"]["organization_name"]) == ("Ada GmbH", "Ada Engines")
        pushes = len(stripe_api.calls_to("customers.update"))
        assert ("customer.updated", 200) in stripe_api.deliver(client)
        assert len(stripe_api.calls_to("customers.update")) == pushes
        [organization] = query(app, "SELECT id FROM organization WHERE name = 'Ada Engines'")
        with app.app_context():
            assert BillingService.reconcile(organization_id=organization.id).customer_drifts == []
    finally:
        app.config["STRIPE_AUTOMATIC_TAX"] = False


# --- Usage-based billing in the primary test (issue 26) --------------------------------------------
# The primary test records API calls in two billing periods (through BillingService.record_usage, with a
# repeated idempotency key each time), the worker reports the overage to the sandbox's meter, and the
# renewal invoice the test clock produces bills the period that ended: exactly the overage, at the
# metered price (plans.toml: api_calls_overage, 2 cents a call in the sandbox).


def usage_in_period(
    app: Flask, stripe_api: SandboxAccount, clock_id: str, organization_id: int, quantities: list[int]
) -> None:
    """Record each quantity at the test clock's time (a repeat of each is not counted) and report."""
    from app import clock
    from app.services.billing_service import BillingService

    now = stripe_api.api("GET", f"/v1/test_helpers/test_clocks/{clock_id}")["frozen_time"]
    with pytest.MonkeyPatch.context() as patch, app.app_context():
        patch.setattr(clock, "timestamp", lambda: float(now))
        for index, quantity in enumerate(quantities * 2):
            key = f"calls-{now}-{index % len(quantities)}"
            BillingService.record_usage(organization_id, "api_calls", quantity, idempotency_key=key)
        run = BillingService.report_usage()
    assert (run.failed, run.still_pending) == (0, 0)


def metered_line(stripe_api: SandboxAccount, invoice_id: str, period_end: int) -> tuple[int, int]:
    """The (quantity, amount) of the invoice's metered line, which bills the period that ended."""
    invoice = stripe_api.api("GET", f"/v1/invoices/{invoice_id}")
    price = stripe_api.price_id("api_calls_overage")
    [line] = [li for li in invoice["lines"]["data"] if li["pricing"]["price_details"]["price"] == price]
    assert line["period"]["end"] == period_end
    return line["quantity"], line["amount"]


# --- Signup: bad input, repeats, other browsers, payment states -----------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("email", "not-an-email", "Invalid email address."),
        ("email", "", "This field is required."),
        ("password", "short", "Use 12 to 128 characters."),
        ("password", "x" * 129, "Use 12 to 128 characters."),
        ("password", "aaaaaaaaaaaaaaaa", "That password is too easy to guess."),
        ("password", "ada@example.com-is-me", "Your password must not contain your email address."),
        ("organization_name", "", "This field is required."),
        ("organization_name", "A", "Field must be between 2 and 100 characters long."),
        ("owner_name", "   ", "This field is required."),
        ("tier", "platinum", "Not a valid choice."),
        ("addon_extra_seats", "51", "Number must be between 0 and 50."),
        ("addon_extra_seats", "-1", "Number must be between 0 and 50."),
    ],
)
def test_each_invalid_field_is_named_and_nothing_is_stored(
    app: Flask, offline_stripe: SandboxAccount, field: str, value: str, message: str
) -> None:
    client = app.test_client()
    response = start_signup(client, **{field: value})
    page = response.get_data(as_text=True)
    assert response.status_code == 422
    assert message in page
    assert 'value="Analytical Engines"' in page or field == "organization_name"  # values are kept...
    assert PASSWORD not in page  # ...except the password
    assert query(app, "SELECT id FROM pending_signup") == []
    assert offline_stripe.calls_to("checkout.sessions.create") == []


def test_an_email_that_owns_an_account_is_answered_as_any_other(app: Flask, offline_stripe: SandboxAccount) -> None:
    """The form does not tell who has an account (tests/test_security.py covers the mailbox's side)."""
    sign_up(app.test_client(), offline_stripe)
    response = start_signup(app.test_client(), email="ADA@example.com")
    assert response.status_code == 303 and "An account with this email" not in response.get_data(as_text=True)
    assert len(query(app, "SELECT id FROM pending_signup")) == 2


def test_a_new_attempt_supersedes_the_open_one_and_expires_its_checkout(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    first = checkout_session_id(start_signup(client))
    second = checkout_session_id(start_signup(client, tier="business"))
    rows = {row.checkout_session_id: row for row in query(app, "SELECT * FROM pending_signup")}
    assert rows[first].status == "expired" and rows[first].failure_reason == "superseded by a newer signup attempt"
    assert rows[second].status == "pending" and rows[second].tier == "business"
    assert [args for args, _ in offline_stripe.calls_to("checkout.sessions.expire")] == [(first,)]
    assert offline_stripe.session(first)["status"] == "expired"


def test_the_same_form_sent_again_from_the_same_browser_resumes_its_checkout(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    """Every signup POST used to create a Checkout Session: a double click, or Back and submit, resumes the
    open one (with the form's latest answers) when it sells the same items; anything else starts anew."""
    client = app.test_client()
    first = checkout_session_id(start_signup(client))
    again = checkout_session_id(start_signup(client, organization_name="Difference Engines"))
    assert again == first and len(offline_stripe.calls_to("checkout.sessions.create")) == 1
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert pending.status == "pending" and pending.organization_name == "Difference Engines"
    assert domain_event_counts(app)["signup.resumed"] == 1
    # Paying it makes the account with the answers sent last.
    offline_stripe.pay(first)
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={first}").headers["Location"] == "/app"
    assert [r.name for r in query(app, "SELECT name FROM organization")] == ["Difference Engines"]

    # Another browser sending the same email and choices cannot take an open signup over: it supersedes
    # it, as before.
    grace = app.test_client()
    mine = checkout_session_id(start_signup(grace, email="grace@example.com"))
    theirs = checkout_session_id(start_signup(app.test_client(), email="grace@example.com"))
    assert theirs != mine and offline_stripe.session(mine)["status"] == "expired"


def test_other_choices_or_a_closed_checkout_start_a_new_one(app: Flask, offline_stripe: SandboxAccount) -> None:
    # Different choices (yearly billing) from the browser holding the open signup make a new checkout.
    linus = app.test_client()
    monthly = checkout_session_id(start_signup(linus, email="linus@example.com"))
    yearly = checkout_session_id(start_signup(linus, email="linus@example.com", interval="year"))
    assert yearly != monthly and offline_stripe.session(monthly)["status"] == "expired"
    # A session closed at Stripe meanwhile is not offered again.
    offline_stripe.api("POST", f"/v1/checkout/sessions/{yearly}/expire")
    fresh = checkout_session_id(start_signup(linus, email="linus@example.com", interval="year"))
    assert fresh != yearly and offline_stripe.session(fresh)["status"] == "open"
    assert len(offline_stripe.calls_to("checkout.sessions.create")) == 3


def test_a_superseded_checkout_paid_anyway_still_gets_its_account(app: Flask, offline_stripe: SandboxAccount) -> None:
    """Stripe's word that a checkout was paid wins over our bookkeeping: the customer paid."""
    client = app.test_client()
    first = checkout_session_id(start_signup(client))
    offline_stripe.fail_next("checkout.sessions.expire")  # the expire did not reach Stripe in time
    second = checkout_session_id(start_signup(client, tier="business"))
    offline_stripe.pay(first)
    # The account is made; this browser now belongs to the newer attempt. The ended attempt's password
    # was erased, so the owner is asked to choose one through the reset link.
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={first}")
    assert response.headers["Location"] == "/auth/forgot-password"
    assert query(app, "SELECT password_hash FROM user_account")[0].password_hash == ""
    assert len(query(app, "SELECT id FROM organization")) == 1
    # Paying the second one too is a conflict that is recorded for a refund, not a second account.
    offline_stripe.pay(second)
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={second}")
    assert response.status_code == 409 and "refund" in response.get_data(as_text=True)
    assert len(query(app, "SELECT id FROM organization")) == 1
    assert domain_event_counts(app)["signup.conflict"] == 1


def test_the_success_url_signs_in_only_the_browser_that_started_the_signup(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner_browser, other_browser = app.test_client(), app.test_client()
    session_id = checkout_session_id(start_signup(owner_browser))
    offline_stripe.pay(session_id)
    url = f"/billing/complete-signup-from-stripe?session_id={session_id}"
    stolen = other_browser.get(url)
    assert stolen.status_code == 303 and stolen.headers["Location"] == "/auth/login"
    assert other_browser.get("/app").status_code == 302  # not signed in
    assert owner_browser.get(url).headers["Location"] == "/app"
    assert owner_browser.get(url).headers["Location"] == "/app"  # replayed by the owner: still fine
    assert "Analytical Engines" in owner_browser.get("/app").get_data(as_text=True)
    assert len(query(app, "SELECT id FROM organization")) == 1


@pytest.mark.parametrize("session_id", ["cs_test_unknown123", "not-a-session", "", "cs_live_" + "x" * 300])
def test_unknown_or_malformed_checkout_ids_get_a_clear_error_page(
    app: Flask, offline_stripe: SandboxAccount, session_id: str
) -> None:
    response = app.test_client().get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert response.status_code == 404
    assert "We could not finish that checkout" in response.get_data(as_text=True)
    assert offline_stripe.calls_to("checkout.sessions.retrieve") == []  # Stripe is not asked about strangers


def test_a_checkout_created_elsewhere_is_not_ours(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    checkout_session_id(start_signup(client))
    foreign = offline_stripe.api(
        "POST",
        "/v1/checkout/sessions",
        {
            "mode": "subscription",
            "line_items": [{"price": offline_stripe.price_id("starter_monthly"), "quantity": 1}],
            "success_url": "https://elsewhere.example/done",
            "cancel_url": "https://elsewhere.example/",
        },
    )
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={foreign['id']}")
    assert response.status_code == 404
    webhook = post_and_apply(client, stripe_event("checkout.session.completed", offline_stripe.pay(foreign["id"])))
    assert webhook.status_code == 200
    [row] = query(app, "SELECT status, outcome FROM stripe_event")
    assert (row.status, row.outcome) == ("ignored", "not ours: not a checkout this app created")


def test_an_asynchronous_payment_shows_a_processing_page_until_it_settles(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client))
    session = offline_stripe.pay(session_id, outcome="async")
    assert post_and_apply(client, stripe_event("checkout.session.completed", session)).status_code == 200
    waiting = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert waiting.status_code == 202 and 'id="payment-processing"' in waiting.get_data(as_text=True)
    assert query(app, "SELECT status FROM pending_signup")[0].status == "pending"
    assert query(app, "SELECT id FROM organization") == []

    settled = offline_stripe.settle_async_payment(session_id)
    event = stripe_event("checkout.session.async_payment_succeeded", settled)
    assert post_and_apply(client, event).status_code == 200
    [organization] = query(app, "SELECT * FROM organization")
    assert organization.billing_status == "active"
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"


def test_a_trial_needs_no_payment_and_starts_trialing(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    sign_up(client, offline_stripe, outcome="trial", tier="pro", addon_extra_seats="0")
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["subscription_data"]["trial_period_days"] == "14"
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("pro", "trialing")
    assert organization.trial_end is not None
    assert query(app, "SELECT * FROM organization_addon") == []
    assert "Free trial" in client.get("/app").get_data(as_text=True)


def test_returning_from_the_cancel_url_keeps_the_values(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    checkout_session_id(start_signup(client, tier="business"))
    page = client.get("/auth/signup?checkout=canceled").get_data(as_text=True)
    assert "Checkout was canceled and nothing was charged." in page
    assert 'value="ada@example.com"' in page and 'value="Analytical Engines"' in page
    assert '<input checked id="tier-2" name="tier" required type="radio" value="business">' in page
    # Another browser sees an empty form: the values are only for the browser that entered them.
    assert "Analytical Engines" not in app.test_client().get("/auth/signup?checkout=canceled").get_data(as_text=True)


def test_stripe_unavailable_keeps_the_form_and_marks_the_attempt_failed(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    offline_stripe.fail_next("checkout.sessions.create")
    response = start_signup(app.test_client())
    assert response.status_code == 503
    assert "We could not reach our payment provider." in response.get_data(as_text=True)
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert pending.status == "failed" and pending.failure_reason.startswith("checkout not created")


def test_prices_are_resolved_by_lookup_key_once_and_cached_in_redis(app: Flask, offline_stripe: SandboxAccount) -> None:
    """The signup page shows every price the catalogue sells: one lookup at Stripe fills the cache, and
    the signups that follow (page and POST) cost none."""
    checkout_session_id(start_signup(app.test_client()))
    checkout_session_id(start_signup(app.test_client(), email="grace@example.com"))
    [(_, call)] = offline_stripe.calls_to("prices.list")
    catalogue_keys = app.extensions["plan_catalogue"].priced_lookup_keys()  # with the metered prices: 10, one request
    assert catalogue_keys[-2:] == ["api_calls_overage", "api_calls_overage_yearly"]
    assert call["params"] == {"lookup_keys": catalogue_keys, "active": "true", "limit": str(len(catalogue_keys))}
    assert {"starter_monthly", "extra_seat_monthly", "starter_yearly"} <= set(catalogue_keys)
    cached = app.extensions["redis"].keys("cache:stripe-price:*")
    assert sorted(cached) == sorted(f"cache:stripe-price:{key}".encode() for key in catalogue_keys)


def test_a_lookup_key_without_an_active_price_is_a_clear_error(app: Flask, offline_stripe: SandboxAccount) -> None:
    price_id = offline_stripe.price_id("business_monthly")
    offline_stripe.force(price_id, active=False)  # archived in the Dashboard
    try:
        response = start_signup(app.test_client(), tier="business")
    finally:
        offline_stripe.force(price_id, active=True)
    assert response.status_code == 422
    assert "No active Stripe price has the lookup key &#39;business_monthly&#39;." in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM pending_signup") == []


@pytest.mark.parametrize("missing", ["STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"])
def test_ensure_stripe_names_a_missing_credential(make_app: Any, missing: str) -> None:
    from app.services.billing_service import BillingConfigurationError, BillingService

    app = make_app(**{missing: ""})
    with app.app_context(), pytest.raises(BillingConfigurationError, match=f"^{missing} is not set"):
        BillingService.ensure_stripe()
    response = start_signup(app.test_client())
    assert response.status_code == 503 and "Billing is temporarily unavailable" in response.get_data(as_text=True)


def test_the_stripe_client_uses_the_configured_api_base(make_app: Any, offline_stripe: SandboxAccount) -> None:
    from app.services.billing_service import STRIPE_API_VERSION, BillingService

    with make_app(STRIPE_API_BASE=offline_stripe.url).app_context():
        client = BillingService.ensure_stripe()
        assert isinstance(client, stripe.StripeClient)
        BillingService.price_ids_for_lookup_keys(["starter_monthly"])
    [made] = offline_stripe.requests_made()
    assert (made["method"], made["path"], made["stripe_version"]) == ("GET", "/v1/prices", STRIPE_API_VERSION)


def test_signup_is_rate_limited_per_email_with_a_429_page(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(SIGNUP_RATE_LIMIT_PER_EMAIL="2/hour", SIGNUP_RATE_LIMIT_PER_CLIENT="100/hour")
    statuses = [start_signup(app.test_client()).status_code for _ in range(3)]
    assert statuses == [303, 303, 429]
    response = start_signup(app.test_client())
    assert "Too many attempts" in response.get_data(as_text=True)
    assert start_signup(app.test_client(), email="someone.else@example.com").status_code == 303
    assert app.extensions["redis"].keys("LIMITS:LIMITER/ratelimit/signup-email:ada@example.com/*")


def test_signup_is_rate_limited_per_client(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(SIGNUP_RATE_LIMIT_PER_CLIENT="2/hour")
    client = app.test_client()
    statuses = [start_signup(client, email=f"user{n}@example.com").status_code for n in range(3)]
    assert statuses == [303, 303, 429]


def test_concurrent_redirects_and_webhooks_provision_exactly_once(app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = app.test_client()
    session_id = checkout_session_id(start_signup(owner))
    session = offline_stripe.pay(session_id)
    completed = stripe_event("checkout.session.completed", session)
    statuses: list[int] = []
    barrier = threading.Barrier(16)

    def arrive(index: int) -> None:
        client = app.test_client()
        barrier.wait()
        if index % 2:
            statuses.append(post_webhook(client, completed).status_code)
        else:
            statuses.append(client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").status_code)

    threads = [threading.Thread(target=arrive, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [200, 303]
    assert len(query(app, "SELECT id FROM organization")) == 1
    assert len(query(app, "SELECT id FROM user_account")) == 1
    events = domain_event_counts(app)
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    # No lock is held while Stripe is read, so arrivals that overlap may each read it once; the ones
    # that come after the commit find the signup done without asking Stripe.
    reads = len(offline_stripe.calls_to("checkout.sessions.retrieve")) + len(
        offline_stripe.calls_to("subscriptions.retrieve")
    )
    assert 1 <= reads <= 16


def test_a_cached_price_stripe_rejects_is_looked_up_again(app: Flask, offline_stripe: SandboxAccount) -> None:
    checkout_session_id(start_signup(app.test_client()))  # caches both prices
    old = offline_stripe.price("starter_monthly")
    # A new price takes over the lookup key and the old one is archived, as a price migration does.
    new = offline_stripe.api(
        "POST",
        "/v1/prices",
        {
            "product": old["product"],
            "currency": old["currency"],
            "unit_amount": old["unit_amount"],
            "recurring": {"interval": "month"},
            "lookup_key": "starter_monthly",
            "transfer_lookup_key": True,
            "tax_behavior": old["tax_behavior"],  # as a migration copies it (Stripe Tax needs one)
        },
    )
    offline_stripe.api("POST", f"/v1/prices/{old['id']}", {"active": False})
    response = start_signup(app.test_client(), email="grace@example.com")
    assert response.status_code == 503  # Stripe refused the archived price the cache still held
    assert checkout_session_id(start_signup(app.test_client(), email="grace@example.com"))
    assert len(offline_stripe.calls_to("prices.list")) == 2
    [_, _, (_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["line_items"][0] == {"price": new["id"], "quantity": "1"}


def test_domain_events_are_announced_only_after_they_commit(app: Flask, offline_stripe: SandboxAccount) -> None:
    from app.services import domain_events

    announced: list[tuple[str, bool]] = []

    def subscriber(announcement: domain_events.Announcement) -> None:
        # Read from another connection: the event must already be committed when it is announced.
        committed = query(app, "SELECT count(*) AS n FROM domain_event WHERE name = :n", n=announcement.name)[0].n
        announced.append((announcement.name, committed > 0))

    domain_events.subscribe("*", subscriber)
    app.config["JOB_RETRY_BASE_SECONDS"] = 0  # the worker retries at once
    try:
        client = app.test_client()
        session_id = checkout_session_id(start_signup(client))
        completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
        offline_stripe.fail_next("subscriptions.retrieve", "server")
        # The worker's first attempt fails and rolls back; its retry applies the event.
        assert post_and_apply(client, completed).status_code == 200
        assert query(app, "SELECT attempts FROM stripe_event")[0].attempts == 2
    finally:
        domain_events.unsubscribe("*", subscriber)
    names = [name for name, _ in announced]
    assert [names.count(name) for name in SIGNUP_EVENTS] == [1, 1, 1]
    assert all(committed for _, committed in announced)


def test_the_signup_return_page_says_we_are_confirming_when_stripe_is_down(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    """Issue 21, item 6: the success URL while Stripe does not answer is a page that checks again (202),
    not a 500; the webhook provisions meanwhile and the next check signs the owner in."""
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client))
    session = offline_stripe.pay(session_id)
    offline_stripe.fail_next("checkout.sessions.retrieve", times=20)
    waiting = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert waiting.status_code == 202 and "We are confirming your payment" in waiting.get_data(as_text=True)
    assert query(app, "SELECT id FROM organization") == []
    assert post_and_apply(client, stripe_event("checkout.session.completed", session)).status_code == 200
    offline_stripe.http.delete(f"{offline_stripe.url}/_sandbox/faults", timeout=10).raise_for_status()
    back = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert back.status_code == 303 and back.headers["Location"] == "/app"


def test_two_paid_signups_for_one_email_racing_end_in_one_account_and_a_refund(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    """Issue 21, item 6: two checkouts of the same email (a superseded one paid anyway) provisioned at
    the same moment: the second waits on the unique email and, when the first commits, becomes a
    conflict that is canceled and refunded (409 page), never an IntegrityError 500."""
    sign_up(app.test_client(), offline_stripe, email="babbage@example.com")
    [(organization_id,)] = query(app, "SELECT id FROM organization")
    first_browser, second_browser = app.test_client(), app.test_client()
    first = checkout_session_id(start_signup(first_browser))
    offline_stripe.fail_next("checkout.sessions.expire")  # the expire did not reach Stripe in time
    second = checkout_session_id(start_signup(second_browser))  # supersedes the first
    offline_stripe.pay(first)
    offline_stripe.pay(second)
    # The email's account is being created in a transaction that has not committed yet (here a member
    # row stands for the first checkout's provisioning, which holds the same unique email).
    from sqlalchemy import create_engine, text

    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    holder = engine.connect()
    holding = holder.begin()
    holder.execute(
        text(
            "INSERT INTO user_account (organization_id, email, name, password_hash, role, created_at) "
            "VALUES (:o, 'ada@example.com', 'Ada', 'x', 'member', now())"
        ),
        {"o": organization_id},
    )
    answers: list[Any] = []
    racing = threading.Thread(
        target=lambda: answers.append(second_browser.get(f"/billing/complete-signup-from-stripe?session_id={second}"))
    )
    racing.start()
    racing.join(timeout=2)
    assert racing.is_alive()  # waiting on the unique email held by the open transaction
    holding.commit()
    holder.close()
    engine.dispose()
    racing.join(timeout=30)
    [answer] = answers
    page = answer.get_data(as_text=True)
    assert answer.status_code == 409, page[-1500:]
    assert "This email already has an account" in page and "refunded" in page
    [pending] = query(app, "SELECT * FROM pending_signup WHERE checkout_session_id = :s", s=second)
    assert pending.status == "failed" and pending.settled_at is not None
    assert offline_stripe.subscription(offline_stripe.session(second)["subscription"])["status"] == "canceled"


# --- The free plan's lifecycle --------------------------------------------------------------------


def test_free_signup_upgraded_to_paid_then_downgraded_to_free(request: pytest.FixtureRequest) -> None:
    """A sibling of the primary lifecycle on the same sandbox: a free signup (no Checkout, no Stripe at
    all), its limits, an upgrade from the billing page through Checkout into a subscription attached to
    the same organization and the Stripe customer made then (on a test clock), a downgrade back to free
    that cancels at the period's end, and a second upgrade that reuses the customer."""
    app: Flask = request.getfixturevalue("make_app")(STRIPE_TEST_CLOCKS=True)
    stripe_api: SandboxAccount = request.getfixturevalue("offline_stripe")
    client = app.test_client()

    page = client.get("/auth/signup").get_data(as_text=True)
    assert 'id="price-free-free"' in page and "Free, no card needed" in page

    # The free signup: the organization exists at once, the owner is signed in, Stripe never hears of it.
    response = start_signup(client, tier="free", addon_extra_seats="0")
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    assert [
        made["path"] for made in stripe_api.requests_made() if made["path"] != "/v1/prices"
    ] == []  # page prices only
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("free", "active")
    assert (organization.billing_customer_id, organization.billing_subscription_id) == (None, None)
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.status, pending.organization_id, pending.password_hash) == ("completed", organization.id, None)
    assert [domain_event_counts(app)[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    home = client.get("/app")
    assert home.status_code == 200 and "Analytical Engines" in home.get_data(as_text=True)
    # The free tier's limits apply: 2 seats, and no subscription to cancel or change.
    billing = client.get("/billing/").get_data(as_text=True)
    assert "1 in use of 2" in billing and 'id="cancel"' not in billing and 'id="change-plan"' not in billing
    assert 'id="upgrade-from-free"' in billing and 'id="upgrade-free"' not in billing  # paid tiers only
    assert "$19.00" in billing  # the paid plans' prices, from Stripe

    # Signing up again with the same email (free) makes no second account.
    again = start_signup(app.test_client(), tier="free", addon_extra_seats="0")
    assert again.status_code == 303 and again.headers["Location"] == "/auth/login"
    assert len(query(app, "SELECT id FROM organization")) == 1

    # The upgrade: the Stripe customer is made now (on a test clock), and Checkout sells it the plan.
    def owner_post(path: str, token: str, **fields: str) -> Any:
        data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": token, **fields}
        return client.post(path, data=data)

    response = owner_post("/billing/resubscribe", "d" * 32, tier="starter")
    assert response.status_code == 303
    session_id = response.headers["Location"].rsplit("/", 1)[-1]
    [(_, customer_call)] = stripe_api.calls_to("customers.create")
    assert customer_call["options"] == {"idempotency_key": f"org-{organization.id}-customer"}
    assert customer_call["params"]["email"] == "ada@example.com"
    assert customer_call["params"]["metadata"] == {"organization_id": str(organization.id)}
    [(_, checkout_call)] = stripe_api.calls_to("checkout.sessions.create")
    customer_id = checkout_call["params"]["customer"]
    assert query(app, "SELECT billing_customer_id FROM organization")[0].billing_customer_id == customer_id
    assert checkout_call["params"]["metadata"] == {"purpose": "resubscribe", "organization_id": str(organization.id)}
    assert checkout_call["params"]["line_items"] == [
        {"price": stripe_api.price_id("starter_monthly"), "quantity": "1"},
        {"price": stripe_api.price_id("api_calls_overage")},
    ]
    customer = stripe_api.api("GET", f"/v1/customers/{customer_id}")
    assert customer["test_clock"].startswith("clock_")

    session = stripe_api.pay(session_id)
    landing = client.get(f"/billing/checkout-complete?session_id={session_id}")
    assert landing.status_code == 303 and landing.headers["Location"] == "/billing/"
    assert all(status == 200 for _, status in stripe_api.deliver(client))
    [upgraded] = query(app, "SELECT * FROM organization")
    assert upgraded.id == organization.id  # the same organization, members and data
    assert (upgraded.tier, upgraded.billing_status) == ("starter", "active")
    assert (upgraded.billing_customer_id, upgraded.billing_subscription_id) == (customer_id, session["subscription"])
    assert "1 in use of 5" in client.get("/billing/").get_data(as_text=True)  # the paid tier's limits now
    assert [domain_event_counts(app)[name] for name in SIGNUP_EVENTS] == [1, 1, 1]

    # The downgrade: canceled at the period's end, noting the free tier; the plan runs until then.
    billing = client.get("/billing/").get_data(as_text=True)
    assert 'id="downgrade-free"' in billing
    assert owner_post("/billing/downgrade-to-free", "e" * 32).status_code == 303
    [(args, update)] = stripe_api.calls_to("subscriptions.update")
    assert args == (session["subscription"],)
    assert update["params"] == {"cancel_at_period_end": "true", "metadata": {"downgrade_to": "free"}}
    assert update["options"] == {"idempotency_key": f"org-{organization.id}-downgrade-free-{'e' * 32}"}
    held = query(app, "SELECT * FROM organization")[0]
    assert (held.tier, held.billing_status, held.cancel_at_period_end) == ("starter", "active", True)
    stripe_api.deliver(client)

    period_end = stripe_api.subscription(session["subscription"])["items"]["data"][0]["current_period_end"]
    stripe_api.advance_clock(customer["test_clock"], period_end + 2 * HOUR)
    ended = [event_type for event_type, status in stripe_api.deliver(client) if status == 200]
    assert "customer.subscription.deleted" in ended and "invoice.created" not in ended
    [free_again] = query(app, "SELECT * FROM organization")
    assert (free_again.tier, free_again.billing_status, free_again.cancel_at_period_end) == ("free", "active", False)
    assert (free_again.billing_subscription_id, free_again.billing_customer_id) == (None, customer_id)
    assert client.get("/app").status_code == 200  # access goes on, on the free plan
    run_jobs(app)
    smtp_server: SmtpSink = request.getfixturevalue("smtp_server")
    assert not [m for m in smtp_server.to("ada@example.com") if "ended" in str(m["Subject"]).lower()]
    assert stripe_api.subscription(session["subscription"])["status"] == "canceled"

    # A second upgrade reuses the customer: no new one is made.
    response = owner_post("/billing/resubscribe", "f" * 32, tier="pro")
    assert response.status_code == 303
    assert len(stripe_api.calls_to("customers.create")) == 1
    assert stripe_api.calls_to("checkout.sessions.create")[-1][1]["params"]["customer"] == customer_id
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} <= {"processed", "ignored"}


# --- Trials without a card ------------------------------------------------------------------------

DAY = 24 * HOUR


def _start_card_less_trial(request: pytest.FixtureRequest) -> tuple[Flask, SandboxAccount, Any, dict[str, Any]]:
    """A Pro signup (14-day trial, no card needed) paid on Checkout without entering a card."""
    app: Flask = request.getfixturevalue("make_app")(STRIPE_TEST_CLOCKS=True)
    stripe_api: SandboxAccount = request.getfixturevalue("offline_stripe")
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, tier="pro", addon_extra_seats="0"))
    [(_, call)] = stripe_api.calls_to("checkout.sessions.create")
    assert call["params"]["payment_method_collection"] == "if_required"
    assert call["params"]["subscription_data"]["trial_period_days"] == "14"
    assert call["params"]["subscription_data"]["trial_settings"] == {
        "end_behavior": {"missing_payment_method": "cancel"}
    }
    session = stripe_api.pay(session_id, outcome="no_card")
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    stripe_api.deliver(client)
    subscription = stripe_api.subscription(session["subscription"])
    assert subscription["status"] == "trialing" and subscription["default_payment_method"] is None
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("pro", "trialing")
    billing = client.get("/billing/").get_data(as_text=True)
    assert 'id="add-card"' in billing and "None on file" in billing
    assert 'id="trial-banner"' not in client.get("/app").get_data(as_text=True)  # not yet: 14 days to go
    return app, stripe_api, client, subscription


def _trial_reminder(app: Flask, stripe_api: SandboxAccount, client: Any, subscription: dict[str, Any]) -> str:
    """Three days before the trial ends: Stripe's trial_will_end, one email, and the banner."""
    clock_id = stripe_api.api("GET", f"/v1/customers/{subscription['customer']}")["test_clock"]
    stripe_api.advance_clock(clock_id, subscription["trial_end"] - 3 * DAY + HOUR)
    assert "customer.subscription.trial_will_end" in [event for event, _ in stripe_api.deliver(client)]
    [event] = query(app, "SELECT * FROM domain_event WHERE name = 'subscription.trial_will_end'")
    assert event.data["ends_without_card"] == "cancel"
    assert 'id="trial-banner"' in client.get("/app").get_data(as_text=True)
    return str(clock_id)


def test_a_trial_without_a_card_converts_once_the_owner_adds_one(
    request: pytest.FixtureRequest, smtp_server: SmtpSink
) -> None:
    app, stripe_api, client, subscription = _start_card_less_trial(request)
    clock_id = _trial_reminder(app, stripe_api, client, subscription)
    run_jobs(app)
    run_jobs(app)  # a second run sends nothing more: the outbox delivers once
    [reminder] = [m for m in smtp_server.to("ada@example.com") if "trial ends" in str(m["Subject"]).lower()]
    assert "add one on the billing page before then" in email_text(reminder)
    assert "is canceled when the trial ends" in email_text(reminder)

    # The owner adds a card in the customer portal from the billing page; the trial then converts.
    portal = client.post("/billing/portal", data={"csrf_token": csrf_token(client, "/billing/")})
    stripe_api.update_card_in_portal(portal.headers["Location"], "4242 4242 4242 4242")
    stripe_api.deliver(client)
    assert 'id="add-card"' not in client.get("/billing/").get_data(as_text=True)
    stripe_api.advance_clock(clock_id, subscription["trial_end"] + 2 * HOUR)
    assert "invoice.paid" in [event for event, _ in stripe_api.deliver(client)]
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status, organization.last_payment_status) == (
        "pro",
        "active",
        "paid",
    )
    assert 'id="trial-banner"' not in client.get("/app").get_data(as_text=True)


def test_a_trial_without_a_card_lapses_cleanly_and_resumes_by_paying(request: pytest.FixtureRequest) -> None:
    app, stripe_api, client, subscription = _start_card_less_trial(request)
    clock_id = _trial_reminder(app, stripe_api, client, subscription)

    # No card by the end: Stripe cancels the subscription (nothing invoiced), and access ends.
    stripe_api.advance_clock(clock_id, subscription["trial_end"] + 2 * HOUR)
    ended = [event for event, _ in stripe_api.deliver(client)]
    assert "customer.subscription.deleted" in ended and "invoice.paid" not in ended
    assert stripe_api.subscription(subscription["id"])["status"] == "canceled"
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("pro", "canceled")
    assert client.get("/app").headers["Location"] == "/billing/"
    billing = client.get("/billing/").get_data(as_text=True)
    assert 'id="resubscribe"' in billing and 'id="trial-banner"' not in billing

    # Resumed by paying: a new subscription through Checkout on the same organization and customer.
    data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": "a" * 32, "tier": "pro"}
    session_id = client.post("/billing/resubscribe", data=data).headers["Location"].rsplit("/", 1)[-1]
    session = stripe_api.pay(session_id)
    assert client.get(f"/billing/checkout-complete?session_id={session_id}").status_code == 303
    stripe_api.deliver(client)
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.billing_status, organization.billing_subscription_id) == ("active", session["subscription"])
    assert organization.billing_customer_id == subscription["customer"]
    assert client.get("/app").status_code == 200
