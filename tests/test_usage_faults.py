"""Usage reporting under real faults (issue 26, "Proof — Faults"): Stripe's meter event summary equals
our billed total to the unit, with no double count and no loss, when

- a real `flask billing worker` process is SIGKILLed while its usage:report job has a meter event
  request in flight at a slowed Stripe (accepted there, its answer not back yet: the same as Stripe
  timing out after accepting), on v1 (one event a request) and on the v2 stream (USAGE_STREAM_THRESHOLD),
  and another worker process takes the job over by itself (the dead worker's claim is a lease:
  WORKER_STALLED_SECONDS) and sends the report again under its identifier;
- the same POST /api/v1/usage requests (same idempotency keys) arrive several times at once from
  several threads while reports run and Stripe answers 429.

The workers are tests/test_chaos.py's (`Workers`; `worker_env` from conftest); usage is recorded through the public
API only. tests/test_usage_reports.py proves the same paths step by step, in process."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from app.services import usage_reports
from app.services.billing_service import BillingService
from tests.conftest import SandboxAccount, SmtpSink, query, run_jobs, worker_env
from tests.test_chaos import Workers, queue_report
from tests.test_usage_api import Owner, post_usage
from tests.test_usage_reports import meter_summary_total, tally_and_gather

# Short leases, so the takeover comes within seconds (the defaults are 2, 10 and 5 seconds).
LEASES = {"WORKER_HEARTBEAT_SECONDS": "0.2", "WORKER_STALLED_SECONDS": "1", "WORKER_RECOVERY_SECONDS": "0.2"}
STRIPE_SLOW = 6.0  # seconds each Stripe answer takes while the worker is to be caught mid-request
WAIT = 120  # a bound on waiting for the workers, not a measurement
REPORT_JOB = "SELECT id, status, worker_id FROM procrastinate_jobs WHERE task_name = 'usage:report' ORDER BY id"


@pytest.fixture
def reporters(app: Flask, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount) -> Iterator[Workers]:
    running = Workers(worker_env(app, smtp_server, stripe_sandbox))
    yield running
    running.stop()


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> Owner:
    signed_up = Owner(app, offline_stripe)
    run_jobs(app)  # the signup's emails: the workers below only report usage
    return signed_up


def record(app: Flask, key: str, quantity: int, idempotency_key: str) -> int:
    """One usage event through the API; returns the HTTP status (201 recorded, 200 a repeat)."""
    body = {"meter": "api_calls", "quantity": quantity, "idempotency_key": idempotency_key}
    status: int = post_usage(app, key, body).status_code
    return status


def wait_for(what: str, done: Any, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


def customer_id(app: Flask) -> str:
    [row] = query(app, "SELECT billing_customer_id FROM organization")
    return str(row.billing_customer_id)


def billed(app: Flask) -> int:
    [row] = query(app, "SELECT COALESCE(SUM(billable), 0) AS billed FROM usage_period_total")
    return int(row.billed)


def reports(app: Flask) -> list[Any]:
    return query(app, "SELECT identifier, quantity, status FROM usage_report ORDER BY id")


def sent_identifiers(stripe_api: SandboxAccount, call: str) -> list[str]:
    """The identifiers of the meter events the app sent Stripe (every attempt), v1 or streamed."""
    if call == "billing.meter_events.create":
        return [made[1]["params"]["identifier"] for made in stripe_api.calls_to(call)]
    return [event["identifier"] for made in stripe_api.calls_to(call) for event in made[1]["params"]["events"]]


def kill_mid_report_and_take_over(
    app: Flask,
    stripe_api: SandboxAccount,
    reporters: Workers,
    key: str,
    call: str,
    settings: dict[str, str],
) -> tuple[Any, Any]:
    """A worker runs usage:report with Stripe slow; it is SIGKILLed once its `call` (the meter event
    request) reached Stripe and before the answer came back. Usage recorded meanwhile; then a second
    worker takes over by itself. Returns the report job as the dead worker left it, and every report
    job once none is left to run (the every-minute schedule may have queued one more meanwhile: the
    job recovered is then superseded by it, see queue.requeue_stalled_jobs)."""
    stripe_api.set_latency(STRIPE_SLOW)
    try:
        first = reporters.start(**LEASES, **settings)
        queue_report(app)
        wait_for(f"a {call} request in flight", lambda: stripe_api.calls_to(call))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        stripe_api.set_latency(0)
    [left] = [job for job in query(app, REPORT_JOB) if job.status == "doing"]  # claimed by a worker that is gone
    # Stripe took the request; we never heard: the report is still ours to send.
    assert {report.status for report in reports(app)} == {"pending"}
    # Usage goes on while no worker reports: a new event, and a repeat of the first that is not counted.
    assert record(app, key, 300, "after-the-kill") == 201
    assert record(app, key, 1500, "k1") == 200
    reporters.start(**LEASES, **settings)
    wait_for(
        "the second worker to take the report job over and finish it",
        lambda: (
            all(job.status not in ("todo", "doing") for job in query(app, REPORT_JOB))
            and all(report.status == "sent" for report in reports(app))
        ),
    )
    return left, query(app, REPORT_JOB)


def assert_taken_over(left: Any, ended: list[Any]) -> None:
    """The dead worker's job is not left running; another worker ran the report to its end."""
    by_id = {job.id: job for job in ended}
    assert by_id[left.id].status != "doing", ended
    assert any(job.status == "succeeded" and job.worker_id != left.worker_id for job in ended), ended


