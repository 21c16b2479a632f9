"""`flask billing reconcile` end to end against the offline Stripe (sandbox/), with webhook delivery
held (switched off), and the pure diff it is built on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app.extensions import db
from app.models import BillingStatus
from app.services import reconcile
from app.services.plans import PlanCatalogue
from app.services.subscription_state import SubscriptionState
from tests.conftest import SandboxAccount, checkout_session_id, csrf_token, query, start_signup
from tests.live_support import (
    SANDBOX_SECRET_KEY,
    SANDBOX_WEBHOOK_SECRET,
    WEBHOOK_PATH,
    LiveServer,
    Sandbox,
    free_port,
)


@pytest.fixture
def held_sandbox(
    live_server: Callable[..., LiveServer], sandbox: Callable[..., Sandbox]
) -> tuple[Flask, SandboxAccount]:
    """The app on a sandbox of its own (reconcile reads the whole Stripe account, so no other test's
    objects may be in it), with webhook delivery held: nothing the sandbox does reaches the app unless
    reconcile fetches it. Each signup's customer is on a test clock, so time can pass."""
    port = free_port()
    server = live_server(
        STRIPE_SECRET_KEY=SANDBOX_SECRET_KEY,
        STRIPE_WEBHOOK_SECRET=SANDBOX_WEBHOOK_SECRET,
        STRIPE_API_BASE=f"http://127.0.0.1:{port}",
        STRIPE_TEST_CLOCKS=True,
    )
    process = sandbox(f"{server.url}{WEBHOOK_PATH}", port=port, secret=SANDBOX_WEBHOOK_SECRET)
    held = requests.post(f"{process.url}/_sandbox/delivery", json={"mode": "hold"}, timeout=5)
    assert held.ok and held.json()["mode"] == "hold"
    assert server.app is not None
    return server.app, SandboxAccount(process.url, SANDBOX_SECRET_KEY)


def _sign_up(app: Flask, account: SandboxAccount, email: str) -> FlaskClient:
    """Sign up and pay; the success page provisions the organization (no webhook is delivered)."""
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, email=email, organization_name=f"Org of {email}"))
    account.pay(session_id)
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert response.status_code == 303, response.get_data(as_text=True)
    return client


def _subscription_of(app: Flask, email: str) -> str:
    [row] = query(
        app,
        "SELECT o.billing_subscription_id FROM organization o JOIN user_account u ON u.organization_id = o.id "
        "WHERE u.email = :e",
        e=email,
    )
    return str(row.billing_subscription_id)


def _reconcile(app: Flask, *args: str) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["billing", "reconcile", *args])
    return result.exit_code, result.output


