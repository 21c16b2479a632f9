"""The live-mode body of tests/test_signup_stripe_flow.py::test_signup_flow_end_to_end.

`pytest --stripe-live` hands that test to walk_live_signup(request): the app runs on a real HTTP server
on LIVE_APP_PORT (default 5055) with the STRIPE_* settings of the environment and uses the real Stripe
SDK over HTTP (no seam), and headless Chromium signs up, pays on the hosted Checkout page and lands in
the app. Two ways to run it:

- Stripe test mode: STRIPE_SECRET_KEY=sk_test_..., prices with the catalogue's lookup keys in that
  account, and webhooks forwarded with
  `stripe listen --forward-to localhost:5055/billing/webhooks/stripe` (STRIPE_WEBHOOK_SECRET is the
  whsec_... it prints).
- The offline sandbox: what scripts/test does (STRIPE_API_BASE=http://127.0.0.1:12112, the sandbox's
  SANDBOX_WEBHOOK_URL pointing at this port and SANDBOX_WEBHOOK_SECRET=STRIPE_WEBHOOK_SECRET).

Screenshots of every step: artifacts/browser/<test-name>/NN-<step>.png."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask
from playwright.sync_api import expect

from tests.conftest import PASSWORD, SandboxAccount, live_stripe_environment, query
from tests.live_support import WEBHOOK_PATH, BrowserPage, LiveServer, submit_signup, wait_until
from tests.test_signup_stripe_flow import metered_line, usage_in_period

SIGNUP_EVENTS = ("organization.created", "user.created", "signup.completed")
WEBHOOK_WAIT_SECONDS = 60
EMAIL = "ada@example.com"
ORGANIZATION = "Analytical Engines"
CARD_OK = "4242 4242 4242 4242"
HOUR = 3600


def walk_live_signup(request: pytest.FixtureRequest) -> None:
    """Form → hosted Checkout (paid with 4242) → checkout.session.completed webhook verified, stored and
    processed → signed in on /app → a renewal, a failed renewal and its recovery on the customer's test
    clock → billing page → cancel at period end, the webhook that follows, and the subscription's end."""
    environment = live_stripe_environment()  # skips, naming the missing variables, before anything starts
    port = int(os.environ.get("LIVE_APP_PORT", "5055"))
    server: LiveServer = request.getfixturevalue("live_server")(
        port,
        STRIPE_SECRET_KEY=environment["STRIPE_SECRET_KEY"],
        STRIPE_WEBHOOK_SECRET=environment["STRIPE_WEBHOOK_SECRET"],
        STRIPE_API_BASE=environment.get("STRIPE_API_BASE", ""),
        STRIPE_TEST_CLOCKS=True,
    )
    assert server.app is not None
    app = server.app
    browser: BrowserPage = request.getfixturevalue("chromium")
    page = browser.page

    # The signup form, submitted, sends the browser to Stripe's hosted Checkout.
    submit_signup(browser, server.url, email=EMAIL, password=PASSWORD, organization=ORGANIZATION, owner="Ada Lovelace")
    [pending] = query(app, "SELECT * FROM pending_signup")
    session_id = pending.checkout_session_id
    assert pending.status == "pending" and re.fullmatch(r"cs_test_\w+", session_id or ""), pending
    assert session_id in page.url, f"the browser is at {page.url}, not on Checkout for {session_id}"

    pay_on_hosted_checkout(browser)
    wait_until(
        lambda: signup_webhook_processed(app, session_id),
        WEBHOOK_WAIT_SECONDS,
        lambda: no_webhook_message(
            app, server, environment, "the checkout.session.completed webhook (with the organization created)"
        ),
    )

    # The success URL signed the owner in, in this browser, on a page that shows the organization.
    page.wait_for_url(f"{server.url}/app", timeout=WEBHOOK_WAIT_SECONDS * 1000)
    expect(page.locator("#organization-name")).to_have_text(ORGANIZATION)
    expect(page.locator("#plan")).to_have_text("Starter")
    expect(page.locator("#billing-status")).to_have_text("Active")
    expect(page.locator("#signed-in-as")).to_contain_text(f"({EMAIL}, owner)")
    browser.step("signed in on the dashboard")

    # What is stored: one organization and owner, each signup event once, the signup completed.
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.name, organization.tier, organization.billing_status) == (ORGANIZATION, "starter", "active")
    assert organization.signup_checkout_session_id == session_id
    assert organization.billing_customer_id.startswith("cus_")
    assert organization.billing_subscription_id.startswith("sub_")
    assert [(a.addon_key, a.quantity) for a in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 2)]
    [owner] = query(app, "SELECT * FROM user_account")
    assert (owner.email, owner.role, owner.organization_id) == (EMAIL, "owner", organization.id)
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.status, pending.organization_id) == ("completed", organization.id)
    events = Counter(row.name for row in query(app, "SELECT name FROM domain_event"))
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1], events
    # Only verified deliveries are stored (a bad signature is answered 400 and dropped): the checkout's
    # event is there, for this session, and nothing Stripe sent failed to apply.
    [completed] = [
        e for e in stored_events(app) if e["type"] == "checkout.session.completed" and e["object"]["id"] == session_id
    ]
    assert completed["livemode"] is False and completed["object"]["client_reference_id"] == str(pending.id)
    assert completed["status"] == "processed", completed
    assert re.fullmatch(rf"(already_)?provisioned \(organization {organization.id}\)", completed["outcome"]), completed
    assert not [e for e in stored_events(app) if e["status"] not in ("processed", "ignored")], stored_events(app)

    live_through_a_year(
        app, server, environment, organization.billing_customer_id, organization.billing_subscription_id
    )

    # The billing page, and a cancellation at the period end: Stripe answers, the page follows at once,
    # and the customer.subscription.updated webhook that follows it changes nothing and records nothing.
    page.click("#billing-link")
    page.wait_for_url(f"{server.url}/billing/")
    expect(page.locator("#renews")).to_be_visible()
    expect(page.locator("#addons")).to_have_text("Extra seats × 2")
    browser.step("billing page")
    rename_the_organization(app, server, environment, browser, organization.billing_customer_id)
    page.check("input[name=when][value=period_end]")
    page.click("#cancel")
    expect(page.locator("#plan-ends")).to_be_visible()
    expect(page.locator("#billing-status")).to_have_text("Active")
    browser.step("canceled at period end")
    wait_until(
        lambda: [
            e
            for e in stored_events(app)
            if e["type"] == "customer.subscription.updated"
            and e["object"]["id"] == organization.billing_subscription_id
            and e["object"]["cancel_at_period_end"]
            and e["status"] == "processed"
        ],
        WEBHOOK_WAIT_SECONDS,
        lambda: no_webhook_message(
            app, server, environment, "the customer.subscription.updated webhook for the cancellation"
        ),
    )
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.cancel_at_period_end, organization.billing_status) == (True, "active")
    events = Counter(row.name for row in query(app, "SELECT name FROM domain_event"))
    assert events["subscription.cancellation_scheduled"] == 1, events
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1], events

    # The end: the customer's clock passes the period end and Stripe ends the subscription.
    stripe_api = stripe_http(environment)
    clock_id = stripe_api.api("GET", f"/v1/customers/{organization.billing_customer_id}")["test_clock"]
    period_end = int(organization.current_period_end.timestamp())
    stripe_api.advance_clock(clock_id, period_end + 2 * HOUR)
    wait_for_organization(app, server, environment, "the subscription's end", lambda o: o.billing_status == "canceled")
    page.goto(f"{server.url}/app")
    page.wait_for_url(f"{server.url}/billing/")
    expect(page.locator("#resubscribe")).to_be_visible()
    browser.step("subscription ended")

    walk_live_taxed_signup(browser, server, environment)  # Stripe Tax (issue 24): helper below


