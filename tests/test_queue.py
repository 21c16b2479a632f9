"""The job queue in the webhook pipeline: acknowledgement at intake, application by the worker from
Stripe's current object, coalescing, durability (Redis flush, a worker killed mid-job), the events
that are not ours or malformed (issue 11, leaks 5 and 6), two clocks (leak 7), status and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app.extensions import db
from app.services import domain_events, jobs, queue, stripe_objects
from tests.conftest import (
    SandboxAccount,
    SmtpSink,
    checkout_session_id,
    post_and_apply,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    start_signup,
    stripe_event,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def organization(app: Flask, offline_stripe: SandboxAccount) -> dict[str, Any]:
    session = sign_up(app.test_client(), offline_stripe)
    run_jobs(app)  # the welcome email and anything else the signup queued
    [row] = query(app, "SELECT * FROM organization")
    return {"id": row.id, "subscription_id": session["subscription"], "customer_id": session["customer"]}


def organization_row(app: Flask) -> Any:
    [row] = query(app, "SELECT * FROM organization")
    return row


def names(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def subscription_reads(stripe_api: SandboxAccount) -> int:
    return len(stripe_api.calls_to("subscriptions.retrieve"))


# --- Intake and application ------------------------------------------------------------------------


def test_the_request_stores_and_queues_and_the_worker_applies(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    reads = subscription_reads(offline_stripe)
    response = post_webhook(client, stripe_event("customer.subscription.updated", subscription))
    assert response.status_code == 200 and response.get_json() == {"received": True}
    # Acknowledged without calling Stripe or applying anything.
    assert subscription_reads(offline_stripe) == reads
    assert organization_row(app).billing_status == "active"
    [event] = query(app, "SELECT * FROM stripe_event WHERE type = 'customer.subscription.updated'")
    assert (event.status, event.object_key) == ("pending", f"subscription:{organization['subscription_id']}")
    # The request queues nothing: the stored event is the work, and a worker's dispatch pass gives its
    # object a job (every WORKER_DISPATCH_SECONDS, once the event is WEBHOOK_COALESCE_SECONDS old).
    assert query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'") == []
    queue.dispatch_now(app)
    [job] = query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")
    assert (job.status, job.lock, job.queueing_lock) == ("todo", f"stripe:{event.object_key}", None)
    queue.dispatch_now(app)  # a job waits for the object: nothing more is queued
    assert len(query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")) == 1

    run_jobs(app)
    assert organization_row(app).billing_status == "past_due"
    [event] = query(app, "SELECT * FROM stripe_event WHERE type = 'customer.subscription.updated'")
    assert event.status == "processed" and event.outcome.startswith("applied Stripe's current subscription")


def test_fifty_concurrent_deliveries_of_one_event_apply_it_once_and_send_one_email(
    app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    smtp_server.clear()
    ended = offline_stripe.change_subscription(organization["subscription_id"], status="canceled")
    event = stripe_event("customer.subscription.deleted", ended)
    barrier = threading.Barrier(50)
    statuses: list[int] = []

    def deliver() -> None:
        client = app.test_client()
        barrier.wait()
        statuses.append(post_webhook(client, event).status_code)

    threads = [threading.Thread(target=deliver) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 50
    run_jobs(app)
    run_jobs(app)
    assert organization_row(app).billing_status == "canceled"
    assert names(app)["organization.billing_status_changed"] == 1
    assert len(query(app, "SELECT id FROM stripe_event WHERE event_id = :e", e=event["id"])) == 1
    ended_emails = [m for m in smtp_server.messages if m["Subject"] == "Your subscription has ended"]
    assert len(ended_emails) == 1 and "ada@example.com" in str(ended_emails[0]["To"])


def test_two_hundred_events_for_one_subscription_cost_at_most_two_stripe_reads(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    reads = subscription_reads(offline_stripe)
    for n in range(200):
        status = ("active", "unpaid", "past_due")[n % 3]
        subscription = offline_stripe.change_subscription(organization["subscription_id"], status=status)
        assert post_webhook(client, stripe_event("customer.subscription.updated", subscription)).status_code == 200
    # One job is queued for the subscription, however many events wait for it.
    queue.dispatch_now(app)
    assert len(query(app, "SELECT id FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")) == 1
    run_jobs(app)
    assert subscription_reads(offline_stripe) - reads <= 2
    assert organization_row(app).billing_status == "unpaid"  # Stripe's state after the 200th change
    outcomes = Counter(row.status for row in query(app, "SELECT status FROM stripe_event WHERE type LIKE 'customer.%'"))
    assert outcomes == {"processed": 200}


def test_a_redis_flush_while_jobs_wait_loses_none(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount, smtp_server: SmtpSink
) -> None:
    smtp_server.clear()
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    post_webhook(client, stripe_event("customer.subscription.updated", subscription))
    invoice = {"id": "in_flush", "object": "invoice", "customer": organization["customer_id"], "amount_due": 2900}
    post_webhook(client, stripe_event("invoice.payment_failed", invoice))
    queue.dispatch_now(app)
    waiting = query(app, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")[0][0]
    assert waiting == 2
    app.extensions["redis"].flushdb()
    run_jobs(app)
    assert organization_row(app).billing_status == "past_due"
    assert organization_row(app).last_payment_status == "failed"
    assert [m["Subject"] for m in smtp_server.messages] == ["Your payment failed"]
    assert "$29.00" in smtp_server.messages[0].get_body(preferencelist=("plain",)).get_content()


# --- Leak 5: events about objects that are not ours ------------------------------------------------


def test_a_subscription_stripe_does_not_know_is_ignored_with_the_reason(
    client: FlaskClient, app: Flask, offline_stripe: SandboxAccount
) -> None:
    foreign = {"id": "sub_OtherEnvironment1", "object": "subscription", "status": "active", "metadata": {}}
    response = post_and_apply(client, stripe_event("customer.subscription.updated", foreign))
    assert response.status_code == 200
    [row] = query(app, "SELECT status, outcome FROM stripe_event")
    assert (row.status, row.outcome) == (
        "ignored",
        "not ours: this Stripe account has no subscription sub_OtherEnvironment1",
    )


def test_a_subscription_no_organization_holds_and_not_from_our_signups_is_ignored(
    client: FlaskClient, app: Flask, offline_stripe: SandboxAccount
) -> None:
    # A subscription in the shared Stripe account created by another environment: no metadata of ours.
    session = offline_stripe.pay(checkout_session_id(start_signup(app.test_client())))
    foreign = offline_stripe.change_subscription(session["subscription"], metadata={})
    response = post_and_apply(client, stripe_event("customer.subscription.updated", foreign))
    assert response.status_code == 200
    [row] = query(app, "SELECT status, outcome FROM stripe_event")
    assert row.status == "ignored" and row.outcome.startswith("not ours: no organization holds this subscription")
    assert query(app, "SELECT id FROM organization") == []


def test_a_checkout_of_another_environment_is_ignored_at_intake(client: FlaskClient, app: Flask) -> None:
    foreign = {"id": "cs_test_elsewhere1", "object": "checkout.session", "metadata": {"purpose": "other-app"}}
    response = post_webhook(client, stripe_event("checkout.session.completed", foreign))
    assert response.status_code == 200 and response.get_json()["ignored"] == "not ours: not a checkout this app created"
    assert query(app, "SELECT count(*) FROM procrastinate_jobs")[0][0] == 0


# --- Leak 6: signed events with malformed objects --------------------------------------------------

SUBSCRIPTION = {"object": "subscription", "status": "active", "metadata": {}}


@pytest.mark.parametrize(
    ("event_type", "obj", "reason"),
    [
        ("customer.subscription.updated", SUBSCRIPTION, "Object missing required field `id`"),
        ("customer.subscription.updated", {**SUBSCRIPTION, "id": 42}, "Expected `str`, got `int` - at `$.id`"),
        ("customer.subscription.updated", {**SUBSCRIPTION, "id": "sub_\x00evil"}, "at `$.id`"),
        ("customer.subscription.updated", {**SUBSCRIPTION, "id": "sub_1x", "status": ["active"]}, "at `$.status`"),
        ("customer.subscription.updated", {**SUBSCRIPTION, "id": "sub_1x", "metadata": {"a": "b\x00"}}, "$.metadata"),
        (
            "customer.subscription.updated",
            {
                **SUBSCRIPTION,
                "id": "sub_1x",
                "items": {"data": [{"id": "si_1x", "price": {"id": "p_1"}, "quantity": "2"}]},
            },
            "at `$.items.data[0].quantity`",
        ),
        ("checkout.session.completed", {"id": None, "metadata": {"purpose": "signup"}}, "at `$.id`"),
        ("checkout.session.completed", {"id": "cs_test_1x", "metadata": "signup"}, "at `$.metadata`"),
        ("invoice.payment_failed", {"id": "in_1x", "customer": {"no": "id"}}, "at `$.customer"),
        ("invoice.paid", {"id": "in_1x"}, "it names no customer"),
    ],
)
def test_a_malformed_object_is_stored_as_failed_with_a_reason_and_nothing_applied(
    client: FlaskClient, app: Flask, event_type: str, obj: dict[str, Any], reason: str
) -> None:
    event = stripe_event(event_type, obj)
    response = post_webhook(client, event)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert reason in response.get_json()["failed"]
    [row] = query(app, "SELECT status, last_error, object_key, payload FROM stripe_event")
    assert row.status == "failed" and reason in row.last_error and row.object_key is None
    assert row.last_error.isprintable() and "Traceback" not in row.last_error
    assert json.loads(row.payload) == event  # kept whole, for a replay after a fix
    assert query(app, "SELECT count(*) FROM procrastinate_jobs")[0][0] == 0
    run_jobs(app)
    assert query(app, "SELECT count(*) FROM domain_event")[0][0] == 0
    listing = app.test_cli_runner().invoke(args=["billing", "events", "--status", "failed"])
    assert event["id"] in listing.output and reason in listing.output


def test_a_metered_item_without_a_quantity_is_valid_and_applies(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    metered = {"id": "si_metered1", "object": "subscription_item", "price": {"id": "price_usage"}, "quantity": None}
    payload = {**subscription, "items": {**subscription["items"], "data": [*subscription["items"]["data"], metered]}}
    response = post_and_apply(client, stripe_event("customer.subscription.updated", payload))
    assert response.get_json() == {"received": True}
    assert organization_row(app).billing_status == "past_due"
    [row] = query(app, "SELECT status FROM stripe_event WHERE type = 'customer.subscription.updated'")
    assert row.status == "processed"
    # Read back from Stripe with such an item, the subscription still maps (the item counts as 0).
    from app.services.subscription_state import SubscriptionState

    with app.app_context():
        state = SubscriptionState.from_stripe(
            stripe_objects.subscription_for_state(payload), app.extensions["plan_catalogue"]
        )
    assert state.subscription_id == organization["subscription_id"]


def test_a_failed_event_is_replayed_after_a_fix(
    client: FlaskClient,
    app: Flask,
    organization: dict[str, Any],
    offline_stripe: SandboxAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    # Stripe starts sending a field in a shape this version cannot read.
    event = stripe_event("customer.subscription.updated", {**subscription, "cancel_at_period_end": "soon"})
    assert "failed" in post_and_apply(client, event).get_json()
    runner = app.test_cli_runner()
    again = runner.invoke(args=["billing", "replay", event["id"]])
    assert again.exit_code == 1 and "failed again: malformed Subscription object" in again.output
    assert organization_row(app).billing_status == "active"

    # The fix (a reader that accepts the new shape) is deployed; the event is replayed and applied.
    strict = stripe_objects.read_for_event

    def tolerant(event_type: str, obj: Any) -> Any:
        return strict(event_type, {k: v for k, v in obj.items() if k != "cancel_at_period_end"})

    monkeypatch.setattr(stripe_objects, "read_for_event", tolerant)
    replay = runner.invoke(args=["billing", "replay", event["id"]])
    assert replay.exit_code == 0 and "queued (subscription:" in replay.output
    run_jobs(app)
    assert organization_row(app).billing_status == "past_due"
    [row] = query(app, "SELECT status, last_error FROM stripe_event WHERE event_id = :e", e=event["id"])
    assert (row.status, row.last_error) == ("processed", None)


# --- Leak 7: two clocks -----------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [90, -90])
def test_ordering_does_not_depend_on_our_clock_agreeing_with_stripes(
    client: FlaskClient, app: Flask, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    """Our clock runs 90 s ahead of (or behind) Stripe's, which stamps events with its own. The skew is
    applied at the one clock every billing module reads (app/clock.py)."""
    from app import clock

    real = clock.timestamp
    monkeypatch.setattr(clock, "timestamp", lambda: real() + skew)
    assert abs(clock.now() - int(time.time()) - skew) <= 1  # the seam moves what billing reads
    session = sign_up(app.test_client(), offline_stripe)  # provisioned with our (skewed) clock
    stripe_now = int(time.time())
    subscription_id = session["subscription"]

    # A newer change at Stripe, stamped by Stripe's clock: applied, never settled as stale.
    past_due = offline_stripe.change_subscription(subscription_id, status="past_due")
    post_and_apply(client, stripe_event("customer.subscription.updated", past_due, created=stripe_now))
    assert organization_row(app).billing_status == "past_due"

    # An older event delivered late (its payload says active): it never wins over Stripe's state.
    stale = {**past_due, "status": "active"}
    post_and_apply(client, stripe_event("customer.subscription.updated", stale, created=stripe_now - 60))
    assert organization_row(app).billing_status == "past_due"

    # Stripe moves on; the event carries a timestamp older than anything we hold: still applied.
    unpaid = offline_stripe.change_subscription(subscription_id, status="unpaid")
    post_and_apply(client, stripe_event("customer.subscription.updated", unpaid, created=stripe_now - 120))
    assert organization_row(app).billing_status == "unpaid"
    assert not [row for row in query(app, "SELECT outcome FROM stripe_event") if "stale" in (row.outcome or "")]


# --- Durability: a worker killed mid-job --------------------------------------------------------------


def _trial_email_held_at_smtp(app: Flask, organization: dict[str, Any], smtp_server: SmtpSink) -> int:
    """A trial-ending email waiting in the outbox, with the SMTP server set to hold the next message
    (so a worker is caught mid-job); returns the domain event's id."""
    smtp_server.clear()
    with app.app_context():
        row = domain_events.record(
            "subscription.trial_will_end", organization_id=organization["id"], source="test", trial_end=None
        )
        db.session.flush()
        event_id = row.id
        db.session.commit()
    smtp_server.hold_messages()
    return event_id