def test_reconcile_finds_and_repairs_every_kind_of_drift(held_sandbox: tuple[Flask, SandboxAccount]) -> None:
    app, account = held_sandbox
    _sign_up(app, account, "ada@example.com")
    _sign_up(app, account, "grace@example.com")
    carol = _sign_up(app, account, "carol@example.com")

    # An orphan: two signups for one email, both paid; the first became the account, the second has
    # no organization and nobody comes back for it (the older checkout could not be expired in time).
    first_browser, second_browser = app.test_client(), app.test_client()
    first = checkout_session_id(start_signup(first_browser, email="dora@example.com"))
    account.fail_next("checkout.sessions.expire", kind="server", times=5)
    second = checkout_session_id(start_signup(second_browser, email="dora@example.com"))
    account.pay(first)
    account.pay(second)
    assert first_browser.get(f"/billing/complete-signup-from-stripe?session_id={first}").status_code == 303
    orphan = account.session(second)["subscription"]

    # Changes at Stripe that the app never hears about: a cancellation (API), a new quantity (API),
    # and a failed payment (Carol's new card is declined at the renewal on her test clock).
    ada, grace, carols = (_subscription_of(app, f"{n}@example.com") for n in ("ada", "grace", "carol"))
    account.api("DELETE", f"/v1/subscriptions/{ada}")
    seats = next(item for item in account.subscription(grace)["items"]["data"] if item["quantity"] == 2)
    account.api("POST", f"/v1/subscriptions/{grace}", {"items": [{"id": seats["id"], "quantity": 5}]})
    portal = carol.post("/billing/portal", data={"csrf_token": csrf_token(carol, "/billing/")})
    assert portal.status_code == 303
    account.update_card_in_portal(portal.headers["Location"], "4000 0000 0000 0341")
    subscription = account.subscription(carols)
    customer = account.api("GET", f"/v1/customers/{subscription['customer']}")
    period_end = subscription["items"]["data"][0]["current_period_end"]
    account.advance_clock(customer["test_clock"], period_end + 7200)
    assert account.subscription(carols)["status"] == "past_due"

    code, output = _reconcile(app)
    assert code == 1, output
    assert f"({ada}): status is 'active' here, 'canceled' at Stripe" in output
    assert f"({grace}): addons is {{'extra_seats': 2}} here, {{'extra_seats': 5}} at Stripe" in output
    assert f"({carols}): status is 'active' here, 'past_due' at Stripe" in output
    assert f"({carols}): current_period_end is" in output
    # Organizations and signups by name and email, not ids only.
    assert "Org of ada@example.com <ada@example.com> [organization " in output
    assert f"orphan subscription {orphan} of signup Analytical Engines <dora@example.com> (signup, active)" in output
    assert "missing event" in output and "customer.subscription.deleted" in output
    code, as_json = _reconcile(app, "--json")
    report = json.loads(as_json)
    assert code == 1 and report["clean"] is False
    assert {drift["subscription_id"] for drift in report["subscriptions"]} == {ada, grace, carols}
    assert [o["subscription_id"] for o in report["orphans"]] == [orphan]
    assert {e["type"] for e in report["missing_events"]} >= {
        "checkout.session.completed",
        "customer.subscription.deleted",
        "customer.subscription.updated",
        "invoice.paid",
        "invoice.payment_failed",
    }
    # One organization only.
    [ada_row] = query(app, "SELECT id FROM organization WHERE billing_subscription_id = :s", s=ada)
    code, as_json = _reconcile(app, "--org", str(ada_row.id), "--json")
    only_ada = json.loads(as_json)
    assert code == 1 and [drift["subscription_id"] for drift in only_ada["subscriptions"]] == [ada]
    assert only_ada["orphans"] == [] and {e["type"] for e in only_ada["missing_events"]} >= {
        "customer.subscription.deleted"
    }
    assert all(
        e["event_id"] not in {m["event_id"] for m in report["missing_events"] if m["type"] == "invoice.payment_failed"}
        for e in only_ada["missing_events"]
    )
    # A dry run changed nothing.
    assert account.subscription(orphan)["status"] == "active"
    assert {r.billing_status for r in query(app, "SELECT billing_status FROM organization")} == {"active"}
    assert not query(app, "SELECT id FROM stripe_event")

    code, output = _reconcile(app, "--apply")
    assert code == 0, output
    assert "Stripe and the database agree." in output and "canceled and refunded" in output
    rows = {r.billing_subscription_id: r for r in query(app, "SELECT * FROM organization")}
    assert rows[ada].billing_status == "canceled" and rows[carols].billing_status == "past_due"
    assert rows[carols].last_payment_status == "failed"  # the missed invoice.payment_failed, applied
    addons = query(
        app,
        "SELECT quantity FROM organization_addon a JOIN organization o ON o.id = a.organization_id "
        "WHERE o.billing_subscription_id = :s",
        s=grace,
    )
    assert [a.quantity for a in addons] == [5]
    # The orphan was canceled and its payment refunded, with keys derived from our ids.
    assert account.subscription(orphan)["status"] == "canceled"
    [pending] = query(app, "SELECT * FROM pending_signup WHERE checkout_session_id = :c", c=second)
    assert pending.settlement["amount_refunded"] > 0
    refunds = account.api("GET", "/v1/refunds")["data"]
    assert [r["id"] for r in refunds] == [pending.settlement["refund_id"]]
    assert len(query(app, "SELECT id FROM organization")) == 4
    # Every event Stripe sent is now stored, applied through the delivery path.
    assert not query(app, "SELECT event_id FROM stripe_event WHERE status = 'failed'")

    code, output = _reconcile(app)
    assert code == 0 and "Stripe and the database agree." in output, output


