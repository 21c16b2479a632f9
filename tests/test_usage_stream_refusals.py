"""The v2 meter event stream's failures, by kind (usage_stream.py): a request Stripe refuses whole is
split until the event that makes it refused stands alone and fails with Stripe's words, the others sent
once; a failure that may pass is retried in the run with a growing pause; and Stripe's
v1.billing.meter.no_meter_found fails the reports it names, through the webhook like every event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask

from tests.conftest import SandboxAccount, query, run_jobs
from tests.test_usage_reports import EVENT_NAME, Customer, pending_reports, stream_statuses

STREAM = "/v2/billing/meter_event_stream"


@pytest.fixture
def customer(app: Flask, offline_stripe: SandboxAccount) -> Customer:
    app.config["USAGE_STREAM_THRESHOLD"] = 100
    return Customer(app, offline_stripe)


def arm(customer: Customer, kind: str, times: int, **extra: Any) -> None:
    fault = {"method": "POST", "path": STREAM, "kind": kind, "times": times, **extra}
    customer.stripe.http.post(f"{customer.stripe.url}/_sandbox/faults", json=fault, timeout=10).raise_for_status()


def accepted_identifiers(customer: Customer) -> list[str]:
    """Every identifier in a stream request Stripe answered 200, in order (repeats included)."""
    made = [r for r in customer.stripe.requests_made() if r["path"] == STREAM and r["status"] == 200]
    return [event["identifier"] for r in made for event in r["params"]["events"]]


def test_a_request_refused_whole_is_split_until_the_bad_event_fails_alone(customer: Customer) -> None:
    pending_reports(customer, 150)
    bad = customer.reports()[37].identifier
    # Stripe refuses, as a whole, every request that carries this one event.
    arm(customer, "invalid_request", 100, body_contains=f'"{bad}"')
    run = customer.report()
    assert (run.sent, run.failed, run.still_pending) == (149, 1, 0)
    reports = {r.identifier: r for r in customer.reports()}
    assert reports[bad].status == "failed"
    assert reports[bad].last_error.startswith("refused by Stripe's meter event stream: Invalid request.")
    assert {r.status for i, r in reports.items() if i != bad} == {"sent"}
    # Refused: [0:100], [0:50], [25:50], [37:50], [37:43], [37:40], [37] (alone: failed). Sent once
    # each: [0:25], [25:37], [38:40], [40:43], [43:50], [50:100], then the run's last 50.
    statuses = [400, 400, 200, 400, 200, 400, 400, 400, 400, 200, 200, 200, 200, 200]
    assert stream_statuses(customer) == statuses
    accepted = accepted_identifiers(customer)
    assert len(accepted) == len(set(accepted)) == 149 and bad not in accepted  # each good event sent once
    assert customer.stripe_total() == customer.our_billed_total() - 1 == 149
    usage = customer.app.test_cli_runner().invoke(args=["billing", "usage"])
    assert usage.exit_code == 1 and f"failed {bad}: refused by Stripe's meter event stream" in usage.output
    status = customer.app.test_cli_runner().invoke(args=["billing", "status"])
    assert "usage reports:   pending=0  sent=149  failed=1" in status.output
    assert customer.report().sent == 0  # settled: the failed report is not sent again
    assert len(stream_statuses(customer)) == 14


def test_a_refusal_that_does_not_come_back_costs_one_request_and_sends_everything_once(customer: Customer) -> None:
    pending_reports(customer, 150)
    arm(customer, "invalid_request", 1)
    run = customer.report()
    assert (run.sent, run.failed, run.still_pending) == (150, 0, 0)
    assert stream_statuses(customer) == [400, 200, 200, 200]  # 100 refused, then 50 + 50, then the last 50
    accepted = accepted_identifiers(customer)
    assert len(accepted) == len(set(accepted)) == 150
    assert customer.stripe_total() == customer.our_billed_total() == 150


def test_a_failure_that_may_pass_is_retried_in_the_run_then_left_pending(customer: Customer) -> None:
    customer.app.config.update(USAGE_STREAM_RETRIES=2, USAGE_STREAM_RETRY_SECONDS=0.01)
    pending_reports(customer, 101)
    customer.stripe.fail_next("billing.meter_event_stream.create", kind="server", times=2)
    run = customer.report()
    assert (run.sent, run.failed, run.still_pending) == (101, 0, 0)
    assert stream_statuses(customer) == [500, 500, 200, 200]
    # Stripe asking us to slow down: every process pauses for its Retry-After, then the retry goes out.
    pending_reports(customer, 101)
    arm(customer, "rate_limit", 1, retry_after=1)
    assert customer.report().sent == 101
    assert stream_statuses(customer)[4:] == [429, 200, 200]
    # Still failing after the retries: pending with the error noted, never failed; the next run sends.
    pending_reports(customer, 101)
    customer.stripe.fail_next("billing.meter_event_stream.create", kind="server", times=3)
    run = customer.report()
    assert (run.sent, run.failed, run.still_pending) == (0, 0, 101)
    fresh = customer.reports()[202:]
    assert {(r.status, r.attempts) for r in fresh[:100]} == {("pending", 1)}
    assert "APIError" in fresh[0].last_error
    assert customer.report().sent == 101
    assert customer.stripe_total() == customer.our_billed_total() == 303


def test_stripes_no_meter_found_fails_the_reports_it_names_and_ops_see_it(customer: Customer) -> None:
    """A streamed event whose event_name no active meter has (here: the meter deactivated in the
    Dashboard) is not counted; Stripe's v1.billing.meter.no_meter_found arrives thin, enters through
    the webhook like every event, and fails the reports it names with Stripe's words."""
    customer.app.config["USAGE_STREAM_THRESHOLD"] = 1
    pending_reports(customer, 3)
    [meter] = [m for m in customer.stripe.api("GET", "/v1/billing/meters")["data"] if m["event_name"] == EVENT_NAME]
    customer.stripe.take_events()  # the signup's
    customer.stripe.force(meter["id"], status="inactive")
    try:
        assert customer.report().sent == 3  # the stream validates later
    finally:
        customer.stripe.force(meter["id"], status="active")
    [event] = customer.stripe.take_events()
    thin = json.loads(event["payload"])
    assert thin["object"] == "v2.core.event" and thin["type"] == "v1.billing.meter.no_meter_found"
    assert "data" not in thin and "related_object" not in thin
    client = customer.app.test_client()
    for _ in range(2):  # a redelivery changes nothing
        posted = client.post("/billing/webhooks/stripe", data=event["payload"].encode(), headers=event["headers"])
        assert posted.status_code == 200
        run_jobs(customer.app)
    reports = customer.reports()
    assert [r.status for r in reports] == ["failed"] * 3
    assert reports[0].last_error == f"no meter found: No active meter was found with event_name '{EVENT_NAME}'."
    [stored] = query(customer.app, f"SELECT status, outcome FROM stripe_event WHERE event_id = '{thin['id']}'")  # noqa: S608
    assert stored.status == "processed"
    assert stored.outcome == "no meter found: 3 error(s) (no_meter x3); 3 usage report(s) marked failed"
    assert customer.stripe_total() == 0
    status = customer.app.test_cli_runner().invoke(args=["billing", "status"])
    assert "usage reports:   pending=0  sent=0  failed=3  meter error reports=1" in status.output
    usage = customer.app.test_cli_runner().invoke(args=["billing", "usage"])
    assert usage.exit_code == 1 and "Stripe no meter found: 3 error(s)" in usage.output
