"""Two-factor sign-in (TOTP) with real codes: the tests hold the app's clock (app.clock.timestamp) and make
each code with pyotp's at(for_time), as an authenticator app would at that moment. Enrolment, sign-in,
wrong and reused codes, one step of clock skew, recovery codes once, the owner's requirement, and
confirming it's you before sensitive actions. Real PostgreSQL, Redis, job queue and SMTP."""

from __future__ import annotations

import hashlib
import html
import re
import time
from typing import Any

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient

import app.clock
from tests.conftest import PASSWORD, SandboxAccount, SmtpSink, csrf_token, query, sign_up
from tests.test_accounts import EMAIL, client_at, log_in, post_form, signed_in
from tests.test_team import INVITEE, Owner, invitation_link, join


class Clock:
    """Held at five seconds into the current 30-second step: real time (Stripe and the database see
    the same day), moved only by the test."""

    def __init__(self) -> None:
        self.start = self.now = time.time() // 30 * 30 + 5.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    held = Clock()
    monkeypatch.setattr(app.clock, "timestamp", lambda: held.now)
    return held


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount, clock: Clock) -> FlaskClient:
    client = client_at(app, "192.0.2.10")
    sign_up(client, offline_stripe)
    return client


def enrol(client: FlaskClient, clock: Clock) -> tuple[pyotp.TOTP, list[str]]:
    """Set up two-factor sign-in as a person would: read the secret off the page, type the app's code."""
    page = client.get("/account/two-factor")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    text = page.get_data(as_text=True)
    assert "<svg" in text and 'class="qr-code"' in text  # the QR code, inline
    secret = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', text)
    assert secret, text
    totp = pyotp.TOTP(secret.group(1).replace(" ", ""))
    wrong = post_form(client, "/account/two-factor", "/account/two-factor", code="000000")
    assert wrong.status_code == 422 and "That code is not right" in wrong.get_data(as_text=True)
    response = post_form(client, "/account/two-factor", "/account/two-factor", code=totp.at(clock.now))
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    codes = re.findall(r"<li><code>([0-9a-f-]+)</code></li>", response.get_data(as_text=True))
    assert len(codes) == 10 and len(set(codes)) == 10
    return totp, codes


def code_step(client: FlaskClient, code: str) -> Any:
    return post_form(client, "/auth/two-factor", "/auth/two-factor", code=code)


def password_step(app: Flask, address: str = "192.0.2.20") -> FlaskClient:
    client = client_at(app, address)
    response = log_in(client)
    assert response.status_code == 303 and response.headers["Location"] == "/auth/two-factor"
    assert not signed_in(client)  # the password alone signs nobody in
    return client


def test_enrol_then_sign_in_takes_the_password_and_a_code(app: Flask, owner: FlaskClient, clock: Clock) -> None:
    totp, _ = enrol(owner, clock)
    [row] = query(app, "SELECT totp_secret, totp_enabled_at, totp_last_step FROM user_account")
    assert row.totp_enabled_at is not None and row.totp_last_step == int(clock.start) // 30
    assert "On: signing in asks for a code" in owner.get("/account/").get_data(as_text=True)

    clock.advance(30)
    browser = password_step(app)
    response = code_step(browser, totp.at(clock.now))
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    assert signed_in(browser)


def test_a_wrong_code_signs_nobody_in_and_wrong_codes_are_limited(
    make_app: Any, offline_stripe: SandboxAccount, clock: Clock
) -> None:
    app = make_app(TWO_FACTOR_RATE_LIMIT="3/minute")
    owner = client_at(app, "192.0.2.10")
    sign_up(owner, offline_stripe)
    totp, _ = enrol(owner, clock)
    clock.advance(30)
    browser = password_step(app)
    wrong = str((int(totp.at(clock.now)) + 1) % 1_000_000).zfill(6)
    response = code_step(browser, wrong)
    assert response.status_code == 401 and "That code is not right" in response.get_data(as_text=True)
    assert not signed_in(browser)
    assert [code_step(browser, wrong).status_code for _ in range(2)] == [401, 401]
    # Three wrong codes for this account: the next try is refused, even the right code, from anywhere.
    assert code_step(browser, totp.at(clock.now)).status_code == 429
    assert code_step(password_step(app, "192.0.2.30"), totp.at(clock.now)).status_code == 429


