"""Intake is one round trip (issue 20): a new event is verified, deduplicated and stored in one
statement that is its own transaction and queues nothing (a worker's dispatch pass gives its object a
job); a duplicate is the same statement and writes nothing; and the webhook route carries no session,
CSRF, rate-limit or sign-in machinery."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from flask import Flask, Response
from flask.testing import FlaskClient
from sqlalchemy import event as sqlalchemy_event
from werkzeug.test import EnvironBuilder

from app.extensions import db
from app.machine_entry import MachineEntry
from app.services import queue, webhook_intake
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


@contextmanager
def listening(app: Flask, channel: str) -> Iterator[Callable[[], list[str]]]:
    """A connection LISTENing on channel meanwhile; the callable returns what it received so far."""
    with app.app_context():
        url = db.engine.url
    connection = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )
    connection.autocommit = True
    received: list[str] = []

    def notifications() -> list[str]:
        time.sleep(0.1)
        connection.poll()
        while connection.notifies:
            received.append(connection.notifies.pop(0).payload)
        return received

    try:
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {channel}")
        yield notifications
    finally:
        connection.close()


def subscription_event() -> dict[str, Any]:
    subscription = {"id": f"sub_{uuid.uuid4().hex[:24]}", "object": "subscription", "status": "active"}
    return stripe_event("customer.subscription.updated", subscription)


def webhook_jobs(app: Flask, lock: str | None = None) -> list[Any]:
    sql = "SELECT status, lock, args FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'"
    return query(app, sql + " AND lock = :lock", lock=lock) if lock else query(app, sql)


def test_a_new_event_is_stored_in_one_statement_that_queues_nothing_and_a_duplicate_writes_nothing(
    client: FlaskClient, app: Flask
) -> None:
    delivered = subscription_event()
    post_webhook(client, subscription_event())  # the connection and the prepared statement exist

    with listening(app, "procrastinate_any_queue_v1") as notifications:
        with statements_sent(app) as sent:
            assert post_webhook(client, delivered).status_code == 200
        assert sent == ["EXECUTE (autocommit)"]  # no BEGIN, no COMMIT, no read before it, no second statement
        # No job and no NOTIFY: a notification takes PostgreSQL's one notification lock through the
        # commit, so every delivery would commit after the one before it. The stored event is the work.
        assert notifications() == []
    [row] = query(
        app,
        "SELECT status, object_key, xmin::text AS version FROM stripe_event WHERE event_id = :id",
        id=delivered["id"],
    )
    assert row.status == "pending"
    assert webhook_jobs(app) == []

    with statements_sent(app) as sent:
        response = post_webhook(client, delivered)
    assert response.status_code == 200 and response.get_json()["duplicate"] is True
    assert sent == ["EXECUTE (autocommit)"]
    [again] = query(
        app, "SELECT attempts, xmin::text AS version FROM stripe_event WHERE event_id = :id", id=delivered["id"]
    )
    assert (again.attempts, again.version) == (1, row.version)  # not written, not even locked

    # A worker's dispatch pass gives each object one job (the first delivery's and this one's), and
    # wakes the listening workers for them.
    with listening(app, "procrastinate_any_queue_v1") as notifications:
        queue.dispatch_now(app)
        assert len(notifications()) == 2
    assert len(webhook_jobs(app)) == 2
    [job] = webhook_jobs(app, f"stripe:{row.object_key}")
    assert job.status == "todo" and job.args == {"provider": "stripe", "object_key": row.object_key}


def test_a_burst_about_one_object_gets_one_job(client: FlaskClient, app: Flask) -> None:
    first = subscription_event()
    second = stripe_event("customer.subscription.updated", first["data"]["object"])
    for delivered in (first, second):
        assert post_webhook(client, delivered).status_code == 200
    queue.dispatch_now(app)
    queue.dispatch_now(app)  # a job waits for the object: nothing more
    key = f"stripe:subscription:{first['data']['object']['id']}"
    assert len(webhook_jobs(app, key)) == 1
    assert len(query(app, "SELECT 1 FROM stripe_event WHERE status = 'pending'")) == 2


def test_the_dispatch_pass_waits_for_the_coalescing_window(make_app: Any) -> None:
    """Events younger than WEBHOOK_COALESCE_SECONDS are left for the next pass, so a burst about one
    object is collected by one job; once the oldest is old enough, the object gets its job."""
    app = make_app(WEBHOOK_COALESCE_SECONDS=30)
    older, newer = subscription_event(), subscription_event()
    for delivered in (older, newer):
        assert post_webhook(app.test_client(), delivered).status_code == 200
    queue.dispatch_now(app)
    assert webhook_jobs(app) == []
    with app.app_context():
        db.session.execute(
            db.text("UPDATE stripe_event SET received_at = received_at - interval '31 seconds' WHERE event_id = :id"),
            {"id": older["id"]},
        )
        db.session.commit()
    queue.dispatch_now(app)
    assert [job.args["object_key"] for job in webhook_jobs(app)] == [f"subscription:{older['data']['object']['id']}"]
    # Running what is due now (`flask billing worker --once`, reconcile's drain) does not wait.
    queue.dispatch_now(app, coalesce=False)
    assert len(webhook_jobs(app)) == 2


def test_an_event_arriving_while_its_objects_job_runs_is_queued_when_that_job_ends(
    client: FlaskClient, app: Flask
) -> None:
    """The job that was applying the object may have collected its events before this one was stored:
    while it runs the dispatch pass leaves the object alone, and the first pass after it ends queues it."""
    first = subscription_event()
    assert post_webhook(client, first).status_code == 200
    queue.dispatch_now(app)
    with app.app_context():
        db.session.execute(db.text("UPDATE procrastinate_jobs SET status = 'doing'"))
        db.session.commit()
    assert post_webhook(client, stripe_event("customer.subscription.updated", first["data"]["object"])).status_code
    queue.dispatch_now(app)
    assert [job.status for job in webhook_jobs(app)] == ["doing"]
    with app.app_context():
        db.session.execute(db.text("UPDATE procrastinate_jobs SET status = 'succeeded'"))
        db.session.commit()
    queue.dispatch_now(app)
    assert sorted(job.status for job in webhook_jobs(app)) == ["succeeded", "todo"]


def test_a_failed_event_delivered_again_is_taken_over_in_the_same_statement(client: FlaskClient, app: Flask) -> None:
    delivered = subscription_event()
    assert post_webhook(client, delivered).status_code == 200
    with app.app_context():
        db.session.execute(
            db.text("UPDATE stripe_event SET status = 'failed' WHERE event_id = :id"), {"id": delivered["id"]}
        )
        db.session.commit()
    with statements_sent(app) as sent:
        assert post_webhook(client, delivered).get_json() == {"received": True}
    assert sent == ["EXECUTE (autocommit)"]
    [row] = query(app, "SELECT status, attempts FROM stripe_event WHERE event_id = :id", id=delivered["id"])
    assert (row.status, row.attempts) == ("pending", 2)
    queue.dispatch_now(app)
    assert len(webhook_jobs(app)) == 1


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


def test_a_settled_events_redelivery_is_read_no_further_than_its_id(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the signature verifies, a redelivery of an event this process saw settled is answered from
    its event id alone: the body is not read as an event (no json.loads of all of it, no checks of
    its fields), and no statement is sent. A pending event's redelivery, and a new event, are read."""
    ignored = stripe_event("charge.refunded", {"id": "ch_3", "object": "charge"})
    pending = subscription_event()
    post_webhook(client, ignored)
    post_webhook(client, pending)
    read: list[str] = []
    provider = BillingService._webhook_providers["stripe"]
    real = provider.parse

    def parse(text: str, headers: Any) -> Any:
        read.append(json.loads(text)["id"])
        return real(text, headers)

    monkeypatch.setattr(provider, "parse", parse)
    with statements_sent(app) as sent:
        assert post_webhook(client, ignored).get_json() == {"received": True, "duplicate": True}
    assert (read, sent) == ([], [])
    assert post_webhook(client, ignored, secret="whsec_forged").status_code == 400
    assert post_webhook(client, pending).get_json()["duplicate"] is True
    assert read == [pending["id"]]
    assert provider.event_id(json.dumps(ignored), {}) == ignored["id"]
    assert provider.event_id('{"id": 3}', {}) is None and provider.event_id("[1]", {}) is None