# --- A promotion code on a plan change (issue 24) ----------------------------------------------------------


def upgrade_with_a_promotion_code(
    app: Flask, server: LiveServer, environment: dict[str, str], browser: BrowserPage, subscription_id: str
) -> None:
    """Starter → Pro with a code made in Stripe (15% off for a month): the preview shows its discount,
    the change's invoice carries the same to the cent, and the billing page shows the code."""
    stripe_api = stripe_http(environment)
    coupon = stripe_api.api(
        "POST", "/v1/coupons", {"percent_off": 15, "duration": "repeating", "duration_in_months": 1}
    )
    code = f"LIVE{uuid.uuid4().hex[:6].upper()}"
    stripe_api.api(
        "POST", "/v1/promotion_codes", {"promotion": {"type": "coupon", "coupon": coupon["id"]}, "code": code}
    )
    page = browser.page
    page.goto(f"{server.url}/billing/plan")
    page.check("input[name=tier][value=pro]")
    page.fill("#promotion_code", code.lower())
    page.click("button#preview-plan")
    expect(page.locator("#preview-promotion")).to_contain_text(f"{code}: 15% off for 1 month")
    shown = int(page.locator("#preview-discount").get_attribute("data-amount") or "0")
    assert shown < 0
    browser.step("plan change previewed with a promotion code")
    page.click("#confirm-change")
    page.wait_for_url(f"{server.url}/billing/")
    wait_until(
        lambda: (
            query(app, "SELECT tier FROM organization WHERE billing_subscription_id = :s", s=subscription_id)[0].tier
            == "pro"
        ),
        WEBHOOK_WAIT_SECONDS,
        lambda: no_webhook_message(app, server, environment, "the upgrade to Pro"),
    )
    subscription = stripe_api.api("GET", f"/v1/subscriptions/{subscription_id}", {"expand": ["discounts"]})
    [discount] = subscription["discounts"]
    invoice = stripe_api.api("GET", f"/v1/invoices/{subscription['latest_invoice']}")
    assert -sum(share["amount"] for share in invoice["total_discount_amounts"]) == shown
    page.reload()
    expect(page.locator("#discount")).to_contain_text(code)
    assert discount["end"]
    browser.step("billing page shows the code's discount")


