"""Acknowledged means applied, under faults (issue 20): organizations live through plan and seat
changes, failed payments and recoveries, scheduled cancellations and cancellations at the offline
Stripe, while deliveries are dropped (and redelivered, as Stripe retries), doubled, shuffled and sent
concurrently; real worker processes apply them while Stripe is slow, one worker is SIGKILLed with jobs
in flight, the app's PostgreSQL connections are cut, Redis is flushed, SMTP refuses mail for a while
and Stripe answers 429. The organizations also record metered usage through the usage API all along
(each request sent twice at once), and the workers report it to Stripe's meter events through those
faults (the killed worker may hold the report job; Stripe's meter events answer 429 too). After the
workers drain: no acknowledged event is left unapplied (before any reconcile), every organization
equals its subscription at Stripe, every email was sent once, Stripe's meter event summary of each
customer equals our billed total to the unit, and reconcile finds nothing to repair.

Seeded and reproducible: CHAOS_SEED (default: a fixed one for CI), CHAOS_ORGS (3) and CHAOS_ROUNDS (1:
one round meeting every fault); `make chaos` runs a longer one (scripts/chaos). The seed is printed
and is in every failure message."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import text

from app.extensions import db
from app.services import jobs, queue, usage_reports
from app.services.billing_service import BillingService
from tests.conftest import (
    SandboxAccount,
    SmtpSink,
    query,
    run_jobs,
    sign_up,
    worker_env,
)
from tests.test_usage_api import create_api_key, post_usage
from tests.test_usage_reports import meter_summary_total

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CHAOS_SEED", "20"))
ORGS = int(os.environ.get("CHAOS_ORGS", "3"))
ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "1"))
FAULTS = ("slow_kill", "cut_db", "flush_redis", "smtp_down", "throttle")
# One round meets every fault; longer runs meet three a round, drawn by the seed.
FAULTS_PER_ROUND = len(FAULTS) if ROUNDS == 1 else 3
DRAIN_SECONDS = float(os.environ.get("CHAOS_DRAIN_SECONDS", "60"))
WHY = f"(chaos seed {SEED}, {ORGS} organizations, {ROUNDS} rounds: CHAOS_SEED={SEED} reproduces it)"


class Workers:
    """`flask billing worker` processes, as production runs them, on the test database and Redis."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, **settings: str) -> subprocess.Popen[bytes]:
        """One more worker; `settings` are environment variables of its own (WORKER_STALLED_SECONDS...)."""
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "billing", "worker", "--concurrency", "2"],
            cwd=ROOT,
            env={**self.env, **settings},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def workers(app: Flask, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount) -> Iterator[Workers]:
    running = Workers(worker_env(app, smtp_server, stripe_sandbox))
    yield running
    running.stop()


def execute(app: Flask, sql: str, **params: Any) -> list[Any]:
    with app.app_context():
        rows = list(db.session.execute(text(sql), params).all())
        db.session.commit()
        return rows


# --- what happens to the organizations at Stripe --------------------------------------------------


def act(stripe_api: SandboxAccount, subscription_id: str, rng: random.Random) -> str:
    """One change at Stripe to a subscription still alive; returns what it was."""
    current = stripe_api.subscription(subscription_id)
    if current["status"] == "canceled":
        return "nothing (canceled)"
    choice = rng.choice(["seats", "plan", "payment_failed", "recovered", "cancel_at_period_end", "resume", "cancel"])
    if choice == "seats":
        tier = _tier_key(current)
        stripe_api.change_subscription(subscription_id, lookup_keys={tier: 1, "extra_seat_monthly": rng.randint(1, 5)})
    elif choice == "plan":
        stripe_api.change_subscription(
            subscription_id, lookup_keys={rng.choice(["starter_monthly", "pro_monthly", "business_monthly"]): 1}
        )
    elif choice == "payment_failed":
        stripe_api.force(subscription_id, status="past_due", emit="customer.subscription.updated")
    elif choice == "recovered":
        stripe_api.force(subscription_id, status="active", emit="customer.subscription.updated")
    elif choice in ("cancel_at_period_end", "resume"):
        stripe_api.api(
            "POST", f"/v1/subscriptions/{subscription_id}", {"cancel_at_period_end": choice == "cancel_at_period_end"}
        )
    else:
        stripe_api.api("DELETE", f"/v1/subscriptions/{subscription_id}")
    return choice


