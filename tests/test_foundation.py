"""The foundation: production boot checks, Redis-backed sessions and limits, readiness, migrations,
request logs and the development stand-ins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, inspect, text

from app import create_app
from app.startup import ConfigurationError
from config import PROJECT_ROOT, DevelopmentConfig, ProductionConfig, TestConfig

STRONG_SECRET = "0Jv3kq9Zr8wXf2LmN5pT7yB1cD4eG6hK-production-grade"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def production_environ(database_url: str, redis_url: str) -> dict[str, str]:
    """Good production settings, on the test database and Redis."""
    return {
        "APP_ENV": "production",
        "SECRET_KEY": STRONG_SECRET,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STRIPE_SECRET_KEY": "sk_test_production_boot_check",
        "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION": "1",
        "STRIPE_WEBHOOK_SECRET": "whsec_production_boot_check",
        "APP_BASE_URL": "https://billing.example.com",
        "TRUSTED_PROXY_COUNT": "1",
        "MAIL_SERVER": "smtp.example.com",
        "MAIL_DEFAULT_SENDER": "Billing <billing@example.com>",
    }


def production_app(environ: dict[str, str]) -> Flask:
    return create_app(ProductionConfig(environ))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"REDIS_URL": None}, "REDIS_URL is not set"),
        ({"REDIS_URL": "redis://127.0.0.1:{free_port}/0"}, "does not answer a ping"),
        ({"SECRET_KEY": None}, "SECRET_KEY is not set"),
        ({"SECRET_KEY": "changeme"}, "SECRET_KEY is too weak"),
        ({"SECRET_KEY": "a" * 40}, "SECRET_KEY is too weak"),
        ({"DATABASE_URL": "sqlite:///production.sqlite3"}, "DATABASE_URL must be a PostgreSQL URL, not sqlite"),
        ({"DATABASE_URL": None}, "DATABASE_URL is not set"),
        ({"STRIPE_WEBHOOK_SECRET": None}, "STRIPE_WEBHOOK_SECRET is not set"),
        ({"APP_BASE_URL": "http://billing.example.com"}, "APP_BASE_URL must be the public https:// address"),
        ({"MAIL_SERVER": None}, "MAIL_SERVER is not set"),
        ({"MAIL_DEFAULT_SENDER": None}, "MAIL_DEFAULT_SENDER is not set"),
    ],
)
def test_production_refuses_to_boot_naming_the_setting(
    production_environ: dict[str, str], changes: dict[str, str | None], problem: str
) -> None:
    environ = dict(production_environ)
    for name, value in changes.items():
        if value is None:
            environ.pop(name)
        else:
            environ[name] = value.format(free_port=free_port())
    with pytest.raises(ConfigurationError) as refused:
        production_app(environ)
    message = str(refused.value)
    assert message.startswith("Refusing to start in production")
    assert problem in message
    assert message.count("\n  - ") == 1  # only what is wrong


@pytest.mark.parametrize("live_key", ["sk_live_production_boot_check", "rk_live_production_boot_check"])
def test_production_refuses_a_live_key_with_another_stripe_api_base(
    production_environ: dict[str, str], live_key: str
) -> None:
    environ = {**production_environ, "STRIPE_SECRET_KEY": live_key, "STRIPE_API_BASE": "http://127.0.0.1:12111"}
    with pytest.raises(ConfigurationError) as refused:
        production_app(environ)
    assert "STRIPE_API_BASE is set together with a live Stripe key" in str(refused.value)
    assert live_key not in str(refused.value)  # the message never shows the key
    # A live key alone, or a test key with the sandbox's address, boots.
    production_app({**production_environ, "STRIPE_SECRET_KEY": live_key})
    production_app({**production_environ, "STRIPE_API_BASE": "http://127.0.0.1:12111"})


@pytest.mark.parametrize(("setting", "problem"), [(None, "TRUSTED_PROXY_COUNT is not set"), ("one", "whole number")])
def test_production_wants_the_trusted_proxy_count_said_explicitly(
    production_environ: dict[str, str], setting: str | None, problem: str
) -> None:
    environ = {key: value for key, value in production_environ.items() if key != "TRUSTED_PROXY_COUNT"}
    if setting is not None:
        environ["TRUSTED_PROXY_COUNT"] = setting
    with pytest.raises(ConfigurationError) as refused:
        production_app(environ)
    message = str(refused.value)
    assert problem in message and "rate limits and request logs" in message and "0" in message


@pytest.mark.parametrize(("setting", "client_address"), [("0", "192.0.2.1"), ("1", "203.0.113.9")])
def test_the_trusted_proxy_count_decides_the_client_address(
    production_environ: dict[str, str], setting: str, client_address: str
) -> None:
    """0: nothing in front, X-Forwarded-For is the client's to forge and is ignored; 1: the proxy's
    header names the client."""
    app = production_app({**production_environ, "TRUSTED_PROXY_COUNT": setting})
    seen: list[str] = []

    @app.get("/whoami")
    def whoami() -> str:
        from app.extensions import client_address as current_client

        seen.append(current_client())
        return "ok"

    app.test_client().get(
        "/whoami",
        environ_base={"REMOTE_ADDR": "192.0.2.1"},
        headers={"X-Forwarded-For": "203.0.113.9"},
        base_url="https://localhost",
    )
    assert seen == [client_address]


def test_production_names_every_problem_at_once(production_environ: dict[str, str]) -> None:
    environ = {"APP_ENV": "production", "DATABASE_URL": "sqlite:///x.sqlite3"}
    with pytest.raises(ConfigurationError) as refused:
        production_app(environ)
    message = str(refused.value)
    for problem in (
        "SECRET_KEY is not set",
        "DATABASE_URL must be a PostgreSQL URL",
        "REDIS_URL is not set",
        "STRIPE_SECRET_KEY is not set",
        "STRIPE_WEBHOOK_SECRET is not set",
        "APP_BASE_URL must be the public https:// address",
        "TRUSTED_PROXY_COUNT is not set",
        "MAIL_SERVER is not set",
        "MAIL_DEFAULT_SENDER is not set",
    ):
        assert problem in message


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"SESSION_TYPE": "cachelib"}, "sessions must be Redis-backed"),
        ({"CACHE_TYPE": "SimpleCache"}, "the cache must be Redis-backed"),
        ({"RATELIMIT_STORAGE_URI": "memory://"}, "rate-limit storage must be Redis-backed"),
    ],
)
def test_production_refuses_stand_in_storage(
    production_environ: dict[str, str], override: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        create_app(ProductionConfig(production_environ), **override)


def test_gunicorn_exits_non_zero_with_the_message(production_environ: dict[str, str]) -> None:
    environ = {**os.environ, **production_environ, "GUNICORN_BIND": f"127.0.0.1:{free_port()}"}
    del environ["SECRET_KEY"]
    environ["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run(  # noqa: S603 (our own gunicorn, fixed arguments)
        [str(Path(sys.executable).with_name("gunicorn")), "wsgi:app"],
        cwd=PROJECT_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Refusing to start in production" in result.stderr
    assert "SECRET_KEY is not set" in result.stderr and "does not answer a ping" in result.stderr
    assert "Booting worker" not in result.stderr  # nothing half-started


def test_a_good_production_app_keeps_sessions_and_limits_in_redis(
    production_environ: dict[str, str], redis_url: str
) -> None:
    app = production_app(production_environ)
    redis_client = app.extensions["redis"]
    redis_client.flushdb()
    client = app.test_client()
    response = client.get("https://billing.example.com/auth/login")
    assert response.status_code == 200
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" in cookie
    session_id = cookie.split(";")[0].split("=", 1)[1]
    assert redis_client.exists(f"session:{session_id}")

    form = {"email": "nobody@example.com", "password": "wrong password"}
    page = response.get_data(as_text=True)
    marker = 'name="csrf_token" type="hidden" value="'
    form["csrf_token"] = page[page.index(marker) + len(marker) :].split('"', 1)[0]
    # Over HTTPS, CSRF also checks that the form was posted from our own pages.
    referer = {"Referer": "https://billing.example.com/auth/login"}
    assert client.post("https://billing.example.com/auth/login", data=form, headers=referer).status_code == 401
    assert redis_client.keys("LIMITS:LIMITER/ratelimit/login-account-client:nobody@example.com:*")


def test_production_sends_hsts_and_development_does_not(production_environ: dict[str, str], app: Flask) -> None:
    production = production_app(production_environ).test_client()
    assert (
        production.get("https://billing.example.com/healthz")
        .headers["Strict-Transport-Security"]
        .startswith("max-age=")
    )
    assert "Strict-Transport-Security" not in app.test_client().get("/healthz").headers


def test_healthz_answers_without_dependencies(make_app: Any) -> None:
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    response = app.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_names_redis_when_it_is_unreachable(make_app: Any, client: Any) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}

    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["failed"] == ["redis"] and body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("unreachable")


def test_readyz_names_the_database_when_it_is_unreachable(make_app: Any) -> None:
    app = make_app(SQLALCHEMY_DATABASE_URI=f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.get_json()["failed"] == ["database"]


def migrations_check_url(database_url: str) -> str:
    """The scratch database of the migrations test, named after the test database, so a run that
    TEST_DATABASE_URL moves elsewhere never drops another run's scratch database."""
    server, name = database_url.rsplit("/", 1)
    return f"{server}/{name}_migrations_check"


