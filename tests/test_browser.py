"""A real browser through the whole product, in the default run: headless Chromium drives the app on a
real HTTP server, and the offline Stripe sandbox (a subprocess, reached with the real SDK over HTTP)
hosts Checkout and the customer portal and sends signed webhooks back to the app. No keys needed.

Screenshots of every step: artifacts/browser/<test-name>/NN-<step>.png."""

from __future__ import annotations

import re
from collections import Counter

from flask import Flask
from playwright.sync_api import Browser, Page, expect

from tests.conftest import PASSWORD, email_confirmation_path, invitation_path, query
from tests.live_support import BrowserPage, SandboxedApp, submit_signup, wait_until

CARD_OK = "4242 4242 4242 4242"
EMAIL = "ada@example.com"
ORGANIZATION = "Analytical Engines"
WEBHOOK_WAIT_SECONDS = 20


def fill_card(page: Page, number: str) -> None:
    page.fill("#cardNumber", number)
    page.fill("#cardExpiry", "12 / 34")
    page.fill("#cardCvc", "123")
    page.fill("#billingName", "Ada Lovelace")


def sign_up_to_checkout(browser: BrowserPage, stack: SandboxedApp) -> None:
    page = browser.page
    submit_signup(
        browser, stack.server.url, email=EMAIL, password=PASSWORD, organization=ORGANIZATION, owner="Ada Lovelace"
    )
    assert re.fullmatch(rf"{re.escape(stack.sandbox.url)}/checkout/cs_test_\w+", page.url), page.url
    expect(page.locator("#email"), "Checkout is prefilled with the signup's email").to_have_value(EMAIL)
    expect(page.locator("#total"), "Starter $19 + 2 extra seats at $5").to_have_text("$29.00")
    browser.step("checkout")


def wait_for_applied(app: Flask) -> None:
    """The worker beside the app has applied every stored webhook event."""
    wait_until(
        lambda: not query(app, "SELECT id FROM stripe_event WHERE status = 'pending'"),
        WEBHOOK_WAIT_SECONDS,
        lambda: "the worker did not apply the stored webhooks: " + stored_events(app),
    )


def stored_events(app: Flask) -> str:
    rows = query(app, "SELECT type, status, outcome FROM stripe_event ORDER BY id")
    return "; ".join(f"{r.type} {r.status} ({r.outcome})" for r in rows) or "none"


