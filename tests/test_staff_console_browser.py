"""The operations console in a real browser (Debian's headless Chromium): a staff member signs in with
two factors, searches by the customer's Stripe id, finds the organization with its drift from Stripe
highlighted, re-syncs it with a reason, and sees the difference gone and the action in the staff audit
log. The app runs on PostgreSQL with a worker beside it, on a sandbox of its own with webhook delivery
held, so the change made at Stripe reaches the app only through the re-sync.

Screenshots of every step: artifacts/browser/<test-name>/NN-<step>.png."""

from __future__ import annotations

import re
import time

import pyotp
from flask import Flask
from playwright.sync_api import expect

from tests.conftest import PASSWORD, SandboxAccount, query
from tests.live_support import BrowserPage, wait_until
from tests.test_reconcile import _sign_up, held_sandbox  # noqa: F401 (the held_sandbox fixture)

STAFF = "staff@ledgerline.example"


def enrol_staff(app: Flask, account: SandboxAccount) -> pyotp.TOTP:
    """A staff member: signed up, two-factor sign-in turned on (as a person does, off the page), and
    granted from the command line."""
    client = _sign_up(app, account, STAFF)
    page = client.get("/account/two-factor").get_data(as_text=True)
    secret = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', page)
    assert secret, page
    totp = pyotp.TOTP(secret.group(1).replace(" ", ""))
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert token
    enabled = client.post("/account/two-factor", data={"csrf_token": token.group(1), "code": totp.now()})
    assert enabled.status_code == 200, enabled.get_data(as_text=True)
    granted = app.test_cli_runner().invoke(args=["users", "grant-staff", STAFF])
    assert granted.exit_code == 0, granted.output
    return totp


def test_search_by_customer_id_see_the_drift_resync_and_find_it_audited(
    chromium: BrowserPage,
    held_sandbox: tuple[Flask, SandboxAccount],  # noqa: F811
) -> None:
    app, account = held_sandbox
    page = chromium.page
    _sign_up(app, account, "ada@example.com")
    [organization] = query(
        app,
        "SELECT o.* FROM organization o JOIN user_account u ON u.organization_id = o.id "
        "WHERE u.email = 'ada@example.com'",
    )
    totp = enrol_staff(app, account)
    base = app.config["APP_BASE_URL"]

    # The customer cancels at Stripe; the app never hears of it (delivery is held).
    account.api("POST", f"/v1/subscriptions/{organization.billing_subscription_id}", {"cancel_at_period_end": True})

    # Sign in with the password and a code (the next step's: this step's was used to turn it on).
    page.goto(f"{base}/auth/login")
    page.fill("#email", STAFF)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(f"{base}/auth/two-factor")
    page.fill("#code", totp.at(time.time() + 30))
    page.click("#two-factor-submit")
    page.wait_for_url(f"{base}/app")
    page.click("#console-link")
    chromium.step("console")

    page.fill("#q", organization.billing_customer_id)
    page.click("#search")
    expect(page.locator("#results tr.hit")).to_have_count(1)
    chromium.step("search by customer id")
    page.click("#results tr.hit a")
    expect(page.locator("#drift-banner")).to_be_visible()
    drifted = page.locator('#comparison tr.drift[data-field="cancel_at_period_end"]')
    expect(drifted).to_contain_text("False")
    expect(drifted).to_contain_text("True")
    expect(page.locator("#comparison tr.drift")).to_have_count(1)
    chromium.step("organization with drift highlighted")

    page.click("#action-resync")
    page.fill("#reason", "customer cancelled in the portal; the app still shows renewing")
    chromium.step("re-sync confirmation")
    page.click("#confirm")
    expect(page.locator(".flash.success")).to_contain_text("Re-sync queued for the worker")
    wait_until(
        lambda: bool(query(app, "SELECT id FROM staff_audit WHERE action = 'resync.done'")),
        20,
        "the worker re-synced the organization and wrote it to the audit log",
    )
    assert query(app, "SELECT cancel_at_period_end FROM organization WHERE id = :i", i=organization.id)[0][0]
    page.reload()
    expect(page.locator("#in-agreement")).to_be_visible()
    expect(page.locator("#comparison tr.drift")).to_have_count(0)
    entry = page.locator('#staff-audit tr.audit-entry[data-action="resync"]')
    expect(entry).to_contain_text(STAFF)
    expect(entry).to_contain_text("customer cancelled in the portal")
    done = page.locator('#staff-audit tr.audit-entry[data-action="resync.done"]')
    expect(done).to_contain_text("cancel_at_period_end False -> True")
    expect(page.locator('#resync-jobs tr.resync-job[data-status="succeeded"]')).to_have_count(1)
    chromium.step("drift gone, audited")
    page.click("#audit-link")
    expect(page.locator('tr.audit-entry[data-action="resync"]')).to_have_count(1)
    expect(page.locator('tr.audit-entry[data-action="staff.granted"]')).to_have_count(1)
    chromium.step("staff audit log")
