"""Passwords: one policy on every form that sets one (signup, joining through an invitation, reset,
change) with the shipped common-password list; scrypt at OWASP's parameters and the rehash of older
hashes at sign-in; the "your password was changed" email; the throttle on password changes. Real
PostgreSQL, Redis, job queue and SMTP."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import check_password_hash, generate_password_hash

from app.extensions import db
from app.services import password_policy
from app.services.auth_service import hash_password
from config import BaseConfig, ProductionConfig
from tests.conftest import PASSWORD, SandboxAccount, SmtpSink, csrf_token, email_text, query, run_jobs, start_signup
from tests.test_accounts import (
    EMAIL,
    NEW_PASSWORD,
    client_at,
    log_in,
    post_form,
    request_reset,
    reset_link,
    set_password,
    signed_in,
    user_row,
)
from tests.test_team import INVITEE, Owner, invitation_link, join

# Long enough, five distinct characters and more, not in the old six-entry list: the old forms took them.
COMMON = ["Password2024!", "iloveyou12345", "qwertyqwerty", "Sunshine2023!!"]


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> FlaskClient:
    from tests.conftest import sign_up

    client = client_at(app, "192.0.2.10")
    sign_up(client, offline_stripe)
    return client


# --- One policy, one list ----------------------------------------------------------------------------------


def test_the_common_password_list_is_the_shipped_one_loaded_once() -> None:
    listed = password_policy.common_passwords()
    assert len(listed) >= 29_000 and {"trustno1", "iloveyou", "sunshine", "qwerty123456"} <= listed
    assert password_policy.common_passwords() is listed  # read once per process
    for password in COMMON:
        with pytest.raises(password_policy.PasswordRejected, match="common passwords"):
            password_policy.check_new_password(password, email="ada@example.com")
    password_policy.check_new_password(PASSWORD, email="ada@example.com")  # a passphrase is fine


def test_signup_refuses_a_common_password(app: Flask, offline_stripe: SandboxAccount) -> None:
    for password in COMMON:
        response = start_signup(app.test_client(), password=password)
        assert response.status_code == 422, password
        assert "lists of common passwords" in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM pending_signup") == []


def test_joining_through_an_invitation_follows_the_same_policy(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = Owner(app, offline_stripe)
    owner.invite(INVITEE)
    path = invitation_link(smtp_server, app)
    teammate = app.test_client()
    for password in [*COMMON, "aaaaaaaaaaaaaaaa", "grace@example.com is me"]:
        response = join(teammate, path, password=password)
        assert response.status_code == 422, password
    assert "Your password must not contain your email address." in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE) == []
    assert join(teammate, path).status_code == 303


def test_reset_and_change_follow_the_same_policy(app: Flask, owner: FlaskClient, smtp_server: SmtpSink) -> None:
    request_reset(app.test_client(), EMAIL)
    run_jobs(app)
    token = reset_link(smtp_server)
    assert set_password(app.test_client(), token, "Password2024!").status_code == 422
    changed = post_form(
        owner, "/account/password", "/account/", current_password=PASSWORD, password=COMMON[1], confirm=COMMON[1]
    )
    assert changed.status_code == 422 and "lists of common passwords" in changed.get_data(as_text=True)
    assert check_password_hash(user_row(app).password_hash, PASSWORD)


# --- Hashing ------------------------------------------------------------------------------------------------


def test_production_hashes_with_owasps_scrypt_parameters(make_app: Any) -> None:
    assert BaseConfig({}).PASSWORD_SCRYPT_N == 2**17
    assert ProductionConfig({}).PASSWORD_SCRYPT_N == 2**17
    app = make_app(PASSWORD_SCRYPT_N=BaseConfig({}).PASSWORD_SCRYPT_N)
    with app.app_context():
        stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt:131072:8:1$") and check_password_hash(stored, PASSWORD)


def test_sign_in_rehashes_a_hash_made_with_older_parameters(
    make_app: Any, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    from tests.conftest import sign_up

    app = make_app(PASSWORD_SCRYPT_N=2**16)
    browser = client_at(app, "192.0.2.10")
    sign_up(browser, offline_stripe)
    # The hash werkzeug made by default before: scrypt with N=2**15.
    old = generate_password_hash(PASSWORD, method="scrypt")
    assert old.startswith("scrypt:32768:8:1$")
    with app.app_context():
        db.session.execute(db.text("UPDATE user_account SET password_hash = :h"), {"h": old})
        db.session.commit()
    epoch = user_row(app).session_epoch

    laptop = client_at(app, "192.0.2.11")
    assert log_in(laptop).status_code == 303
    rehashed = user_row(app).password_hash
    assert rehashed.startswith("scrypt:65536:8:1$") and check_password_hash(rehashed, PASSWORD)
    # The password did not change: no session ended, no email, and it still signs in.
    assert user_row(app).session_epoch == epoch and signed_in(browser)
    assert log_in(client_at(app, "192.0.2.12")).status_code == 303
    assert user_row(app).password_hash == rehashed  # already current: left alone
    run_jobs(app)
    assert not [m for m in smtp_server.to(EMAIL) if "password was changed" in m["Subject"]]


# --- The email and the throttle ----------------------------------------------------------------------------


def password_changed_emails(smtp_server: SmtpSink) -> list[Any]:
    return [m for m in smtp_server.to(EMAIL) if m["Subject"] == "Your Ledgerline password was changed"]


def test_changing_or_resetting_the_password_emails_the_account(
    app: Flask, owner: FlaskClient, smtp_server: SmtpSink
) -> None:
    response = post_form(
        owner, "/account/password", "/account/", current_password=PASSWORD, password=NEW_PASSWORD, confirm=NEW_PASSWORD
    )
    assert response.status_code == 303
    run_jobs(app)
    [message] = password_changed_emails(smtp_server)
    text = email_text(message)
    assert "was changed from your account page" in text and "http://localhost/auth/forgot-password" in text
    assert NEW_PASSWORD not in text

    request_reset(app.test_client(), EMAIL)
    run_jobs(app)
    token = reset_link(smtp_server)
    assert set_password(app.test_client(), token, "yet another good passphrase").status_code == 303
    run_jobs(app)
    messages = password_changed_emails(smtp_server)
    assert len(messages) == 2 and "through a password reset link" in email_text(messages[1])


def test_password_changes_are_throttled_per_user(make_app: Any, offline_stripe: SandboxAccount) -> None:
    from tests.conftest import sign_up

    app = make_app(PASSWORD_CHANGE_RATE_LIMIT="3/hour")
    owner = client_at(app, "192.0.2.10")
    sign_up(owner, offline_stripe)
    token = csrf_token(owner, "/account/")
    guesses = [
        owner.post(
            "/account/password",
            data={
                "csrf_token": token,
                "current_password": f"guess {n}",
                "password": NEW_PASSWORD,
                "confirm": NEW_PASSWORD,
            },
        ).status_code
        for n in range(4)
    ]
    assert guesses == [422, 422, 422, 429]
    # From another address too: the limit is the user's, not the client's.
    laptop = client_at(app, "192.0.2.99")
    assert log_in(laptop).status_code == 303
    again = post_form(
        laptop, "/account/password", "/account/", current_password=PASSWORD, password=NEW_PASSWORD, confirm=NEW_PASSWORD
    )
    assert again.status_code == 429
    assert check_password_hash(user_row(app).password_hash, PASSWORD)
    assert re.search(r"scrypt:\d+:8:1\$", user_row(app).password_hash)