def test_a_settled_whop_events_redelivery_is_known_by_its_webhook_id(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whop's event id is the signed webhook-id header: a redelivery of a settled one (re-signed, as
    Whop retries) is a duplicate without reading its body or asking the database."""
    from tests.test_whop_webhooks import WHOP, deliver, envelope, whop_headers

    app = make_app(**WHOP)
    client = app.test_client()
    body = envelope("membership.activated", {"id": "mem_9", "status": "active", "metadata": {}})
    assert deliver(client, body, whop_headers(body, "msg_settled_9")).status_code == 200
    with app.app_context():
        db.session.execute(db.text("UPDATE whop_event SET status = 'processed' WHERE event_id = 'msg_settled_9'"))
        db.session.commit()
    deliver(client, body, whop_headers(body, "msg_settled_9", timestamp=int(time.time()) + 1))  # remembered
    whop = BillingService._webhook_providers["whop"]
    monkeypatch.setattr(whop, "parse", lambda *args: pytest.fail("the body was read"))
    with statements_sent(app) as sent:
        again = deliver(client, body, whop_headers(body, "msg_settled_9", timestamp=int(time.time()) + 2))
    assert again.get_json() == {"received": True, "duplicate": True}
    assert sent == []
    assert deliver(client, body, whop_headers(body, "msg_settled_9", "whsec_other")).status_code == 400


def test_a_process_starts_knowing_the_most_recent_settled_events_but_never_a_pending_one(
    client: FlaskClient, app: Flask
) -> None:
    """gunicorn's post_fork fills a new (or recycled) worker's memory with the most recent settled
    events, so their redeliveries cost no statement from its first request; a pending one is still
    asked about."""
    settled, pending = stripe_event("charge.refunded", {"id": "ch_2", "object": "charge"}), subscription_event()
    post_webhook(client, settled)  # ignored: settled at once
    post_webhook(client, pending)
    app.extensions.pop("webhook_settled_events")  # a process that has seen nothing
    with statements_sent(app) as sent:
        post_webhook(client, settled)
    assert sent == ["EXECUTE (autocommit)"]  # without the memory, the database is asked

    app.extensions.pop("webhook_settled_events")
    with app.app_context():
        assert webhook_intake.remember_recent_settled_events() >= 1
    with statements_sent(app) as sent:
        assert post_webhook(client, settled).get_json() == {"received": True, "duplicate": True}
    assert sent == []
    with statements_sent(app) as sent:
        assert post_webhook(client, pending).get_json()["duplicate"] is True
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


def test_a_dispatch_pass_reads_a_chunk_of_a_backlog_and_the_next_goes_on_from_there(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads at most UNCLAIMED_CHUNK pending rows (in object order), so its cost does not grow
    with a backlog; the next pass goes on where it stopped, and wraps around. The minute's sweep reads
    them all."""
    monkeypatch.setattr(webhook_intake, "UNCLAIMED_CHUNK", 2)
    monkeypatch.setattr(webhook_intake, "_dispatch_cursor", {})
    delivered = [subscription_event() for _ in range(5)]
    for event in delivered:
        assert post_webhook(client, event).status_code == 200
    objects = sorted(f"subscription:{event['data']['object']['id']}" for event in delivered)

    def queued() -> list[str]:
        return sorted(job.args["object_key"] for job in webhook_jobs(app))

    queue.dispatch_now(app)
    assert queued() == objects[:2]
    queue.dispatch_now(app)
    assert queued() == objects[:4]
    queue.dispatch_now(app)  # the last one: a short chunk, so the next pass starts again
    assert queued() == objects
    with app.app_context():
        db.session.execute(db.text("DELETE FROM procrastinate_jobs"))
        db.session.commit()
        assert sorted(BillingService.queue_unclaimed_events(older_than_seconds=0)) == [f"stripe:{o}" for o in objects]
    assert queued() == objects