def assert_counted_once(app: Flask, stripe_api: SandboxAccount, call: str, expected: int) -> None:
    made = reports(app)
    identifiers = [report.identifier for report in made]
    assert len(set(identifiers)) == len(identifiers), made
    assert all(report.status == "sent" for report in made), made
    assert billed(app) == expected == sum(report.quantity for report in made)
    assert meter_summary_total(stripe_api, customer_id(app)) == expected  # to the unit
    # The report in flight when the worker died was sent again by the next one (under its identifier),
    # and Stripe counted it once.
    attempts = Counter(sent_identifiers(stripe_api, call))
    assert attempts[identifiers[0]] == 2, attempts
    with app.app_context():
        assert usage_reports.counts().unreported_events == 0


def test_a_worker_sigkilled_mid_meter_event_loses_and_doubles_nothing(
    app: Flask, offline_stripe: SandboxAccount, owner: Owner, reporters: Workers
) -> None:
    key = owner.create_key("metering")
    assert record(app, key, 1500, "k1") == 201  # 500 past the 1,000 Starter includes
    call = "billing.meter_events.create"
    left, ended = kill_mid_report_and_take_over(
        app, offline_stripe, reporters, key, call, {"USAGE_STREAM_THRESHOLD": "0"}
    )
    assert_taken_over(left, ended)
    assert offline_stripe.calls_to("billing.meter_event_stream.create") == []  # v1 throughout
    assert_counted_once(app, offline_stripe, call, 800)
    assert [report.quantity for report in reports(app)] == [500, 300]


def test_a_worker_sigkilled_mid_stream_request_loses_and_doubles_nothing(
    app: Flask, offline_stripe: SandboxAccount, owner: Owner, reporters: Workers
) -> None:
    key = owner.create_key("metering")
    # Three reports wait when the worker's run begins (earlier runs gathered them and could not send):
    # above the threshold of 2, the run goes through the v2 stream.
    for number, quantity in enumerate((1500, 40, 60), start=1):
        assert record(app, key, quantity, f"k{number}") == 201
        with app.app_context():
            assert tally_and_gather() == 1
    call = "billing.meter_event_stream.create"
    left, ended = kill_mid_report_and_take_over(
        app, offline_stripe, reporters, key, call, {"USAGE_STREAM_THRESHOLD": "2"}
    )
    assert_taken_over(left, ended)
    assert offline_stripe.calls_to("billing.meter_events.create") == []  # the stream throughout
    assert_counted_once(app, offline_stripe, call, 900)
    assert [report.quantity for report in reports(app)] == [500, 40, 60, 300]


def test_duplicate_api_requests_during_reporting_and_429s_count_once(
    app: Flask, offline_stripe: SandboxAccount, owner: Owner
) -> None:
    """Each of 24 events is posted 4 times, from 8 threads at once, while reports run in a loop and
    Stripe answers the meter events 429 now and then: each is stored once and counted once at Stripe."""
    key = owner.create_key("metering")
    rng = random.Random(26)
    events = [(f"evt-{number}", rng.randint(20, 120)) for number in range(24)]
    events[0] = ("evt-0", 1000)  # the included 1,000 are used up at once: the rest is billed
    posts = [event for event in events for _ in range(4)]
    rng.shuffle(posts)
    offline_stripe.http.post(
        f"{offline_stripe.url}/_sandbox/faults",
        json={"method": "POST", "path": "/v1/billing/meter_events", "kind": "rate_limit", "times": 3, "retry_after": 0},
        timeout=10,
    ).raise_for_status()
    posting = threading.Event()
    posting.set()
    runs: list[usage_reports.ReportRun] = []

    def report_while_posting() -> None:
        while posting.is_set():
            with app.app_context():
                runs.append(BillingService.report_usage())
            time.sleep(0.02)

    reporter = threading.Thread(target=report_while_posting)
    reporter.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda event: record(app, key, event[1], event[0]), posts))
    finally:
        posting.clear()
        reporter.join(60)
    assert Counter(statuses) == {201: len(events), 200: 3 * len(events)}, Counter(statuses)
    for _ in range(10):  # the next runs send what a 429 left pending
        with app.app_context():
            runs.append(BillingService.report_usage())
        if all(report.status == "sent" for report in reports(app)):
            break
    assert any(run.still_pending for run in runs), "Stripe's 429 never met a report"
    total = sum(quantity for _, quantity in events)
    [stored] = query(app, "SELECT SUM(total) AS total FROM usage_period_total")
    assert stored.total == total  # each event once
    made = reports(app)
    assert all(report.status == "sent" for report in made), made
    assert len({report.identifier for report in made}) == len(made)
    assert billed(app) == total - 1000 == sum(report.quantity for report in made)
    assert meter_summary_total(offline_stripe, customer_id(app)) == total - 1000