def test_the_migrations_scratch_database_follows_test_database_url() -> None:
    assert (
        migrations_check_url("postgresql+psycopg2://postgres@127.0.0.1:5432/billing_test_newcomer")
        == "postgresql+psycopg2://postgres@127.0.0.1:5432/billing_test_newcomer_migrations_check"
    )
    assert migrations_check_url("postgresql+psycopg2://u@h/billing_test").endswith("/billing_test_migrations_check")


def test_migrations_run_from_empty_to_head_and_back(database_url: str) -> None:
    """On a database of its own: upgrade, compare with the models, downgrade to nothing."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from flask_migrate import downgrade, upgrade

    from app.extensions import db

    url = migrations_check_url(database_url)
    name = url.rsplit("/", 1)[1]
    admin = create_engine(database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    app = create_app(TestConfig({**os.environ, "TEST_DATABASE_URL": url}))
    try:
        with app.app_context():
            upgrade()
            tables = set(inspect(db.engine).get_table_names())
            assert {"organization", "user_account", "pending_signup", "stripe_event", "domain_event"} <= tables
            assert {"procrastinate_jobs", "procrastinate_events", "outbox_delivery"} <= tables
            with db.engine.connect() as connection:
                # The job queue's tables come from procrastinate's schema SQL, not from the models.
                context = MigrationContext.configure(
                    connection,
                    opts={
                        "include_object": lambda o, n, t, r, c: not (t == "table" and n.startswith("procrastinate_"))
                    },
                )
                differences = compare_metadata(context, db.metadata)
            assert differences == [], "the models and the migrations disagree"
            downgrade(revision="base")
            assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}
            with db.engine.connect() as connection:
                leftovers = connection.execute(
                    text(
                        "SELECT proname FROM pg_proc WHERE proname LIKE 'procrastinate%' UNION ALL "
                        "SELECT typname FROM pg_type WHERE typname LIKE 'procrastinate%'"
                    )
                ).all()
            assert leftovers == [], "the downgrade leaves nothing of the job queue behind"
            db.engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def test_the_domain_event_log_is_append_only(app: Flask) -> None:
    from sqlalchemy.exc import InternalError

    from app.extensions import db

    with app.app_context():
        db.session.execute(text("INSERT INTO domain_event (name, data, occurred_at) VALUES ('x', '{}', now())"))
        db.session.commit()
        for statement in ("UPDATE domain_event SET name = 'y'", "DELETE FROM domain_event"):
            with pytest.raises(InternalError, match="append-only"):
                db.session.execute(text(statement))
            db.session.rollback()


def test_each_request_logs_one_line_with_its_id(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="app.request"):
        response = app.test_client().get("/healthz?token=secret-query", headers={"X-Request-ID": "req-abc12345"})
    [record] = [r for r in caplog.records if r.name == "app.request"]
    assert response.headers["X-Request-ID"] == "req-abc12345"
    fields = {name: getattr(record, name) for name in ("request_id", "method", "path", "status")}
    assert fields == {"request_id": "req-abc12345", "method": "GET", "path": "/healthz", "status": 200}
    assert isinstance(record.duration_ms, float)
    assert "secret-query" not in record.getMessage()


def test_production_logs_are_json(production_environ: dict[str, str], capfd: pytest.CaptureFixture[str]) -> None:
    app = production_app(production_environ)
    capfd.readouterr()
    app.test_client().get("https://billing.example.com/healthz")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    [entry] = [line for line in lines if line["logger"] == "app.request"]
    assert entry["method"] == "GET" and entry["path"] == "/healthz" and entry["status"] == 200
    assert len(entry["request_id"]) == 32 and entry["duration_ms"] >= 0


def test_a_webhook_delivery_logs_the_same_json_line_as_a_page(
    production_environ: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    """The machine entry's deliveries are logged as pages are: one JSON line with its request id (the one
    answered in X-Request-ID), method, path, status, duration and the client's address (from the
    proxy's X-Forwarded-For), made without the stack lookup logging.info does; a client's request id
    shaped like a key is still masked."""
    app = production_app(production_environ)
    capfd.readouterr()
    client = app.test_client()
    proxied = {"X-Forwarded-For": "3.18.12.63", "X-Forwarded-Proto": "https"}
    client.get("https://billing.example.com/healthz", headers=proxied)
    body = b'{"id": "evt_1", "object": "event"}'
    unsigned = {**proxied, "Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"}
    delivery = client.post("/billing/webhooks/stripe", data=body, headers=unsigned)
    client.post("/billing/webhooks/stripe", data=body, headers={**unsigned, "X-Request-ID": "sk_live_notreally1"})
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    page_line, delivery_line, keyed_line = [line for line in lines if line["logger"] == "app.request"]
    assert delivery.status_code == 400
    fields = {"time", "level", "logger", "message", "request_id", "method", "path", "status", "duration_ms"}
    assert set(delivery_line) == set(page_line) == fields | {"remote_addr"}
    assert delivery_line["request_id"] == delivery.headers["X-Request-ID"]
    assert len(delivery_line["request_id"]) == 32
    assert (delivery_line["method"], delivery_line["path"], delivery_line["status"]) == (
        "POST",
        "/billing/webhooks/stripe",
        400,
    )
    assert delivery_line["remote_addr"] == page_line["remote_addr"] == "3.18.12.63"
    assert delivery_line["level"] == "INFO" and delivery_line["duration_ms"] >= 0
    assert delivery_line["message"] == f"POST /billing/webhooks/stripe 400 {delivery_line['duration_ms']:.2f}ms"
    assert keyed_line["request_id"] == "[redacted]"


def test_development_runs_on_named_stand_ins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A newcomer's machine: no DATABASE_URL, no REDIS_URL. The migrations build SQLite and a signup
    form renders on filesystem sessions."""
    from flask_migrate import upgrade

    environ = {"APP_INSTANCE_DIR": str(tmp_path)}
    with caplog.at_level("WARNING"):
        app = create_app(DevelopmentConfig(environ))
    [message] = [r.getMessage() for r in caplog.records if "stand-ins" in r.getMessage()]
    assert "SQLite database" in message and "filesystem sessions" in message
    assert "in-process cache" in message and "in-memory rate limits" in message
    with app.app_context():
        upgrade()
    response = app.test_client().get("/auth/signup")
    assert response.status_code == 200 and "Start your organization" in response.get_data(as_text=True)
    assert (tmp_path / "development.sqlite3").exists() and any((tmp_path / "sessions").iterdir())


