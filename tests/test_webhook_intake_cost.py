"""Intake is one round trip (issue 20): a new event is verified, deduplicated, stored and its worker
woken in one statement that is its own transaction; a duplicate is the same statement and writes
nothing; and the webhook route carries no session, CSRF, rate-limit or sign-in machinery."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event as sqlalchemy_event

from app.extensions import db
from tests.conftest import post_webhook, query, stripe_event


@contextmanager
def statements_sent(app: Flask) -> Iterator[list[str]]:
    """Every SQL statement any of the app's engines sends meanwhile, and whether it went on a
    connection in autocommit (its own transaction: no BEGIN or COMMIT round trips around it)."""
    sent: list[str] = []

    def statement(conn: Any, cursor: Any, text: str, *args: Any) -> None:
        autocommit = conn.connection.dbapi_connection.autocommit
        sent.append(text.split(maxsplit=1)[0].upper() + (" (autocommit)" if autocommit else ""))

    with app.app_context():
        engines = list(db.engines.values())
    for engine in engines:
        sqlalchemy_event.listen(engine, "before_cursor_execute", statement)
    try:
        yield sent
    finally:
        for engine in engines:
            sqlalchemy_event.remove(engine, "before_cursor_execute", statement)


def subscription_event() -> dict[str, Any]:
    subscription = {"id": f"sub_{uuid.uuid4().hex[:24]}", "object": "subscription", "status": "active"}
    return stripe_event("customer.subscription.updated", subscription)


def test_a_new_event_is_stored_with_its_job_in_one_statement_and_a_duplicate_writes_nothing(
    client: FlaskClient, app: Flask
) -> None:
    delivered = subscription_event()
    post_webhook(client, subscription_event())  # the connection and the prepared statement exist

    with statements_sent(app) as sent:
        assert post_webhook(client, delivered).status_code == 200
    assert sent == ["EXECUTE (autocommit)"]  # no BEGIN, no COMMIT of its own, no read before it, no second statement
    [row] = query(
        app,
        "SELECT status, object_key, xmin::text AS version FROM stripe_event WHERE event_id = :id",
        id=delivered["id"],
    )
    assert row.status == "pending"
    [job] = query(
        app, "SELECT status, lock, args FROM procrastinate_jobs WHERE lock = :lock", lock=f"stripe:{row.object_key}"
    )
    assert job.status == "todo" and job.args == {"provider": "stripe", "object_key": row.object_key}

    with statements_sent(app) as sent:
        response = post_webhook(client, delivered)
    assert response.status_code == 200 and response.get_json()["duplicate"] is True
    assert sent == ["EXECUTE (autocommit)"]
    assert len(query(app, "SELECT 1 FROM procrastinate_jobs WHERE lock = :lock", lock=job.lock)) == 1
    [again] = query(
        app, "SELECT attempts, xmin::text AS version FROM stripe_event WHERE event_id = :id", id=delivered["id"]
    )
    assert (again.attempts, again.version) == (1, row.version)  # not written, not even locked


def test_a_burst_about_one_object_shares_the_waiting_job(client: FlaskClient, app: Flask) -> None:
    first = subscription_event()
    second = stripe_event("customer.subscription.updated", first["data"]["object"])
    for delivered in (first, second):
        assert post_webhook(client, delivered).status_code == 200
    key = f"stripe:subscription:{first['data']['object']['id']}"
    assert len(query(app, "SELECT 1 FROM procrastinate_jobs WHERE lock = :lock", lock=key)) == 1
    assert len(query(app, "SELECT 1 FROM stripe_event WHERE status = 'pending'")) == 2


def test_a_failed_event_delivered_again_is_taken_over_in_the_same_statement(client: FlaskClient, app: Flask) -> None:
    delivered = subscription_event()
    assert post_webhook(client, delivered).status_code == 200
    with app.app_context():
        db.session.execute(
            db.text("UPDATE stripe_event SET status = 'failed' WHERE event_id = :id"), {"id": delivered["id"]}
        )
        db.session.execute(db.text("DELETE FROM procrastinate_jobs"))
        db.session.commit()
    with statements_sent(app) as sent:
        assert post_webhook(client, delivered).get_json() == {"received": True}
    assert sent == ["EXECUTE (autocommit)"]
    [row] = query(app, "SELECT status, attempts FROM stripe_event WHERE event_id = :id", id=delivered["id"])
    assert (row.status, row.attempts) == ("pending", 2)
    assert len(query(app, "SELECT 1 FROM procrastinate_jobs")) == 1


def test_the_webhook_route_opens_no_session_and_runs_no_page_hooks(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any) -> Any:
        raise AssertionError("the webhook route used page machinery")

    monkeypatch.setattr(app.session_interface, "open_session", refuse)
    monkeypatch.setattr(app.session_interface, "save_session", refuse)
    # Every before/after-request hook of pages (rate limits, CSRF, the sign-in guard, page headers).
    for registry in (app.before_request_funcs, app.after_request_funcs):
        for scope, hooks in list(registry.items()):
            monkeypatch.setitem(registry, scope, [refuse] * len(hooks))

    client.set_cookie("session", "a-session-id-from-a-browser")
    response = post_webhook(client, subscription_event())
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "Set-Cookie" not in response.headers
    assert response.headers["X-Request-ID"]  # still logged, with its request id
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # and every security header
    assert response.headers["Cache-Control"] == "no-store"
