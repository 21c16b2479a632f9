"""Acknowledged means applied (issue 20): a stored event is applied whatever happens to its job, a
retried job never strands an object's events, reconcile writes through the worker's per-object
serialization, retention keeps what is still to be applied, and emails outlast an SMTP outage."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app.extensions import db
from app.services import jobs, queue, webhook_intake
from app.services.billing_service import BillingService
from tests.conftest import (
    SandboxAccount,
    SmtpSink,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    stripe_event,
    worker_env,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def organization(app: Flask, offline_stripe: SandboxAccount) -> dict[str, Any]:
    session = sign_up(app.test_client(), offline_stripe)
    run_jobs(app)
    [row] = query(app, "SELECT * FROM organization")
    return {"id": row.id, "subscription_id": session["subscription"]}


def execute(app: Flask, sql: str, **params: Any) -> None:
    with app.app_context():
        db.session.execute(text(sql), params)
        db.session.commit()


def billing_status(app: Flask) -> str:
    [row] = query(app, "SELECT billing_status FROM organization")
    return str(row.billing_status)


def webhook_jobs(app: Flask) -> list[Any]:
    return query(
        app, "SELECT id, status, lock, queueing_lock FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'"
    )


def test_a_job_recovered_beside_a_waiting_one_is_queued_again_and_nothing_is_stranded(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription_id = organization["subscription_id"]
    past_due = offline_stripe.change_subscription(subscription_id, status="past_due")
    assert post_webhook(client, stripe_event("customer.subscription.updated", past_due)).status_code == 200
    queue.dispatch_now(app)  # a worker's dispatch pass gives the stored event its job
    # A worker takes the job and dies with it (no heartbeat: it is stalled at once).
    execute(app, "UPDATE procrastinate_jobs SET status = 'doing' WHERE task_name = 'webhooks:apply'")
    # Meanwhile Stripe moves on; the dispatch pass leaves its event to the object's job (running, as far
    # as anyone knows), and a job of its own is queued beside the dead one (a replay, a throttled retry).
    unpaid = offline_stripe.change_subscription(subscription_id, status="unpaid")
    assert post_webhook(client, stripe_event("customer.subscription.updated", unpaid)).status_code == 200
    queue.dispatch_now(app)
    assert [job.status for job in webhook_jobs(app)] == ["doing"]
    with app.app_context():
        webhook_intake.queue_application(BillingService._webhook_providers["stripe"], f"subscription:{subscription_id}")
        db.session.commit()
    assert sorted(job.status for job in webhook_jobs(app)) == ["doing", "todo"]
    assert {job.queueing_lock for job in webhook_jobs(app)} == {None}

    # The stalled job goes back to waiting beside the other (a queueing lock refused this).
    queue.bind(app)
    assert jobs.requeue_stalled_jobs_now(queue.job_app(app), seconds_since_heartbeat=0) == 1
    run_jobs(app)
    assert billing_status(app) == "unpaid"
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} == {"processed"}


def test_recovery_goes_on_past_a_stalled_job_it_cannot_queue_again(app: Flask) -> None:
    """A scheduled task's run left stalled while its next run waits (the queueing lock is taken): it
    is marked failed, and the other stalled jobs are still recovered."""
    for status in ("doing", "todo"):
        execute(
            app,
            "INSERT INTO procrastinate_jobs (queue_name, task_name, queueing_lock, args, status) "
            "VALUES ('maintenance', 'maintenance:expire_pending_signups', 'expire_pending_signups', "
            "'{\"timestamp\": 0}', CAST(:status AS procrastinate_job_status))",
            status=status,
        )
    execute(
        app,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, args, status) VALUES ('webhooks', "
        "'webhooks:apply', 'stripe:subscription:sub_x', "
        '\'{"provider": "stripe", "object_key": "subscription:sub_x"}\', \'doing\')',
    )
    queue.bind(app)
    assert jobs.requeue_stalled_jobs_now(queue.job_app(app), seconds_since_heartbeat=0) == 1
    rows = query(app, "SELECT task_name, status::text AS status FROM procrastinate_jobs ORDER BY id")
    assert [(row.task_name, row.status) for row in rows] == [
        ("maintenance:expire_pending_signups", "failed"),
        ("maintenance:expire_pending_signups", "todo"),
        ("webhooks:apply", "todo"),
    ]


def test_a_pending_event_with_no_job_is_found_by_the_sweep_and_applied(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    past_due = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    assert post_webhook(client, stripe_event("customer.subscription.updated", past_due)).status_code == 200
    # Its job is gone (taken by a worker at the moment the event coalesced into it, or removed by
    # hand): the event is acknowledged and pending, with nobody to apply it.
    execute(app, "DELETE FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")
    with app.app_context():
        assert BillingService.queue_unclaimed_events(older_than_seconds=60) == []  # too young to be lost
    execute(app, "UPDATE stripe_event SET received_at = received_at - interval '2 minutes'")
    with app.app_context():
        assert BillingService.queue_unclaimed_events(older_than_seconds=60) == [
            f"stripe:subscription:{organization['subscription_id']}"
        ]
        assert BillingService.queue_unclaimed_events(older_than_seconds=60) == []  # queued once
    run_jobs(app)
    assert billing_status(app) == "past_due"
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} == {"processed"}


def test_a_running_worker_applies_a_stored_event_that_nothing_queued(
    client: FlaskClient,
    app: Flask,
    organization: dict[str, Any],
    offline_stripe: SandboxAccount,
    smtp_server: SmtpSink,
) -> None:
    """Intake stores the event and queues nothing (no job, no NOTIFY): a real `flask billing worker`
    finds it by itself on its dispatch pass (every WORKER_DISPATCH_SECONDS) and applies it."""
    past_due = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    assert post_webhook(client, stripe_event("customer.subscription.updated", past_due)).status_code == 200
    assert webhook_jobs(app) == []  # nothing but the stored event says there is work
    env = {**worker_env(app, smtp_server, offline_stripe), "WORKER_DISPATCH_SECONDS": "0.2"}
    command = [sys.executable, "-m", "flask", "billing", "worker", "--queue", "webhooks", "--concurrency", "1"]
    worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        deadline = time.monotonic() + 60  # a bound on waiting, not a measurement (make bench times it)
        while time.monotonic() < deadline and billing_status(app) != "past_due":
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert billing_status(app) == "past_due"
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} == {"processed"}
    assert [job.status for job in webhook_jobs(app)] == ["succeeded"]


def unknown_subscription_updates(app: Flask, count: int) -> list[str]:
    """count stored pending events, each about a subscription of its own that the sandbox does not hold
    (its job reads it once and settles the event as not ours); returns their objects."""
    client = app.test_client()
    objects = []
    for number in range(count):
        subscription = {"id": f"sub_backlog{number:03d}", "object": "subscription", "status": "active"}
        assert post_webhook(client, stripe_event("customer.subscription.updated", subscription)).status_code == 200
        objects.append(f"subscription:{subscription['id']}")
    assert len(query(app, "SELECT 1 FROM stripe_event WHERE status = 'pending'")) == count
    return objects


def invoke_in_thread(app: Flask, *args: str) -> Any:
    """A `flask` command through the CLI runner, in a thread of its own (the worker runs an asyncio
    loop, which a loop already running in this thread would refuse: see conftest.run_jobs)."""
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(app.test_cli_runner().invoke(args=list(args))))
    runner.start()
    runner.join()
    [result] = results
    return result


def test_worker_once_applies_a_backlog_larger_than_one_dispatch_chunk(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flask billing worker --once` runs everything stored now: its dispatch pass reads the pending
    events chunk after chunk to the end (the periodic pass reads one chunk), and the worker runs every
    job that gives them."""
    monkeypatch.setattr(webhook_intake, "UNCLAIMED_CHUNK", 3)
    monkeypatch.setattr(webhook_intake, "_dispatch_cursor", {})
    objects = unknown_subscription_updates(app, 8)
    result = invoke_in_thread(app, "billing", "worker", "--once")
    assert result.exit_code == 0, result.output
    assert query(app, "SELECT event_id FROM stripe_event WHERE status = 'pending'") == []
    assert {row.status for row in query(app, "SELECT status FROM stripe_event")} == {"ignored"}
    assert sorted(job.lock for job in webhook_jobs(app)) == sorted(f"stripe:{o}" for o in objects)
    assert {job.status for job in webhook_jobs(app)} == {"succeeded"}