def test_a_code_already_used_cannot_be_used_again(app: Flask, owner: FlaskClient, clock: Clock) -> None:
    totp, _ = enrol(owner, clock)
    clock.advance(30)
    code = totp.at(clock.now)
    assert code_step(password_step(app), code).status_code == 303
    # Someone who watched it being typed, within the same 30 seconds:
    replay = code_step(password_step(app, "198.51.100.1"), code)
    assert replay.status_code == 401 and "used already" in replay.get_data(as_text=True)
    # Nor a code of an earlier step, still within the skew window.
    clock.advance(10)
    assert code_step(password_step(app, "198.51.100.2"), totp.at(clock.now - 30)).status_code == 401
    clock.advance(30)
    assert code_step(password_step(app), totp.at(clock.now)).status_code == 303


def test_a_code_one_step_early_or_late_is_accepted_two_steps_is_not(
    app: Flask, owner: FlaskClient, clock: Clock
) -> None:
    totp, _ = enrol(owner, clock)
    clock.advance(120)
    browser = password_step(app)
    assert code_step(browser, totp.at(clock.now - 60)).status_code == 401  # the phone is a minute slow
    assert code_step(browser, totp.at(clock.now + 60)).status_code == 401  # a minute fast
    assert code_step(browser, totp.at(clock.now - 30)).status_code == 303  # one step slow: fine
    clock.advance(90)
    assert code_step(password_step(app), totp.at(clock.now + 30)).status_code == 303  # one step fast: fine


def test_a_recovery_code_signs_in_once_and_is_stored_hashed(app: Flask, owner: FlaskClient, clock: Clock) -> None:
    _, codes = enrol(owner, clock)
    stored = {row.code_hash for row in query(app, "SELECT code_hash FROM recovery_code")}
    assert len(stored) == 10 and not any(code.replace("-", "") in "".join(stored) for code in codes)
    assert hashlib.sha256(codes[0].replace("-", "").encode()).hexdigest() in stored

    browser = password_step(app)
    response = code_step(browser, codes[0].upper())  # typed in capitals: still the code
    assert response.status_code == 303
    landing = browser.get("/app")
    assert landing.status_code == 200 and "9 left" in html.unescape(landing.get_data(as_text=True))
    again = code_step(password_step(app, "192.0.2.21"), codes[0])
    assert again.status_code == 401
    assert "9 of 10 unused" in owner.get("/account/two-factor").get_data(as_text=True)


def test_the_code_must_follow_the_password_within_five_minutes(app: Flask, owner: FlaskClient, clock: Clock) -> None:
    totp, _ = enrol(owner, clock)
    browser = password_step(app)
    clock.advance(301)
    response = post_form(browser, "/auth/two-factor", "/auth/login", code=totp.at(clock.now))
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    assert not signed_in(browser)


def test_an_owner_requires_two_factor_of_every_member(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink, clock: Clock
) -> None:
    owner = Owner(app, offline_stripe)
    owner.invite(INVITEE)
    teammate = client_at(app, "192.0.2.40")
    assert join(teammate, invitation_link(smtp_server, app)).status_code == 303
    assert signed_in(teammate)

    # Only an owner who uses it may require it.
    refused = post_form(owner.client, "/account/two-factor/requirement", "/account/", required="y")
    assert refused.status_code == 303
    assert "Turn on two-factor sign-in for your own account first." in owner.client.get("/account/").get_data(
        as_text=True
    )
    assert query(app, "SELECT require_two_factor FROM organization")[0].require_two_factor is False
    enrol(owner.client, clock)
    assert post_form(owner.client, "/account/two-factor/requirement", "/account/", required="y").status_code == 303
    assert query(app, "SELECT require_two_factor FROM organization")[0].require_two_factor is True

    # The member is sent to set it up, from any page, until they have.
    for page in ("/app", "/team/", "/account/"):
        response = teammate.get(page)
        assert response.status_code == 303 and response.headers["Location"] == "/account/two-factor", page
    totp, _ = enrol(teammate, clock)
    assert teammate.get("/app").status_code == 200
    # And may not turn it off while it is required.
    disabled = post_form(teammate, "/account/two-factor/disable", "/account/two-factor")
    assert disabled.status_code == 303
    [member] = query(app, "SELECT totp_enabled_at FROM user_account WHERE email = :e", e=INVITEE)
    assert member.totp_enabled_at is not None
    # Signing in again asks for the code.
    clock.advance(30)
    browser = client_at(app, "192.0.2.41")
    assert log_in(browser, INVITEE).headers["Location"] == "/auth/two-factor"
    assert code_step(browser, totp.at(clock.now)).status_code == 303 and signed_in(browser)


