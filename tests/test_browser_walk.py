"""Every flow a person can take, walked in a real browser (Debian's headless Chromium) on BOTH databases
the product runs on: the README's `make run` defaults (the embedded SQLite file, jobs run inside the
app) and PostgreSQL with its worker. The offline Stripe sandbox hosts Checkout and the portal and sends
its webhooks back, the offline Whop double does the same for Whop, and the suite's SMTP sink receives
the emails.

The walks: signup monthly and yearly with each test card (4242, declined, delayed), cancel and return
(before paying: the choices are kept; after paying: it says it was paid), the billing page with Stripe's
figures, a plan change and a seat change with their previews, a scheduled downgrade and the next
invoice it makes, invite and join, the portal, cancel at period end, resume, cancel now with its
confirmation, Whop signup and its billing page, and password reset.

Screenshots of every step: artifacts/browser/<test-name>/NN-<step>.png; a failing test adds a last one
("failure") and the sandbox's log to its report."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Browser, Locator, Page, expect

from tests.conftest import BERLIN_BUSINESS, PASSWORD, SmtpSink, email_confirmation_path, email_text, query
from tests.live_support import (
    SANDBOX_SECRET_KEY,
    SANDBOX_WEBHOOK_SECRET,
    WEBHOOK_PATH,
    BrowserPage,
    LiveServer,
    Sandbox,
    free_port,
    wait_until,
)
from tests.whop_double import WhopDouble

CARD_OK = "4242 4242 4242 4242"
CARD_DECLINED = "4000 0000 0000 0002"
CARD_DELAYED = "4000 0000 0000 3220"  # settles a few seconds later, then succeeds
WHOP_SECRET = "ws_browser_walk_0123456789abcdef"
WHOP_ACCOUNT = "biz_browser_walk"
NEW_PASSWORD = "a brand new passphrase 42"
GAP = 8  # pixels: what "apart" means between a button and a link, or two table headers


@dataclass
class Stack:
    database: str
    app: Flask
    server: LiveServer
    sandbox: Sandbox
    whop: WhopDouble

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, sandbox: Callable[..., Sandbox], tmp_path: Path, smtp_server: SmtpSink
) -> Iterator[Stack]:
    """The app on a live server over the embedded SQLite default (`make run`: jobs inside the app) or
    PostgreSQL (a worker beside it), paying through the Stripe sandbox and the Whop double."""
    server = LiveServer()
    stripe_port, whop_port = free_port(), free_port()
    overrides = {
        "APP_BASE_URL": server.url,
        "STRIPE_SECRET_KEY": SANDBOX_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": SANDBOX_WEBHOOK_SECRET,
        "STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
        "WHOP_API_KEY": "apik_browser_walk",
        "WHOP_WEBHOOK_SECRET": WHOP_SECRET,
        "WHOP_COMPANY_ID": WHOP_ACCOUNT,
        "WHOP_API_BASE": f"http://127.0.0.1:{whop_port}/whop/api/v1",
    }
    build = request.getfixturevalue("make_sqlite_app" if request.param == "sqlite" else "make_app")
    app = build(**overrides)
    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith(request.param), app.config["SQLALCHEMY_DATABASE_URI"]
    stripe = sandbox(f"{server.url}{WEBHOOK_PATH}", port=stripe_port, secret=SANDBOX_WEBHOOK_SECRET)
    whop = WhopDouble(
        port=whop_port,
        webhook_url=f"{server.url}/billing/webhooks/whop",
        secrets=WHOP_SECRET,
        account_id=WHOP_ACCOUNT,
        log=tmp_path / "whop.log",
    ).start()
    server.serve(app, worker=request.param == "postgresql")  # SQLite: the stand-in runs jobs in the app
    try:
        yield Stack(request.param, app, server, stripe, whop)
    finally:
        server.stop()
        whop.stop()


# --- Layout: the faults a newcomer met (a price under its radio button, table headers running together,
# a link touching a button) -------------------------------------------------------------------------------


def box(locator: Locator) -> dict[str, float]:
    found = locator.bounding_box()
    assert found is not None, f"{locator} is not on the page"
    return dict(found)


def text_box(locator: Locator) -> dict[str, float]:
    """Where an element's text is drawn (a table cell's box includes its padding; its words do not)."""
    found: dict[str, float] = locator.evaluate(
        "el => { const r = document.createRange(); r.selectNodeContents(el); const b = r.getBoundingClientRect();"
        " return {x: b.x, y: b.y, width: b.width, height: b.height}; }"
    )
    return found


def assert_apart(left: Locator, right: Locator, what: str, *, text: bool = False) -> None:
    """`right` starts at least GAP pixels after `left` ends (their visible boxes, or their words)."""
    measure = text_box if text else box
    a, b = measure(left), measure(right)
    assert b["x"] - (a["x"] + a["width"]) >= GAP, f"{what}: {a} and {b} touch"


# --- Steps a person takes ----------------------------------------------------------------------------


def fill_signup(
    browser: BrowserPage, stack: Stack, *, email: str, tier: str, interval: str = "month", seats: int = 0
) -> None:
    page = browser.page
    page.goto(f"{stack.url}/auth/signup")
    expect(page.locator("#signup-form")).to_be_visible()
    page.check(f"input[name=tier][value={tier}]")
    page.check(f"input[name=interval][value={interval}]")
    page.fill("#addon_extra_seats", str(seats))
    page.fill("#organization_name", f"Org of {email}")
    page.fill("#owner_name", "Ada Lovelace")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)


def submit_to_checkout(browser: BrowserPage, stack: Stack) -> str:
    """Send the signup form; the browser lands on the sandbox's Checkout. Returns its URL."""
    page = browser.page
    with page.expect_navigation():
        page.click("#signup-submit")
    assert re.fullmatch(rf"{re.escape(stack.sandbox.url)}/checkout/cs_test_\w+", page.url), page.url
    return page.url


