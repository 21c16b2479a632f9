"""Reporting billed usage to Stripe's meter events exactly once: aggregated per customer, meter and
period, a deterministic identifier per report, marked sent only when Stripe accepted it, and Stripe's
meter event summary equal to our billed total to the unit through lost answers, outages, a worker
killed mid-report and duplicate requests. Against the offline sandbox's meters."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

from app import clock
from app.extensions import db
from app.services import usage_reconcile, usage_reports, usage_stream
from app.services.billing_service import BillingService, plan_catalogue
from tests.conftest import SandboxAccount, query, run_jobs, sign_up

EVENT_NAME = "ledgerline_api_calls"  # plans.toml [meters.api_calls]
INCLUDED = 1000  # Starter includes 1,000 API calls a period; the overage is billed


class Customer:
    def __init__(self, app: Flask, stripe_api: SandboxAccount) -> None:
        self.app = app
        self.stripe = stripe_api
        sign_up(app.test_client(), stripe_api)
        [row] = query(app, "SELECT id, billing_customer_id FROM organization")
        self.organization_id: int = row.id
        self.customer_id: str = row.billing_customer_id
        self.keys = 0

    def record(self, quantity: int) -> None:
        self.keys += 1
        with self.app.app_context():
            BillingService.record_usage(self.organization_id, "api_calls", quantity, idempotency_key=f"k{self.keys}")

    def report(self) -> usage_reports.ReportRun:
        with self.app.app_context():
            return BillingService.report_usage()

    def stripe_total(self) -> float:
        return meter_summary_total(self.stripe, self.customer_id)

    def our_billed_total(self) -> int:
        """What the worker's tally has billed of what was recorded."""
        with self.app.app_context():
            BillingService.tally_usage()
        [row] = query(self.app, "SELECT COALESCE(SUM(billable), 0) AS billed FROM usage_period_total")
        return int(row.billed)

    def reports(self) -> list[Any]:
        columns = "identifier, quantity, status, attempts, last_error"
        return query(self.app, f"SELECT {columns} FROM usage_report ORDER BY id")  # noqa: S608


def meter_summary_total(stripe_api: SandboxAccount, customer_id: str) -> float:
    """Stripe's meter event summary of the customer's API calls, over the last 40 days."""
    meters = stripe_api.api("GET", "/v1/billing/meters")["data"]
    [meter] = [m for m in meters if m["event_name"] == EVENT_NAME]
    now = int(datetime.now(UTC).timestamp())
    summaries = stripe_api.api(
        "GET",
        f"/v1/billing/meters/{meter['id']}/event_summaries",
        {"customer": customer_id, "start_time": now - 40 * 86400, "end_time": now + 3600},
    )["data"]
    return float(sum(s["aggregated_value"] for s in summaries))


def tally_and_gather() -> int:
    """A usage:report run's first half (in an app context): the tally, then the gathering of reports."""
    BillingService.tally_usage()
    return usage_reports.gather()


@pytest.fixture
def customer(app: Flask, offline_stripe: SandboxAccount) -> Customer:
    return Customer(app, offline_stripe)


def test_billed_usage_is_reported_once_per_period_and_customer(customer: Customer) -> None:
    customer.record(600)
    customer.record(500)  # 100 past the included 1,000
    customer.record(250)
    assert customer.our_billed_total() == 350
    run = customer.report()
    assert (run.gathered, run.sent, run.failed, run.still_pending) == (1, 1, 0, 0)
    [report] = customer.reports()
    assert (report.quantity, report.status) == (350, "sent")
    assert report.identifier.startswith(f"ledgerline-usage-{customer.organization_id}-api_calls-")
    [(_, call)] = customer.stripe.calls_to("billing.meter_events.create")
    assert call["params"]["payload"] == {"stripe_customer_id": customer.customer_id, "value": "350"}
    assert call["params"]["identifier"] == report.identifier
    assert customer.stripe_total() == 350
    # Nothing new: nothing sent. New usage: a new report, with its own identifier.
    assert customer.report().sent == 0
    customer.record(5)
    assert customer.report().sent == 1
    assert [r.quantity for r in customer.reports()] == [350, 5]
    assert customer.stripe_total() == customer.our_billed_total() == 355