def test_postgres_urls_are_pinned_to_psycopg2() -> None:
    from config import normalise_database_url

    assert normalise_database_url("postgres://u:p@h/db") == "postgresql+psycopg2://u:p@h/db"
    assert normalise_database_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalise_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_redaction_masks_keys_and_card_numbers_but_not_their_neighbours() -> None:
    import logging

    from app.request_log import RedactingFilter

    record = logging.LogRecord(
        "app.request",
        logging.INFO,
        __file__,
        1,
        "POST /x/%s %s with %s",
        ("4242424242424242", 404, "whsec_abc_123"),
        None,
    )
    RedactingFilter(["configured-secret-value"]).filter(record)
    assert record.getMessage() == "POST /x/[redacted] 404 with [redacted]"
    for line, expected in [
        ("card 4242 4242 4242 4242 declined", "card [redacted] declined"),
        ("amex 3782-822463-10005", "amex [redacted]"),
        ("at 1795618244, key configured-secret-value", "at 1795618244, key [redacted]"),
        ("usage key llk_AbC-12_xyZ0123456789 refused", "usage key [redacted] refused"),
    ]:
        assert RedactingFilter(["configured-secret-value"]).redact(line) == expected


def test_redaction_skips_only_text_the_secret_patterns_cannot_match() -> None:
    """The request log's redaction runs its full patterns only on text that contains what every match
    contains (request_log.MAYBE_SECRET, the credential routes' prefixes): it must mask exactly what the
    full patterns mask, for every kind of secret, wherever it sits in the text."""
    import random
    import re

    from app.request_log import SECRET_PATTERNS, RedactingFilter, _mask_groups

    credential_paths = re.compile(r"(?:/team/join/([^\s/?#\"']+))|(?:/auth/reset\-password/([^\s/?#\"']+))")

    def reference(text: str) -> str:  # every pattern on every text, as before the shortcut
        masked = credential_paths.sub(_mask_groups, SECRET_PATTERNS.sub("[redacted]", text))
        return masked.replace("configured-secret-value", "[redacted]")

    samples = [
        "sk_live_AbC123",
        "rk_test_xyz987",
        "whsec_abc_123",
        "apik_Zz_9",
        "ws_abcdefgh12",
        "llk_AbC-12_xyZ0123456789",
        "Bearer abc.def~ghi+jk",
        "redis://:pw@host",
        "postgresql://user:secret@db",
        "4242424242424242",
        "4242 4242 4242 4242",
        "3782-822463-10005",
        "/team/join/tok3n-value",
        "/auth/reset-password/abc",
        "configured-secret-value",
    ]
    filler = [
        "POST",
        "/billing/webhooks/stripe",
        "200",
        "1.72ms",
        "127.0.0.1",
        "a1b2c3",
        "GET",
        "/team/",
        "x_y",
        "f962fed8dc5d1487987e0db8c2cfc174",  # a request id with a run of digits
        "1795618244",
        "2026-12-06",
        "4242",
        "1234 5678",
        "12345678901",
    ]
    fast = RedactingFilter(["configured-secret-value"])
    fast.credential_paths = credential_paths
    fast.credential_prefixes = ("/team/join/", "/auth/reset-password/")
    rng = random.Random(20)
    for _ in range(3000):
        words = [rng.choice(filler) for _ in range(rng.randint(0, 4))]
        secret = rng.choice(samples) if rng.random() < 0.6 else None
        if secret:
            words.insert(rng.randint(0, len(words)), secret)
        line = " ".join(words)
        assert fast.redact(line) == reference(line), line
        assert secret is None or fast.redact(line) != line, line
    assert fast.redact("POST /billing/webhooks/stripe 200 1.72ms") == "POST /billing/webhooks/stripe 200 1.72ms"
    assert fast.redact("GET /team/join/tok3n-value") == "GET /team/join/[redacted]"
    # Credential paths whose prefixes are unknown: every text is scanned for them.
    fast.credential_prefixes = None
    assert fast.redact("GET /team/join/tok3n-value") == "GET /team/join/[redacted]"


def test_a_request_id_with_a_run_of_digits_is_not_scanned_for_secrets() -> None:
    """Most of the request ids we make (32 hex digits) hold four digits in a row; that alone is no reason
    to run the full secret patterns over them on every request's line: only what a card number starts
    with (thirteen digits, or four, a space or dash and four more) is."""
    from app.request_log import MAYBE_SECRET

    assert MAYBE_SECRET.search("f962fed8dc5d1487987e0db8c2cfc174") is None
    assert MAYBE_SECRET.search("at 1795618244 cents") is None
    for card in ("4242424242424242", "4242 4242 4242 4242", "3782-822463-10005"):
        assert MAYBE_SECRET.search(card) is not None
