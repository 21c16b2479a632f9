"""Stripe webhooks through the HTTP endpoint, signed exactly as Stripe signs them, on real PostgreSQL.
Stripe itself is the one seam of conftest.py (SandboxAccount)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import (
    OFFLINE_WEBHOOK_SECRET,
    SandboxAccount,
    checkout_session_id,
    post_and_apply,
    post_webhook,
    query,
    run_jobs,
    sign_stripe_payload,
    sign_up,
    start_signup,
    stripe_event,
)


@pytest.fixture
def organization(app: Flask, offline_stripe: SandboxAccount) -> dict[str, Any]:
    """A provisioned organization; returns its ids and Stripe objects."""
    session = sign_up(app.test_client(), offline_stripe)
    [row] = query(app, "SELECT * FROM organization")
    return {"id": row.id, "subscription_id": session["subscription"], "customer_id": session["customer"]}


def events_named(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def organization_row(app: Flask) -> Any:
    [row] = query(app, "SELECT * FROM organization")
    return row


def stored_events(app: Flask) -> list[Any]:
    return query(app, "SELECT * FROM stripe_event ORDER BY id")


def later(seconds: int = 600) -> int:
    """A Stripe timestamp clearly after the state an organization holds."""
    return int(time.time()) + seconds


# --- Receiving ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({}, None, "missing Stripe-Signature header"),
        ({"Stripe-Signature": "t=1,v1=abc"}, None, "signature does not match"),
        ({"Stripe-Signature": "garbage"}, None, "malformed Stripe-Signature header"),
        ({"Stripe-Signature": "t=123"}, None, "malformed Stripe-Signature header"),
    ],
)
def test_missing_or_bad_signatures_are_refused_and_nothing_is_stored(
    client: FlaskClient, app: Flask, headers: dict[str, str], body: bytes | None, reason: str
) -> None:
    payload = json.dumps(stripe_event("invoice.paid", {"id": "in_1"})).encode()
    response = client.post("/billing/webhooks/stripe", data=body or payload, headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {"error": reason}
    assert stored_events(app) == []


def test_a_signature_with_another_secret_is_refused(client: FlaskClient, app: Flask) -> None:
    response = post_and_apply(client, stripe_event("invoice.paid", {"id": "in_1"}), secret="whsec_someone_else")
    assert response.status_code == 400 and response.get_json() == {"error": "signature does not match"}
    assert stored_events(app) == []


def test_a_stale_timestamp_is_refused_beyond_300_seconds(client: FlaskClient, app: Flask) -> None:
    event = stripe_event("invoice.paid", {"id": "in_1", "customer": "cus_nobody"})
    stale = post_and_apply(client, event, timestamp=int(time.time()) - 301)
    assert stale.status_code == 400 and stale.get_json() == {"error": "timestamp outside the tolerance zone"}
    assert stored_events(app) == []
    assert post_and_apply(client, event, timestamp=int(time.time()) - 290).status_code == 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "body is not JSON"),
        (b"\xff\xfe", "body is not UTF-8"),
        (b"[1, 2]", "body is not a Stripe event"),
        (json.dumps({"id": "evt_1", "object": "event", "type": "x"}).encode(), "body is not a Stripe event"),
        (json.dumps({"id": "cus_1", "object": "customer"}).encode(), "body is not a Stripe event"),
    ],
)
def test_a_signed_body_that_is_not_an_event_is_refused(
    client: FlaskClient, app: Flask, body: bytes, reason: str
) -> None:
    response = post_and_apply(client, body)
    assert response.status_code == 400 and response.get_json() == {"error": reason}
    assert stored_events(app) == []


def test_the_secret_can_be_rotated_without_downtime(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(STRIPE_WEBHOOK_SECRET=f"whsec_new_secret_0123, {OFFLINE_WEBHOOK_SECRET}")
    client = app.test_client()
    signed_with_old = stripe_event("invoice.paid", {"id": "in_1", "customer": "cus_x"})
    signed_with_new = stripe_event("invoice.paid", {"id": "in_2", "customer": "cus_x"})
    assert post_and_apply(client, signed_with_old).status_code == 200
    assert post_and_apply(client, signed_with_new, secret="whsec_new_secret_0123").status_code == 200
    # During a rotation Stripe signs with both secrets in one header: any v1 that matches passes.
    body = json.dumps(stripe_event("invoice.paid", {"id": "in_3", "customer": "cus_x"})).encode()
    old_header = sign_stripe_payload(body, "whsec_retired")
    new_header = sign_stripe_payload(body, "whsec_new_secret_0123")
    both = f"{old_header},v1={new_header.split('v1=')[1]}"
    response = client.post("/billing/webhooks/stripe", data=body, headers={"Stripe-Signature": both})
    assert response.status_code == 200
    assert len(stored_events(app)) == 3


def test_unknown_providers_are_not_found(client: FlaskClient) -> None:
    assert client.post("/billing/webhooks/whop", data=b"{}").status_code == 404


def test_the_endpoint_needs_no_csrf_token_and_is_not_rate_limited(make_app: Any) -> None:
    app = make_app(SIGNUP_RATE_LIMIT_PER_CLIENT="1/hour", LOGIN_RATE_LIMIT_PER_CLIENT="1/hour")
    client = app.test_client()
    statuses = {
        post_and_apply(client, stripe_event("invoice.paid", {"id": f"in_{n}", "customer": "c"})).status_code
        for n in range(30)
    }
    assert statuses == {200}
    assert not app.extensions["redis"].keys("LIMITS*")


def test_every_verified_event_is_stored_with_its_facts(client: FlaskClient, app: Flask) -> None:
    event = stripe_event("invoice.paid", {"id": "in_1", "customer": "cus_unknown"}, created=1_700_000_000)
    body = json.dumps(event)
    assert post_and_apply(client, body.encode()).status_code == 200
    [row] = stored_events(app)
    assert (row.event_id, row.type, row.api_version, row.livemode, row.stripe_created) == (
        event["id"],
        "invoice.paid",
        "2026-10-28.endive",
        False,
        1_700_000_000,
    )
    assert row.payload == body and row.status == "processed" and row.attempts == 1
    assert row.received_at is not None and row.processed_at is not None
    assert row.outcome == "no organization for this customer yet"


def test_unknown_event_types_are_stored_and_answered_200(client: FlaskClient, app: Flask) -> None:
    response = post_and_apply(client, stripe_event("charge.dispute.created", {"id": "dp_1"}))
    assert response.status_code == 200
    [row] = stored_events(app)
    assert (row.status, row.outcome) == ("ignored", "unhandled event type charge.dispute.created")


def test_an_event_from_the_other_mode_is_stored_and_not_applied(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="canceled")
    event = stripe_event("customer.subscription.deleted", subscription, livemode=True, created=later())
    assert post_and_apply(client, event).status_code == 200
    [row] = [e for e in stored_events(app) if e.event_id == event["id"]]
    assert row.status == "ignored" and row.outcome.startswith("livemode mismatch")
    assert organization_row(app).billing_status == "active"


# --- Idempotency, failure and retry ---------------------------------------------------------------


def test_a_duplicate_delivery_changes_nothing(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    event = stripe_event("customer.subscription.updated", subscription, created=later())
    assert post_and_apply(client, event).status_code == 200
    before = events_named(app)
    for _ in range(3):
        response = post_and_apply(client, event)
        assert response.status_code == 200 and response.get_json() == {"received": True, "duplicate": True}
    assert events_named(app) == before
    [row] = [e for e in stored_events(app) if e.event_id == event["id"]]
    assert row.attempts == 1


def test_concurrent_deliveries_of_one_event_apply_it_once(
    app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    event = stripe_event("customer.subscription.updated", subscription, created=later())
    barrier = threading.Barrier(12)
    statuses: list[int] = []

    def deliver() -> None:
        client = app.test_client()
        barrier.wait()
        statuses.append(post_webhook(client, event).status_code)

    threads = [threading.Thread(target=deliver) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 12
    run_jobs(app)
    assert events_named(app)["organization.billing_status_changed"] == 1
    assert len([e for e in stored_events(app) if e.event_id == event["id"]]) == 1


def test_a_failure_rolls_back_is_recorded_and_the_retry_applies_it(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(JOB_RETRY_BASE_SECONDS=0)
    client = app.test_client()
    session_id = checkout_session_id(start_signup(app.test_client()))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    # The delivery is acknowledged at once: storing it is all the request does.
    assert post_webhook(client, completed).get_json() == {"received": True}
    [row] = stored_events(app)
    assert (row.status, row.attempts) == ("pending", 1)
    run_jobs(app)  # the first attempt fails (Stripe answers 500) and rolls back; the retry applies it
    [job] = query(app, "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = 'webhooks:apply'")
    assert (job.status, job.attempts) == ("succeeded", 2)
    [row] = stored_events(app)
    assert (row.status, row.attempts, row.last_error) == ("processed", 2, None)
    assert len(query(app, "SELECT id FROM organization")) == 1
    assert len(query(app, "SELECT id FROM domain_event WHERE name = 'organization.created'")) == 1


def test_a_failure_on_the_last_attempt_marks_the_event_failed_with_its_error(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(JOB_MAX_ATTEMPTS=1)
    session_id = checkout_session_id(start_signup(app.test_client()))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    post_and_apply(app.test_client(), completed)
    [row] = stored_events(app)
    assert row.status == "failed" and "APIError" in row.last_error and row.attempts == 2
    assert query(app, "SELECT id FROM organization") == []
    assert query(app, "SELECT id FROM domain_event WHERE name = 'organization.created'") == []


# --- Processing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "changes", "status", "domain_event"),
    [
        ("customer.subscription.updated", {"status": "past_due"}, "past_due", "organization.billing_status_changed"),
        ("customer.subscription.updated", {"status": "unpaid"}, "unpaid", "organization.billing_status_changed"),
        ("customer.subscription.deleted", {"status": "canceled"}, "canceled", "organization.billing_status_changed"),
        ("customer.subscription.paused", {"status": "paused"}, "paused", "organization.billing_status_changed"),
        ("customer.subscription.updated", {"status": "trialing"}, "trialing", "organization.billing_status_changed"),
        (
            "customer.subscription.updated",
            {"status": "incomplete"},
            "incomplete",
            "organization.billing_status_changed",
        ),
        (
            "customer.subscription.updated",
            {"status": "incomplete_expired"},
            "incomplete_expired",
            "organization.billing_status_changed",
        ),
        (
            "customer.subscription.updated",
            {"cancel_at_period_end": True},
            "active",
            "subscription.cancellation_scheduled",
        ),
    ],
)
def test_subscription_events_move_the_billing_status(
    client: FlaskClient,
    app: Flask,
    organization: dict[str, Any],
    offline_stripe: SandboxAccount,
    event_type: str,
    changes: dict[str, Any],
    status: str,
    domain_event: str,
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], **changes)
    assert post_and_apply(client, stripe_event(event_type, subscription, created=later())).status_code == 200
    row = organization_row(app)
    assert row.billing_status == status
    assert events_named(app)[domain_event] == 1
    assert (row.past_due_since is not None) == (status == "past_due")


def test_resumed_subscriptions_and_recovered_payments_clear_past_due(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    for offset, (event_type, status) in enumerate(
        [("customer.subscription.updated", "past_due"), ("customer.subscription.resumed", "active")], start=1
    ):
        subscription = offline_stripe.change_subscription(organization["subscription_id"], status=status)
        assert (
            post_and_apply(client, stripe_event(event_type, subscription, created=later(600 * offset))).status_code
            == 200
        )
    row = organization_row(app)
    assert (row.billing_status, row.past_due_since) == ("active", None)
    assert events_named(app)["organization.billing_status_changed"] == 2


def test_plan_add_ons_and_dates_follow_the_subscription_items(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(
        organization["subscription_id"],
        lookup_keys={"business_monthly": 1, "extra_seat_monthly": 7},
        trial_end=None,
    )
    assert (
        post_and_apply(client, stripe_event("customer.subscription.updated", subscription, created=later())).status_code
        == 200
    )
    row = organization_row(app)
    assert row.tier == "business"
    assert [(a.addon_key, a.quantity) for a in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 7)]
    assert row.current_period_end.timestamp() == subscription["items"]["data"][0]["current_period_end"]
    names = events_named(app)
    assert names["organization.plan_changed"] == 1 and names["organization.addons_changed"] == 1

    without_addons = offline_stripe.change_subscription(
        organization["subscription_id"], lookup_keys={"business_monthly": 1}
    )
    post_and_apply(client, stripe_event("customer.subscription.updated", without_addons, created=later(1200)))
    assert query(app, "SELECT * FROM organization_addon") == []
    assert events_named(app)["organization.addons_changed"] == 2


def test_invoice_events_record_the_payment_state_and_a_dunning_event(
    client: FlaskClient, app: Flask, organization: dict[str, Any]
) -> None:
    invoice = {
        "id": "in_renewal",
        "customer": organization["customer_id"],
        "amount_due": 1900,
        "attempt_count": 1,
        "hosted_invoice_url": "https://invoice.stripe.test/i/1",
        "next_payment_attempt": later(86400),
    }
    assert post_and_apply(client, stripe_event("invoice.payment_failed", invoice, created=later(10))).status_code == 200
    row = organization_row(app)
    assert (row.last_invoice_id, row.last_payment_status) == ("in_renewal", "failed")
    [failed] = query(app, "SELECT * FROM domain_event WHERE name = 'billing.payment_failed'")
    assert failed.data["hosted_invoice_url"] == "https://invoice.stripe.test/i/1" and failed.data["attempt_count"] == 1

    assert (
        post_and_apply(
            client, stripe_event("invoice.paid", {**invoice, "amount_paid": 1900}, created=later(20))
        ).status_code
        == 200
    )
    row = organization_row(app)
    assert (row.last_invoice_id, row.last_payment_status) == ("in_renewal", "paid")
    # A late copy of the failure (Stripe does not promise order) cannot undo the payment.
    post_and_apply(client, stripe_event("invoice.payment_failed", invoice, created=later(15)))
    assert organization_row(app).last_payment_status == "paid"
    # One for the signup's first invoice (recorded at provisioning), one for this one.
    succeeded = query(app, "SELECT data FROM domain_event WHERE name = 'billing.payment_succeeded'")
    assert events_named(app)["billing.payment_succeeded"] == 2
    assert [row.data["invoice_id"] for row in succeeded].count("in_renewal") == 1


def test_trial_will_end_emits_an_event(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    subscription = offline_stripe.change_subscription(organization["subscription_id"], trial_end=later(3 * 86400))
    assert post_and_apply(client, stripe_event("customer.subscription.trial_will_end", subscription)).status_code == 200
    [event] = query(app, "SELECT * FROM domain_event WHERE name = 'subscription.trial_will_end'")
    assert event.organization_id == organization["id"] and event.data["trial_end"] == subscription["trial_end"]


@pytest.mark.parametrize(
    ("event_type", "status", "reason"),
    [
        ("checkout.session.expired", "expired", "checkout expired"),
        ("checkout.session.async_payment_failed", "failed", "payment failed"),
    ],
)
def test_checkouts_that_end_unpaid_close_the_signup(
    client: FlaskClient, app: Flask, offline_stripe: SandboxAccount, event_type: str, status: str, reason: str
) -> None:
    session_id = checkout_session_id(start_signup(app.test_client()))
    session = offline_stripe.session(session_id)
    assert post_and_apply(client, stripe_event(event_type, session)).status_code == 200
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.status, pending.failure_reason) == (status, reason)
    assert events_named(app)[f"signup.{status}"] == 1
    # The same email can start again at once.
    assert start_signup(app.test_client()).status_code == 303


# --- Order --------------------------------------------------------------------------------------


def test_a_stale_event_never_rolls_an_organization_back(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    past_due = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    newer = stripe_event("customer.subscription.updated", past_due, created=later(1000))
    active_again = offline_stripe.change_subscription(organization["subscription_id"], status="active")
    newest = stripe_event("customer.subscription.updated", active_again, created=later(2000))
    # Delivered newest first, then the older one, each applied before the next arrives.
    assert post_and_apply(client, newest).status_code == 200
    assert post_and_apply(client, newer).status_code == 200
    # The late event's payload (past_due) is never applied: Stripe's current subscription is.
    assert organization_row(app).billing_status == "active"
    older = next(e for e in stored_events(app) if e.event_id == newer["id"])
    assert older.outcome == "applied Stripe's current subscription: no change"


def test_events_too_close_to_order_are_resolved_by_reading_stripe(
    client: FlaskClient, app: Flask, organization: dict[str, Any], offline_stripe: SandboxAccount
) -> None:
    """Two events in the same second cannot be ordered by timestamp: Stripe is asked for the truth."""
    moment = later(1000)
    past_due = offline_stripe.change_subscription(organization["subscription_id"], status="past_due")
    first = stripe_event("customer.subscription.updated", past_due, created=moment)
    unpaid = offline_stripe.change_subscription(organization["subscription_id"], status="unpaid")
    second = stripe_event("customer.subscription.updated", unpaid, created=moment)
    reads_before = len(offline_stripe.calls_to("subscriptions.retrieve"))
    post_webhook(client, second)
    post_webhook(client, first)  # same second, delivered late: its payload (past_due) is not trusted
    run_jobs(app)
    assert organization_row(app).billing_status == "unpaid"
    assert len(offline_stripe.calls_to("subscriptions.retrieve")) == reads_before + 1


def test_subscription_events_before_provisioning_are_not_lost(
    client: FlaskClient, app: Flask, offline_stripe: SandboxAccount
) -> None:
    session_id = checkout_session_id(start_signup(app.test_client()))
    session = offline_stripe.pay(session_id)
    created = stripe_event("customer.subscription.created", offline_stripe.subscription(session["subscription"]))
    assert post_and_apply(client, created).status_code == 200  # before the checkout is provisioned
    assert stored_events(app)[0].outcome.startswith("no organization for this subscription yet")
    # Meanwhile the subscription moved on at Stripe; provisioning reads it as it is now.
    offline_stripe.change_subscription(session["subscription"], lookup_keys={"pro_monthly": 1})
    assert post_and_apply(client, stripe_event("checkout.session.completed", session)).status_code == 200
    row = organization_row(app)
    assert row.tier == "pro" and query(app, "SELECT * FROM organization_addon") == []


# --- Operations ---------------------------------------------------------------------------------


def test_the_cli_lists_events_and_replays_failed_ones(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(JOB_MAX_ATTEMPTS=1)
    client = app.test_client()
    session_id = checkout_session_id(start_signup(app.test_client()))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(session_id))
    offline_stripe.fail_next("subscriptions.retrieve", "connection")
    assert post_and_apply(client, completed).status_code == 200
    runner = app.test_cli_runner()

    listing = runner.invoke(args=["billing", "events", "--status", "failed"])
    assert listing.exit_code == 0
    assert completed["id"] in listing.output and "APIConnectionError" in listing.output

    replay = runner.invoke(args=["billing", "replay", "--failed"])
    assert replay.exit_code == 0, replay.output
    assert f"{completed['id']}: queued (checkout:{session_id})" in replay.output
    assert stored_events(app)[0].status == "pending"
    run_jobs(app)
    assert len(query(app, "SELECT id FROM organization")) == 1
    assert stored_events(app)[0].status == "processed"

    again = runner.invoke(args=["billing", "replay", completed["id"]])
    assert again.exit_code == 0 and "duplicate: already settled" in again.output
    run_jobs(app)
    assert len(query(app, "SELECT id FROM organization")) == 1
    assert runner.invoke(args=["billing", "replay", "evt_missing"]).exit_code != 0
    assert runner.invoke(args=["billing", "events", "--status", "failed"]).output.strip() == "no events"


def test_the_cli_checks_every_catalogue_price(app: Flask, offline_stripe: SandboxAccount) -> None:
    result = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    assert result.exit_code == 0
    assert "tier starter" in result.output and offline_stripe.price_id("extra_seat_monthly") in result.output
    assert offline_stripe.price_id("pro_yearly") in result.output and "$490.00 / year" in result.output
    price_id = offline_stripe.price_id("pro_monthly")
    offline_stripe.force(price_id, active=False)  # archived in the Dashboard
    app.extensions["redis"].flushdb()
    try:
        failed = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    finally:
        offline_stripe.force(price_id, active=True)
    assert failed.exit_code == 1 and "pro_monthly" in failed.output


def test_an_oversized_body_is_refused_unread(client: FlaskClient, app: Flask) -> None:
    body = b'{"id": "evt_big", "object": "event", "padding": "' + b"x" * (1024 * 1024) + b'"}'
    response = post_and_apply(client, body)
    assert response.status_code == 413 and "error" in response.get_json()
    assert stored_events(app) == []


def test_a_seat_change_committed_while_stripe_is_read_makes_the_worker_read_again(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    """Issue 21, item 8: the worker's stale-read guard covers the add-on rows, not only the
    organization's updated_at. An owner's seat change (at Stripe, then here) lands between the
    worker's read of Stripe and its lock: the worker sees the add-ons moved and reads Stripe again,
    instead of applying the older read and losing the seat."""
    from sqlalchemy import create_engine, text

    from app.extensions import db
    from app.services.billing_service import BillingService
    from app.services.stripe_events import apply_subscription_events

    session = sign_up(app.test_client(), offline_stripe, addon_extra_seats="2")
    subscription_id = session["subscription"]
    seat_item = next(
        item["id"]
        for item in offline_stripe.subscription(subscription_id)["items"]["data"]
        if item["price"]["lookup_key"] == "extra_seat_monthly"
    )
    reads: list[int] = []

    class OwnerActsDuringTheRead:
        """BillingService's reads, with the owner's seat change landing just after the first one."""

        def __getattr__(self, name: str) -> Any:
            return getattr(BillingService, name)

        def retrieve_subscription(self, sub_id: str) -> dict[str, Any]:
            read = BillingService.retrieve_subscription(sub_id)
            reads.append(len(reads))
            if len(reads) == 1:
                offline_stripe.api("POST", f"/v1/subscriptions/{sub_id}", {"items": [{"id": seat_item, "quantity": 3}]})
                engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
                with engine.begin() as connection:
                    connection.execute(text("UPDATE organization_addon SET quantity = 3"))
                engine.dispose()
            return read

    with app.app_context():
        apply_subscription_events(subscription_id, [], OwnerActsDuringTheRead())  # type: ignore[arg-type]
        db.session.commit()
    assert len(reads) == 2
    assert [(r.addon_key, r.quantity) for r in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 3)]
