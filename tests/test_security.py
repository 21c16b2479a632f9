"""Issue 23's hardening: credentials kept out of the logs, abuse limits on mail and money, rate limits
that cannot be walked around, sessions that end when they should, uniform answers, production guards.
Real PostgreSQL, Redis and SMTP; Stripe is the offline sandbox."""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app.request_log import HANDLER_NAME, SecretConverter
from config import TestConfig
from tests.conftest import (
    PASSWORD,
    SandboxAccount,
    SmtpSink,
    checkout_session_id,
    csrf_token,
    email_html,
    email_text,
    post_and_apply,
    query,
    run_jobs,
    sign_up,
    start_signup,
    stripe_event,
)
from tests.test_hostile_input import cookie_attributes, production_app  # noqa: F401 (a fixture)
from tests.test_team import INVITEE, Owner, invitation_link, join

# Route arguments whose name says they are a credential; each must be declared <secret:...>.
CREDENTIAL_NAME = re.compile(r"(?:^|_)(?:token|secret|signature|key|code)$")
FAKE_TOKEN = "eyJpbnZpdGF0aW9uIjo0Mn0.Zm9yZ2VkLXNpZ25hdHVyZQ-x_y"


@contextmanager
def app_log() -> Iterator[io.StringIO]:
    """What the app's own log handler writes, as it writes it (after masking)."""
    [handler] = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert isinstance(handler, logging.StreamHandler)
    written = io.StringIO()
    previous = handler.setStream(written)
    try:
        yield written
    finally:
        handler.setStream(previous)


# --- 1. Credentials in links never reach the logs ------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_route_that_takes_a_token_logs_it_masked(make_app: Callable[..., Flask], log_format: str) -> None:
    app = make_app(LOG_FORMAT=log_format)
    rules = [rule for rule in app.url_map.iter_rules() if rule.arguments]
    # The one rule: a credential argument is declared with the secret converter, whatever its name...
    for rule in rules:
        for name in rule.arguments:
            if CREDENTIAL_NAME.search(name):
                assert isinstance(rule._converters[name], SecretConverter), f"{rule.rule}: declare <secret:{name}>"
    credential_rules = [
        rule for rule in rules if any(isinstance(c, SecretConverter) for c in rule._converters.values())
    ]
    # ...and the invitation, reset and confirmation links are among them.
    assert {rule.endpoint for rule in credential_rules} >= {"team.join", "auth.reset_password", "auth.verify_email"}
    client = app.test_client()
    with app_log() as written:
        for rule in credential_rules:
            path = rule.build({name: FAKE_TOKEN for name in rule.arguments}, append_unknown=False)
            assert path is not None
            _, path = path
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                response = client.open(path, method=method)
                assert response.status_code < 500, (rule.rule, method)
    logged = written.getvalue()
    assert FAKE_TOKEN not in logged and FAKE_TOKEN.rsplit(".", maxsplit=1)[-1] not in logged
    for rule in credential_rules:
        masked = rule.rule.split("<", 1)[0] + "[redacted]"
        assert masked in logged, (masked, logged)


# --- 9. Production guards and secret redaction -------------------------------------------------------------


@pytest.fixture
def production_settings(database_url: str, redis_url: str) -> dict[str, str]:
    """Production settings that start, on the test database and Redis (a live-looking Stripe key)."""
    return {
        "SECRET_KEY": "0Jv3kq9Zr8wXf2LmN5pT7yB1cD4eG6hK-production-grade",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STRIPE_SECRET_KEY": "sk_live_production_guard_check",
        "STRIPE_WEBHOOK_SECRET": "whsec_production_guard_check",
        "APP_BASE_URL": "https://billing.example.com",
        "TRUSTED_PROXY_COUNT": "1",
        "MAIL_SERVER": "smtp.example.com",
        "MAIL_USE_TLS": "1",
        "MAIL_DEFAULT_SENDER": "Billing <billing@example.com>",
    }


def production_problems_for(settings: dict[str, str]) -> list[str]:
    from app.startup import production_problems
    from config import ProductionConfig

    return production_problems(vars(ProductionConfig(settings)))


