"""The account pages in a real browser (headless Chromium on a live server, Stripe's sandbox): the
confirmation banner after signup, the account page, sign out everywhere, and "Forgot password?".
Screenshots: artifacts/browser/<test-name>/NN-<step>.png."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.conftest import PASSWORD
from tests.live_support import BrowserPage, SandboxedApp
from tests.test_browser import EMAIL, fill_card, sign_up_to_checkout


def test_the_owner_manages_their_account_in_a_real_browser(chromium: BrowserPage, sandbox_app: SandboxedApp) -> None:
    page, server = chromium.page, sandbox_app.server
    sign_up_to_checkout(chromium, sandbox_app)
    fill_card(page, "4242 4242 4242 4242")
    page.click("button.SubmitButton")
    page.wait_for_url(f"{server.url}/app")
    expect(page.locator("#verify-banner")).to_contain_text(f"we sent a link to {EMAIL}")
    chromium.step("dashboard with the confirmation banner")

    page.click("#account-link")
    page.wait_for_url(f"{server.url}/account/")
    expect(page.locator("#account-email")).to_contain_text("not confirmed yet")
    expect(page.locator("#password-form")).to_be_visible()
    chromium.step("account page")

    # A wrong current password is refused with the reason, next to the field.
    page.fill("#current_password", "not my password at all")
    page.fill("#password", "a brand new passphrase 42")
    page.fill("#confirm", "a brand new passphrase 42")
    page.click("#password-submit")
    expect(page.locator("#current_password-error")).to_have_text("That is not your current password.")
    chromium.step("wrong current password")

    page.click("#everywhere-submit")
    page.wait_for_url(f"{server.url}/auth/login")
    expect(page.locator(".flash")).to_contain_text("signed out on every device")
    chromium.step("signed out everywhere")

    page.click("#forgot-link")
    page.wait_for_url(f"{server.url}/auth/forgot-password")
    page.fill("#email", EMAIL)
    chromium.step("forgot password")
    page.click("#forgot-submit")
    expect(page.locator("#reset-requested")).to_contain_text("a link to choose a new password is on its way")
    chromium.step("reset requested")

    # The old password still works: asking for a link changes nothing by itself.
    page.goto(f"{server.url}/auth/login")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{server.url}/app")
