"""The embedded default of `make run` (no DATABASE_URL, no REDIS_URL): a SQLite file built by `flask db
upgrade`, filesystem sessions, in-process cache and limits, jobs run inside the app. The README's first
command runs here, so the flows a newcomer clicks through are tested here too, with the same Stripe
sandbox and a real SMTP server."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from alembic.script import ScriptDirectory
from flask import Flask

from app.extensions import db
from tests.conftest import (
    PASSWORD,
    SandboxAccount,
    SmtpSink,
    csrf_token,
    email_confirmation_path,
    email_text,
    query,
    sign_up,
)
from tests.live_support import wait_until

INVITEE = "grace@example.com"


def emailed_to(smtp_server: SmtpSink, address: str, subject: str) -> str:
    """The text of the email to `address` with `subject`, once the app's background thread sent it."""
    wait_until(
        lambda: any(m["Subject"] == subject for m in smtp_server.to(address)),
        10,
        lambda: f"no '{subject}' email to {address}: {[m['Subject'] for m in smtp_server.messages]}",
    )
    [message] = [m for m in smtp_server.to(address) if m["Subject"] == subject]
    return email_text(message)


def test_the_embedded_default_is_sqlite_built_by_the_migrations(sqlite_app: Flask) -> None:
    assert sqlite_app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///")
    [version] = query(sqlite_app, "SELECT version_num FROM alembic_version")
    migrations = Path(__file__).resolve().parents[1] / "migrations"
    assert [version.version_num] == ScriptDirectory(str(migrations)).get_heads()  # upgraded to the head


def test_datetimes_read_back_from_sqlite_are_timezone_aware(sqlite_app: Flask, offline_stripe: SandboxAccount) -> None:
    from app.models import Organization, User

    sign_up(sqlite_app.test_client(), offline_stripe)
    with sqlite_app.app_context():
        user = db.session.execute(db.select(User)).scalar_one()
        organization = db.session.execute(db.select(Organization)).scalar_one()
        for value in (user.created_at, organization.created_at):
            assert value.tzinfo is not None and value.utcoffset() == UTC.utcoffset(None)
            assert abs((datetime.now(UTC) - value).total_seconds()) < 120


def test_a_teammate_joins_through_the_emailed_link_on_sqlite(
    sqlite_app: Flask, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    owner = sqlite_app.test_client()
    sign_up(owner, offline_stripe)
    assert owner.get(email_confirmation_path(sqlite_app, "ada@example.com")).status_code == 303
    response = owner.post("/team/invite", data={"csrf_token": csrf_token(owner, "/team/"), "email": INVITEE})
    assert response.status_code == 303
    team_page = owner.get("/team/").get_data(as_text=True)
    assert INVITEE in team_page

    text = emailed_to(smtp_server, INVITEE, "Join Analytical Engines on Ledgerline")
    match = re.search(r"http://localhost(/team/join/[\w.\-]+)", text)
    assert match, text
    teammate = sqlite_app.test_client()
    page = teammate.get(match.group(1))
    assert page.status_code == 200 and INVITEE in page.get_data(as_text=True)
    token = csrf_token(teammate, "/auth/login")
    response = teammate.post(match.group(1), data={"csrf_token": token, "name": "Grace Hopper", "password": PASSWORD})
    assert response.status_code == 303 and response.headers["Location"] == "/app", response.get_data(as_text=True)
    dashboard = teammate.get("/app").get_data(as_text=True)
    assert "Grace Hopper (grace@example.com, member)" in dashboard
    assert 'id="verify-banner"' not in dashboard  # joining through the emailed link confirmed the address


def test_the_owners_pages_answer_on_sqlite(sqlite_app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = sqlite_app.test_client()
    sign_up(owner, offline_stripe, tier="business")  # the audit log is a Business feature
    assert owner.get(email_confirmation_path(sqlite_app, "ada@example.com")).status_code == 303
    for path in ("/app", "/billing/", "/billing/plan", "/billing/seats", "/team/", "/account/", "/app/audit-log"):
        response = owner.get(path)
        assert response.status_code == 200, (path, response.get_data(as_text=True)[-600:])
    preview = owner.post(
        "/billing/plan/preview",
        data={"csrf_token": csrf_token(owner, "/billing/plan"), "tier": "pro", "interval": "month"},
    )
    assert preview.status_code == 200, preview.get_data(as_text=True)[-600:]
    assert "Pro" in preview.get_data(as_text=True)


def test_billing_commands_without_stripe_settings_say_what_is_missing_in_one_line(
    make_sqlite_app: Callable[..., Flask],
) -> None:
    app = make_sqlite_app(STRIPE_SECRET_KEY="", STRIPE_WEBHOOK_SECRET="", STRIPE_API_BASE="")
    for command in (["reconcile"], ["check-prices"]):
        result = app.test_cli_runner().invoke(args=["billing", *command])
        assert result.exit_code == 1, (command, result.output)
        [line] = result.output.splitlines()
        assert line.startswith("Error: STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET are not set"), line
        assert "`make run` sets them only for the processes it starts" in line
        assert "STRIPE_API_BASE=http://127.0.0.1:12111" in line and "Traceback" not in result.output


def test_billing_status_on_sqlite_prints_no_empty_lines(sqlite_app: Flask) -> None:
    result = sqlite_app.test_cli_runner().invoke(args=["billing", "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(line.split(":", 1)[-1].strip() for line in lines), lines
    assert lines[0].startswith("jobs:            no queue: on the SQLite stand-in jobs run inside the app")
    assert "webhook events:  pending=0  processed=0  ignored=0  failed=0" in lines