def test_production_refuses_a_test_mode_stripe_key_unless_told_it_is_meant(
    production_settings: dict[str, str],
) -> None:
    assert production_problems_for(production_settings) == []
    test_key = {**production_settings, "STRIPE_SECRET_KEY": "sk_test_staging_only"}
    assert any("STRIPE_SECRET_KEY is a test-mode key" in p for p in production_problems_for(test_key))
    restricted = {**production_settings, "STRIPE_SECRET_KEY": "rk_test_staging_only"}
    assert any("test-mode key" in p for p in production_problems_for(restricted))
    assert production_problems_for({**test_key, "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION": "1"}) == []


@pytest.mark.parametrize(
    "token", ["metrics", "0123456789abcdef", "a" * 40, "changeme", "ab" * 20, "Zr8wXf2LmN5pT7yB1cD4eG6hK"]
)
def test_production_refuses_a_weak_metrics_token(production_settings: dict[str, str], token: str) -> None:
    problems = production_problems_for({**production_settings, "METRICS_TOKEN": token})
    assert any("METRICS_TOKEN is too weak" in p for p in problems), problems


def test_production_accepts_a_strong_metrics_token_or_none(production_settings: dict[str, str]) -> None:
    strong = "mT7-qLx2Rv9KpZ4sWn8Jc1Hb6Yd3Fg5E0aUo"
    assert production_problems_for({**production_settings, "METRICS_TOKEN": strong}) == []