def test_reconcile_refuses_a_window_stripe_does_not_keep(app: Flask) -> None:
    code, output = _reconcile(app, "--since", "31")
    assert code == 2 and "31 is not in the range 1<=x<=30" in output


# --- The pure diff -------------------------------------------------------------------------------


CATALOGUE = PlanCatalogue.from_mapping(
    {
        "tiers": {"starter": {"name": "Starter", "lookup_key": "starter_monthly"}},
        "addons": {"extra_seats": {"name": "Extra seats", "lookup_key": "seat_monthly"}},
    }
)


def _subscription(**fields: Any) -> dict[str, Any]:
    subscription = {
        "id": "sub_1",
        "status": "active",
        "customer": "cus_1",
        "cancel_at_period_end": False,
        "cancel_at": None,
        "items": {
            "data": [
                {
                    "id": "si_t",
                    "price": {"id": "price_t", "lookup_key": "starter_monthly"},
                    "quantity": 1,
                    "current_period_end": 1_800_000_000,
                },
                {
                    "id": "si_s",
                    "price": {"id": "price_s", "lookup_key": "seat_monthly"},
                    "quantity": 2,
                    "current_period_end": 1_800_000_000,
                },
            ]
        },
    }
    subscription.update(fields)
    return subscription


HELD = reconcile.HeldBilling(
    organization_id=7,
    subscription_id="sub_1",
    status="active",
    tier="starter",
    addons={"extra_seats": 2},
    cancel_at_period_end=False,
    current_period_end=datetime.fromtimestamp(1_800_000_000, UTC),
    collection_paused=None,
)


def test_the_diff_names_each_field_that_differs() -> None:
    assert reconcile.diff_subscription(HELD, SubscriptionState.from_stripe(_subscription(), CATALOGUE)) == []
    state = SubscriptionState.from_stripe(
        _subscription(status="past_due", cancel_at=1_800_000_500, pause_collection={"behavior": "void"}), CATALOGUE
    )
    fields = {drift.field: (drift.ours, drift.stripe) for drift in reconcile.diff_subscription(HELD, state)}
    assert fields == {
        "status": ("active", BillingStatus.PAST_DUE.value),
        "cancel_at_period_end": (False, True),
        "current_period_end": (HELD.current_period_end, datetime.fromtimestamp(1_800_000_500, UTC)),
        "collection_paused": (None, "void"),
    }


def test_orphans_are_only_subscriptions_a_row_of_ours_explains() -> None:
    subscriptions = [
        _subscription(id="sub_held", metadata={"purpose": "signup", "pending_signup_id": "p1"}),
        _subscription(id="sub_conflict", metadata={"purpose": "signup", "pending_signup_id": "p2"}),
        _subscription(id="sub_async", status="incomplete", metadata={"purpose": "signup", "pending_signup_id": "p3"}),
        _subscription(id="sub_other_env", metadata={"purpose": "signup", "pending_signup_id": "p9"}),
        _subscription(id="sub_surplus", metadata={"purpose": "resubscribe", "organization_id": "7"}),
        _subscription(id="sub_ended", status="canceled", metadata={"purpose": "signup", "pending_signup_id": "p2"}),
        _subscription(id="sub_not_ours", metadata={}),
    ]
    orphans = reconcile.find_orphans(
        subscriptions, {"sub_held"}, {"p1": "completed", "p2": "failed", "p3": "pending"}, {"sub_surplus": "cs_9"}
    )
    assert [(o.subscription_id, o.kind, o.reference) for o in orphans] == [
        ("sub_conflict", "signup", "p2"),
        ("sub_other_env", "unknown", "p9"),
        ("sub_surplus", "resubscribe", "cs_9"),
    ]
    report = reconcile.ReconcileReport(orphans=[orphans[1]])
    assert report.clean  # another environment's subscription is reported, never acted on
    # ...and the report says it is left as it is, and why, instead of plainly "agree".
    lines = report.lines()
    assert lines[0].startswith("orphan subscription sub_other_env (active): left untouched: ")
    assert "no signup or checkout in this database explains it" in lines[0]
    assert "Stripe and the database agree." not in lines
    assert lines[-1] == (
        "Stripe and the database agree on everything this app holds. Left as they are: 1 subscription with "
        "this app's metadata that nothing here explains (listed above, with why)."
    )
    assert reconcile.ReconcileReport().lines() == ["Stripe and the database agree."]