def _outbox_worker(database_url: str, smtp_server: SmtpSink, **settings: str) -> subprocess.Popen[bytes]:
    """A real `flask billing worker` process on the outbox queue, as production runs it."""
    env = {
        **os.environ,
        "APP_ENV": "test",
        "FLASK_APP": "wsgi.py",
        "TEST_DATABASE_URL": database_url,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_server.port),
        **settings,
    }
    command = [sys.executable, "-m", "flask", "billing", "worker", "--queue", "outbox", "--concurrency", "1"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


def test_a_worker_killed_mid_job_leaves_nothing_half_done_and_the_job_runs_again(
    app: Flask, organization: dict[str, Any], smtp_server: SmtpSink, database_url: str
) -> None:
    event_id = _trial_email_held_at_smtp(app, organization, smtp_server)
    # A real worker process, as `flask billing worker` runs in production.
    worker = _outbox_worker(database_url, smtp_server)
    try:
        assert smtp_server.held.wait(60), "the worker never reached the SMTP server"
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
        smtp_server.holding = False
        smtp_server.release.set()
    # The job was running: no delivery is recorded (the message was never accepted), the job is stuck
    # in "doing" under a dead worker.
    mine = "SELECT status, attempts FROM procrastinate_jobs WHERE args->>'domain_event_id' = :e"
    [job] = query(app, mine, e=str(event_id))
    assert job.status == "doing"
    delivered = "SELECT consumer FROM outbox_delivery WHERE domain_event_id = :e"
    assert query(app, delivered, e=event_id) == []
    assert smtp_server.messages == []

    # The dead worker's heartbeat stops; the stalled job is queued again and runs once more.
    time.sleep(1.5)
    queue.bind(app)
    assert jobs.requeue_stalled_jobs_now(queue.job_app(app), seconds_since_heartbeat=1) == 1
    run_jobs(app)
    assert [m["Subject"] for m in smtp_server.messages] == [
        "Your trial ends in three days"
    ] or smtp_server.messages == []
    [job] = query(app, mine, e=str(event_id))
    assert job.status == "succeeded"
    assert query(app, delivered, e=event_id) == [("trial_ending_email",)]


def test_a_killed_workers_claim_is_a_lease_another_worker_takes_over_on_its_own(
    app: Flask, organization: dict[str, Any], smtp_server: SmtpSink, database_url: str
) -> None:
    """No one calls the recovery here: the second worker process notices by itself that the first one
    stopped beating its heartbeat (WORKER_STALLED_SECONDS) and runs its claimed job again."""
    event_id = _trial_email_held_at_smtp(app, organization, smtp_server)
    # Short leases, so the test does not wait long; the defaults are 2, 10 and 5 seconds. Only the
    # outbox queue: the maintenance schedule's recovery job never runs in these workers.
    leases = {"WORKER_HEARTBEAT_SECONDS": "0.2", "WORKER_STALLED_SECONDS": "1", "WORKER_RECOVERY_SECONDS": "0.2"}

    def start_worker() -> subprocess.Popen[bytes]:
        return _outbox_worker(database_url, smtp_server, **leases)

    mine = "SELECT status, attempts, worker_id FROM procrastinate_jobs WHERE args->>'domain_event_id' = :e"
    first = start_worker()
    second: subprocess.Popen[bytes] | None = None
    try:
        assert smtp_server.held.wait(60), "the worker never reached the SMTP server"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        [claimed] = query(app, mine, e=str(event_id))
        assert claimed.status == "doing"  # claimed by a worker that is gone
        smtp_server.holding = False
        smtp_server.release.set()
        second = start_worker()
        deadline = time.monotonic() + 120  # a bound on waiting, not a measurement (make bench times it)
        while time.monotonic() < deadline and query(app, mine, e=str(event_id))[0].status != "succeeded":
            time.sleep(0.2)
    finally:
        for worker in (first, second):
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        smtp_server.holding = False
        smtp_server.release.set()
    [job] = query(app, mine, e=str(event_id))
    assert job.status == "succeeded" and job.worker_id != claimed.worker_id
    delivered = "SELECT consumer FROM outbox_delivery WHERE domain_event_id = :e"
    assert query(app, delivered, e=event_id) == [("trial_ending_email",)]
    assert [m["Subject"] for m in smtp_server.messages] == ["Your trial ends in three days"]


def test_two_workers_recovering_the_same_dead_job_queue_it_once_and_fail_nothing(
    app: Flask, organization: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker looks for dead workers' jobs: the one that comes second finds the job queued
    already, and leaves it alone (it must not mark it failed)."""
    with app.app_context():
        domain_events.record("subscription.trial_will_end", organization_id=organization["id"], source="test")
        db.session.commit()
        dead = (
            db.session.execute(
                text(
                    "UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL WHERE task_name LIKE 'outbox:%' "
                    "AND status = 'todo' RETURNING id"
                )
            )
            .scalars()
            .all()
        )
        db.session.commit()
    queue.bind(app)
    jobs_app = queue.job_app(app)
    seen: list[Any] = []
    get_stalled_jobs = jobs_app.job_manager.get_stalled_jobs

    async def stalled_as_first_seen(**kwargs: Any) -> Any:
        if not seen:  # both recoveries read the job as "doing"; the first queues it again
            seen.extend(await get_stalled_jobs(**kwargs))
        return list(seen)

    monkeypatch.setattr(jobs_app.job_manager, "get_stalled_jobs", stalled_as_first_seen)
    assert jobs.requeue_stalled_jobs_now(jobs_app, seconds_since_heartbeat=0) == len(dead) > 0
    assert jobs.requeue_stalled_jobs_now(jobs_app, seconds_since_heartbeat=0) == 0
    statuses = query(app, "SELECT DISTINCT status FROM procrastinate_jobs WHERE id = ANY(:ids)", ids=list(dead))
    assert [row.status for row in statuses] == ["todo"]


# --- Status and metrics ------------------------------------------------------------------------------


def test_status_and_metrics_show_the_queue(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(METRICS_TOKEN="metrics-token-for-tests", JOB_MAX_ATTEMPTS=1)
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    unknown = {"id": "sub_Unknown1", "object": "subscription", "status": "active"}
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    post_and_apply(client, stripe_event("customer.subscription.updated", unknown))  # fails for good
    post_webhook(client, stripe_event("customer.subscription.updated", {**unknown, "id": "sub_Unknown2"}))
    queue.dispatch_now(app)

    status = app.test_cli_runner().invoke(args=["billing", "status", "--json"])
    figures = json.loads(status.output)
    assert figures["jobs"]["todo"] == 1 and figures["jobs"]["failed"] == 1
    assert figures["failed_jobs_by_task"] == {"webhooks:apply": 1}
    assert figures["webhook_events"]["pending"] == 1 and figures["webhook_events"]["failed"] == 1
    assert figures["oldest_waiting_seconds"] >= 0
    text = app.test_cli_runner().invoke(args=["billing", "status"]).output
    assert "todo=1" in text and "webhooks:apply=1" in text

    metrics = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-for-tests"})
    assert metrics.status_code == 200
    body = metrics.get_data(as_text=True)
    assert 'billing_jobs{state="todo"} 1.0' in body
    assert 'billing_failed_jobs{task="webhooks:apply"} 1.0' in body
    assert 'billing_webhook_events{status="pending"} 1.0' in body
    assert "billing_oldest_waiting_job_age_seconds" in body


def test_metrics_are_not_found_without_a_token(client: FlaskClient) -> None:
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 404


# --- A Stripe brownout --------------------------------------------------------------------------------


def test_a_stripe_brownout_slows_neither_pages_nor_webhook_acknowledgements(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    """Every Stripe call takes 5 s while the worker is applying events: a page that does not call
    Stripe still answers in under 100 ms, and webhooks are still acknowledged at intake speed."""
    app = make_app(WORKER_CONCURRENCY=2)
    owner = app.test_client()
    session = sign_up(owner, offline_stripe)
    run_jobs(app)
    subscription = offline_stripe.subscription(session["subscription"])
    sender = app.test_client()
    offline_stripe.set_latency(5)
    try:
        # Work for the worker, each job waiting 5 s on Stripe.
        for n in range(2):
            post_webhook(sender, stripe_event("customer.subscription.updated", {**subscription, "id": f"sub_Slow{n}x"}))
        worker = threading.Thread(target=queue.run_pending_jobs, args=(app,), kwargs={"concurrency": 2})
        worker.start()
        time.sleep(0.5)  # the worker is now waiting on Stripe
        pages: list[float] = []
        acks: list[float] = []
        for _ in range(20):
            started = time.perf_counter()
            page = owner.get("/app")
            pages.append(time.perf_counter() - started)
            assert page.status_code == 200 and "Analytical Engines" in page.get_data(as_text=True)
            event = stripe_event("customer.subscription.updated", subscription)
            started = time.perf_counter()
            ack = post_webhook(sender, event)
            acks.append(time.perf_counter() - started)
            assert ack.status_code == 200 and ack.get_json() == {"received": True}
        assert worker.is_alive(), "the worker finished before the measurements: Stripe was not slow"
        assert offline_stripe.calls_to("subscriptions.retrieve"), "the worker never waited on Stripe"
    finally:
        offline_stripe.set_latency(0)
    worker.join(60)
    pages.sort()
    acks.sort()
    assert pages[len(pages) // 2] < 0.100, pages  # the median page: well under 100 ms
    assert max(pages) < 1.0, pages  # and none waited on Stripe's 5 s
    assert acks[len(acks) // 2] < 0.100 and max(acks) < 1.0, acks
    run_jobs(app)
    assert query(app, "SELECT count(*) FROM stripe_event WHERE status = 'pending'")[0][0] == 0