# --- Confirming it's you before sensitive actions ---------------------------------------------------------

SENSITIVE = [
    ("/billing/change/confirm", "/billing/"),
    ("/billing/portal", "/billing/"),
    ("/billing/cancel", "/billing/"),
    ("/team/members/999/remove", "/team/"),
    ("/account/password", "/account/"),
    ("/account/email", "/account/"),
    ("/account/two-factor/disable", "/account/two-factor"),
    ("/account/two-factor/recovery-codes", "/account/two-factor"),
    ("/account/two-factor/requirement", "/account/"),
]


def test_sensitive_actions_ask_to_confirm_it_is_you_after_ten_minutes(
    app: Flask, owner: FlaskClient, clock: Clock
) -> None:
    token = csrf_token(owner, "/account/")
    clock.advance(10 * 60 + 1)
    for path, page in SENSITIVE:
        response = owner.post(path, data={"csrf_token": token}, headers={"Referer": f"http://localhost{page}"})
        assert response.status_code == 303, path
        assert response.headers["Location"] == f"/account/confirm-access?next={page}", path
    assert query(app, "SELECT cancel_at_period_end FROM organization")[0].cancel_at_period_end is False

    # The cancellation, after confirming with the password: nothing happened before, it happens now.
    confirm = "/account/confirm-access?next=%2Fbilling%2F"
    wrong = post_form(owner, confirm, confirm, password="not my password")
    assert wrong.status_code == 401 and "That is not your password." in wrong.get_data(as_text=True)
    response = post_form(owner, confirm, confirm, password=PASSWORD)
    assert response.status_code == 303 and response.headers["Location"] == "/billing/"
    cancel = post_form(
        owner, "/billing/cancel", "/billing/", request_token="0123456789abcdef0123456789abcdef", when="period_end"
    )
    assert cancel.status_code == 303 and cancel.headers["Location"] == "/billing/"
    assert query(app, "SELECT cancel_at_period_end FROM organization")[0].cancel_at_period_end is True
    # Good for ten minutes, then asked again.
    clock.advance(10 * 60 + 1)
    assert "confirm-access" in owner.post("/billing/portal", data={"csrf_token": token}).headers["Location"]


def test_a_code_confirms_it_is_you_and_the_next_page_stays_on_this_site(
    app: Flask, owner: FlaskClient, clock: Clock
) -> None:
    totp, _ = enrol(owner, clock)
    clock.advance(10 * 60 + 30)
    confirm = "/account/confirm-access?next=https://evil.example/"
    response = post_form(owner, confirm, confirm, code=totp.at(clock.now))
    assert response.status_code == 303 and response.headers["Location"] == "/account/"
    disabled = post_form(owner, "/account/two-factor/disable", "/account/two-factor")
    assert disabled.status_code == 303 and disabled.headers["Location"] == "/account/two-factor"
    [row] = query(app, "SELECT totp_secret, totp_enabled_at FROM user_account WHERE email = :e", e=EMAIL)
    assert row.totp_secret is None and row.totp_enabled_at is None
    assert query(app, "SELECT id FROM recovery_code") == []