def pay(page: Page, card: str) -> None:
    page.fill("#cardNumber", card)
    page.fill("#cardExpiry", "12 / 34")
    page.fill("#cardCvc", "123")
    page.fill("#billingName", "Ada Lovelace")
    page.click("button.SubmitButton")


def emailed_link(smtp_server: SmtpSink, address: str, pattern: str) -> str:
    """The first link matching ``pattern`` in the emails sent to ``address`` (waiting for the worker)."""
    found: str = wait_until(
        lambda: next(
            (
                match.group(0)
                for message in smtp_server.to(address)
                if (match := re.search(pattern, email_text(message)))
            ),
            None,
        ),
        20,
        f"no email to {address} with a link like {pattern}",
    )
    return found


def preview_and_confirm(browser: BrowserPage, name: str) -> None:
    page = browser.page
    browser.step(f"{name} preview")
    page.click("#confirm-change")
    expect(page.locator(".flash.success")).to_be_visible()
    browser.step(name)


# --- The walks -----------------------------------------------------------------------------------------


def test_a_monthly_owner_from_a_declined_card_to_cancelling(
    chromium: BrowserPage, stack: Stack, playwright_chromium: Browser, smtp_server: SmtpSink
) -> None:
    """Monthly signup (a declined card, then 4242) → billing page → upgrade and seats with previews →
    a scheduled downgrade and its next invoice, withdrawn → invite and join → the portal → cancel at
    period end → resume → cancel now, confirmed."""
    page, app, email = chromium.page, stack.app, "ada@example.com"
    fill_signup(chromium, stack, email=email, tier="starter", seats=2)
    submit_to_checkout(chromium, stack)
    expect(page.locator("#total")).to_have_text("$29.00")
    pay(page, CARD_DECLINED)
    expect(page.locator(".errors[role=alert]")).to_have_text("Your card was declined.")
    chromium.step("card declined")
    # Nothing was paid: nothing is provisioned, the signup is still open.
    assert query(app, "SELECT id FROM organization") == [] and query(app, "SELECT id FROM user_account") == []
    assert [row.status for row in query(app, "SELECT status FROM pending_signup")] == ["pending"]
    pay(page, CARD_OK)
    page.wait_for_url(f"{stack.url}/app")
    expect(page.locator("#billing-status")).to_have_text("Active")
    chromium.step("dashboard")

    # The billing page: Stripe's figures, the last payment with its amount and day.
    page.goto(f"{stack.url}/billing/")
    expect(page.locator("#plan-price")).to_contain_text("$19.00 / month")
    expect(page.locator("#next-invoice")).to_contain_text("$29.00 on")
    expect(page.locator("#payment-method")).to_have_text("Visa ending in 4242, expires 12/2034")
    expect(page.locator("#last-payment")).to_contain_text("$29.00 paid on")
    expect(page.locator("tr.invoice")).to_have_count(1)
    headers = page.locator("#invoices thead th")
    expect(headers.nth(2)).to_have_text("Amount")
    expect(headers.nth(3)).to_have_text("Status")
    assert_apart(headers.nth(2), headers.nth(3), '"Amount" and "Status"', text=True)
    chromium.step("billing page")

    # An upgrade, previewed then made at once. Each price beside its plan's name, not under the radio
    # button; the links after the buttons stand apart from them.
    page.click("#change-plan")
    radio, price = page.locator("#choose-business input[name=tier]"), page.locator("#choose-price-business")
    assert box(price)["x"] >= box(radio)["x"] + box(radio)["width"], "the price sits under the radio button"
    assert_apart(page.locator("#preview-plan"), page.locator("#change-plan-form > a"), "Preview button and link")
    page.check("input[name=tier][value=business]")
    page.click("#preview-plan")
    expect(page.locator("#preview-when")).to_contain_text("At once")
    expect(page.locator("#preview-recurring")).to_have_text("$109.00 / month")
    assert_apart(page.locator("#confirm-change"), page.locator("#confirm-form > a"), "Confirm button and link")
    preview_and_confirm(chromium, "upgraded")
    expect(page.locator("#plan")).to_have_text("Business")

    # A seat added, previewed first.
    page.click("#change-seats")
    page.fill("#extra_seats", "3")
    page.click("#preview-seats")
    expect(page.locator("#preview-recurring")).to_have_text("$114.00 / month")
    preview_and_confirm(chromium, "seat added")
    expect(page.locator("#seats")).to_contain_text("(10 included + 3 extra)")

    # A downgrade waits for the period's end; the next invoice shown is what the renewal will charge.
    page.click("#change-plan")
    page.check("input[name=tier][value=starter]")
    page.click("#preview-plan")
    expect(page.locator("#preview-when")).to_contain_text("At the end of the current billing period")
    expect(page.locator("#preview-recurring")).to_have_text("$34.00 / month")
    preview_and_confirm(chromium, "downgrade scheduled")
    expect(page.locator("#scheduled-change")).to_contain_text("to Starter (monthly)")
    expect(page.locator("#plan")).to_have_text("Business")
    expect(page.locator("#next-invoice")).to_contain_text("$34.00 on")
    chromium.step("scheduled downgrade and its next invoice")
    page.click("#keep-plan")
    expect(page.locator("#scheduled-change")).to_have_count(0)
    expect(page.locator("#next-invoice")).to_contain_text("$114.00 on")
    chromium.step("downgrade withdrawn")

    # Invite a teammate (once the owner's address is confirmed), who joins from another browser.
    page.goto(f"{stack.url}{email_confirmation_path(app, email)}")
    page.click("#team-link")
    page.fill("#email", "grace@example.com")
    page.click("#invite-submit")
    expect(page.locator(".flash.success")).to_have_text("Invitation sent to grace@example.com.")
    chromium.step("invitation sent")
    link = emailed_link(smtp_server, "grace@example.com", r"http://\S+/team/join/[\w.\-]+")  # the mailbox's
    second = playwright_chromium.new_context(viewport={"width": 1100, "height": 900})
    try:
        teammate = second.new_page()
        teammate.goto(link)
        teammate.fill("#name", "Grace Hopper")
        teammate.fill("#password", "another horse battery staple")
        teammate.click("#join-submit")
        teammate.wait_for_url(f"{stack.url}/app")
        expect(teammate.locator("#signed-in-as")).to_contain_text("Grace Hopper (grace@example.com, member)")
        expect(teammate.locator("#verify-banner")).to_have_count(0)  # no claim of an email never sent
        teammate.goto(f"{stack.url}/billing/")
        expect(teammate.locator("#members-no-billing")).to_be_visible()
        teammate.screenshot(path=str(chromium.folder / "teammate-dashboard.png"), full_page=True)
    finally:
        second.close()
    page.reload()
    expect(page.locator("#seats")).to_have_text("2 of 13 seats in use.")
    chromium.step("team with the teammate")

    # The customer portal, and back.
    page.goto(f"{stack.url}/billing/")
    page.click("#open-portal")
    page.wait_for_url(re.compile(rf"^{re.escape(stack.sandbox.url)}/portal/bps_\w+$"))
    expect(page.locator("#cancel-at-period-end")).to_be_visible()
    chromium.step("portal")
    page.click("a#return-link")
    page.wait_for_url(f"{stack.url}/billing/")

    # Cancel at the period's end, keep the plan after all, then end it now (which asks first).
    page.check("input[name=when][value=period_end]")
    page.click("#cancel")
    expect(page.locator("#plan-ends")).to_be_visible()
    expect(page.locator("#resume")).to_be_visible()
    chromium.step("cancellation scheduled")
    page.click("#resume")
    expect(page.locator(".flash.success")).to_have_text("Your plan will renew as usual.")
    expect(page.locator("#renews")).to_be_visible()
    chromium.step("resumed")
    page.check("input[name=when][value=now]")
    page.click("#cancel")
    expect(page.locator("h1")).to_have_text("End your plan now?")
    expect(page.locator("#cancel-now-refund")).to_contain_text("Nothing is refunded")
    chromium.step("cancel now asks first")
    page.click("#cancel-now-confirm")
    expect(page.locator(".flash.success")).to_have_text("Your subscription is canceled.")
    expect(page.locator("#billing-status")).to_have_text("Canceled")
    expect(page.locator("#resubscribe")).to_be_visible()
    chromium.step("canceled")