def test_the_report_names_organizations_and_signups_for_people() -> None:
    report = reconcile.ReconcileReport(
        subscriptions=[reconcile.SubscriptionDrift(7, "sub_1", [reconcile.FieldDrift("status", "active", "canceled")])],
        orphans=[reconcile.Orphan("sub_2", "signup", "active", "p2", "signup p2 (failed) has no organization with it")],
        unsettled=[reconcile.Unsettled("resubscribe", "cs_9", "sub_3")],
    )
    names = reconcile.Names(
        organizations={7: "Analytical Engines <ada@example.com>"},
        signups={"p2": "Difference Engines <dora@example.com>"},
        resubscribes={"cs_9": "Analytical Engines <ada@example.com>"},
    )
    assert report.lines(names) == [
        "Analytical Engines <ada@example.com> [organization 7] (sub_1): status is 'active' here, 'canceled' at Stripe",
        "orphan subscription sub_2 of signup Difference Engines <dora@example.com> (signup, active): "
        "signup p2 (failed) has no organization with it",
        "not yet canceled and refunded: resubscribe cs_9 of Analytical Engines <ada@example.com> (sub_3)",
        "Drift remains.",
    ]
    # Without names (the daily job's log), ids as before.
    assert report.lines()[0] == "organization 7 (sub_1): status is 'active' here, 'canceled' at Stripe"


def test_missing_events_are_the_handled_ones_not_stored() -> None:
    events = [
        {"id": "evt_2", "type": "invoice.paid", "created": 20},
        {"id": "evt_1", "type": "customer.subscription.updated", "created": 10},
        {"id": "evt_3", "type": "refund.created", "created": 30},
        {"id": "evt_4", "type": "invoice.paid", "created": 40},
    ]
    missing = reconcile.find_missing_events(events, {"evt_4"}, ["invoice.paid", "customer.subscription.updated"])
    assert [event.event_id for event in missing] == ["evt_1", "evt_2"]


def test_an_orphan_stripe_cannot_refund_now_is_repaired_by_the_next_run(
    held_sandbox: tuple[Flask, SandboxAccount],
) -> None:
    app, account = held_sandbox
    first_browser, second_browser = app.test_client(), app.test_client()
    first = checkout_session_id(start_signup(first_browser, email="dora@example.com"))
    account.fail_next("checkout.sessions.expire", kind="server", times=5)
    second = checkout_session_id(start_signup(second_browser, email="dora@example.com"))
    account.pay(first)
    account.pay(second)
    assert first_browser.get(f"/billing/complete-signup-from-stripe?session_id={first}").status_code == 303
    orphan = account.session(second)["subscription"]

    account.fail_next("refunds.create", kind="server", times=50)  # down for the whole run
    code, output = _reconcile(app, "--apply")
    assert code == 1, output
    assert f"orphan {orphan}: not settled" in output and "Drift remains." in output
    assert not account.api("GET", "/v1/refunds")["data"]
    # Canceled, but not refunded: still drift, never forgotten.
    assert account.subscription(orphan)["status"] == "canceled"
    code, output = _reconcile(app)
    assert code == 1 and "not yet canceled and refunded: signup" in output, output

    requests.delete(f"{account.url}/_sandbox/faults", timeout=5).raise_for_status()
    code, output = _reconcile(app, "--apply")
    assert code == 0, output
    [refund] = account.api("GET", "/v1/refunds")["data"]
    [pending] = query(app, "SELECT settlement FROM pending_signup WHERE checkout_session_id = :c", c=second)
    assert refund["id"] == pending.settlement["refund_id"]
    assert account.subscription(orphan)["status"] == "canceled"


