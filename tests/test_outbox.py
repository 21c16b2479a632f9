"""The outbox and the mailer: domain events reach their consumers through the job queue, once, and
emails travel over real SMTP (aiosmtpd)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.services import domain_events, outbox
from app.services.mailer import EmailNotSent, send_email
from app.services.outbox import OutboxEvent
from tests.conftest import SmtpSink, email_html, email_text, query, run_jobs, sign_up

PROBE = "test.outbox_probe"
handled: list[int] = []


@outbox.consumer(PROBE, name="probe_email")
def probe_email(event: OutboxEvent) -> None:
    handled.append(event.id)
    send_email(
        event.data["to"],
        "subscription_ended",
        subject=f"probe {event.id}",
        owner=_Named("Ada"),
        organization=_Named("X"),
    )


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def record_probe(app: Flask, *, commit: bool = True, **data: Any) -> int:
    with app.app_context():
        row = domain_events.record(PROBE, source="test", to="ada@example.com", **data)
        db.session.flush()
        event_id = row.id
        if commit:
            db.session.commit()
        else:
            db.session.rollback()
    return event_id


def jobs_for(app: Flask, task: str) -> list[Any]:
    return query(app, "SELECT id, status, args, lock FROM procrastinate_jobs WHERE task_name = :t", t=task)


def test_a_committed_event_queues_its_delivery_in_the_same_transaction(app: Flask) -> None:
    kept = record_probe(app)
    rolled_back = record_probe(app, commit=False)
    jobs = jobs_for(app, outbox.TASK)
    assert [job.args for job in jobs] == [{"domain_event_id": kept}]
    assert jobs[0].lock == f"domain_event:{kept}"
    assert rolled_back != kept


def test_events_without_consumers_queue_nothing(app: Flask) -> None:
    with app.app_context():
        domain_events.record("test.nobody_listens", source="test")
        db.session.commit()
    assert query(app, "SELECT count(*) FROM procrastinate_jobs")[0][0] == 0


def test_the_worker_sends_the_email_once_and_records_it(app: Flask, smtp_server: SmtpSink) -> None:
    event_id = record_probe(app)
    run_jobs(app)
    assert [m["Subject"] for m in smtp_server.messages] == [f"probe {event_id}"]
    assert query(app, "SELECT consumer FROM outbox_delivery WHERE domain_event_id = :i", i=event_id) == [
        ("probe_email",)
    ]
    # Delivered again (a replay, a duplicate job): the consumer is not called, nothing is sent.
    with app.app_context():
        outbox.enqueue(event_id)
        db.session.commit()
    calls = handled.count(event_id)
    run_jobs(app)
    assert handled.count(event_id) == calls
    assert len(smtp_server.messages) == 1
    assert {row.status for row in jobs_for(app, outbox.TASK)} == {"succeeded"}


def test_a_refused_message_is_retried_and_sent_once(make_app: Any, smtp_server: SmtpSink) -> None:
    app = make_app(JOB_RETRY_BASE_SECONDS=0)
    event_id = record_probe(app)
    smtp_server.refuse_next(1)
    run_jobs(app)
    assert [m["Subject"] for m in smtp_server.messages] == [f"probe {event_id}"]
    job = query(app, "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = :t", t=outbox.TASK)[0]
    assert (job.status, job.attempts) == ("succeeded", 2)
    assert query(app, "SELECT count(*) FROM outbox_delivery")[0][0] == 1


def test_a_message_the_server_never_accepts_fails_the_job_and_records_nothing(
    make_app: Any, smtp_server: SmtpSink
) -> None:
    app = make_app(JOB_RETRY_BASE_SECONDS=0, OUTBOX_MAX_ATTEMPTS=3)  # emails retry OUTBOX_MAX_ATTEMPTS times
    record_probe(app)
    smtp_server.refuse_next(10)
    run_jobs(app)
    job = query(app, "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = :t", t=outbox.TASK)[0]
    assert (job.status, job.attempts) == ("failed", 3)
    assert query(app, "SELECT count(*) FROM outbox_delivery")[0][0] == 0
    assert smtp_server.messages == []


def test_send_email_raises_when_no_server_answers(make_app: Any) -> None:
    from tests.conftest import _free_port

    app = make_app(MAIL_PORT=_free_port())
    with app.app_context():
        try:
            send_email(
                "ada@example.com", "subscription_ended", subject="x", owner=_Named("A"), organization=_Named("B")
            )
        except EmailNotSent as exc:
            assert "ConnectionRefusedError" in str(exc)
        else:
            raise AssertionError("a refused connection must raise EmailNotSent")


def test_signup_sends_the_owner_one_welcome_email_with_a_receipt(
    client: FlaskClient, app: Flask, offline_stripe: Any, smtp_server: SmtpSink
) -> None:
    sign_up(client, offline_stripe)
    assert smtp_server.messages == []  # nothing is sent from the request
    run_jobs(app)
    run_jobs(app)
    # (The owner also gets the link to confirm the address: app/services/account_emails.py.)
    welcome = [m for m in smtp_server.to("ada@example.com") if str(m["Subject"]).startswith("Welcome")]
    assert len(welcome) == 1
    message = welcome[0]
    assert message["Subject"] == "Welcome to Ledgerline: your receipt"
    assert message["From"] == "Ledgerline Billing <billing@ledgerline.test>"
    text = email_text(message)
    html = email_html(message)
    assert "Analytical Engines" in text and "Receipt" in text and "Starter" in text
    assert "<strong>Analytical Engines</strong>" in html
    assert "Extra seats × 2" in text
    # A receipt a person reads: the amount charged and the day, never the provider's ids.
    today = f"{datetime.now(UTC):%-d %B %Y}"
    assert f"Paid: $29.00 on {today}" in text, text
    assert f"<td>$29.00 on {today}</td>" in html, html
    assert not re.search(r"\b(in|cs_test|sub|cus)_\w+", text + html), text
