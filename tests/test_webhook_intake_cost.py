"""Intake is one round trip (issue 20): a new event is verified, deduplicated, stored and its worker
woken in one statement that is its own transaction; a duplicate is the same statement and writes
nothing; and the webhook route carries no session, CSRF, rate-limit or sign-in machinery."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask, Response
from flask.testing import FlaskClient
from sqlalchemy import event as sqlalchemy_event
from werkzeug.test import EnvironBuilder

from app.extensions import db
from app.machine_entry import MachineEntry
from app.services.billing_service import BillingService
from tests.conftest import OFFLINE_WEBHOOK_SECRET, post_webhook, query, sign_stripe_payload, stripe_event


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


def through_flask(app: Flask) -> Any:
    """The app's own Flask route, behind the machine entry (what it hands over anything unusual to)."""
    entry = app.wsgi_app
    while not isinstance(entry, MachineEntry):
        entry = entry.app  # a proxy middleware in front
    return entry.flask


def deliveries() -> list[tuple[str, bytes, dict[str, str]]]:
    """(provider, body, headers): new, the same again, ignored, forged, an unknown provider."""
    new = json.dumps(subscription_event()).encode()
    ignored = json.dumps(stripe_event("charge.refunded", {"id": "ch_1", "object": "charge"})).encode()
    signed = {"Content-Type": "application/json"}
    return [
        ("stripe", new, {**signed, "Stripe-Signature": sign_stripe_payload(new, OFFLINE_WEBHOOK_SECRET)}),
        ("stripe", new, {**signed, "Stripe-Signature": sign_stripe_payload(new, OFFLINE_WEBHOOK_SECRET)}),
        ("stripe", ignored, {**signed, "Stripe-Signature": sign_stripe_payload(ignored, OFFLINE_WEBHOOK_SECRET)}),
        ("stripe", new, {**signed, "Stripe-Signature": sign_stripe_payload(new, "whsec_forged")}),
        ("nope", new, {**signed, "Stripe-Signature": sign_stripe_payload(new, OFFLINE_WEBHOOK_SECRET)}),
    ]


def answers(app: Flask, wsgi: Any, sent: list[tuple[str, bytes, dict[str, str]]]) -> list[tuple[int, Any, set[str]]]:
    answered = []
    for provider, body, headers in sent:
        environ = EnvironBuilder(
            path=f"/billing/webhooks/{provider}", method="POST", data=body, headers=headers
        ).get_environ()
        response = Response.from_app(wsgi, environ)
        answered.append((response.status_code, response.get_json(), set(response.headers.keys())))
    return answered


def test_the_machine_entry_answers_webhooks_as_the_flask_route_does_without_a_request_context(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New: 200 and stored once; the same again: 200, duplicate; ignored: 200; a bad signature: 400
    and nothing stored; an unknown provider: 404. Byte for byte the Flask route's answers, headers
    included (status, body, header names); and the entry builds no request context (no session, no URL
    matching, no hooks)."""
    flask_sent, entry_sent = deliveries(), deliveries()
    by_flask = answers(app, through_flask(app), flask_sent)

    def refuse(*args: Any) -> Any:
        raise AssertionError("the machine entry built a Flask request context")

    monkeypatch.setattr(app, "request_context", refuse)
    by_entry = answers(app, app.wsgi_app, entry_sent)
    assert [status for status, _, _ in by_entry] == [200, 200, 200, 400, 404]
    assert by_entry == by_flask
    assert by_entry[1][1] == {"received": True, "duplicate": True}
    for sent in (flask_sent, entry_sent):
        new_id = json.loads(sent[0][1])["id"]
        [row] = query(app, "SELECT status, attempts FROM stripe_event WHERE event_id = :id", id=new_id)
        assert (row.status, row.attempts) == ("pending", 1)  # stored once; the forged copy changed nothing


def test_a_settled_event_delivered_again_costs_no_round_trip_a_pending_one_still_asks(
    client: FlaskClient, app: Flask
) -> None:
    """A redelivery of an event this process saw settled (processed or ignored: final) is answered as a
    duplicate after its signature is checked, with no statement; a pending one is still asked about
    (it may fail, and a failed one is taken over by its next delivery)."""
    ignored = stripe_event("charge.refunded", {"id": "ch_1", "object": "charge"})
    assert post_webhook(client, ignored).get_json()["received"] is True
    with statements_sent(app) as sent:
        assert post_webhook(client, ignored).get_json() == {"received": True, "duplicate": True}
    assert sent == []
    assert post_webhook(client, ignored, secret="whsec_forged").status_code == 400  # verified before anything

    pending = subscription_event()
    post_webhook(client, pending)
    with statements_sent(app) as sent:
        assert post_webhook(client, pending).get_json()["duplicate"] is True
    assert sent == ["EXECUTE (autocommit)"]
    with app.app_context():
        db.session.execute(
            db.text("UPDATE stripe_event SET status = 'processed' WHERE event_id = :id"), {"id": pending["id"]}
        )
        db.session.commit()
    with statements_sent(app) as sent:
        post_webhook(client, pending)  # the database says processed: remembered
        post_webhook(client, pending)
    assert sent == ["EXECUTE (autocommit)"]


def test_a_webhook_the_machine_entry_cannot_finish_is_answered_by_the_flask_route_from_the_same_body(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error on the short path (the database going away mid-statement) hands the request,
    body included, to the Flask route, with its database-restart retry and error answers; storing is
    idempotent, so the event is stored once."""
    real = BillingService.handle_webhook_event
    calls: list[str] = []

    def fails_once(provider: str, payload: bytes, headers: Any) -> Any:
        calls.append(provider)
        if len(calls) == 1:
            raise RuntimeError("the connection went away")
        return real(provider, payload, headers)

    monkeypatch.setattr(BillingService, "handle_webhook_event", fails_once)
    delivered = subscription_event()
    response = post_webhook(client, delivered)
    assert response.status_code == 200 and response.get_json() == {"received": True}
    assert len(calls) == 2
    assert [
        row.attempts for row in query(app, "SELECT attempts FROM stripe_event WHERE event_id = :id", id=delivered["id"])
    ] == [1]