def test_usage_within_the_included_quantity_reports_nothing(customer: Customer) -> None:
    customer.record(INCLUDED)
    assert customer.report().gathered == 0
    assert customer.stripe.calls_to("billing.meter_events.create") == []


def test_stripe_accepting_but_the_answer_being_lost_counts_once(customer: Customer) -> None:
    customer.record(INCLUDED + 40)
    customer.stripe.fail_next("billing.meter_events.create", kind="lost_response", times=1)
    run = customer.report()
    assert (run.sent, run.still_pending) == (0, 1)  # we do not know it arrived: still pending
    [report] = customer.reports()
    assert report.status == "pending" and report.attempts == 1 and "APIConnectionError" in report.last_error
    assert customer.stripe_total() == 40  # it did arrive
    run = customer.report()  # the retry: Stripe already has the identifier
    assert (run.sent, run.failed) == (1, 0)
    assert customer.reports()[0].status == "sent"
    assert len(customer.stripe.calls_to("billing.meter_events.create")) == 2
    assert customer.stripe_total() == customer.our_billed_total() == 40


def test_an_outage_leaves_reports_pending_until_stripe_answers(customer: Customer) -> None:
    customer.record(INCLUDED + 7)
    customer.stripe.fail_next("billing.meter_events.create", kind="server", times=1)
    assert customer.report().still_pending == 1
    customer.stripe.fail_next("billing.meter_events.create", kind="connection", times=1)
    assert customer.report().still_pending == 1
    assert customer.stripe_total() == 0
    assert customer.report().sent == 1
    assert customer.stripe_total() == customer.our_billed_total() == 7


def test_a_429_leaves_every_report_pending_and_the_next_run_counts_each_once(customer: Customer) -> None:
    """Stripe asking us to slow down (429, Retry-After) is not a refusal: the run stops with the reports
    pending (never failed), every worker pauses as Stripe asks, and the next run sends each once."""
    with customer.app.app_context():  # a report for the previous period too: two reports in the run
        last_month = clock.utcnow() - timedelta(days=32)
        BillingService.record_usage(
            customer.organization_id, "api_calls", INCLUDED + 3, idempotency_key="old", occurred_at=last_month
        )
    customer.record(INCLUDED + 4)
    fault = {"method": "POST", "path_regex": "/v1/billing/meter_events", "kind": "rate_limit", "times": 1}
    response = customer.stripe.http.post(
        f"{customer.stripe.url}/_sandbox/faults", json={**fault, "retry_after": 1, "should_retry": False}, timeout=10
    )
    response.raise_for_status()
    run = customer.report()
    assert (run.gathered, run.sent, run.failed, run.still_pending) == (2, 0, 0, 2)
    assert [(r.status, r.attempts) for r in customer.reports()] == [("pending", 1), ("pending", 0)]
    assert "429" in customer.reports()[0].last_error or "rate limit" in customer.reports()[0].last_error.lower()
    assert customer.stripe_total() == 0
    run = customer.report()  # after the pause Stripe asked for
    assert (run.gathered, run.sent, run.failed, run.still_pending) == (0, 2, 0, 0)
    assert [r.status for r in customer.reports()] == ["sent", "sent"]
    assert customer.report().sent == 0  # nothing left to send
    assert customer.stripe_total() == customer.our_billed_total() == 7
    statuses = [r["status"] for r in customer.stripe.requests_made() if r["path"] == "/v1/billing/meter_events"]
    assert statuses == [429, 200, 200]


def test_a_worker_killed_between_gathering_and_sending_loses_nothing(customer: Customer) -> None:
    customer.record(INCLUDED + 12)
    with customer.app.app_context():
        assert tally_and_gather() == 1  # ...and the worker dies before sending
    customer.record(3)
    run = customer.report()  # the next run sends the old report and the new one
    assert (run.gathered, run.sent) == (1, 2)
    assert customer.stripe_total() == customer.our_billed_total() == 15