def test_a_yearly_signup_cancel_and_return_a_delayed_card_and_a_password_reset(
    chromium: BrowserPage, stack: Stack, smtp_server: SmtpSink
) -> None:
    """Yearly signup → cancel and return (every choice kept) → a declined card, then a delayed one (the
    processing page, then the dashboard) → Back to the paid checkout and "Cancel and return" says it was
    paid → sign out → forgot password → the emailed link → a new password signs in."""
    page, email = chromium.page, "lin@example.com"
    fill_signup(chromium, stack, email=email, tier="business", interval="year", seats=1)
    checkout = submit_to_checkout(chromium, stack)
    expect(page.locator("#total")).to_have_text("$1,040.00")
    page.click("#cancel-link")
    page.wait_for_url(f"{stack.url}/auth/signup?checkout=canceled")
    expect(page.locator(".flash")).to_contain_text("Checkout was canceled and nothing was charged.")
    expect(page.locator("input[name=interval][value=year]")).to_be_checked()
    expect(page.locator("input[name=tier][value=business]")).to_be_checked()
    expect(page.locator("#addon_extra_seats")).to_have_value("1")
    chromium.step("canceled and returned, choices kept")

    page.fill("#password", PASSWORD)
    checkout = submit_to_checkout(chromium, stack)
    pay(page, CARD_DECLINED)
    expect(page.locator(".errors[role=alert]")).to_have_text("Your card was declined.")
    pay(page, CARD_DELAYED)
    expect(page.locator("#payment-processing")).to_be_visible()
    chromium.step("payment processing")
    page.wait_for_url(f"{stack.url}/app", timeout=30_000)  # the page checks again until it has cleared
    expect(page.locator("#plan")).to_have_text("Business")
    chromium.step("dashboard after the delayed payment")
    page.goto(f"{stack.url}/billing/")
    expect(page.locator("#plan-price")).to_contain_text("$990.00 / year")

    # Back to the paid checkout and "Cancel and return": nothing was canceled, and it says so.
    page.goto(checkout)
    expect(page.locator("#status-message")).to_contain_text("complete")
    page.click("#cancel-link")
    page.wait_for_url(f"{stack.url}/billing/")
    expect(page.locator(".flash")).to_contain_text("This checkout was already paid, so nothing was canceled")
    chromium.step("cancel and return after paying")

    # A forgotten password: the emailed link, a new password, signed in with it.
    page.click("#sign-out")
    page.wait_for_url(f"{stack.url}/auth/login")
    page.click("#forgot-link")
    page.fill("#email", email)
    page.click("#forgot-submit")
    expect(page.locator("#reset-requested")).to_be_visible()
    chromium.step("reset requested")
    link = emailed_link(smtp_server, email, r"http://\S+/auth/reset-password/\S+")
    page.goto(link)
    page.fill("#password", NEW_PASSWORD)
    page.fill("#confirm", NEW_PASSWORD)
    page.click("#reset-submit")
    page.wait_for_url(f"{stack.url}/auth/login")
    expect(page.locator(".flash.success")).to_contain_text("Your password is changed")
    page.fill("#email", email)
    page.fill("#password", NEW_PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{stack.url}/app")
    chromium.step("signed in with the new password")


# On PostgreSQL only: the embedded default meets the same cards in the two walks above, and CI's ten
# minutes are better spent elsewhere.
@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_the_other_cards_yearly_4242_and_monthly_delayed(
    chromium: BrowserPage, stack: Stack, playwright_chromium: Browser
) -> None:
    """The rest of the card matrix: yearly paid with 4242 at once, and monthly paid with a delayed card
    (the processing page, then the dashboard), each with its price on the billing page."""
    page = chromium.page
    fill_signup(chromium, stack, email="yearly@example.com", tier="starter", interval="year")
    submit_to_checkout(chromium, stack)
    expect(page.locator("#total")).to_have_text("$190.00")
    pay(page, CARD_OK)
    page.wait_for_url(f"{stack.url}/app")
    page.goto(f"{stack.url}/billing/")
    expect(page.locator("#plan-price")).to_contain_text("$190.00 / year")
    expect(page.locator("#last-payment")).to_contain_text("$190.00 paid on")
    chromium.step("yearly paid with 4242")

    other = playwright_chromium.new_context(viewport={"width": 1100, "height": 900})
    try:
        second = BrowserPage(other.new_page(), chromium.folder / "monthly-delayed")
        second.folder.mkdir()
        fill_signup(second, stack, email="monthly@example.com", tier="starter", seats=1)
        submit_to_checkout(second, stack)
        pay(second.page, CARD_DELAYED)
        expect(second.page.locator("#payment-processing")).to_be_visible()
        second.step("payment processing")
        second.page.wait_for_url(f"{stack.url}/app", timeout=30_000)
        second.page.goto(f"{stack.url}/billing/")
        expect(second.page.locator("#plan-price")).to_contain_text("$19.00 / month")
        expect(second.page.locator("#billing-status")).to_have_text("Active")
        second.step("monthly paid with a delayed card")
    finally:
        other.close()


def test_whop_signup_and_its_billing_page(chromium: BrowserPage, stack: Stack) -> None:
    """Pay through Whop (its restrictions said up front) → the dashboard → the billing page shows what
    Whop knows → "Change plan" offers only managing the membership on Whop."""
    page, email = chromium.page, "whop@example.com"
    fill_signup(chromium, stack, email=email, tier="starter")
    expect(page.locator("#whop-restrictions")).to_be_visible()
    page.check("input[name=payment_provider][value=whop]")
    chromium.step("signup through Whop")
    with page.expect_navigation():
        page.click("#signup-submit")
    assert page.url.startswith(f"{stack.whop.url}/whop/checkout/ch_"), page.url
    page.fill("#email", email)
    page.fill("#name", "Ada Lovelace")
    page.fill("#card", CARD_OK)
    page.fill("#expiry", "12/34")
    page.fill("#cvc", "123")
    chromium.step("Whop checkout")
    page.click("#pay")
    page.wait_for_url(f"{stack.url}/app")
    expect(page.locator("#plan")).to_have_text("Starter")
    chromium.step("dashboard")

    def whop_events() -> list[tuple[str, str]]:
        return [(row.type, row.status) for row in query(stack.app, "SELECT type, status FROM whop_event")]

    wait_until(
        lambda: {status for _, status in whop_events()} == {"processed"},
        20,
        lambda: f"Whop's events were not all applied: {whop_events()}",
    )
    page.goto(f"{stack.url}/billing/")
    expect(page.locator("#billed-by")).to_have_text("Whop")
    expect(page.locator("#plan-price")).to_contain_text("$19.00 / month")
    expect(page.locator("#next-invoice")).to_contain_text("$19.00 on")
    expect(page.locator("#payment-method")).to_have_text("Visa ending in 4242, expires 12/2034")
    expect(page.locator("#last-payment")).to_contain_text("$19.00 paid on")
    chromium.step("Whop billing page")
    page.goto(f"{stack.url}/billing/plan")
    expect(page.locator("#change-plan-form")).to_have_count(0)
    expect(page.locator("#whop-plan")).to_contain_text("$19.00 / month, paid through Whop")
    expect(page.locator("#open-portal")).to_have_text("Manage your membership on Whop")
    chromium.step("plan changes happen on Whop")


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_free_signup_upgraded_with_a_code_and_taxed_then_address_and_tax_ids_edited(
    chromium: BrowserPage, stack: Stack
) -> None:
    """Stripe Tax on (issue 24): a free signup → upgrade through Checkout with the promotion code LAUNCH20,
    a Berlin address and a VAT ID → the billing page shows the discount, the VAT on the next invoice, the
    address and the verified VAT ID → moving to Paris is reverse charged; an unverified French VAT ID
    added and the German one removed bring French VAT; the owner renames the organization."""
    stack.app.config["STRIPE_AUTOMATIC_TAX"] = True
    page = chromium.page
    fill_signup(chromium, stack, email="gmbh@example.com", tier="free")
    expect(page.locator("#tax-note")).to_contain_text("Prices are shown before tax")
    page.click("#signup-submit")
    page.wait_for_url(f"{stack.url}/app")  # the free plan starts at once, no checkout
    page.goto(f"{stack.url}/billing/")
    page.check("#upgrade-starter input")
    chromium.step("free plan, upgrading")
    with page.expect_navigation():
        page.click("#upgrade")
    assert page.url.startswith(f"{stack.sandbox.url}/checkout/cs_test_"), page.url
    for field, value in {**BERLIN_BUSINESS, "promotionCode": "LAUNCH20"}.items():
        page.fill(f"#{field}", value)
    chromium.step("checkout with address, VAT ID and code")
    pay(page, CARD_OK)
    page.wait_for_url(f"{stack.url}/billing/")
    expect(page.locator("#discount")).to_contain_text("LAUNCH20: 20% off")
    # $19.00 less 20% is $15.20; 19% VAT on it is $2.89.
    expect(page.locator("#next-invoice-tax")).to_have_text("($15.20 + $2.89 tax)")
    expect(page.locator("#next-invoice")).to_contain_text("$18.09")
    expect(page.locator("#billing-address")).to_have_text("Friedrichstr. 1, 10117 Berlin, DE")
    expect(page.locator(".tax-id")).to_have_text(re.compile(r"EU VAT number DE123456789 \(verified\)"))
    chromium.step("billing page: discount, tax, address, VAT ID")

    page.fill("#line1", "1 rue de Rivoli")
    page.fill("#postal_code", "75001")
    page.fill("#city", "Paris")
    page.fill("#country", "FR")
    page.click("#save-billing-address")
    expect(page.locator(".flash.success")).to_have_text("Billing address saved.")
    expect(page.locator("#billing-address")).to_have_text("1 rue de Rivoli, 75001 Paris, FR")
    expect(page.locator("#next-invoice-tax")).to_have_count(0)  # reverse charge
    chromium.step("moved to Paris: reverse charge")
    page.fill("#value", "FR 123 456 789 01")
    page.click("#add-tax-id")
    expect(page.locator(".flash.success")).to_have_text("Tax ID added.")
    page.locator(".tax-id", has_text="DE123456789").locator(".remove-tax-id").click()
    expect(page.locator(".flash.success")).to_have_text("Tax ID removed.")
    expect(page.locator(".tax-id")).to_have_text(re.compile(r"EU VAT number FR12345678901 \(not verified\)"))
    expect(page.locator("#next-invoice-tax")).to_have_text("($15.20 + $3.04 tax)")  # French VAT, 20%
    chromium.step("tax IDs edited")
    page.fill("#organization-name #name", "Difference Engines")
    page.click("#save-organization-name")
    expect(page.locator(".flash.success")).to_have_text("The organization is now called Difference Engines.")
    expect(page.locator("h1")).to_have_text("Billing for Difference Engines")
    chromium.step("organization renamed")
