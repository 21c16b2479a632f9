"""A real browser on the README's `make run` defaults: the app on the embedded SQLite file (built by
`flask db upgrade`, jobs run inside the app, filesystem sessions, in-process limits) served over HTTP,
the offline Stripe sandbox hosting Checkout and sending signed webhooks back, and headless Chromium
(Debian's) walking signup -> payment -> billing page -> plan-change preview -> invite -> join. Each
page it passes is also checked for the layout faults a newcomer met: a price under its radio button,
an invitation link overflowing its card, table headers running together, a link touching a button.

Screenshots of every step: artifacts/browser/<test-name>/NN-<step>.png."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from flask import Flask
from playwright.sync_api import Browser, Locator, Page, expect

from tests.conftest import PASSWORD, email_confirmation_path, invitation_path, query
from tests.live_support import (
    SANDBOX_SECRET_KEY,
    SANDBOX_WEBHOOK_SECRET,
    WEBHOOK_PATH,
    BrowserPage,
    LiveServer,
    Sandbox,
    free_port,
    submit_signup,
    wait_until,
)

EMAIL = "ada@example.com"
ORGANIZATION = "Analytical Engines"
CARD_OK = "4242 4242 4242 4242"
GAP = 8  # pixels: what "apart" means between a button and a link, or two table headers


@dataclass
class EmbeddedStack:
    app: Flask
    server: LiveServer
    sandbox: Sandbox


@pytest.fixture
def embedded_stack(make_sqlite_app: Callable[..., Flask], sandbox: Callable[..., Sandbox]) -> Iterator[EmbeddedStack]:
    server = LiveServer()
    sandbox_port = free_port()
    app = make_sqlite_app(
        APP_BASE_URL=server.url,
        STRIPE_SECRET_KEY=SANDBOX_SECRET_KEY,
        STRIPE_WEBHOOK_SECRET=SANDBOX_WEBHOOK_SECRET,
        STRIPE_API_BASE=f"http://127.0.0.1:{sandbox_port}",
    )
    assert app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    process = sandbox(f"{server.url}{WEBHOOK_PATH}", port=sandbox_port, secret=SANDBOX_WEBHOOK_SECRET)
    server.serve(app, worker=False)  # the stand-in runs its jobs inside the app
    yield EmbeddedStack(app, server, process)
    server.stop()


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


def fill_card(page: Page) -> None:
    page.fill("#cardNumber", CARD_OK)
    page.fill("#cardExpiry", "12 / 34")
    page.fill("#cardCvc", "123")
    page.fill("#billingName", "Ada Lovelace")


def test_signup_billing_plan_preview_and_a_teammate_joining_on_the_embedded_default(
    chromium: BrowserPage, embedded_stack: EmbeddedStack, playwright_chromium: Browser
) -> None:
    page, app, server = chromium.page, embedded_stack.app, embedded_stack.server

    # Signup and payment on the sandbox's Checkout; the success URL signs the owner in.
    submit_signup(chromium, server.url, email=EMAIL, password=PASSWORD, organization=ORGANIZATION, owner="Ada Lovelace")
    assert page.url.startswith(f"{embedded_stack.sandbox.url}/checkout/cs_test_"), page.url
    fill_card(page)
    page.click("button.SubmitButton")
    page.wait_for_url(f"{server.url}/app")
    expect(page.locator("#organization-name")).to_have_text(ORGANIZATION)
    expect(page.locator("#billing-status")).to_have_text("Active")
    chromium.step("signed in on the dashboard")
    embedded_stack.sandbox.wait_for_deliveries(20)
    wait_until(
        lambda: not query(app, "SELECT id FROM stripe_event WHERE status = 'pending'"),
        20,
        "the app applied the sandbox's webhooks inside itself",
    )

    # The billing page: the invoice table's headers stand apart.
    page.goto(f"{server.url}/billing/")
    expect(page.locator("#plan-price")).to_contain_text("$19.00 / month")
    expect(page.locator("tr.invoice")).to_have_count(1)
    headers = page.locator("#invoices thead th")
    expect(headers.nth(2)).to_have_text("Amount")
    expect(headers.nth(3)).to_have_text("Status")
    assert_apart(headers.nth(2), headers.nth(3), '"Amount" and "Status"', text=True)
    chromium.step("billing page")

    # The change-plan page: each price beside its plan's name, not under the radio button; the link
    # after the button stands apart from it.
    page.click("#change-plan")
    radio, price = page.locator("#choose-pro input[name=tier]"), page.locator("#choose-price-pro")
    expect(price).to_contain_text("/ month")
    assert box(price)["x"] >= box(radio)["x"] + box(radio)["width"], "the price sits under the radio button"
    assert_apart(page.locator("#preview-plan"), page.locator("#change-plan-form > a"), "Preview button and link")
    page.check("#choose-pro input[name=tier]")
    chromium.step("choose pro")
    page.click("#preview-plan")
    expect(page.locator("#preview-plan")).to_contain_text("Pro, billed monthly, 2 extra seats")
    expect(page.locator("#preview-recurring")).to_contain_text("/ month")
    assert_apart(page.locator("#confirm-change"), page.locator("#confirm-form > a"), "Confirm button and link")
    chromium.step("plan change preview")

    # Invite a teammate (once the owner's address is confirmed); the link goes to the mailbox only.
    page.goto(f"{server.url}{email_confirmation_path(app, EMAIL)}")
    page.click("#team-link")
    expect(page.locator("#seats")).to_have_text("1 of 7 seats in use.")
    page.fill("#email", "grace@example.com")
    page.click("#invite-submit")
    expect(page.locator(".flash.success")).to_have_text("Invitation sent to grace@example.com.")
    expect(page.locator("a[href*='/team/join/']")).to_have_count(0)
    href = f"{server.url}{invitation_path(app, 'grace@example.com')}"
    chromium.step("invitation sent")

    second = playwright_chromium.new_context(viewport={"width": 1100, "height": 900})
    try:
        teammate = second.new_page()
        teammate.goto(href)
        expect(teammate.locator("#invited-email")).to_have_text("grace@example.com")
        teammate.fill("#name", "Grace Hopper")
        teammate.fill("#password", "another horse battery staple")
        teammate.click("#join-submit")
        teammate.wait_for_url(f"{server.url}/app")  # the embedded default answered 500 here before
        expect(teammate.locator("#signed-in-as")).to_contain_text("Grace Hopper (grace@example.com, member)")
        expect(teammate.locator("#verify-banner")).to_have_count(0)
        teammate.screenshot(path=str(chromium.folder / "teammate-dashboard.png"), full_page=True)
    finally:
        second.close()
    page.reload()
    expect(page.locator("#seats")).to_have_text("2 of 7 seats in use.")
    chromium.step("team with the teammate")