def test_redis_without_a_password_and_smtp_without_tls_warn_or_refuse(
    production_settings: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from app import create_app
    from app.startup import ConfigurationError
    from config import ProductionConfig

    insecure = {**production_settings, "MAIL_USE_TLS": ""}  # and the test Redis has no password
    caplog.set_level(logging.WARNING)
    app = create_app(ProductionConfig(insecure))  # warn, the default: it starts, and says so
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("has no password" in w for w in warnings), warnings
    assert any("MAIL_SERVER smtp.example.com is used without TLS" in w for w in warnings), warnings
    with app.app_context():
        from app.extensions import db

        db.engine.dispose()
    with pytest.raises(ConfigurationError) as refused:
        create_app(ProductionConfig({**insecure, "INSECURE_BACKENDS": "refuse"}))
    assert "has no password" in str(refused.value) and "(INSECURE_BACKENDS=refuse)" in str(refused.value)
    assert "without TLS" in str(refused.value)
    # A password in the URL and TLS on the mail connection: nothing to say.
    from app.startup import insecure_backends

    secured = vars(
        ProductionConfig({**production_settings, "REDIS_URL": "rediss://:s3cret-pass@redis.internal:6380/0"})
    )
    assert insecure_backends(secured) == []
    assert any(
        "INSECURE_BACKENDS must be" in p for p in production_problems_for({**insecure, "INSECURE_BACKENDS": "x"})
    )


def test_every_credential_the_app_knows_is_masked_in_the_logs(make_app: Callable[..., Flask]) -> None:
    credentials = {
        "WHOP_API_KEY": "whop-key-Zr8wXf2LmN5pT7yB",
        "WHOP_WEBHOOK_SECRET": "whop-hook-old-9aQ3, whop-hook-new-4bR7",
        "METRICS_TOKEN": "metrics-token-mT7qLx2Rv9KpZ4sW",
        "MAIL_PASSWORD": "smtp-password-Hb6Yd3Fg",
        "STRIPE_WEBHOOK_SECRET": "whsec_suite_rotating_1,whsec_suite_rotating_2",
    }
    make_app(**credentials)
    logger = logging.getLogger("app.test")
    with app_log() as written:
        for value in credentials.values():
            for part in value.split(","):
                logger.warning("calling with %s", part.strip())
        logger.warning(
            "connecting to redis://:r3dis-pass-Q9@cache.internal:6379/0 and postgresql://app:pg-pass-7Z@db/app"
        )
        logger.warning("Authorization: Bearer abcdefghijklmnop0123 sent; Whop key apik_unknown_to_config_123")
    logged = written.getvalue()
    for value in credentials.values():
        for part in value.split(","):
            assert part.strip() not in logged, part
    for leaked in ("r3dis-pass-Q9", "pg-pass-7Z", "abcdefghijklmnop0123", "apik_unknown_to_config_123"):
        assert leaked not in logged, leaked
    assert "cache.internal:6379" in logged and "calling with [redacted]" in logged


# --- 4. Rate limits that cannot be walked around ----------------------------------------------------------


def client_at(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def log_in(client: FlaskClient, email: str, password: str, token: str | None = None) -> Any:
    token = token or csrf_token(client, "/auth/login")
    return client.post("/auth/login", data={"csrf_token": token, "email": email, "password": password})


def test_one_ipv6_network_is_one_client_and_ipv4_addresses_are_their_own(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_CLIENT="3/hour", LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT="1000/hour")
    # Three failures from three addresses of one /64 use up that network's limit...
    statuses = [
        log_in(client_at(app, f"2001:db8:5:7::{n:x}"), f"user{n}@example.com", "nope nope nope").status_code
        for n in range(1, 4)
    ]
    assert statuses == [401, 401, 401]
    assert log_in(client_at(app, "2001:db8:5:7:ffff:1:2:3"), "x@example.com", "nope nope").status_code == 429
    # ...the next /64 is another client, and so is each IPv4 address (an IPv4-mapped one is that address).
    assert log_in(client_at(app, "2001:db8:5:8::1"), "x@example.com", "nope nope").status_code == 401
    for n in range(3):
        assert log_in(client_at(app, "192.0.2.50"), f"v4{n}@example.com", "nope nope").status_code == 401
    assert log_in(client_at(app, "::ffff:192.0.2.50"), "v4x@example.com", "nope nope").status_code == 429
    assert log_in(client_at(app, "192.0.2.51"), "v4y@example.com", "nope nope").status_code == 401


def test_the_ipv6_prefix_length_is_a_setting(make_app: Callable[..., Flask]) -> None:
    from app.extensions import client_bucket

    assert client_bucket("2001:db8:5:7:1:2:3:4", 64) == "2001:db8:5:7::/64"
    assert client_bucket("2001:db8:5:7:1:2:3:4", 48) == "2001:db8:5::/48"
    assert client_bucket("203.0.113.9", 64) == "203.0.113.9"
    app = make_app(RATELIMIT_IPV6_PREFIX_LENGTH=56)
    seen: list[str] = []

    @app.get("/whoami-for-limits")
    def whoami() -> str:
        from app.extensions import client_address

        seen.append(client_address())
        return "ok"

    client_at(app, "2001:db8:5:7aa:1::9").get("/whoami-for-limits")
    assert seen == ["2001:db8:5:700::/56"]
    with pytest.raises(SystemExit, match="RATELIMIT_IPV6_PREFIX_LENGTH"):
        TestConfig({"RATELIMIT_IPV6_PREFIX_LENGTH": "200"})


def test_a_parallel_burst_of_sign_in_guesses_gets_no_more_than_the_limit(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    """Fifty wrong passwords for one account from one address, all at once, against the real Redis."""
    app = make_app(LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT="5/hour", LOGIN_RATE_LIMIT_PER_CLIENT="1000/hour")
    sign_up(app.test_client(), offline_stripe)
    clients = [client_at(app, "198.51.100.77") for _ in range(50)]
    tokens = [csrf_token(client, "/auth/login") for client in clients]
    start = threading.Barrier(len(clients))
    statuses: list[int] = []
    lock = threading.Lock()

    def guess(index: int) -> None:
        start.wait()
        status = log_in(clients[index], "ada@example.com", f"wrong guess {index}", tokens[index]).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = Counter(statuses)
    assert counted[401] <= 5 and counted[401] + counted[429] == 50, counted
    # The limit is spent: even the right password waits, from that address.
    assert log_in(client_at(app, "198.51.100.77"), "ada@example.com", PASSWORD).status_code == 429
    # Successes give their place back: the owner, elsewhere, signs in as often as they like.
    assert [log_in(client_at(app, "192.0.2.10"), "ada@example.com", PASSWORD).status_code for _ in range(7)] == [
        303
    ] * 7


def test_signup_posts_are_limited_per_client_network_and_per_email(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    """Each signup POST creates a Checkout Session: limited per client (an IPv6 /64 is one) and per email."""
    app = make_app(SIGNUP_RATE_LIMIT_PER_CLIENT="2/hour", SIGNUP_RATE_LIMIT_PER_EMAIL="100/hour")
    first = client_at(app, "2001:db8:9:9::1")
    assert start_signup(first, email="one@example.com").status_code == 303
    assert start_signup(client_at(app, "2001:db8:9:9::2"), email="two@example.com").status_code == 303
    assert start_signup(client_at(app, "2001:db8:9:9::3"), email="three@example.com").status_code == 429
    assert start_signup(client_at(app, "2001:db8:9:a::1"), email="three@example.com").status_code == 303


# --- 3. Invitations: limited, and they say who sent them and how to report it --------------------------------


def invite(owner: Owner, email: str) -> Any:
    return owner.invite(email)


def test_invitations_are_limited_per_organization_and_per_client(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    app = make_app(INVITATION_RATE_LIMIT_PER_ORGANIZATION="3/hour", INVITATION_RATE_LIMIT_PER_CLIENT="2/hour")
    owner = Owner(app, offline_stripe)
    owner.client.environ_base["REMOTE_ADDR"] = "192.0.2.60"
    assert [invite(owner, f"t{n}@example.com").status_code for n in range(3)] == [303, 303, 429]
    # Another address is another client, but the organization has one invitation left this hour.
    owner.client.environ_base["REMOTE_ADDR"] = "192.0.2.61"
    assert invite(owner, "t3@example.com").status_code == 303
    assert invite(owner, "t4@example.com").status_code == 429
    owner.client.environ_base["REMOTE_ADDR"] = "192.0.2.62"
    refused = invite(owner, "t5@example.com")
    assert refused.status_code == 429 and "Too many attempts" in refused.get_data(as_text=True)
    assert len(query(app, "SELECT id FROM invitation")) == 3
    run_jobs(app)
    assert len([m for m in smtp_server.messages if "Join" in str(m["Subject"])]) == 3


@pytest.mark.parametrize("report_to", ["", "abuse@ledgerline.test"])
def test_the_invitation_email_names_the_inviter_and_how_to_report_it(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount, smtp_server: SmtpSink, report_to: str
) -> None:
    app = make_app(ABUSE_REPORT_EMAIL=report_to)
    owner = Owner(app, offline_stripe)
    assert invite(owner, "grace@example.com").status_code == 303
    run_jobs(app)
    [message] = smtp_server.to("grace@example.com")
    expected = report_to or "billing@ledgerline.test"  # the sender's address when none is set
    for body in (email_text(message), email_html(message)):
        assert "Ada Lovelace" in body and "ada@example.com" in body
        assert f"Report it to {expected}" in body or f'mailto:{expected}">{expected}</a>' in body, body


# --- 5. Sessions -------------------------------------------------------------------------------------------


def signed_in(client: FlaskClient) -> bool:
    return int(client.get("/app").status_code) == 200


def test_a_removed_teammate_invited_back_finds_every_old_session_ended(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = Owner(app, offline_stripe)
    assert owner.invite(INVITEE).status_code == 303
    laptop = app.test_client()
    assert join(laptop, invitation_link(smtp_server, app)).status_code == 303 and signed_in(laptop)
    [member] = query(app, "SELECT id, session_epoch FROM user_account WHERE email = :e", e=INVITEE)
    assert owner.post(f"/team/members/{member.id}/remove").status_code == 303
    [removed] = query(app, "SELECT session_epoch FROM user_account WHERE id = :i", i=member.id)
    assert removed.session_epoch > member.session_epoch  # removal ends the sessions by the epoch
    # Invited back and joined on another device, before the laptop made any request meanwhile.
    smtp_server.clear()
    assert owner.invite(INVITEE).status_code == 303
    phone = app.test_client()
    assert join(phone, invitation_link(smtp_server, app), password="another passphrase 2").status_code == 303
    assert signed_in(phone)
    assert not signed_in(laptop)  # the session from before the removal stays ended


def test_the_success_page_signs_in_only_within_the_window_after_the_account_exists(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app.test_client()
    checkout = checkout_session_id(start_signup(client))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(checkout))
    assert post_and_apply(client, completed).status_code == 200  # the account exists from now
    later = time.time() + 16 * 60  # SIGNUP_SIGN_IN_MINUTES is 15
    monkeypatch.setattr("app.access._now", lambda: later)
    landing = client.get(f"/billing/complete-signup-from-stripe?session_id={checkout}")
    assert landing.status_code == 303 and landing.headers["Location"] == "/auth/login"
    monkeypatch.undo()
    assert not signed_in(client)
    # The chance is spent: coming back within the window does not sign in either.
    again = client.get(f"/billing/complete-signup-from-stripe?session_id={checkout}")
    assert again.headers["Location"] == "/auth/login" and not signed_in(client)


def test_the_signup_in_a_session_signs_in_once_even_from_a_copy_of_the_session(
    app: Flask, offline_stripe: SandboxAccount, redis_url: str
) -> None:
    store = redis.Redis.from_url(redis_url)
    client = app.test_client()
    checkout = checkout_session_id(start_signup(client))
    cookie = client.get_cookie("session")
    assert cookie is not None
    copied = store.get(f"session:{cookie.value}")
    assert copied is not None
    offline_stripe.pay(checkout)
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={checkout}").headers["Location"] == "/app"
    # Someone who copied the session (its id and what the store held) before the sign-in replays it.
    store.set(f"session:{cookie.value}", copied, ex=3600)
    copycat = app.test_client()
    copycat.set_cookie("session", cookie.value)
    replay = copycat.get(f"/billing/complete-signup-from-stripe?session_id={checkout}")
    assert replay.headers["Location"] == "/auth/login" and not signed_in(copycat)
    assert signed_in(client)


def test_sessions_end_after_the_idle_timeout_and_after_the_absolute_lifetime(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(SESSION_IDLE_MINUTES=30)
    sign_up(app.test_client(), offline_stripe)
    clock = [time.time()]
    monkeypatch.setattr("app.access._now", lambda: clock[0])
    idle = client_at(app, "192.0.2.70")
    assert log_in(idle, "ada@example.com", PASSWORD).status_code == 303 and signed_in(idle)
    clock[0] += 29 * 60
    assert signed_in(idle)  # used again within 30 minutes...
    clock[0] += 31 * 60
    assert not signed_in(idle)  # ...then left alone for 31: ended
    # Used every 25 minutes, a session still ends 12 hours after its sign-in (SESSION_LIFETIME_HOURS).
    busy = client_at(app, "192.0.2.71")
    assert log_in(busy, "ada@example.com", PASSWORD).status_code == 303
    signed_in_at = clock[0]
    while clock[0] + 25 * 60 < signed_in_at + 12 * 3600:
        clock[0] += 25 * 60
        assert signed_in(busy), (clock[0] - signed_in_at) / 3600
    clock[0] = signed_in_at + 12 * 3600 + 60
    assert not signed_in(busy)
    assert log_in(busy, "ada@example.com", PASSWORD).status_code == 303 and signed_in(busy)


def test_signing_in_rotates_the_csrf_token(app: Flask, offline_stripe: SandboxAccount) -> None:
    sign_up(app.test_client(), offline_stripe)
    client = app.test_client()
    before = csrf_token(client, "/auth/login")
    assert log_in(client, "ada@example.com", PASSWORD, before).status_code == 303
    # A token seen before sign-in (on a shared computer, in a page's cache) no longer works after it.
    stale = client.post("/auth/logout", data={"csrf_token": before})
    assert stale.status_code == 400 and signed_in(client)
    after = csrf_token(client, "/account/")
    assert after != before
    assert client.post("/auth/logout", data={"csrf_token": after}).status_code == 303


def test_the_production_session_cookie_is_a_host_only_secure_cookie(production_app: Flask) -> None:  # noqa: F811
    response = production_app.test_client().get("/auth/login", base_url="https://localhost")
    [header] = [v for v in response.headers.getlist("Set-Cookie") if "session=" in v.split(";")[0]]
    assert header.startswith("__Host-session=")
    attributes = cookie_attributes(response, "__Host-session")
    assert "secure" in attributes and attributes["path"] == "/" and "domain" not in attributes
    assert production_app.config["REMEMBER_COOKIE_NAME"].startswith("__Host-")


def test_pages_with_account_or_billing_data_are_never_stored(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = Owner(app, offline_stripe)
    for path in ("/app", "/account/", "/billing/", "/billing/plan", "/billing/seats", "/team/"):
        response = owner.client.get(path)
        assert response.status_code == 200, path
        assert response.headers["Cache-Control"] == "no-store", path
    assert app.test_client().get("/auth/login").headers["Cache-Control"] == "no-store"  # its form's token
    owner.invite(INVITEE)
    join_page = app.test_client().get(invitation_link(smtp_server, app))  # shows the invitee's address
    assert join_page.status_code == 200 and join_page.headers["Cache-Control"] == "no-store"
    assert "no-store" not in owner.client.get("/static/app.css").headers.get("Cache-Control", "")


# --- 7. Enumeration: the form answers the same, the mailbox learns ----------------------------------------


def answer_shape(response: Any) -> tuple[int, str]:
    """What a signup POST's answer shows: its status and where it sends the browser, ids blanked."""
    return response.status_code, re.sub(r"cs_[A-Za-z0-9_]+", "cs_ID", response.headers.get("Location", ""))


def test_signup_answers_the_same_whether_or_not_the_email_has_an_account(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    sign_up(app.test_client(), offline_stripe)
    run_jobs(app)
    smtp_server.clear()
    taken = start_signup(app.test_client(), email="ada@example.com", organization_name="Second Try")
    fresh = start_signup(app.test_client(), email="newcomer@example.com", organization_name="Second Try")
    assert answer_shape(taken) == answer_shape(fresh)
    assert "account" not in taken.get_data(as_text=True).lower()
    # The mailbox learns it, with the way in; the new address hears nothing before it pays.
    run_jobs(app)
    [notice] = smtp_server.to("ada@example.com")
    assert notice["Subject"] == "You already have a Ledgerline account"
    assert "http://localhost/auth/login" in email_text(notice)
    assert "http://localhost/auth/forgot-password" in email_text(notice)
    assert smtp_server.to("newcomer@example.com") == []
    # Paying anyway for the taken address creates no second account (the conflict path refunds it).
    offline_stripe.pay(checkout_session_id(taken))
    landing = app.test_client().get(f"/billing/complete-signup-from-stripe?session_id={checkout_session_id(taken)}")
    assert landing.status_code == 409 and "already has an account" in landing.get_data(as_text=True)
    assert len(query(app, "SELECT id FROM user_account WHERE email = 'ada@example.com'")) == 1


def test_invitations_answer_the_same_whether_or_not_the_address_has_an_account(
    app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = Owner(app, offline_stripe)
    sign_up(app.test_client(), offline_stripe, email="bob@example.com", organization_name="Elsewhere Ltd")
    run_jobs(app)  # the signups' own emails
    smtp_server.clear()
    for address in ("bob@example.com", "stranger@example.com"):
        response = owner.invite(address)
        assert response.status_code == 303 and response.headers["Location"] == "/team/"
        page = owner.client.get("/team/").get_data(as_text=True)
        assert f"Invitation sent to {address}." in page and "another organization" not in page
    assert len(query(app, "SELECT id FROM invitation WHERE status = 'pending'")) == 2
    run_jobs(app)
    [notice] = smtp_server.to("bob@example.com")
    assert "already has a Ledgerline account" in email_text(notice)
    assert "/team/join/" not in email_text(notice) and "Ada Lovelace (ada@example.com)" in email_text(notice)
    [invitation] = smtp_server.to("stranger@example.com")
    assert "/team/join/" in email_text(invitation)
    # Owner's own members are known to the owner: that answer stays.
    refused = owner.invite("ada@example.com")
    assert "already belongs to a member" in owner.client.get(refused.headers["Location"]).get_data(as_text=True)
