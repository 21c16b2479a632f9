"""Retention: a pending signup's password hash lives only while the signup is open. It is erased when the
signup completes, fails or expires (by webhook, by a newer attempt, or by the scheduled sweep), and the
database refuses a closed signup that still holds one."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.services.jobs import close_expired_signups
from tests.conftest import (
    SandboxAccount,
    checkout_session_id,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    start_signup,
    stripe_event,
)


def signups(app: Flask) -> list[Any]:
    return query(app, "SELECT id, status, password_hash, failure_reason FROM pending_signup ORDER BY created_at")


def checkout_object(session_id: str, pending_id: Any) -> dict[str, Any]:
    """The parts of a Checkout Session object these events carry that the app reads."""
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": "subscription",
        "status": "expired",
        "payment_status": "unpaid",
        "client_reference_id": str(pending_id),
        "metadata": {"purpose": "signup", "pending_signup_id": str(pending_id)},
    }


def test_a_completed_signup_keeps_no_hash(app: Flask, offline_stripe: SandboxAccount) -> None:
    sign_up(app.test_client(), offline_stripe)
    [pending] = signups(app)
    assert pending.status == "completed" and pending.password_hash is None
    [owner] = query(app, "SELECT password_hash FROM user_account")
    assert owner.password_hash.startswith("scrypt:")


@pytest.mark.parametrize(
    ("event_type", "status"),
    [("checkout.session.expired", "expired"), ("checkout.session.async_payment_failed", "failed")],
)
def test_a_signup_that_ends_unpaid_keeps_no_hash(
    app: Flask, offline_stripe: SandboxAccount, event_type: str, status: str
) -> None:
    session_id = checkout_session_id(start_signup(app.test_client()))
    [pending] = signups(app)
    assert pending.status == "pending" and pending.password_hash.startswith("scrypt:")  # kept while open
    event = stripe_event(event_type, checkout_object(session_id, pending.id))
    assert post_webhook(app.test_client(), event).status_code == 200
    run_jobs(app)  # the worker applies it
    [pending] = signups(app)
    assert (pending.status, pending.password_hash) == (status, None)


def test_a_superseded_signup_keeps_no_hash(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    start_signup(client)
    start_signup(client, tier="business")
    first, second = signups(app)
    assert (first.status, first.password_hash) == ("expired", None)
    assert second.status == "pending" and second.password_hash.startswith("scrypt:")


def test_the_scheduled_sweep_erases_the_hashes_of_overdue_signups(app: Flask, offline_stripe: SandboxAccount) -> None:
    start_signup(app.test_client(), email="overdue@example.com")
    start_signup(app.test_client(), email="fresh@example.com")
    with app.app_context():
        db.session.execute(
            text(
                "UPDATE pending_signup SET expires_at = now() - interval '2 hours' WHERE email = 'overdue@example.com'"
            )
        )
        db.session.commit()
        assert close_expired_signups() == 1
        assert close_expired_signups() == 0  # idempotent
    rows = {row.email: row for row in query(app, "SELECT email, status, password_hash FROM pending_signup")}
    assert (rows["overdue@example.com"].status, rows["overdue@example.com"].password_hash) == ("expired", None)
    assert rows["fresh@example.com"].status == "pending" and rows["fresh@example.com"].password_hash


def test_the_database_refuses_a_closed_signup_that_keeps_a_hash(app: Flask, offline_stripe: SandboxAccount) -> None:
    start_signup(app.test_client())
    with app.app_context(), pytest.raises(IntegrityError, match="ck_pending_signup_hash_only_while_open"):
        db.session.execute(text("UPDATE pending_signup SET status = 'failed'"))
        db.session.commit()