# --- Customer details (issue 24): the organization's rename reaches Stripe's customer ---------------------

RENAMED = "Difference Engines"


def rename_the_organization(
    app: Flask, server: LiveServer, environment: dict[str, str], browser: BrowserPage, customer_id: str
) -> None:
    """The owner renames the organization on the billing page (POST /billing/organization-name): the
    page follows at once, the worker gives Stripe's customer the name (Checkout named it after the card
    holder, and it has no tax ID, so the name is the organization's), and the customer.updated that
    comes back is applied without renaming anything or pushing again."""
    page = browser.page
    page.fill("#organization-name #name", RENAMED)
    page.click("#save-organization-name")
    expect(page.locator(".flash.success")).to_have_text(f"The organization is now called {RENAMED}.")
    expect(page.locator("h1")).to_have_text(f"Billing for {RENAMED}")
    browser.step("organization renamed")
    stripe_api = stripe_http(environment)

    def customer_named() -> bool:
        customer = stripe_api.api("GET", f"/v1/customers/{customer_id}")
        return (customer.get("name"), (customer.get("metadata") or {}).get("organization_name")) == (RENAMED,) * 2

    wait_until(customer_named, WEBHOOK_WAIT_SECONDS, lambda: f"Stripe's customer {customer_id} was not renamed")
    wait_until(
        lambda: [
            e
            for e in stored_events(app)
            if e["type"] == "customer.updated"
            and e["object"]["id"] == customer_id
            and e["object"]["name"] == RENAMED
            and e["status"] == "processed"
        ],
        WEBHOOK_WAIT_SECONDS,
        lambda: no_webhook_message(app, server, environment, "the customer.updated webhook for the rename"),
    )
    [organization] = query(app, "SELECT name FROM organization")
    assert organization.name == RENAMED
    renamed = query(app, "SELECT data FROM domain_event WHERE name = 'organization.renamed'")
    assert [r.data for r in renamed] == [{"name": RENAMED, "previous": ORGANIZATION}]
    assert not [e for e in stored_events(app) if e["status"] not in ("processed", "ignored")], stored_events(app)