def test_worker_once_with_concurrency_runs_the_jobs_its_jobs_defer(
    app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    """With --concurrency above one, procrastinate's worker stops at the first fetch that finds nothing,
    even while a running job is about to defer more (applying the event records domain events, whose
    outbox deliveries are jobs): `--once` runs those too before it returns."""
    past_due = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    assert post_webhook(app.test_client(), stripe_event("customer.subscription.updated", past_due)).status_code == 200
    result = invoke_in_thread(app, "billing", "worker", "--once", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert billing_status(app) == "past_due"
    jobs_run = query(app, "SELECT task_name, status::text AS status FROM procrastinate_jobs ORDER BY id")
    assert jobs_run[-1].task_name == "outbox:deliver"  # deferred by the webhook job as it ran
    assert {job.status for job in jobs_run} == {"succeeded"}


def test_a_pass_that_queues_many_jobs_brings_the_job_tables_statistics_up_to_date(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """procrastinate's fetch is planned from procrastinate_jobs' statistics; analyzed while the table
    held a few rows, it reads every waiting job on each fetch. Once a worker's passes have queued
    JOB_STATISTICS_AFTER jobs (and as many as the table held at the last analysis) they analyze the
    table: its row count in pg_class is then the jobs'. Fewer: left to autovacuum."""
    monkeypatch.setattr(webhook_intake, "_dispatch_cursor", {})
    monkeypatch.setattr(webhook_intake, "_job_statistics", {"queued": 0, "rows": 0})

    def counted() -> tuple[float, int]:
        [row] = query(
            app,
            "SELECT reltuples, (SELECT count(*) FROM procrastinate_jobs) AS jobs FROM pg_class"
            " WHERE relname = 'procrastinate_jobs'",
        )
        return row.reltuples, row.jobs

    execute(app, "ANALYZE procrastinate_jobs")  # what the statistics were while the table was quiet
    quiet, _ = counted()
    objects = unknown_subscription_updates(app, 12)
    monkeypatch.setattr(webhook_intake, "JOB_STATISTICS_AFTER", 20)
    with app.app_context():
        assert len(jobs.dispatch_webhook_events(coalesce=False)) == 12
    assert counted() == (quiet, 12)  # twelve jobs, fewer than JOB_STATISTICS_AFTER: not analyzed
    execute(app, "DELETE FROM procrastinate_jobs WHERE lock = ANY(:locks)", locks=[f"stripe:{o}" for o in objects[:8]])
    with app.app_context():  # eight more: twenty queued since the last analysis
        assert len(jobs.dispatch_webhook_events(coalesce=False)) == 8
    assert counted() == (12, 12)
    monkeypatch.setattr(webhook_intake, "JOB_STATISTICS_AFTER", 5)
    execute(app, "DELETE FROM procrastinate_jobs")
    execute(app, "DELETE FROM stripe_event WHERE object_key = ANY(:keys)", keys=objects[:5])
    with app.app_context():  # seven: past JOB_STATISTICS_AFTER, not yet the twelve of the last analysis
        assert len(jobs.dispatch_webhook_events(coalesce=False)) == 7
    assert counted() == (12, 7)


def test_the_periodic_dispatch_pass_still_reads_one_chunk(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a drain, the workers' periodic pass keeps its bounded cost: one chunk a pass."""
    monkeypatch.setattr(webhook_intake, "UNCLAIMED_CHUNK", 3)
    monkeypatch.setattr(webhook_intake, "_dispatch_cursor", {})
    objects = unknown_subscription_updates(app, 8)
    with app.app_context():
        assert jobs.dispatch_webhook_events(coalesce=False) == [f"stripe:{o}" for o in objects]
        execute(app, "DELETE FROM procrastinate_jobs")
        assert jobs.dispatch_webhook_events(coalesce=True) == [f"stripe:{o}" for o in objects[:3]]
        assert jobs.dispatch_webhook_events(coalesce=True) == [f"stripe:{o}" for o in objects[3:6]]


def test_a_drain_waits_its_turn_behind_another_pass_with_no_transaction_open(
    app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another pass holds the one-pass lock, a drain does not skip its turn (what it left would
    stay pending): it waits, with no transaction open, and goes on once the lock is let go."""
    monkeypatch.setattr(webhook_intake, "UNCLAIMED_CHUNK", 3)
    objects = unknown_subscription_updates(app, 5)
    in_transaction_while_waiting: list[bool] = []

    sleep = time.sleep

    def pause(seconds: float) -> None:
        if threading.current_thread().name == "drain":
            in_transaction_while_waiting.append(db.session().in_transaction())
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", pause)
    with app.app_context():
        holder = db.engine.connect()
    try:
        holder.execute(text("SELECT pg_advisory_xact_lock(hashtext('ledgerline:webhook-dispatch'))"))
        drained: list[list[str]] = []

        def drain() -> None:
            with app.app_context():
                drained.append(jobs.dispatch_webhook_events(coalesce=False))

        drainer = threading.Thread(target=drain, name="drain")
        drainer.start()
        time.sleep(0.5)
        assert drainer.is_alive() and webhook_jobs(app) == []
        holder.commit()  # the other pass ends
        drainer.join(10)
    finally:
        holder.close()
    assert drained == [[f"stripe:{o}" for o in objects]]
    assert in_transaction_while_waiting and not any(in_transaction_while_waiting)


def test_reconcile_applies_a_backlog_larger_than_one_dispatch_chunk(
    app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flask billing reconcile --apply` runs the webhook jobs itself (its drain) before it reads again:
    every pending event gets its job then, not one chunk of them."""
    monkeypatch.setattr(webhook_intake, "UNCLAIMED_CHUNK", 3)
    monkeypatch.setattr(webhook_intake, "_dispatch_cursor", {})
    offline_stripe.change_subscription(organization["subscription_id"], status="past_due")  # no webhook reaches us
    unknown_subscription_updates(app, 10)
    result = invoke_in_thread(app, "billing", "reconcile", "--apply")
    assert result.exit_code == 0, result.output
    assert billing_status(app) == "past_due"
    assert query(app, "SELECT event_id FROM stripe_event WHERE status = 'pending'") == []


def test_reconcile_repairs_through_the_worker_under_the_objects_lock(
    app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription_id = organization["subscription_id"]
    offline_stripe.change_subscription(subscription_id, status="past_due")  # no webhook reaches us
    # A worker is applying this subscription's events right now.
    execute(
        app,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, args, status) VALUES ('webhooks', "
        "'webhooks:apply', :lock, '{}', 'doing')",
        lock=f"stripe:subscription:{subscription_id}",
    )
    with app.app_context():
        report = BillingService.reconcile(apply=True, organization_id=organization["id"])
    # Reconcile queued its repair; it did not write the organization beside the worker.
    assert any(f"follows {subscription_id}: re-read queued" in line for line in report.applied)
    assert billing_status(app) == "active" and not report.clean
    execute(app, "UPDATE procrastinate_jobs SET status = 'succeeded' WHERE status = 'doing'")
    run_jobs(app)
    assert billing_status(app) == "past_due"
    with app.app_context():
        assert BillingService.reconcile(organization_id=organization["id"]).subscriptions == []


def test_retention_keeps_the_payloads_still_to_be_applied_and_covers_every_provider(app: Flask) -> None:
    old = datetime.now(UTC) - timedelta(days=400)
    for number, status in enumerate(("processed", "ignored", "pending", "failed")):
        execute(
            app,
            "INSERT INTO stripe_event (event_id, type, status, payload, received_at, stripe_created, livemode, "
            "attempts) VALUES (:id, 'invoice.paid', :status, '{}', :at, 1, false, 0)",
            id=f"evt_old_{number}",
            status=status,
            at=old,
        )
        execute(
            app,
            "INSERT INTO whop_event (event_id, type, status, payload, received_at, whop_created, livemode, attempts) "
            "VALUES (:id, 'payment.succeeded', :status, '{}', :at, 1, true, 0)",
            id=f"msg_old_{number}",
            status=status,
            at=old,
        )
    with app.app_context():
        assert jobs.drop_event_payloads() == 4
    for table in ("stripe_event", "whop_event"):
        kept = {row.status: row.payload for row in query(app, f"SELECT status, payload FROM {table}")}  # noqa: S608
        assert kept == {"processed": "", "ignored": "", "pending": "{}", "failed": "{}"}


def test_emails_outlast_a_day_of_smtp_outage_then_fail_visibly_and_are_sent_once_on_replay(
    make_app: Any, offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    app = make_app()
    decision = queue.OUTBOX_RETRY
    with app.app_context():
        attempts = int(app.config["OUTBOX_MAX_ATTEMPTS"])
        waits = []
        for attempt in range(attempts - 1):
            job = queue.job_app(app).tasks["outbox:deliver"].configure().job
            asked = datetime.now(UTC)
            retry = decision.get_retry_decision(exception=OSError(), job=job.evolve(attempts=attempt))
            assert retry is not None and retry.retry_at is not None
            waits.append((retry.retry_at - asked).total_seconds())
        assert decision.get_retry_decision(exception=OSError(), job=job.evolve(attempts=attempts - 1)) is None
    assert sum(waits) >= 24 * 3600  # a day of SMTP outage loses no email

    # With the attempts used up, the delivery fails where ops see it, and is sent once on replay.
    quick = make_app(OUTBOX_MAX_ATTEMPTS=1)
    smtp_server.refuse_next(50)
    sign_up(quick.test_client(), offline_stripe)
    run_jobs(quick)
    runner = quick.test_cli_runner()
    listed = runner.invoke(args=["billing", "emails", "--failed"])
    assert listed.exit_code == 0 and "signup.completed" in listed.output and "welcome_email" in listed.output
    status = runner.invoke(args=["billing", "status"])
    assert "outbox:deliver=" in status.output
    smtp_server.refusals = 0
    replayed = runner.invoke(args=["billing", "emails", "--replay-failed"])
    assert replayed.exit_code == 0 and "queued again" in replayed.output
    run_jobs(quick)
    assert len([m for m in smtp_server.messages if "Welcome" in str(m["Subject"])]) == 1
    assert runner.invoke(args=["billing", "emails", "--failed"]).output.strip() == "no failed deliveries"
    runner.invoke(args=["billing", "emails", "--replay-failed"])
    run_jobs(quick)
    assert len([m for m in smtp_server.messages if "Welcome" in str(m["Subject"])]) == 1
