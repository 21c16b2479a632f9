"""Accounts: sign-in limits an attacker cannot turn against the owner, sign out everywhere, password
change and reset, email verification. Real PostgreSQL, Redis, job queue and SMTP (aiosmtpd)."""

from __future__ import annotations

import io
import logging
import re
import statistics
import threading
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from app.extensions import db
from app.models import User
from app.request_log import HANDLER_NAME
from app.services.account_service import AccountService
from tests.conftest import PASSWORD, SandboxAccount, SmtpSink, csrf_token, email_text, query, run_jobs, sign_up

EMAIL = "ada@example.com"
NEW_PASSWORD = "a brand new passphrase 42"
RESET_LINK = re.compile(r"http://localhost/auth/reset-password/(\S+)")
VERIFY_LINK = re.compile(r"http://localhost/auth/verify-email/(\S+)")


def client_at(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def log_in(client: FlaskClient, email: str = EMAIL, password: str = PASSWORD) -> Any:
    return client.post(
        "/auth/login", data={"csrf_token": csrf_token(client, "/auth/login"), "email": email, "password": password}
    )


def post_form(client: FlaskClient, path: str, form_page: str, **fields: str) -> Any:
    return client.post(path, data={"csrf_token": csrf_token(client, form_page), **fields})


def signed_in(client: FlaskClient) -> bool:
    return int(client.get("/app").status_code) == 200


def events_named(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def user_row(app: Flask) -> Any:
    [row] = query(app, "SELECT * FROM user_account WHERE email = :e", e=EMAIL)
    return row


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> FlaskClient:
    """The owner, signed in by the signup in the browser that paid."""
    client = client_at(app, "192.0.2.10")
    sign_up(client, offline_stripe)
    return client


# --- Sign-in limits -----------------------------------------------------------------------------------------


def test_forty_failures_from_other_addresses_do_not_stop_the_owner_signing_in(app: Flask, owner: FlaskClient) -> None:
    """The scheme: failures are limited per client address (any account) and per account *and* client
    address together; never per account alone, which anyone anywhere could exhaust."""
    statuses = Counter()
    # Forty failures, from four addresses at ten each and from twenty more at once each, with the defaults.
    for n in range(4):
        attacker = client_at(app, f"198.51.100.{n}")
        statuses.update(log_in(attacker, password=f"guess number {i}").status_code for i in range(5))
    for n in range(20):
        statuses.update([log_in(client_at(app, f"203.0.113.{n}"), password="guessing again").status_code])
    assert sum(statuses.values()) == 40 and statuses[401] >= 24, statuses
    # Each attacking address is stopped for this account: the pair limit (5/minute) held.
    assert log_in(client_at(app, "198.51.100.0"), password="one more guess").status_code == 429
    assert log_in(client_at(app, "198.51.100.0")).status_code == 429  # even the right password, from there
    # The owner, from their own address, signs in at the first try.
    response = log_in(client_at(app, "192.0.2.10"))
    assert response.status_code == 303 and response.headers["Location"] == "/app"


def test_one_address_cannot_spray_guesses_across_accounts(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_CLIENT="5/minute")
    sign_up(app.test_client(), offline_stripe)
    attacker = client_at(app, "198.51.100.7")
    statuses = [log_in(attacker, f"user{n}@example.com", "nope nope nope").status_code for n in range(6)]
    assert statuses == [401] * 5 + [429]
    assert log_in(client_at(app, "192.0.2.10")).status_code == 303


# --- Sign out everywhere, password change --------------------------------------------------------------------


def test_sign_out_everywhere_ends_every_session_of_the_user(app: Flask, owner: FlaskClient) -> None:
    laptop = client_at(app, "192.0.2.11")
    assert log_in(laptop).status_code == 303
    assert signed_in(owner) and signed_in(laptop)
    page = owner.get("/account/").get_data(as_text=True)
    assert "Sign out everywhere" in page and EMAIL in page
    response = post_form(owner, "/account/sign-out-everywhere", "/account/")
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    assert not signed_in(owner) and not signed_in(laptop)
    assert laptop.get("/account/").status_code == 302
    assert events_named(app)["user.signed_out_everywhere"] == 1
    # Signing in again works, and the new session is not ended by the old epoch.
    assert log_in(laptop).status_code == 303 and signed_in(laptop)


def test_changing_the_password_signs_out_every_other_session(app: Flask, owner: FlaskClient) -> None:
    laptop = client_at(app, "192.0.2.11")
    assert log_in(laptop).status_code == 303
    wrong = post_form(
        owner,
        "/account/password",
        "/account/",
        current_password="not my password",
        password=NEW_PASSWORD,
        confirm=NEW_PASSWORD,
    )
    assert wrong.status_code == 422 and "not your current password" in wrong.get_data(as_text=True)
    weak = post_form(
        owner, "/account/password", "/account/", current_password=PASSWORD, password="short", confirm="short"
    )
    assert weak.status_code == 422 and signed_in(laptop)
    before = owner.get_cookie("session")
    response = post_form(
        owner, "/account/password", "/account/", current_password=PASSWORD, password=NEW_PASSWORD, confirm=NEW_PASSWORD
    )
    assert response.status_code == 303
    after = owner.get_cookie("session")
    assert before and after and before.value != after.value  # this session continues on a fresh id
    assert signed_in(owner) and not signed_in(laptop)
    assert log_in(client_at(app, "192.0.2.12")).status_code == 401
    assert log_in(client_at(app, "192.0.2.12"), password=NEW_PASSWORD).status_code == 303
    assert events_named(app)["user.password_changed"] == 1


# --- Password reset --------------------------------------------------------------------------------------------


def request_reset(client: FlaskClient, email: str) -> Any:
    return post_form(client, "/auth/forgot-password", "/auth/forgot-password", email=email)


def reset_link(smtp_server: SmtpSink, email: str = EMAIL) -> str:
    [message] = [m for m in smtp_server.to(email) if "Reset your" in str(m["Subject"])]
    found = RESET_LINK.search(email_text(message))
    assert found, email_text(message)
    return found.group(1)


def set_password(client: FlaskClient, token: str, password: str = NEW_PASSWORD) -> Any:
    return client.post(
        f"/auth/reset-password/{token}",
        data={"csrf_token": csrf_token(client, "/auth/forgot-password"), "password": password, "confirm": password},
    )


def test_password_reset_from_the_sign_in_page_to_a_new_password(
    app: Flask, owner: FlaskClient, smtp_server: SmtpSink
) -> None:
    stranger = client_at(app, "192.0.2.20")
    assert 'href="/auth/forgot-password"' in stranger.get("/auth/login").get_data(as_text=True)
    response = request_reset(stranger, "  ADA@example.com ")
    assert response.status_code == 200 and "a link to choose a new password is on its way" in response.get_data(
        as_text=True
    )
    run_jobs(app)
    token = reset_link(smtp_server)
    # No usable secret was stored: not in the domain events, not in the queued jobs.
    stored = " ".join(
        str(row)
        for row in query(app, "SELECT data FROM domain_event") + query(app, "SELECT args FROM procrastinate_jobs")
    )
    assert token not in stored and token[:20] not in stored
    [requested] = query(app, "SELECT user_id, data FROM domain_event WHERE name = 'user.password_reset_requested'")
    assert requested.user_id == user_row(app).id and requested.data == {}

    page = stranger.get(f"/auth/reset-password/{token}")
    assert page.status_code == 200 and "Choose a new password" in page.get_data(as_text=True)
    mismatch = stranger.post(
        f"/auth/reset-password/{token}",
        data={
            "csrf_token": csrf_token(stranger, f"/auth/reset-password/{token}"),
            "password": NEW_PASSWORD,
            "confirm": "something else entirely",
        },
    )
    assert mismatch.status_code == 422 and "The two passwords differ" in mismatch.get_data(as_text=True)
    response = set_password(stranger, token)
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    # Every session of the user ended, the old password is gone, the new one works.
    assert not signed_in(owner)
    assert log_in(client_at(app, "192.0.2.21")).status_code == 401
    assert log_in(client_at(app, "192.0.2.22"), password=NEW_PASSWORD).status_code == 303
    # The link reached the mailbox: the address counts as confirmed.
    assert user_row(app).email_verified_at is not None
    # Used once, it is spent.
    reused = stranger.get(f"/auth/reset-password/{token}")
    assert reused.status_code == 400 and "already been used" in reused.get_data(as_text=True)
    assert set_password(stranger, token, "yet another passphrase 7").status_code == 400
    assert log_in(client_at(app, "192.0.2.23"), password=NEW_PASSWORD).status_code == 303
    assert events_named(app)["user.password_reset"] == 1


def test_reset_and_confirmation_links_never_reach_the_logs(app: Flask, owner: FlaskClient) -> None:
    with app.app_context():
        user = db.session.get_one(User, user_row(app).id)
        tokens = [AccountService.password_reset_token(user), AccountService.email_verification_token(user)]
        db.session.rollback()
    [handler] = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert isinstance(handler, logging.StreamHandler)
    written = io.StringIO()
    previous = handler.setStream(written)
    try:
        client = client_at(app, "192.0.2.35")
        client.get(f"/auth/reset-password/{tokens[0]}")
        client.get(f"/auth/verify-email/{tokens[1]}")
    finally:
        handler.setStream(previous)
    logged = written.getvalue()
    assert "/auth/reset-password/[redacted]" in logged and "/auth/verify-email/[redacted]" in logged
    assert tokens[0] not in logged and tokens[1] not in logged


def test_a_reset_link_expires_after_an_hour(app: Flask, owner: FlaskClient) -> None:
    with app.app_context():
        user = db.session.get_one(User, user_row(app).id)
        fresh = AccountService.password_reset_token(user, now=int(time.time()) - 59 * 60)
        stale = AccountService.password_reset_token(user, now=int(time.time()) - 61 * 60)
        db.session.rollback()
    client = client_at(app, "192.0.2.30")
    expired = client.get(f"/auth/reset-password/{stale}")
    assert expired.status_code == 400 and "expired" in expired.get_data(as_text=True)
    assert set_password(client, stale).status_code == 400
    assert client.get(f"/auth/reset-password/{fresh}").status_code == 200
    tampered = fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB")
    assert client.get(f"/auth/reset-password/{tampered}").status_code == 400
    assert log_in(client_at(app, "192.0.2.31")).status_code == 303  # nothing changed


def test_two_uses_of_one_link_at_once_change_the_password_once(app: Flask, owner: FlaskClient) -> None:
    with app.app_context():
        token = AccountService.password_reset_token(db.session.get_one(User, user_row(app).id))
        db.session.rollback()
    clients = [client_at(app, f"192.0.2.{40 + n}") for n in range(2)]
    forms = [
        {"csrf_token": csrf_token(c, f"/auth/reset-password/{token}"), "password": p, "confirm": p}
        for c, p in zip(clients, ("first new passphrase 1", "second new passphrase 2"), strict=True)
    ]
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def use(n: int) -> None:
        barrier.wait()
        statuses.append(clients[n].post(f"/auth/reset-password/{token}", data=forms[n]).status_code)

    threads = [threading.Thread(target=use, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [303, 400]
    assert events_named(app)["user.password_reset"] == 1


def test_known_and_unknown_addresses_get_the_same_answer_for_the_same_work(
    app: Flask, owner: FlaskClient, smtp_server: SmtpSink
) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2].split()[0])

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        answers, work, timings = {}, {}, {}
        for label, email in (("known", EMAIL), ("unknown", "nobody@example.com")):
            statements.clear()
            response = request_reset(client_at(app, f"192.0.2.5{len(answers)}"), email)
            answers[label] = (response.status_code, response.get_data(as_text=True).replace(email, "EMAIL"))
            work[label] = list(statements)
        # Timing class: alternate the two (limits raised so the loop is not stopped), compare medians.
        app.config.update(
            PASSWORD_RESET_RATE_LIMIT_PER_EMAIL="1000/hour", PASSWORD_RESET_RATE_LIMIT_PER_CLIENT="1000/hour"
        )
        timer = client_at(app, "192.0.2.60")
        token = csrf_token(timer, "/auth/forgot-password")
        for label in ("known", "unknown"):
            timings[label] = []
        for _ in range(15):
            for label, email in (("known", EMAIL), ("unknown", "nobody@example.com")):
                started = time.perf_counter()
                timer.post("/auth/forgot-password", data={"csrf_token": token, "email": email})
                timings[label].append(time.perf_counter() - started)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert answers["known"] == answers["unknown"] and answers["known"][0] == 200
    assert work["known"] == work["unknown"] and work["known"], work  # the same statements, in the same order
    known, unknown = statistics.median(timings["known"]), statistics.median(timings["unknown"])
    assert 0.5 < known / unknown < 2, (known, unknown)
    # Only the account's owner gets mail; the unknown address gets none, and is stored nowhere.
    run_jobs(app)
    assert smtp_server.to("nobody@example.com") == []
    assert len([m for m in smtp_server.to(EMAIL) if "Reset your" in str(m["Subject"])]) == 16
    assert "nobody@example.com" not in str(query(app, "SELECT data FROM domain_event"))


def test_reset_requests_are_limited_per_address_and_per_client(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(PASSWORD_RESET_RATE_LIMIT_PER_EMAIL="2/hour", PASSWORD_RESET_RATE_LIMIT_PER_CLIENT="100/hour")
    sign_up(app.test_client(), offline_stripe)
    statuses = [request_reset(client_at(app, f"198.51.100.{n}"), EMAIL).status_code for n in range(3)]
    assert statuses == [200, 200, 429]  # per address, from anywhere
    assert request_reset(client_at(app, "198.51.100.9"), "grace@example.com").status_code == 200

    app = make_app(PASSWORD_RESET_RATE_LIMIT_PER_EMAIL="100/hour", PASSWORD_RESET_RATE_LIMIT_PER_CLIENT="2/minute")
    client = client_at(app, "198.51.100.20")
    statuses = [request_reset(client, f"user{n}@example.com").status_code for n in range(3)]
    assert statuses == [200, 200, 429]  # per client, whatever the address


# --- Email verification --------------------------------------------------------------------------------------


def verification_links(smtp_server: SmtpSink) -> list[str]:
    messages = [m for m in smtp_server.to(EMAIL) if "Confirm your email" in str(m["Subject"])]
    return [found.group(1) for m in messages if (found := VERIFY_LINK.search(email_text(m)))]


def test_the_owner_confirms_their_address_after_signup(app: Flask, owner: FlaskClient, smtp_server: SmtpSink) -> None:
    # Provisioning did not wait: the owner is in, with a banner until the address is confirmed.
    page = owner.get("/app").get_data(as_text=True)
    assert 'id="verify-banner"' in page and "Inviting teammates" in page
    assert user_row(app).email_verified_at is None
    run_jobs(app)
    [token] = verification_links(smtp_server)
    response = owner.get(f"/auth/verify-email/{token}")
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    assert user_row(app).email_verified_at is not None
    page = owner.get("/app").get_data(as_text=True)
    assert 'id="verify-banner"' not in page
    # Opening the link again changes nothing; the event is recorded once.
    assert owner.get(f"/auth/verify-email/{token}").status_code == 303
    assert events_named(app)["user.email_verified"] == 1
    # A confirmed address gets no more links.
    post_form(owner, "/account/verify-email", "/account/")
    run_jobs(app)
    assert len(verification_links(smtp_server)) == 1


def test_the_confirmation_link_can_be_sent_again_within_limits(
    app: Flask, owner: FlaskClient, smtp_server: SmtpSink
) -> None:
    statuses = [post_form(owner, "/account/verify-email", "/account/").status_code for _ in range(4)]
    assert statuses == [303, 303, 303, 429]
    run_jobs(app)
    links = verification_links(smtp_server)
    assert len(links) == 4  # the one after signup and three asked for
    # Any of them works; a link signed for another purpose or tampered with does not.
    other = client_at(app, "192.0.2.70")
    assert other.get(f"/auth/verify-email/{links[-1]}").headers["Location"] == "/auth/login"
    assert user_row(app).email_verified_at is not None


def test_a_stale_or_foreign_confirmation_link_is_refused(app: Flask, owner: FlaskClient) -> None:
    with app.app_context():
        user = db.session.get_one(User, user_row(app).id)
        stale = AccountService.email_verification_token(user, now=int(time.time()) - 8 * 86400)
        reset_token = AccountService.password_reset_token(user)
        db.session.rollback()
    expired = owner.get(f"/auth/verify-email/{stale}")
    assert expired.status_code == 400 and "expired" in expired.get_data(as_text=True)
    assert owner.get(f"/auth/verify-email/{reset_token}").status_code == 400  # another purpose's signature
    assert user_row(app).email_verified_at is None


CHANGE_LINK = re.compile(r"http://localhost(/auth/change-email/\S+)")
NEW_EMAIL = "ada.lovelace@example.org"


def test_changing_the_email_takes_a_link_sent_to_the_new_address_and_tells_the_old_one(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    run_jobs(app)
    smtp_server.clear()
    response = post_form(owner, "/account/email", "/account/", new_email=" Ada.Lovelace@Example.ORG ")
    assert response.status_code == 303
    page = owner.get("/account/").get_data(as_text=True)
    assert f"We sent a link to {NEW_EMAIL}. Your address changes when you open it" in page
    assert query(app, "SELECT email FROM user_account")[0].email == EMAIL  # nothing changes before the link
    run_jobs(app)
    assert smtp_server.to(EMAIL) == []
    [message] = smtp_server.to(NEW_EMAIL)
    match = CHANGE_LINK.search(email_text(message))
    assert match, email_text(message)

    # Opened anywhere (the mailbox proves the address): the account moves, confirmed; the old address is told.
    assert app.test_client().get(match.group(1)).status_code == 303
    [user] = query(app, "SELECT email, email_verified_at FROM user_account")
    assert user.email == NEW_EMAIL and user.email_verified_at is not None
    run_jobs(app)
    [notice] = smtp_server.to(EMAIL)
    assert notice["Subject"] == "Your Ledgerline email address was changed"
    assert NEW_EMAIL in email_text(notice) and "/auth/change-email/" not in email_text(notice)
    fresh = app.test_client()
    log_in(fresh, NEW_EMAIL)
    assert signed_in(fresh)
    assert log_in(app.test_client(), EMAIL).status_code == 401
    # The link works once.
    again = app.test_client().get(match.group(1))
    assert again.status_code == 400 and "already used" in again.get_data(as_text=True)
    names = [r.name for r in query(app, "SELECT name FROM domain_event ORDER BY id")]
    assert names.count("user.email_change_requested") == 1 and names.count("user.email_changed") == 1


def test_an_address_that_has_an_account_is_answered_alike_and_its_mailbox_is_told(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    sign_up(app.test_client(), offline_stripe, email="grace@example.com", organization_name="Hopper & Co")
    run_jobs(app)
    smtp_server.clear()
    response = post_form(owner, "/account/email", "/account/", new_email="grace@example.com")
    assert response.status_code == 303
    assert "We sent a link to grace@example.com." in owner.get("/account/").get_data(as_text=True)
    run_jobs(app)
    [notice] = smtp_server.to("grace@example.com")
    assert "already has a Ledgerline account, so nothing was changed" in email_text(notice)
    assert "/auth/change-email/" not in email_text(notice)
    # A link minted anyway (the address got its account after the link was sent) is refused, nothing moves.
    with app.app_context():
        user = db.session.execute(db.select(User).where(User.email == EMAIL)).scalar_one()
        path = f"/auth/change-email/{AccountService.email_change_token(user, 'grace@example.com')}"
        db.session.rollback()
    refused = app.test_client().get(path)
    assert refused.status_code == 400 and "already has a Ledgerline account" in refused.get_data(as_text=True)
    assert {r.email for r in query(app, "SELECT email FROM user_account")} == {EMAIL, "grace@example.com"}


def test_email_change_requests_are_checked_and_throttled_per_user(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(EMAIL_CHANGE_RATE_LIMIT="2/hour")
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    same = post_form(owner, "/account/email", "/account/", new_email=EMAIL.upper())
    assert same.status_code == 422 and "That is already your email address." in same.get_data(as_text=True)
    bad = post_form(owner, "/account/email", "/account/", new_email="not an address")
    assert bad.status_code == 422 and "Invalid email address." in bad.get_data(as_text=True)
    assert post_form(owner, "/account/email", "/account/", new_email="x@example.org").status_code == 429
    assert [r.name for r in query(app, "SELECT name FROM domain_event WHERE name LIKE 'user.email_change%'")] == []