def test_reconcile_gives_each_customer_the_accounts_name_and_one_failing_leaves_the_rest_repaired(
    held_sandbox: tuple[Flask, SandboxAccount],
) -> None:
    """Two renamed organizations whose customers lost the name at Stripe (told to nobody), and Stripe
    refusing every change to Grace's customer: --apply repairs Ada's through the worker's customer-sync
    job and still reports Grace's; once Stripe answers again, the waiting job (retried) repairs it and a
    run after that sends Stripe nothing."""
    app, account = held_sandbox
    clients = {name: _sign_up(app, account, f"{name}@example.com") for name in ("ada", "grace")}
    for name, client in clients.items():
        response = client.post(
            "/billing/organization-name",
            data={"csrf_token": csrf_token(client, "/billing/"), "name": f"{name.title()} Co"},
        )
        assert response.status_code == 303
    organizations = {row.name: row for row in query(app, "SELECT * FROM organization")}
    ada, grace = (organizations[name].billing_customer_id for name in ("Ada Co", "Grace Co"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the live server's worker pushes each rename
        names = {account.api("GET", f"/v1/customers/{c}")["metadata"].get("organization_name") for c in (ada, grace)}
        if names == {"Ada Co", "Grace Co"}:
            break
        time.sleep(0.2)
    assert account.api("GET", f"/v1/customers/{ada}")["name"] == "Ada Co"
    for customer in (ada, grace):  # lost at Stripe, with no event
        account.force(customer, name=None, metadata={})
    refused = {"method": "POST", "path_regex": f"^/v1/customers/{grace}$", "kind": "server", "times": 1000}
    requests.post(f"{account.url}/_sandbox/faults", json=refused, timeout=10).raise_for_status()

    code, output = _reconcile(app)
    assert code == 1
    assert f"(customer {ada}): metadata.organization_name is 'Ada Co' here, none at Stripe" in output
    assert f"(customer {ada}): name is 'Ada Co' here, none at Stripe" in output
    assert f"(customer {grace}): name is 'Grace Co' here, none at Stripe" in output

    code, output = _reconcile(app, "--apply")
    assert code == 1, output
    repaired = account.api("GET", f"/v1/customers/{ada}")
    assert (repaired["name"], repaired["metadata"]["organization_name"]) == ("Ada Co", "Ada Co")
    report = output.split("\n")
    assert not [line for line in report if f"(customer {ada}): name is" in line]  # repaired
    assert f"(customer {grace}): name is 'Grace Co' here, none at Stripe" in output  # Stripe refused it
    assert account.api("GET", f"/v1/customers/{grace}")["name"] is None
    assert f"organization {organizations['Grace Co'].id} ({grace}) email" not in output  # only what differs

    # Stripe answers again; the retry falls due (time passes) and the next run repairs Grace's too.
    requests.delete(f"{account.url}/_sandbox/faults", timeout=10).raise_for_status()
    with app.app_context():
        db.session.execute(text("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'"))
        db.session.commit()
    code, output = _reconcile(app, "--apply")
    assert code == 0, output
    repaired = account.api("GET", f"/v1/customers/{grace}")
    assert (repaired["name"], repaired["metadata"]["organization_name"]) == ("Grace Co", "Grace Co")
    updates = len(account.calls_to("customers.update"))
    code, output = _reconcile(app, "--apply")
    assert code == 0 and "Stripe and the database agree." in output, output
    assert len(account.calls_to("customers.update")) == updates  # nothing sent twice
