"""Helpers for driving the product in a real browser (headless Chromium against the app on a real HTTP
server and the offline Stripe sandbox), used by tests/test_account_browser.py. The flows these tests
once walked here (signup, portal, upgrade, seats, invitation, cancel) are walked by
tests/test_browser_walk.py on both databases."""

from __future__ import annotations

import re

from flask import Flask
from playwright.sync_api import Page, expect

from tests.conftest import PASSWORD, query
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