def _tier_key(subscription: dict[str, Any]) -> str:
    for item in subscription["items"]["data"]:
        key = (item.get("price") or {}).get("lookup_key") or ""
        if not key.startswith("extra_seat"):
            return str(key)
    return "starter_monthly"


# --- deliveries, as a bad network and Stripe's retries make them -----------------------------------


def deliver(app: Flask, events: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Post the events from 4 threads at once, shuffled; a third of the first attempts are dropped
    before they reach the app. Returns the deliveries to be retried (dropped or not acknowledged)."""
    rng.shuffle(events)
    dropped = [event for event in events if rng.random() < 0.3]
    if events and len(dropped) == len(events):
        dropped.pop()  # something gets through in every round
    sent = [event for event in events if all(event is not other for other in dropped)]

    def post(event: dict[str, Any]) -> dict[str, Any] | None:
        response = app.test_client().post(
            "/billing/webhooks/stripe", data=event["payload"].encode(), headers=event["headers"]
        )
        return None if 200 <= response.status_code < 300 else event

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [event for event in pool.map(post, sent) if event is not None]
    return dropped + failed


def cut_database_connections(app: Flask) -> int:
    """pg_terminate_backend on every connection to the test database but this one: the web app's
    pools and the workers' (the shared server itself is not restarted)."""
    rows = execute(
        app,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()
    return len(rows)


def kill_a_worker_mid_job(app: Flask, workers: Workers, stripe_api: SandboxAccount, known: set[int]) -> bool:
    """SIGKILL the newest worker while it has a job running (Stripe slow, so jobs stay in flight); its
    heartbeat is then made old, as 30 s without one would make it, and the stalled jobs recovered."""
    victim = workers.processes[-1]
    deadline = time.monotonic() + 30
    worker_ids: set[int] = set()
    while time.monotonic() < deadline:
        rows = execute(app, "SELECT id FROM procrastinate_workers")
        worker_ids = {row.id for row in rows} - known
        if worker_ids and execute(
            app,
            "SELECT 1 FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = ANY(:ids)",
            ids=list(worker_ids),
        ):
            break
        time.sleep(0.05)
    else:
        print(
            "chaos: no job in flight:",
            worker_ids,
            known,
            victim.poll(),
            execute(app, "SELECT task_name, status, worker_id FROM procrastinate_jobs WHERE status <> 'succeeded'"),
            execute(app, "SELECT id, last_heartbeat FROM procrastinate_workers"),
        )
        return False
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    execute(
        app,
        "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' WHERE id = ANY(:ids) RETURNING id",
        ids=list(worker_ids),
    )
    queue.bind(app)
    jobs.requeue_stalled_jobs_now(queue.job_app(app), seconds_since_heartbeat=30)
    return True


def clear_faults(stripe_api: SandboxAccount) -> None:
    stripe_api.http.delete(f"{stripe_api.url}/_sandbox/faults", timeout=10).raise_for_status()


def wait_for_new_worker(app: Flask, known: set[int]) -> set[int]:
    """The ids of the workers registered once one more than `known` is."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ids = {row.id for row in execute(app, "SELECT id FROM procrastinate_workers")}
        if ids - known:
            return ids
        time.sleep(0.1)
    raise AssertionError(f"no worker started {WHY}")


def drain(app: Flask, deadline: float) -> None:
    """Wait for the workers to apply every stored event and run every due job."""
    while time.monotonic() < deadline:
        [row] = execute(
            app,
            "SELECT (SELECT count(*) FROM stripe_event WHERE status = 'pending') AS pending, "
            "(SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
            " AND (scheduled_at IS NULL OR scheduled_at < now() + interval '30 seconds') "
            " AND queue_name <> 'maintenance') AS jobs",
        )
        if row.pending == 0 and row.jobs == 0:
            return
        if os.environ.get("CHAOS_VERBOSE"):
            print(
                "chaos drain:",
                execute(
                    app,
                    "SELECT task_name, status, scheduled_at > now() AS later, attempts, "
                    "worker_id FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
                ),
            )
            time.sleep(2)
        time.sleep(0.2)
    pending = execute(app, "SELECT event_id, type, last_error, attempts FROM stripe_event WHERE status = 'pending'")
    waiting = execute(
        app, "SELECT task_name, status, args, attempts FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    )
    raise AssertionError(f"the workers did not drain {WHY}: pending events {pending}, jobs {waiting}")


# --- metered usage, recorded through the API and reported by the workers ---------------------------


def queue_report(app: Flask) -> None:
    """What the every-minute schedule does (jobs.report_usage), now rather than at the next minute; a
    report job already waiting does it instead."""
    with app.app_context():
        queue.defer(
            "usage:report",
            queue="maintenance",
            lock="report_usage",
            queueing_lock="report_usage",
            timestamp=int(time.time()),
        )
        db.session.commit()


def record_usage(app: Flask, keys: list[str], round_number: int, rng: random.Random) -> Counter[int]:
    """Each organization's service records two usage events through the API (together past what Starter
    includes), each request sent twice at once (a client retrying); returns the answers' statuses. A
    canceled organization's may be refused: what counts is that we and Stripe agree on what was billed."""
    posts = []
    for key in keys:
        for event in range(2):
            quantity = rng.randint(500, 1500)
            body = {"meter": "api_calls", "quantity": quantity, "idempotency_key": f"{round_number}-{event}"}
            posts += [(key, body), (key, body)]
    rng.shuffle(posts)

    def post(item: tuple[str, dict[str, Any]]) -> int:
        status: int = post_usage(app, item[0], item[1]).status_code
        return status

    with ThreadPoolExecutor(max_workers=4) as pool:
        return Counter(pool.map(post, posts))


def finish_reports(app: Flask, deadline: float) -> None:
    """The workers' next report runs, until none is pending and no billed usage is unreported."""
    report_jobs = (
        "SELECT id, status, worker_id, attempts FROM procrastinate_jobs "
        "WHERE task_name = 'usage:report' AND status IN ('todo', 'doing')"
    )
    while True:
        with app.app_context():
            counts = usage_reports.counts()
        running = execute(app, report_jobs)
        if counts.pending == 0 and counts.unreported_events == 0 and not running:
            return
        if time.monotonic() > deadline:  # where the report job is stuck, for whoever reads the failure
            busy = execute(
                app,
                "SELECT pid, application_name, state, wait_event_type, wait_event, left(query, 120) AS query "
                "FROM pg_stat_activity WHERE datname = current_database() AND state <> 'idle' "
                "AND pid <> pg_backend_pid()",
            )
            raise AssertionError(f"usage was not reported in time {WHY}: {counts}; jobs {running}; database {busy}")
        if not running:
            queue_report(app)
        time.sleep(0.2)


def assert_stripe_counts_our_usage(app: Flask, stripe_api: SandboxAccount) -> int:
    """Every report sent, none failed, and each customer's meter event summary at Stripe equal to the
    usage we billed it, to the unit; returns the units billed."""
    statuses = Counter(row.status for row in query(app, "SELECT status FROM usage_report"))
    assert set(statuses) <= {"sent"}, f"usage reports {dict(statuses)} {WHY}"
    billed = query(
        app,
        "SELECT o.billing_customer_id AS customer, COALESCE(SUM(t.billable), 0) AS billable "
        "FROM organization o LEFT JOIN usage_period_total t ON t.organization_id = o.id "
        "WHERE o.billing_customer_id IS NOT NULL GROUP BY o.billing_customer_id",
    )
    for row in billed:
        at_stripe = meter_summary_total(stripe_api, row.customer)
        assert at_stripe == row.billable, f"{row.customer}: {at_stripe} at Stripe, {row.billable} billed {WHY}"
    return sum(int(row.billable) for row in billed)


def chaos_round(
    app: Flask,
    stripe_api: SandboxAccount,
    smtp_server: SmtpSink,
    workers: Workers,
    events: list[dict[str, Any]],
    faults: list[str],
    rng: random.Random,
    known_workers: set[int],
    *,
    first: bool,
) -> tuple[set[int], list[dict[str, Any]]]:
    """Deliver one round's events with its faults; returns the workers now known and what to redeliver."""
    if "throttle" in faults:  # Stripe answers 429 to the next reads; it takes a meter event and times out, then 429
        throttle = {"path_regex": "/v1/subscriptions/[^/]+", "method": "GET", "kind": "rate_limit"}
        stripe_api.http.post(
            f"{stripe_api.url}/_sandbox/faults", json={**throttle, "times": 3, "retry_after": 1}, timeout=10
        ).raise_for_status()
        metered = {"path": "/v1/billing/meter_events", "method": "POST"}
        for kind in ("lost_response", "rate_limit"):
            stripe_api.http.post(
                f"{stripe_api.url}/_sandbox/faults", json={**metered, "kind": kind, "times": 1}, timeout=10
            ).raise_for_status()
    if "smtp_down" in faults:
        smtp_server.refuse_next(rng.randint(1, 4))
    queue_report(app)  # the workers report the round's usage through its faults
    others = [process for process in workers.processes[:-1] if process.poll() is None]
    if "slow_kill" not in faults:
        return known_workers, deliver(app, events, rng)
    wait_for_new_worker(app, known_workers)  # the one to be killed is up
    stripe_api.set_latency(3.0)  # Stripe is slow: jobs stay in flight
    for process in others:  # the other workers hang for a while, so the newest one takes the jobs
        process.send_signal(signal.SIGSTOP)
    try:
        # Watched while the deliveries go on: the worker dies as soon as it holds a job.
        with ThreadPoolExecutor(max_workers=1) as watcher:
            killing = watcher.submit(kill_a_worker_mid_job, app, workers, stripe_api, known_workers)
            retry = deliver(app, events, rng)
            killed = killing.result()
    finally:
        for process in others:
            process.send_signal(signal.SIGCONT)
        stripe_api.set_latency(0)
    known_workers = {row.id for row in execute(app, "SELECT id FROM procrastinate_workers")}
    workers.start()  # the replacement, the next one to be killed
    assert killed or not first, f"no job was ever in flight to kill {WHY}"
    print(f"chaos: a worker was {'SIGKILLed mid-job' if killed else 'not caught mid-job'}")
    return known_workers, retry


def assert_organizations_follow_stripe(app: Flask, stripe_api: SandboxAccount, subscriptions: list[str]) -> None:
    for subscription_id in subscriptions:
        at_stripe = stripe_api.subscription(subscription_id)
        [organization] = query(
            app,
            "SELECT billing_status, cancel_at_period_end, tier FROM organization WHERE billing_subscription_id = :s",
            s=subscription_id,
        )
        expected_status = {"past_due": "past_due", "canceled": "canceled"}.get(at_stripe["status"], at_stripe["status"])
        assert organization.billing_status == expected_status, f"{subscription_id}: {organization} {WHY}"
        if at_stripe["status"] != "canceled":  # an ended subscription has nothing scheduled any more
            scheduled = bool(at_stripe["cancel_at_period_end"])
            assert organization.cancel_at_period_end == scheduled, f"{subscription_id} {WHY}"


# --- the test ----------------------------------------------------------------------------------


def test_acknowledged_events_are_applied_whatever_fails(
    make_app: Callable[..., Flask],
    offline_stripe: SandboxAccount,
    smtp_server: SmtpSink,
    workers: Workers,
    redis_url: str,
) -> None:
    started = time.monotonic()
    print(f"chaos: seed {SEED}, {ORGS} organizations, {ROUNDS} rounds")
    rng = random.Random(SEED)
    # Every organization signs up from the test's one address: the signup limit is not under test here.
    app = make_app(JOB_RETRY_BASE_SECONDS=1, JOB_RETRY_MAX_WAIT_SECONDS=2, SIGNUP_RATE_LIMIT_PER_CLIENT="1000/minute")
    # The organizations sign up (applied in-process, before the chaos starts).
    subscriptions: list[str] = []
    api_keys: list[str] = []  # each organization's key to the usage API
    for number in range(ORGS):
        owner = app.test_client()
        email = f"owner{number}-{SEED}@example.com"
        # Paid on Checkout as the account's email (Stripe shows the signup's customer_email read-only):
        # reconcile compares the customer's email with the account's.
        session = sign_up(owner, offline_stripe, email=email, organization_name=f"Chaos {number}")
        subscriptions.append(str(session["subscription"]))
        api_keys.append(create_api_key(owner, "metering"))
    offline_stripe.deliver(app.test_client())
    run_jobs(app)
    smtp_server.clear()
    offline_stripe.http.post(
        f"{offline_stripe.url}/_sandbox/delivery", json={"duplicate_rate": 0.3, "reorder": True}, timeout=10
    ).raise_for_status()
    print(f"chaos: {ORGS} signups in {time.monotonic() - started:.1f} s")
    workers.start()
    known_workers = wait_for_new_worker(app, set())
    workers.start()
    retry: list[dict[str, Any]] = []
    try:
        for number in range(ROUNDS):
            clear_faults(offline_stripe)  # the test's own reads at Stripe are not the app's to be throttled
            actions = [act(offline_stripe, subscription, rng) for subscription in subscriptions]
            print(f"chaos round {number}: {actions}")
            usage = record_usage(app, api_keys, number, rng)
            print(f"chaos round {number}: usage answered {dict(usage)}")
            events = offline_stripe.take_events() + retry
            faults = rng.sample(FAULTS, k=FAULTS_PER_ROUND)
            if number == 0 and "slow_kill" not in faults:
                faults[0] = "slow_kill"  # every run kills a worker mid-job once
            print(f"chaos round {number}: faults {faults}")
            known_workers, retry = chaos_round(
                app, offline_stripe, smtp_server, workers, events, faults, rng, known_workers, first=number == 0
            )
            # The next report run, still under the round's faults: the cut may meet its worker recording
            # the job's outcome, which the worker writes again (job_outcomes, issue 20).
            queue_report(app)
            if "cut_db" in faults:
                cut_database_connections(app)
            if "flush_redis" in faults:
                redis.Redis.from_url(redis_url).flushdb()
        # Stripe retries what it never got an answer for, until every event is acknowledged.
        for _ in range(5):
            if not retry:
                break
            retry = deliver(app, retry, rng)
        retry += offline_stripe.take_events()
        for _ in range(20):
            if not retry:
                break
            retry = deliver(app, retry, random.Random(rng.random()))
        assert retry == [], f"{len(retry)} deliveries never acknowledged {WHY}"
        print(f"chaos: delivered by {time.monotonic() - started:.1f} s")
        drain(app, time.monotonic() + DRAIN_SECONDS)
        print(f"chaos: drained by {time.monotonic() - started:.1f} s")
        clear_faults(offline_stripe)
        finish_reports(app, time.monotonic() + DRAIN_SECONDS)
        print(f"chaos: usage reported by {time.monotonic() - started:.1f} s")
    finally:
        offline_stripe.set_latency(0)
        offline_stripe.http.post(
            f"{offline_stripe.url}/_sandbox/delivery", json={"duplicate_rate": 0, "reorder": False}, timeout=10
        )

    # 1. Nothing acknowledged is left unapplied, before any reconcile.
    statuses = Counter(row.status for row in query(app, "SELECT status FROM stripe_event"))
    assert set(statuses) <= {"processed", "ignored"}, f"{statuses} {WHY}"
    print(f"chaos: events {dict(statuses)}, {len(smtp_server.messages)} emails")
    # 2. Every organization is its subscription at Stripe.
    assert_organizations_follow_stripe(app, offline_stripe, subscriptions)
    # 3. Each email went out once (every message names the domain event it is for).
    sent = Counter((str(m["To"]), str(m["X-Ledgerline-Event"]), str(m["Subject"])) for m in smtp_server.messages)
    assert all(count == 1 for count in sent.values()), f"emails sent more than once: {sent} {WHY}"
    undelivered = query(
        app, "SELECT task_name, status FROM procrastinate_jobs WHERE queue_name = 'outbox' AND status <> 'succeeded'"
    )
    assert undelivered == [], f"{undelivered} {WHY}"
    # 4. Stripe counted the usage we billed, each customer's to the unit: nothing lost, nothing twice.
    units = assert_stripe_counts_our_usage(app, offline_stripe)
    assert units > 0, f"no usage was billed: nothing was proven {WHY}"
    print(f"chaos: {units} billed units, equal at Stripe")
    # 5. Reconcile finds nothing to repair (every field it compares: status, tier, add-ons and their
    # quantities, the scheduled cancellation, the period end).
    # Organization by organization: the suite's sandbox also holds every other test's subscriptions.
    for [organization_id] in query(
        app, "SELECT id FROM organization WHERE billing_subscription_id = ANY(:s)", s=subscriptions
    ):
        with app.app_context():
            report = BillingService.reconcile(apply=False, organization_id=organization_id)
            assert report.clean, f"organization {organization_id}: {list(report.lines())} {WHY}"