# --- Taxes (issue 24): one helper, called by walk_live_signup ------------------------------------------


def walk_live_taxed_signup(browser: BrowserPage, server: LiveServer, environment: dict[str, str]) -> None:
    """With STRIPE_AUTOMATIC_TAX, a Berlin business signs up in the browser with its VAT ID on the hosted
    Checkout page, lands on the billing page with its address, its verified VAT ID and the tax on the next
    invoice, and moves to Paris (reverse charge). Exact amounts against the sandbox's rate table; against
    Stripe test mode only with LIVE_STRIPE_TAX=1 (Stripe Tax must be active, registered in Germany)."""
    sandbox = bool(environment.get("STRIPE_API_BASE"))
    if not (sandbox or os.environ.get("LIVE_STRIPE_TAX") == "1"):
        return
    app, page = server.app, browser.page
    assert app is not None
    app.config["STRIPE_AUTOMATIC_TAX"] = True
    try:
        page.context.clear_cookies()  # a new customer, in a browser of its own
        email = "finance@ada-gmbh.example"
        submit_signup(
            browser, server.url, email=email, password=PASSWORD, organization="Ada GmbH", owner="Ada", extra_seats=0
        )

        def address_and_vat_id() -> None:
            for field, value in (("billingAddressLine1", "Friedrichstr. 1"), ("billingLocality", "Berlin")):
                page.fill(f"#{field}", value)
            page.fill("#billingPostalCode", "10117")
            country = page.locator("#billingCountry")
            if country.evaluate("e => e.tagName") == "SELECT":
                country.select_option("DE")
            else:
                country.fill("DE")
            business = page.locator("#enableTaxId, [name=enableTaxId]")  # Stripe's "purchasing as a business"
            if business.count() and business.first.is_visible() and not business.first.is_checked():
                business.first.check()
            page.fill("#businessName", "Ada GmbH")
            page.fill("#taxId", "DE123456789")
            browser.step("billing address and VAT ID")

        pay_on_hosted_checkout(browser, before_submit=address_and_vat_id)
        page.wait_for_url(f"{server.url}/app", timeout=WEBHOOK_WAIT_SECONDS * 1000)
        page.goto(f"{server.url}/billing/")
        expect(page.locator("#billing-address")).to_contain_text("10117 Berlin")
        expect(page.locator(".tax-id-value")).to_have_text("DE123456789")
        expect(page.locator("#next-invoice-tax")).to_be_visible()
        if sandbox:
            expect(page.locator(".tax-id-status")).to_have_text("verified")
            expect(page.locator("#next-invoice-tax")).to_have_text("($19.00 + $3.61 tax)")
        browser.step("billing page with tax")
        page.fill("#city", "Paris")
        page.fill("#country", "FR")
        page.click("#save-billing-address")
        expect(page.locator("#billing-address")).to_contain_text("Paris")
        if sandbox:  # a verified VAT ID of a business in another EU country: reverse charge, no VAT
            expect(page.locator("#next-invoice-tax")).to_have_count(0)
        browser.step("moved to Paris")
        # Before its test clock moves (a change's proration date is our clock's): a code on a plan change.
        [gmbh] = query(app, "SELECT * FROM organization WHERE name = 'Ada GmbH'")
        upgrade_with_a_promotion_code(app, server, environment, browser, gmbh.billing_subscription_id)
    finally:
        app.config["STRIPE_AUTOMATIC_TAX"] = False