def test_a_worker_killed_after_stripe_accepted_before_marking_it_sent(customer: Customer) -> None:
    customer.record(INCLUDED + 9)
    with customer.app.app_context():
        tally_and_gather()
        [event] = usage_reports.pending(plan_catalogue())
        BillingService._send_meter_event(event)  # Stripe accepts; the worker dies before the UPDATE
    assert customer.reports()[0].status == "pending"
    assert customer.report().sent == 1
    assert customer.stripe_total() == customer.our_billed_total() == 9


def test_two_reporters_at_once_count_each_unit_once(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app()
    customer = Customer(app, offline_stripe)
    customer.record(INCLUDED)
    for _ in range(30):
        customer.record(1)
    runs: list[usage_reports.ReportRun] = []
    threads = [threading.Thread(target=lambda: runs.append(customer.report())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    customer.report()
    assert all(r.status == "sent" for r in customer.reports())
    assert customer.stripe_total() == customer.our_billed_total() == 30


def test_a_refused_report_is_failed_with_stripes_words_and_shown_to_ops(customer: Customer) -> None:
    customer.record(INCLUDED + 4)
    with customer.app.app_context():
        db.session.execute(text("UPDATE organization SET billing_customer_id = 'cus_gone'"))
        db.session.commit()
    run = customer.report()
    assert run.failed == 1
    [report] = customer.reports()
    assert report.status == "failed" and "No such customer: 'cus_gone'" in report.last_error
    result = customer.app.test_cli_runner().invoke(args=["billing", "usage"])
    assert result.exit_code == 1
    assert "0 pending, 0 sent, 1 failed" in result.output and "cus_gone" in result.output


def test_a_report_unsettled_for_20_hours_is_failed_not_sent_again(customer: Customer) -> None:
    customer.record(INCLUDED + 6)
    with customer.app.app_context():
        tally_and_gather()
        db.session.execute(text("UPDATE usage_report SET created_at = now() - interval '21 hours'"))
        db.session.commit()
    run = customer.report()
    assert (run.sent, run.failed) == (0, 1)
    assert "24-hour identifier window" in customer.reports()[0].last_error
    assert customer.stripe.calls_to("billing.meter_events.create") == []


def test_stripes_asynchronous_error_report_fails_the_reports_it_names_and_ops_see_it(customer: Customer) -> None:
    """v1.billing.meter.error_report_triggered arrives thin (no data); the worker reads it back from
    GET /v2/core/events/:id, marks the reports it names failed with Stripe's words, and ops see both."""
    customer.record(INCLUDED + 5)
    customer.record(8)
    assert customer.report().sent == 1
    [report] = customer.reports()
    customer.stripe.take_events()  # the signup's
    response = customer.stripe.http.post(
        f"{customer.stripe.url}/_sandbox/meters/error_report", json={"identifiers": [report.identifier]}, timeout=10
    )
    response.raise_for_status()
    [event] = customer.stripe.take_events()
    thin = json.loads(event["payload"])
    assert thin["object"] == "v2.core.event" and "data" not in thin
    assert (
        thin["type"] == "v1.billing.meter.error_report_triggered" and thin["related_object"]["type"] == "billing.meter"
    )
    client = customer.app.test_client()
    for _ in range(2):  # a redelivery changes nothing
        posted = client.post("/billing/webhooks/stripe", data=event["payload"].encode(), headers=event["headers"])
        assert posted.status_code == 200
        run_jobs(customer.app)
    [report] = customer.reports()
    assert report.status == "failed"
    assert report.last_error == "refused by Stripe after acceptance: " + (
        "No customer was found for the meter event's stripe_customer_id."
    )
    [stored] = query(customer.app, f"SELECT status, outcome FROM stripe_event WHERE event_id = '{thin['id']}'")  # noqa: S608
    assert stored.status == "processed"
    assert stored.outcome == (
        "meter error report: 1 error(s) (meter_event_customer_not_found x1); 1 usage report(s) marked failed"
    )
    assert customer.stripe_total() == 0  # Stripe no longer counts the refused event
    status = customer.app.test_cli_runner().invoke(args=["billing", "status"])
    assert "usage reports:   pending=0  sent=0  failed=1  meter error reports=1" in status.output
    usage = customer.app.test_cli_runner().invoke(args=["billing", "usage"])
    assert usage.exit_code == 1 and f"failed {report.identifier}: refused by Stripe after acceptance" in usage.output
    assert "Stripe meter error report: 1 error(s)" in usage.output
    assert reconcile(customer).exit_code == 1  # the shortfall is Stripe's to be told again (--apply)


# --- reconcile: our billed totals against Stripe's meter event summaries ------------------------------


def reconcile(customer: Customer, *args: str) -> Any:
    return customer.app.test_cli_runner().invoke(args=["billing", "usage", "--reconcile", *args])


def test_reconcile_agrees_when_every_report_arrived(customer: Customer) -> None:
    customer.record(INCLUDED + 25)
    customer.report()
    result = reconcile(customer)
    assert result.exit_code == 0, result.output
    assert "Checked 1 billing periods" in result.output and "agree" in result.output


def test_reconcile_counts_usage_still_on_its_way_as_not_missing(customer: Customer) -> None:
    customer.record(INCLUDED + 25)  # billed, not yet reported
    with customer.app.app_context():
        assert BillingService.reconcile_usage().clean


def test_reconcile_resends_what_stripe_lacks_once(customer: Customer) -> None:
    customer.record(INCLUDED + 30)
    customer.report()
    customer.record(8)
    with customer.app.app_context():
        tally_and_gather()
        # A report marked sent that Stripe never took (dropped, or refused later by an error report).
        db.session.execute(text("UPDATE usage_report SET status = 'sent' WHERE status = 'pending'"))
        db.session.commit()
    assert customer.stripe_total() == 30
    found = reconcile(customer)
    assert found.exit_code == 1 and "Stripe has 30, we billed 38: 8 missing" in found.output
    customer.stripe.fail_next("billing.meter_events.create", kind="lost_response", times=1)
    first = reconcile(customer, "--apply")  # Stripe takes the correction; its answer is lost
    assert "not re-sent" in first.output
    assert customer.stripe_total() == 38
    again = reconcile(customer, "--apply")  # the summary moved: nothing is missing, nothing is sent
    assert again.exit_code == 0 and "re-sent" not in again.output
    assert len(customer.stripe.calls_to("billing.meter_events.create")) == 2  # the report and one correction
    with customer.app.app_context():
        [drift] = [
            usage_reconcile.UsageDrift(period, 30)
            for period in usage_reconcile.periods_to_check(plan_catalogue(), clock.utcnow())
        ]
        with pytest.raises(usage_reports.MeterEventAlreadyRecorded):
            BillingService._send_meter_event(drift.correction(clock.utcnow()))  # the same correction: counted once
    assert customer.stripe_total() == customer.our_billed_total() == 38


def test_check_prices_checks_each_meter_and_its_metered_price(app: Flask, offline_stripe: SandboxAccount) -> None:
    [meter] = [m for m in offline_stripe.api("GET", "/v1/billing/meters")["data"] if m["event_name"] == EVENT_NAME]
    result = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    assert result.exit_code == 0, result.output
    assert "meter api_calls" in result.output and meter["id"] in result.output
    assert offline_stripe.price_id("api_calls_overage") in result.output
    offline_stripe.force(meter["id"], status="inactive")  # deactivated in the Dashboard
    try:
        failed = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    finally:
        offline_stripe.force(meter["id"], status="active")
    assert failed.exit_code == 1 and f"no active Stripe meter has the event_name '{EVENT_NAME}'" in failed.output


# -- a large run: the v2 meter event stream (usage_stream.py) ------------------------------------------


def pending_reports(customer: Customer, count: int) -> None:
    """`count` pending reports of one unit each (a gathering after each event: one report each)."""
    if customer.keys == 0:
        customer.record(INCLUDED)  # the tier's included calls: billed nothing
    with customer.app.app_context():
        for _ in range(count):
            customer.keys += 1
            BillingService.record_usage(customer.organization_id, "api_calls", 1, idempotency_key=f"k{customer.keys}")
            assert tally_and_gather() == 1


def stream_statuses(customer: Customer) -> list[int]:
    made = customer.stripe.requests_made()
    return [r["status"] for r in made if r["path"] == "/v2/billing/meter_event_stream"]


def test_a_large_run_goes_through_the_stream_in_requests_of_100(customer: Customer) -> None:
    customer.app.config["USAGE_STREAM_THRESHOLD"] = 100
    pending_reports(customer, 250)
    run = customer.report()
    assert (run.sent, run.failed, run.still_pending) == (250, 0, 0)
    streamed = customer.stripe.calls_to("billing.meter_event_stream.create")
    assert [len(call[1]["params"]["events"]) for call in streamed] == [100, 100, 50]  # ceil(250 / 100) requests
    assert len(customer.stripe.calls_to("billing.meter_event_session.create")) == 1
    assert customer.stripe.calls_to("billing.meter_events.create") == []
    first = streamed[0][1]["params"]["events"][0]
    assert first["identifier"] == customer.reports()[0].identifier  # the identifier v1 would send
    assert {r.status for r in customer.reports()} == {"sent"}
    assert customer.stripe_total() == customer.our_billed_total() == 250


def test_a_run_at_or_below_the_threshold_stays_on_v1(customer: Customer) -> None:
    customer.app.config["USAGE_STREAM_THRESHOLD"] = 3
    pending_reports(customer, 3)
    assert customer.report().sent == 3
    assert len(customer.stripe.calls_to("billing.meter_events.create")) == 3
    assert customer.stripe.calls_to("billing.meter_event_stream.create") == []
    assert customer.stripe_total() == customer.our_billed_total() == 3


def test_a_streamed_request_whose_answer_was_lost_counts_once(customer: Customer) -> None:
    customer.app.config["USAGE_STREAM_THRESHOLD"] = 100
    pending_reports(customer, 150)
    customer.stripe.fail_next("billing.meter_event_stream.create", kind="lost_response", times=1)
    run = customer.report()
    assert (run.sent, run.still_pending) == (0, 150)  # we do not know the first 100 arrived
    assert customer.stripe_total() == 100  # they did
    assert {(r.status, r.attempts) for r in customer.reports()[:100]} == {("pending", 1)}
    run = customer.report()  # the same identifiers again: Stripe counts each once
    assert (run.sent, run.still_pending) == (150, 0)
    assert customer.stripe_total() == customer.our_billed_total() == 150
    assert stream_statuses(customer) == [200, 200, 200]  # the lost one was accepted, then 100 + 50


def test_an_expired_session_is_renewed_and_a_live_one_reused(customer: Customer) -> None:
    customer.app.config["USAGE_STREAM_THRESHOLD"] = 100
    pending_reports(customer, 101)
    assert customer.report().sent == 101
    pending_reports(customer, 101)
    assert customer.report().sent == 101  # the same session
    assert len(customer.stripe.calls_to("billing.meter_event_session.create")) == 1
    customer.stripe.http.post(f"{customer.stripe.url}/_sandbox/meters/expire_sessions", timeout=10).raise_for_status()
    pending_reports(customer, 101)
    assert customer.report().sent == 101  # refused as expired, renewed, sent again
    assert len(customer.stripe.calls_to("billing.meter_event_session.create")) == 2
    assert stream_statuses(customer)[-3:] == [401, 200, 200]
    held = customer.app.extensions[usage_stream.SESSION_KEY]  # its end is near: renewed before use
    customer.app.extensions[usage_stream.SESSION_KEY] = replace(held, expires_at=clock.utcnow() + timedelta(seconds=30))
    pending_reports(customer, 101)
    assert customer.report().sent == 101
    assert len(customer.stripe.calls_to("billing.meter_event_session.create")) == 3
    assert 401 not in stream_statuses(customer)[-2:]
    assert customer.stripe_total() == customer.our_billed_total() == 404