def test_signup_pay_manage_in_the_portal_and_cancel_in_a_real_browser(
    chromium: BrowserPage, sandbox_app: SandboxedApp
) -> None:
    """Signup form → sandbox Checkout (4242) → signed in on /app → billing page → portal: cancel at
    period end → back in the app, the webhook shows the plan ending → resume → cancel now in the
    app → Canceled, and /app sends the owner to billing."""
    page, app, server = chromium.page, sandbox_app.app, sandbox_app.server
    sign_up_to_checkout(chromium, sandbox_app)

    fill_card(page, CARD_OK)
    chromium.step("card entered")
    page.click("button.SubmitButton")
    # Stripe's success URL signs the owner in (this browser started the signup) and lands on /app.
    page.wait_for_url(f"{server.url}/app")
    expect(page.locator("#organization-name")).to_have_text(ORGANIZATION)
    expect(page.locator("#plan")).to_have_text("Starter")
    expect(page.locator("#billing-status")).to_have_text("Active")
    expect(page.locator("#signed-in-as")).to_contain_text(f"Ada Lovelace ({EMAIL}, owner)")
    chromium.step("signed in on the dashboard")

    # The webhooks of the payment arrive signed, are verified, stored and settle without failures.
    sandbox_app.sandbox.wait_for_deliveries(WEBHOOK_WAIT_SECONDS)
    wait_for_applied(app)
    events = {row.type: row.status for row in query(app, "SELECT type, status FROM stripe_event")}
    assert events == {
        "customer.subscription.created": "processed",
        "invoice.paid": "processed",
        "checkout.session.completed": "processed",
    }, stored_events(app)
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.name, organization.tier, organization.billing_status) == (ORGANIZATION, "starter", "active")
    assert organization.billing_subscription_id.startswith("sub_") and organization.last_payment_status == "paid"
    assert len(query(app, "SELECT id FROM user_account")) == 1

    # The billing page.
    page.click("#billing-link")
    page.wait_for_url(f"{server.url}/billing/")
    expect(page.locator("#plan")).to_have_text("Starter")
    expect(page.locator("#billing-status")).to_have_text("Active")
    expect(page.locator("#renews")).to_be_visible()
    expect(page.locator("#addons")).to_have_text("Extra seats × 2")
    chromium.step("billing page")

    # The customer portal (the sandbox's): cancel at the end of the period there.
    page.click("#open-portal")
    page.wait_for_url(re.compile(rf"^{re.escape(sandbox_app.sandbox.url)}/portal/bps_\w+$"))
    expect(page.locator("#cancel-at-period-end")).to_be_visible()
    chromium.step("portal")
    page.click("#cancel-at-period-end")
    expect(page.locator("#renew"), "the portal offers to renew once cancellation is scheduled").to_be_visible()
    expect(page.locator(".subscription")).to_contain_text("Cancels on")
    chromium.step("portal cancel at period end")

    # Back in the app, the customer.subscription.updated webhook is what tells it.
    page.click("a#return-link")
    page.wait_for_url(f"{server.url}/billing/")
    wait_until(
        lambda: query(app, "SELECT cancel_at_period_end FROM organization")[0].cancel_at_period_end,
        WEBHOOK_WAIT_SECONDS,
        lambda: "the portal's cancellation never reached the organization; webhooks stored: " + stored_events(app),
    )
    page.reload()
    expect(page.locator("#plan-ends"), "the billing page shows when the plan ends").to_be_visible()
    expect(page.locator("#renews")).to_have_count(0)
    expect(page.locator("#billing-status")).to_have_text("Active")
    expect(page.locator("#resume")).to_be_visible()
    chromium.step("billing page plan ends")
    assert (
        Counter(r.name for r in query(app, "SELECT name FROM domain_event"))["subscription.cancellation_scheduled"] == 1
    )

    # The app hides "cancel" while a cancellation is scheduled: keep the plan, then cancel it now.
    page.click("#resume")
    expect(page.locator(".flash.success")).to_have_text("Your plan will renew as usual.")
    expect(page.locator("#renews")).to_be_visible()
    chromium.step("plan resumed")
    page.check("input[name=when][value=now]")
    chromium.step("cancel now chosen")
    page.click("#cancel")
    # Ending it now asks first, saying what is lost, when, and that nothing is refunded.
    expect(page.locator("h1")).to_have_text("End your plan now?")
    expect(page.locator("#cancel-now-refund")).to_contain_text("Nothing is refunded")
    chromium.step("cancel now asks for confirmation")
    page.click("#cancel-now-confirm")
    expect(page.locator(".flash.success")).to_have_text("Your subscription is canceled.")
    expect(page.locator("#billing-status")).to_have_text("Canceled")
    expect(page.locator("#ended")).to_be_visible()
    chromium.step("canceled")

    # A canceled organization is sent from the app to the billing page, which offers a new subscription.
    page.goto(f"{server.url}/app")
    page.wait_for_url(f"{server.url}/billing/")
    expect(page.locator("#billing-blocked")).to_be_visible()
    expect(page.locator("#resubscribe")).to_be_visible()
    chromium.step("app redirects to billing")

    # Every webhook the sandbox sent (resume, cancel) was delivered; none undid the cancellation.
    sandbox_app.sandbox.wait_for_deliveries(WEBHOOK_WAIT_SECONDS)
    wait_for_applied(app)
    assert query(app, "SELECT id FROM stripe_event WHERE status NOT IN ('processed', 'ignored')") == [], stored_events(
        app
    )
    assert "customer.subscription.deleted" in stored_events(app)
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.billing_status, organization.cancel_at_period_end) == ("canceled", False)
    assert organization.ended_at is not None