def live_through_a_year(
    app: Flask, server: LiveServer, environment: dict[str, str], customer_id: str, subscription_id: str
) -> None:
    """On the customer's test clock (STRIPE_TEST_CLOCKS): a paid renewal; a card whose charges fail and a
    failed renewal (past due, the owner notified); the open invoice paid with a good card (active again).
    Everything reaches the app as real, signed webhooks."""
    stripe_api = stripe_http(environment)
    clock_id = stripe_api.api("GET", f"/v1/customers/{customer_id}")["test_clock"]
    assert clock_id, "the signup's customer is not on a test clock: is STRIPE_TEST_CLOCKS on?"

    def period_end() -> int:
        return int(stripe_api.subscription(subscription_id)["items"]["data"][0]["current_period_end"])

    first_end = period_end()
    # Usage (issue 26): Starter includes 1,000 API calls; 1,300 recorded and reported, the renewal
    # invoice bills the 300 past it at the metered price (helpers: the primary test's usage block).
    [organization] = query(app, "SELECT id FROM organization")
    usage_in_period(app, stripe_api, clock_id, organization.id, [800, 500])
    stripe_api.advance_clock(clock_id, first_end + 2 * HOUR)
    renewed = stripe_api.subscription(subscription_id)
    unit_amount = stripe_api.price("api_calls_overage")["unit_amount"]
    assert metered_line(stripe_api, renewed["latest_invoice"], first_end) == (300, 300 * unit_amount)
    wait_for_organization(
        app,
        server,
        environment,
        "the renewal's invoice.paid",
        lambda o: (
            o.last_invoice_id == renewed["latest_invoice"]
            and o.last_payment_status == "paid"
            and int(o.current_period_end.timestamp()) == period_end() > first_end
        ),
    )

    failing_card = stripe_api.api(
        "POST", "/v1/payment_methods/pm_card_chargeCustomerFail/attach", {"customer": customer_id}
    )
    stripe_api.api("POST", f"/v1/subscriptions/{subscription_id}", {"default_payment_method": failing_card["id"]})
    stripe_api.advance_clock(clock_id, period_end() + 2 * HOUR)
    failed_invoice = stripe_api.subscription(subscription_id)["latest_invoice"]
    wait_for_organization(
        app,
        server,
        environment,
        "the failed renewal's invoice.payment_failed",
        lambda o: o.billing_status == "past_due" and o.last_invoice_id == failed_invoice,
    )
    [notice] = query(app, "SELECT * FROM domain_event WHERE name = 'billing.payment_failed'")
    assert notice.data["invoice_id"] == failed_invoice and notice.data["hosted_invoice_url"]

    good_card = stripe_api.api("POST", "/v1/payment_methods/pm_card_visa/attach", {"customer": customer_id})
    stripe_api.api("POST", f"/v1/invoices/{failed_invoice}/pay", {"payment_method": good_card["id"]})
    stripe_api.api("POST", f"/v1/subscriptions/{subscription_id}", {"default_payment_method": good_card["id"]})
    wait_for_organization(
        app,
        server,
        environment,
        "the recovered invoice's invoice.paid",
        lambda o: o.billing_status == "active" and o.last_payment_status == "paid" and o.past_due_since is None,
    )


def stripe_http(environment: dict[str, str]) -> SandboxAccount:
    """The Stripe API over plain HTTP, as a script or the Stripe CLI uses it: the sandbox's, or Stripe's."""
    return SandboxAccount(
        environment.get("STRIPE_API_BASE") or "https://api.stripe.com", environment["STRIPE_SECRET_KEY"]
    )


def wait_for_organization(
    app: Flask, server: LiveServer, environment: dict[str, str], awaited: str, predicate: Callable[[Any], bool]
) -> None:
    def holds() -> bool:
        rows = query(app, "SELECT * FROM organization")
        return len(rows) == 1 and predicate(rows[0])

    wait_until(holds, WEBHOOK_WAIT_SECONDS, lambda: no_webhook_message(app, server, environment, awaited))


def pay_on_hosted_checkout(browser: BrowserPage, before_submit: Callable[[], None] | None = None) -> None:
    """Pay with 4242 on the Checkout page. Stripe's hosted page and the sandbox's share these element
    ids; Stripe may first show a payment-method accordion, a country and postal code, and Link.
    before_submit fills in what else the page asks (a billing address and tax ID)."""
    page = browser.page
    page.locator("#cardNumber:visible, [data-testid=card-accordion-item-button]:visible").first.wait_for(timeout=30_000)
    browser.step("checkout")
    if not page.locator("#cardNumber").is_visible():
        page.click("[data-testid=card-accordion-item-button]")
    email = page.locator("#email")
    if email.count() and email.is_editable() and not email.input_value():
        email.fill(EMAIL)
    page.fill("#cardNumber", CARD_OK)
    page.fill("#cardExpiry", "12 / 34")
    page.fill("#cardCvc", "123")
    page.fill("#billingName", "Ada Lovelace")
    postal_code = page.locator("#billingPostalCode")
    if postal_code.count() and postal_code.is_visible():
        postal_code.fill("10001")
    save_with_link = page.locator("#enableStripePass")
    if save_with_link.count() and save_with_link.is_visible() and save_with_link.is_checked():
        save_with_link.uncheck()
    if before_submit is not None:
        before_submit()
    browser.step("card entered")
    page.click("button.SubmitButton")


def stored_events(app: Flask) -> list[dict[str, Any]]:
    """The webhook events the app verified and stored, oldest first, with their object."""
    rows = query(app, "SELECT type, status, outcome, livemode, payload FROM stripe_event ORDER BY id")
    return [
        {
            "type": r.type,
            "status": r.status,
            "outcome": r.outcome or "",
            "livemode": r.livemode,
            "object": json.loads(r.payload)["data"]["object"],
        }
        for r in rows
    ]


def signup_webhook_processed(app: Flask, session_id: str) -> bool:
    completed = query(
        app,
        "SELECT id FROM stripe_event WHERE type = 'checkout.session.completed' AND status = 'processed'"
        " AND payload::jsonb -> 'data' -> 'object' ->> 'id' = :session_id",
        session_id=session_id,
    )
    return bool(completed) and bool(query(app, "SELECT id FROM organization"))


def no_webhook_message(app: Flask, server: LiveServer, environment: dict[str, str], awaited: str) -> str:
    """Why a webhook never arrived, and how to forward them; with the sandbox, what it tried to send."""
    stored = "; ".join(f"{e['type']} {e['status']} ({e['outcome']})" for e in stored_events(app)) or "none"
    message = (
        f"{awaited} was not processed within {WEBHOOK_WAIT_SECONDS} s. If no webhook arrived: Stripe "
        "can only deliver webhooks to a URL it can reach: with Stripe test "
        f"mode run `stripe listen --forward-to localhost:{server.port}{WEBHOOK_PATH}` and set "
        "STRIPE_WEBHOOK_SECRET to the whsec_... it prints; with the offline sandbox start it with "
        f"SANDBOX_WEBHOOK_URL={server.url}{WEBHOOK_PATH} and SANDBOX_WEBHOOK_SECRET equal to "
        "STRIPE_WEBHOOK_SECRET (a wrong secret is answered 400 and nothing is stored). "
        f"Webhook events stored so far: {stored}."
    )
    api_base = environment.get("STRIPE_API_BASE", "")
    if api_base:  # the sandbox says what it tried to deliver (not a Stripe endpoint; absent on Stripe)
        try:
            response = requests.get(f"{api_base}/_sandbox/deliveries", timeout=2)
            if response.ok:
                sent = response.json()
                message += f" The sandbox delivers to {sent['webhook_url']}: " + "; ".join(
                    f"{d['type']} {d['state']} after {d['attempts']} attempt(s) ({d['last_status'] or d['last_error']})"
                    for d in sent["deliveries"]
                )
        except (requests.RequestException, ValueError, KeyError):
            pass
    return message