def test_upgrade_add_a_seat_invite_a_teammate_and_open_an_invoice_in_a_real_browser(
    chromium: BrowserPage, sandbox_app: SandboxedApp, playwright_chromium: Browser
) -> None:
    """The owner's billing in the app: prices on the signup page → pay → the billing page with Stripe's
    figures → open an invoice → upgrade with its preview → add a seat → invite a teammate, who accepts
    from a second browser and never sees billing."""
    page, app, server = chromium.page, sandbox_app.app, sandbox_app.server
    page.goto(f"{server.url}/auth/signup")
    expect(page.locator("#price-starter-month"), "prices come from Stripe (the sandbox)").to_have_text("$19.00 / month")
    expect(page.locator("#price-business-year")).to_have_text("or $990.00 / year")
    expect(page.locator("#trial-pro")).to_have_text("14-day free trial")
    expect(page.locator("#interval-choice")).to_be_visible()
    chromium.step("signup prices")
    sign_up_to_checkout(chromium, sandbox_app)
    fill_card(page, CARD_OK)
    page.click("button.SubmitButton")
    page.wait_for_url(f"{server.url}/app")
    sandbox_app.sandbox.wait_for_deliveries(WEBHOOK_WAIT_SECONDS)

    # The billing page: plan and price, seats, next invoice, card on file, invoice history.
    page.click("#billing-link")
    page.wait_for_url(f"{server.url}/billing/")
    expect(page.locator("#plan-price")).to_contain_text("$19.00 / month")
    expect(page.locator("#seats")).to_have_text("1 in use of 7 (5 included + 2 extra)")
    expect(page.locator("#next-invoice")).to_contain_text("$29.00 on")
    expect(page.locator("#payment-method")).to_have_text("Visa ending in 4242, expires 12/2034")
    expect(page.locator("tr.invoice")).to_have_count(1)
    expect(page.locator("tr.invoice .invoice-status")).to_have_text("paid")
    chromium.step("billing page with Stripe's figures")
    with page.context.expect_page() as opened:
        page.click("tr.invoice .invoice-hosted")
    invoice_page = opened.value
    invoice_page.wait_for_load_state()
    assert invoice_page.url.startswith(sandbox_app.sandbox.url), invoice_page.url
    expect(invoice_page.locator("body")).to_contain_text(" · paid")
    expect(invoice_page.locator("body")).to_contain_text("1 × Starter")
    invoice_page.screenshot(path=str(chromium.folder / "hosted-invoice.png"), full_page=True)
    invoice_page.close()

    # Upgrade to Business: the preview says what happens and what it costs before anything changes.
    page.click("#change-plan")
    page.check("#choose-business input[name=tier]")
    chromium.step("choose business")
    page.click("#preview-plan")
    expect(page.locator("#preview-when")).to_contain_text("At once")
    expect(page.locator("#preview-today")).to_contain_text("is charged today")
    expect(page.locator("#preview-recurring")).to_have_text("$109.00 / month")
    chromium.step("upgrade preview")
    page.click("#confirm-change")
    expect(page.locator(".flash.success")).to_have_text("Your subscription is changed.")
    expect(page.locator("#plan")).to_have_text("Business")
    expect(page.locator("#seats")).to_have_text("1 in use of 12 (10 included + 2 extra)")
    expect(page.locator("tr.invoice")).to_have_count(2)  # the prorated upgrade invoice
    chromium.step("upgraded")

    # Add a seat.
    page.click("#change-seats")
    page.fill("#extra_seats", "3")
    page.click("#preview-seats")
    expect(page.locator("#preview-recurring")).to_have_text("$114.00 / month")
    chromium.step("seat preview")
    page.click("#confirm-change")
    expect(page.locator(".flash.success")).to_have_text("Your subscription is changed.")
    expect(page.locator("#seats")).to_have_text("1 in use of 13 (10 included + 3 extra)")
    chromium.step("seat added")
    [organization] = query(app, "SELECT tier FROM organization")
    assert organization.tier == "business"
    assert [(r.addon_key, r.quantity) for r in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 3)]

    # Invite a teammate, who accepts in a second browser (once the owner's address is confirmed).
    page.goto(f"{server.url}{email_confirmation_path(app, EMAIL)}")
    page.click("#team-link")
    page.fill("#email", "grace@example.com")
    page.click("#invite-submit")
    expect(page.locator(".flash.success")).to_have_text("Invitation sent to grace@example.com.")
    expect(page.locator("a[href*='/team/join/']")).to_have_count(0)  # the link goes to the mailbox only
    link = f"{server.url}{invitation_path(app, 'grace@example.com')}"
    chromium.step("invitation sent")
    second = playwright_chromium.new_context(viewport={"width": 1100, "height": 900})
    try:
        teammate = second.new_page()
        teammate.goto(link)
        expect(teammate.locator("#invited-email")).to_have_text("grace@example.com")
        teammate.fill("#name", "Grace Hopper")
        teammate.fill("#password", "another horse battery staple")
        teammate.click("#join-submit")
        teammate.wait_for_url(f"{server.url}/app")
        expect(teammate.locator("#signed-in-as")).to_contain_text("Grace Hopper (grace@example.com, member)")
        expect(teammate.locator("#billing-link")).to_have_count(0)
        teammate.screenshot(path=str(chromium.folder / "teammate-dashboard.png"), full_page=True)
        teammate.goto(f"{server.url}/billing/")
        expect(teammate.locator("#members-no-billing")).to_be_visible()
        expect(teammate.locator("#plan-price")).to_have_count(0)
    finally:
        second.close()
    page.reload()
    expect(page.locator("tr.member[data-email='grace@example.com']")).to_be_visible()
    expect(page.locator("#seats")).to_contain_text("2 of 13 seats in use")
    chromium.step("team with the teammate")
