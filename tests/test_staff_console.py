"""The operations console (/admin): staff only (every route 404s to anyone else, found from the url_map
so a new route is covered the day it is added), staff granted only from the command line and only with
two-factor sign-in, the append-only staff audit log, search, the organization page beside Stripe's live
subscription with drift highlighted, and the audited, idempotent actions. Real PostgreSQL, Redis, job
queue, SMTP and the offline Stripe sandbox (webhooks held: a change made at Stripe reaches the app only
when a test or a re-sync fetches it)."""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

import pyotp
import pytest
import sqlalchemy
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import SandboxAccount, SmtpSink, csrf_token, query, run_jobs, sign_up
from tests.test_accounts import client_at
from tests.test_two_factor import Clock, clock, enrol  # noqa: F401 (the clock fixture)

STAFF = "staff@ledgerline.example"
REQUEST_TOKEN = re.compile(r'name="request_token" type="hidden" value="([0-9a-f]{32})"')


class Staff:
    def __init__(self, client: FlaskClient, totp: pyotp.TOTP, held: Clock) -> None:
        self.client, self.totp, self.clock = client, totp, held

    def code(self) -> str:
        """A code of the next 30-second step (each step's code is accepted once)."""
        self.clock.advance(30)
        return str(self.totp.at(self.clock.now))


def cli(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount, clock: Clock) -> FlaskClient:  # noqa: F811
    client = client_at(app, "192.0.2.10")
    sign_up(client, offline_stripe)
    return client


@pytest.fixture
def staff(app: Flask, offline_stripe: SandboxAccount, owner: FlaskClient, clock: Clock) -> Staff:  # noqa: F811
    client = client_at(app, "192.0.2.11")
    sign_up(client, offline_stripe, email=STAFF, organization_name="Ledgerline support")
    refused = cli(app, "users", "grant-staff", STAFF)
    assert refused.exit_code == 1 and "has no two-factor sign-in" in refused.output
    totp, _codes = enrol(client, clock)
    granted = cli(app, "users", "grant-staff", STAFF.upper(), "--reason", "support rota")
    assert granted.exit_code == 0 and f"{STAFF} is staff now" in granted.output, granted.output
    return Staff(client, totp, clock)


def organization_of(app: Flask, email: str) -> Any:
    [row] = query(
        app,
        "SELECT o.* FROM organization o JOIN user_account u ON u.organization_id = o.id WHERE u.email = :e",
        e=email,
    )
    return row


def act(staff: Staff, organization_id: int, action: str, target: str = "", **fields: str) -> tuple[Any, str]:
    """Open the action's confirmation page and submit it; returns the answer and the form's token."""
    path = f"/admin/organizations/{organization_id}/actions/{action}" + (f"?target={target}" if target else "")
    page = staff.client.get(path)
    assert page.status_code == 200, page.get_data(as_text=True)
    token = REQUEST_TOKEN.search(page.get_data(as_text=True))
    assert token, page.get_data(as_text=True)
    return submit(staff, path, token.group(1), target, **fields), token.group(1)


def submit(staff: Staff, path: str, token: str, target: str = "", **fields: str) -> Any:
    data = {"csrf_token": csrf_token(staff.client, path), "request_token": token, "target": target, **fields}
    return staff.client.post(path, data=data)


def audit_rows(app: Flask, action: str) -> list[Any]:
    return query(app, "SELECT * FROM staff_audit WHERE action = :a ORDER BY id", a=action)


def console_urls(app: Flask, organization_id: int) -> list[tuple[str, str]]:
    """Every console route with its arguments filled in (an action route once for each action there
    is), and each of its methods; every view of the console's blueprint is among them."""
    from app.services.staff_actions import ACTIONS

    choices: dict[str, list[Any]] = {"organization_id": [organization_id], "action": sorted(ACTIONS)}
    found, endpoints = [], set()
    with app.test_request_context():
        for rule in app.url_map.iter_rules():
            if not rule.endpoint.startswith("admin."):
                continue
            endpoints.add(rule.endpoint)
            names = sorted(rule.arguments)
            for combination in itertools.product(*(choices.get(name, ["1"]) for name in names)):
                path = rule.build(dict(zip(names, combination, strict=True)), append_unknown=False)
                assert path is not None
                found += [(method, path[1]) for method in sorted(rule.methods or ()) if method in ("GET", "POST")]
    assert endpoints == {name for name in app.view_functions if name.startswith("admin.")}
    return found


def test_every_console_route_is_404_to_anonymous_visitors_customers_and_staff_without_two_factor(
    app: Flask, owner: FlaskClient, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    routes = console_urls(app, organization.id)
    assert {path for _, path in routes} >= {"/admin/", "/admin/queue", "/admin/audit", "/admin/view-as/stop"}
    assert ("POST", f"/admin/organizations/{organization.id}/actions/apply_coupon") in routes
    assert len(routes) >= 20
    anonymous = app.test_client()
    for method, path in routes:
        assert anonymous.open(path, method=method).status_code == 404, (method, path)
        assert owner.open(path, method=method).status_code == 404, (method, path)
    # The flag alone (set behind the command line's back) is not enough without two-factor sign-in.
    with app.app_context():
        from app.extensions import db

        db.session.execute(sqlalchemy.text("UPDATE user_account SET is_staff = true"))
        db.session.commit()
    for method, path in routes:
        assert owner.open(path, method=method).status_code == 404, (method, path)
    assert "console-link" not in owner.get("/app").get_data(as_text=True)
    assert query(app, "SELECT count(*) AS n FROM staff_audit")[0].n == 0


def test_staff_are_granted_and_revoked_only_from_the_command_line_and_every_grant_is_audited(
    app: Flask, staff: Staff
) -> None:
    assert staff.client.get("/admin/").status_code == 200
    assert 'id="console-link"' in staff.client.get("/app").get_data(as_text=True)
    [granted] = audit_rows(app, "staff.granted")
    assert granted.staff_email == "command line" and granted.reason == "support rota"
    assert granted.before == {"is_staff": False} and granted.after == {"is_staff": True}
    assert cli(app, "users", "revoke-staff", STAFF).exit_code == 0
    assert staff.client.get("/admin/").status_code == 404
    assert [row.after for row in audit_rows(app, "staff.revoked")] == [{"is_staff": False}]
    assert cli(app, "users", "grant-staff", "nobody@example.com").exit_code == 1


def test_the_staff_audit_log_cannot_be_changed_or_deleted(app: Flask, staff: Staff) -> None:
    with app.app_context():
        from app.extensions import db

        for statement in ("UPDATE staff_audit SET reason = 'nothing happened'", "DELETE FROM staff_audit"):
            with pytest.raises(sqlalchemy.exc.InternalError, match="staff_audit is append-only"):
                db.session.execute(sqlalchemy.text(statement))
            db.session.rollback()
    assert [row.reason for row in audit_rows(app, "staff.granted")] == ["support rota"]


def test_search_drift_and_resync_are_audited_and_a_double_submit_acts_once(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    subscription_id, customer_id = organization.billing_subscription_id, organization.billing_customer_id
    for term in ("ada@example.com", "analytical", customer_id, subscription_id):
        page = staff.client.get("/admin/", query_string={"q": term}).get_data(as_text=True)
        assert f"/admin/organizations/{organization.id}" in page, term
        assert "Ledgerline support" not in page or term == "analytical"
    assert "Nothing matches" in staff.client.get("/admin/?q=cus_doesnotexist").get_data(as_text=True)

    # Drift: the customer's cancellation at Stripe never reached the app (webhooks are held).
    offline_stripe.api("POST", f"/v1/subscriptions/{subscription_id}", {"cancel_at_period_end": True})
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    assert 'id="drift-banner"' in page
    drifted = re.search(r'<tr class="drift" data-field="cancel_at_period_end"[^>]*>(.*?)</tr>', page, re.S)
    assert drifted and "False" in drifted.group(1) and "True" in drifted.group(1)
    assert '<tr class="drift" data-field="status"' not in page  # only what differs is highlighted

    # A reason is required; nothing is done or audited without one.
    refused, token = act(staff, organization.id, "resync", reason="")
    assert refused.status_code == 422 and audit_rows(app, "resync") == []
    path = f"/admin/organizations/{organization.id}/actions/resync"
    done = submit(staff, path, token, reason="customer says they cancelled")
    assert done.status_code == 303
    again = submit(staff, path, token, reason="customer says they cancelled")  # the same form, again
    assert again.status_code == 303
    # Queued for the worker, not done in the request: a durable job, visible in the queue's figures.
    [entry] = audit_rows(app, "resync")
    assert entry.staff_email == STAFF and entry.organization_id == organization.id
    assert entry.reason == "customer says they cancelled" and "queued for the worker" in entry.outcome
    assert entry.before["cancel_at_period_end"] is False and audit_rows(app, "resync.done") == []
    assert organization_of(app, "ada@example.com").cancel_at_period_end is False
    [job] = query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'staff:resync'")
    assert job.status == "todo" and job.args["organization_id"] == organization.id
    assert job.lock == f"stripe:subscription:{subscription_id}"  # never beside the worker's other writes to it
    queue_page = staff.client.get("/admin/queue").get_data(as_text=True)
    assert f'<tr class="resync-job" data-status="todo"><td>{job.id}</td>' in queue_page
    assert "Already done by this form" in queue_page  # the second submit was told, not acted on
    run_jobs(app)
    [done] = audit_rows(app, "resync.done")  # written by the worker when done, once for the two submits
    assert done.staff_email == STAFF and done.reason == "customer says they cancelled"
    assert done.before["cancel_at_period_end"] is False and done.after["cancel_at_period_end"] is True
    assert "cancel_at_period_end False -> True" in done.outcome
    assert organization_of(app, "ada@example.com").cancel_at_period_end is True
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    assert 'id="in-agreement"' in page and 'class="drift"' not in page
    assert f'<tr class="resync-job" data-status="succeeded"><td>{job.id}</td>' in page
    assert "customer says they cancelled" in staff.client.get("/admin/audit").get_data(as_text=True)


def test_a_refund_asks_for_a_two_factor_code_and_refunds_once(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    invoice_id = re.search(r'id="refund-(in_[A-Za-z0-9]+)"', page)
    assert invoice_id, page
    invoice = offline_stripe.api("GET", f"/v1/invoices/{invoice_id.group(1)}", {"expand": ["payments"]})
    intent = invoice["payments"]["data"][0]["payment"]["payment_intent"]
    path = f"/admin/organizations/{organization.id}/actions/refund?target={invoice_id.group(1)}"

    no_code, token = act(staff, organization.id, "refund", invoice_id.group(1), reason="charged twice", amount="5")
    assert no_code.status_code == 401 and "moves money" in no_code.get_data(as_text=True)
    assert offline_stripe.calls_to("refunds.create") == []
    done = submit(staff, path, token, invoice_id.group(1), reason="charged twice", amount="5", code=staff.code())
    assert done.status_code == 303, done.get_data(as_text=True)
    again = submit(staff, path, token, invoice_id.group(1), reason="charged twice", amount="5", code=staff.code())
    assert again.status_code == 303
    charge = offline_stripe.api("GET", f"/v1/payment_intents/{intent}")["latest_charge"]
    assert offline_stripe.api("GET", f"/v1/charges/{charge}")["amount_refunded"] == 500
    [entry] = audit_rows(app, "refund")
    assert entry.target == invoice_id.group(1) and entry.reason == "charged twice" and "Refunded $5.00" in entry.outcome

    # The refund is shown beside its invoice and its payment, read live from Stripe.
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    row = re.search(rf'<tr data-invoice="{invoice_id.group(1)}">(.*?)</tr>', page, re.S)
    assert row and '<td class="refunded">$5.00</td>' in row.group(1), page
    payment = re.search(rf'<tr data-payment="{charge}" class="refunded">(.*?)</tr>', page, re.S)
    assert payment and f"<code>{invoice_id.group(1)}</code>" in payment.group(1)
    [refund] = offline_stripe.api("GET", "/v1/refunds", {"charge": charge})["data"]
    assert f'data-refund="{refund["id"]}"' in payment.group(1) and "$5.00" in payment.group(1)
    # Stripe not answering the payments read: named there, and the rest of the page is shown.
    offline_stripe.fail_next("charges.list", "connection")
    page = staff.client.get(f"/admin/organizations/{organization.id}")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'id="payments-unavailable"' in text and "Stripe did not answer" in text
    assert f'<tr data-invoice="{invoice_id.group(1)}">' in text and 'id="timeline"' in text
    assert 'id="in-agreement"' in text
    assert f'data-refund="{refund["id"]}"' not in text
    offline_stripe.fail_next("refunds.list", "server")
    text = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    assert f'<tr data-payment="{charge}" class="refunded">' in text and "Stripe did not answer" in text


def test_cancel_at_period_end_and_undo_it_at_stripe_and_in_the_database(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    done, _ = act(staff, organization.id, "cancel_at_period_end", reason="asked by phone", code=staff.code())
    assert done.status_code == 303, done.get_data(as_text=True)
    assert offline_stripe.subscription(organization.billing_subscription_id)["cancel_at_period_end"] is True
    assert organization_of(app, "ada@example.com").cancel_at_period_end is True
    undone, _ = act(staff, organization.id, "resume", reason="changed their mind", code=staff.code())
    assert undone.status_code == 303, undone.get_data(as_text=True)
    assert offline_stripe.subscription(organization.billing_subscription_id)["cancel_at_period_end"] is False
    assert organization_of(app, "ada@example.com").cancel_at_period_end is False
    [cancel] = audit_rows(app, "cancel_at_period_end")
    [resume] = audit_rows(app, "resume")
    assert cancel.before["cancel_at_period_end"] is False and cancel.after["cancel_at_period_end"] is True
    assert resume.before["cancel_at_period_end"] is True and resume.after["cancel_at_period_end"] is False
    # The owner's audit log names who did it as Ledgerline's support, not as "a former member".
    with app.app_context():
        from app.services import audit_log

        owners_log = audit_log.entries(organization.id, app.extensions["plan_catalogue"])
    scheduled = next(entry for entry in owners_log if entry.what.startswith("Cancellation scheduled"))
    assert scheduled.by == "Ledgerline support"


def test_the_organization_page_says_stripe_did_not_answer_and_shows_the_rest(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    page = staff.client.get(f"/admin/organizations/{organization.id}")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'id="provider-unavailable"' in text and "Stripe did not answer" in text
    assert "ada@example.com" in text and 'id="timeline"' in text and "signup.completed" in text

    # A Stripe slower than the page-read timeout: the first read is not answered, and the page does
    # not wait for the others (one timeout, not one per read); the database's side is all there.
    app.config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"] = 0.3
    app.extensions.pop("stripe_read_client", None)
    offline_stripe.set_latency(2)
    try:
        page = staff.client.get(f"/admin/organizations/{organization.id}")
    finally:
        offline_stripe.set_latency(0)
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'id="provider-unavailable"' in text and "ada@example.com" in text
    for unread in ("invoices-unavailable", "payments-unavailable"):
        shown = re.search(rf'id="{unread}">([^<]*)<', text)
        assert shown and "was not asked again" in shown.group(1), text


def test_the_queue_shows_a_failed_event_and_staff_replay_it(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    offline_stripe.api(
        "POST", f"/v1/subscriptions/{organization.billing_subscription_id}", {"cancel_at_period_end": True}
    )
    held = [e for e in offline_stripe.take_events() if e["type"] == "customer.subscription.updated"][-1]
    stored = staff.client.post("/billing/webhooks/stripe", data=held["payload"].encode(), headers=held["headers"])
    assert stored.status_code in (200, 202), stored.get_data(as_text=True)
    event = json.loads(held["payload"])
    # Its application failed for good (as after a bug in the reading code, since fixed).
    with app.app_context():
        from app.extensions import db

        db.session.execute(
            sqlalchemy.text(
                "UPDATE stripe_event SET status = 'failed', attempts = 5, last_error = 'boom' WHERE event_id = :e"
            ),
            {"e": event["id"]},
        )
        db.session.execute(sqlalchemy.text("DELETE FROM procrastinate_jobs"))
        db.session.commit()
    queue = staff.client.get("/admin/queue?status=failed").get_data(as_text=True)
    assert event["id"] in queue and "boom" in queue
    found = staff.client.get("/admin/", query_string={"q": event["id"]}).get_data(as_text=True)
    assert f"/admin/organizations/{organization.id}" in found
    done, _ = act(staff, organization.id, "replay", event["id"], reason="fixed the bug")
    assert done.status_code == 303, done.get_data(as_text=True)
    run_jobs(app)
    assert query(app, "SELECT status FROM stripe_event WHERE event_id = :e", e=event["id"])[0].status == "processed"
    assert organization_of(app, "ada@example.com").cancel_at_period_end is True
    [entry] = audit_rows(app, "replay")
    assert entry.target == event["id"] and "queued" in entry.outcome


def test_view_as_the_owner_is_read_only_audited_and_ends_after_fifteen_minutes(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    path = f"/admin/organizations/{organization.id}/view-as-owner"
    assert staff.client.post(path, data={"csrf_token": csrf_token(staff.client, path), "reason": ""}).status_code == 422
    started = staff.client.post(path, data={"csrf_token": csrf_token(staff.client, path), "reason": "ticket 42"})
    assert started.status_code == 303 and started.headers["Location"] == "/app"
    page = staff.client.get("/billing/").get_data(as_text=True)
    assert 'id="view-as-banner"' in page and "viewing as ada@example.com" in page and "Analytical Engines" in page
    token = csrf_token(staff.client, "/billing/")
    refused = staff.client.post("/billing/portal", data={"csrf_token": token})
    assert refused.status_code == 403 and offline_stripe.calls_to("billing_portal.sessions.create") == []
    assert staff.client.get("/admin/").status_code == 404  # the console is not the owner's
    [entry] = audit_rows(app, "view_as_owner")
    assert entry.staff_email == STAFF and entry.reason == "ticket 42" and entry.target.startswith("user:")

    # Ended by hand: back to the organization's console page, and audited.
    stop = staff.client.post("/admin/view-as/stop", data={"csrf_token": csrf_token(staff.client, "/app")})
    assert stop.status_code == 303 and stop.headers["Location"] == f"/admin/organizations/{organization.id}"
    assert [row.outcome for row in audit_rows(app, "view_as_owner.ended")] == ["stopped viewing as the owner"]
    assert 'id="view-as-banner"' not in staff.client.get("/app").get_data(as_text=True)

    # Ended on its own after 15 minutes.
    staff.client.post(path, data={"csrf_token": csrf_token(staff.client, path), "reason": "ticket 43"})
    assert 'id="view-as-banner"' in staff.client.get("/app").get_data(as_text=True)
    staff.clock.advance(15 * 60 + 1)
    page = staff.client.get("/app").get_data(as_text=True)
    assert 'id="view-as-banner"' not in page and "Ledgerline support" in page
    assert [row.reason for row in audit_rows(app, "view_as_owner")] == ["ticket 42", "ticket 43"]


def test_extend_a_trial_at_stripe_and_in_the_database_once(
    app: Flask,
    offline_stripe: SandboxAccount,
    clock: Clock,  # noqa: F811
) -> None:
    trialing = client_at(app, "192.0.2.12")
    sign_up(trialing, offline_stripe, email="grace@example.com", tier="pro")
    staff_client = client_at(app, "192.0.2.13")
    sign_up(staff_client, offline_stripe, email=STAFF, organization_name="Ledgerline support")
    totp, _ = enrol(staff_client, clock)
    assert cli(app, "users", "grant-staff", STAFF).exit_code == 0
    staff = Staff(staff_client, totp, clock)
    organization = organization_of(app, "grace@example.com")
    assert organization.billing_status == "trialing"
    before = int(organization.trial_end.timestamp())
    path = f"/admin/organizations/{organization.id}/actions/extend_trial"
    too_long, token = act(staff, organization.id, "extend_trial", reason="outage", days="400", code=staff.code())
    assert too_long.status_code == 409 and "1 to 90 days" in too_long.get_data(as_text=True)
    done = submit(staff, path, token, reason="outage on our side", days="7", code=staff.code())
    assert done.status_code == 303, done.get_data(as_text=True)
    again = submit(staff, path, token, reason="outage on our side", days="7", code=staff.code())
    assert again.status_code == 303
    subscription = offline_stripe.subscription(organization.billing_subscription_id)
    assert subscription["trial_end"] == before + 7 * 86400  # once, not twice
    assert int(organization_of(app, "grace@example.com").trial_end.timestamp()) == before + 7 * 86400
    refusal, entry = audit_rows(app, "extend_trial")  # a refusal is audited too, without the form's token
    assert refusal.outcome.startswith("refused: ") and refusal.request_key is None
    assert entry.reason == "outage on our side" and entry.after["trial_end"] != entry.before["trial_end"]
    # Not for a paying subscription.
    ada = organization_of(app, STAFF)
    refused, _ = act(staff, ada.id, "extend_trial", reason="why not", days="7", code=staff.code())
    assert refused.status_code == 409 and "free trial" in refused.get_data(as_text=True)


def test_a_failed_email_is_shown_and_sent_again_once(
    make_app: Any,
    offline_stripe: SandboxAccount,
    smtp_server: SmtpSink,
    clock: Clock,  # noqa: F811
) -> None:
    app = make_app(JOB_RETRY_BASE_SECONDS=0, OUTBOX_MAX_ATTEMPTS=2)
    sign_up(client_at(app, "192.0.2.14"), offline_stripe)
    staff_client = client_at(app, "192.0.2.15")
    sign_up(staff_client, offline_stripe, email=STAFF, organization_name="Ledgerline support")
    totp, _ = enrol(staff_client, clock)
    assert cli(app, "users", "grant-staff", STAFF).exit_code == 0
    staff = Staff(staff_client, totp, clock)
    run_jobs(app)
    # The password-reset link never leaves: the mail server refuses it until the delivery gives up.
    stranger = client_at(app, "192.0.2.16")
    asked = stranger.post(
        "/auth/forgot-password",
        data={"csrf_token": csrf_token(stranger, "/auth/forgot-password"), "email": "ada@example.com"},
    )
    assert asked.status_code == 200
    smtp_server.refuse_next(10)
    run_jobs(app)
    smtp_server.refuse_next(0)
    sent_before = len(smtp_server.to("ada@example.com"))
    organization = organization_of(app, "ada@example.com")
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    failed = re.search(r"user.password_reset_requested · event (\d+)", page)
    assert failed and "not sent (gave up)" in page, page
    queue = staff.client.get("/admin/queue").get_data(as_text=True)
    assert re.search(rf'<tr class="failed-email"><td>{failed.group(1)}</td><td>user.password_reset_requested', queue)
    done, token = act(staff, organization.id, "resend", failed.group(1), reason="customer never got the link")
    assert done.status_code == 303, done.get_data(as_text=True)
    path = f"/admin/organizations/{organization.id}/actions/resend?target={failed.group(1)}"
    assert submit(staff, path, token, failed.group(1), reason="customer never got the link").status_code == 303
    run_jobs(app)
    assert len(smtp_server.to("ada@example.com")) == sent_before + 1
    [entry] = audit_rows(app, "resend")
    assert entry.target == failed.group(1) and "queued again" in entry.outcome


def test_apply_a_coupon_at_stripe_asks_for_a_code_is_audited_and_applied_once(
    app: Flask, staff: Staff, owner: FlaskClient, offline_stripe: SandboxAccount
) -> None:
    organization = organization_of(app, "ada@example.com")
    coupon = offline_stripe.api("POST", "/v1/coupons", {"percent_off": 25, "duration": "forever", "name": "Goodwill"})
    page = staff.client.get(f"/admin/organizations/{organization.id}").get_data(as_text=True)
    assert 'id="action-apply_coupon"' in page
    path = f"/admin/organizations/{organization.id}/actions/apply_coupon"
    no_code, token = act(staff, organization.id, "apply_coupon", reason="outage credit", coupon=coupon["id"])
    assert no_code.status_code == 401 and "moves money" in no_code.get_data(as_text=True)
    assert offline_stripe.subscription(organization.billing_subscription_id)["discounts"] == []
    unknown, _ = act(staff, organization.id, "apply_coupon", reason="outage credit", coupon="NOPE", code=staff.code())
    assert unknown.status_code == 409 and "Stripe refused the coupon" in unknown.get_data(as_text=True)
    done = submit(staff, path, token, reason="outage credit", coupon=coupon["id"], code=staff.code())
    assert done.status_code == 303, done.get_data(as_text=True)
    again = submit(staff, path, token, reason="outage credit", coupon=coupon["id"], code=staff.code())
    assert again.status_code == 303
    subscription = offline_stripe.api(
        "GET", f"/v1/subscriptions/{organization.billing_subscription_id}", {"expand": ["discounts.source.coupon"]}
    )
    [discount] = subscription["discounts"]  # once, not twice
    assert discount["source"]["coupon"]["id"] == coupon["id"] and discount["source"]["coupon"]["times_redeemed"] == 1
    refusal, entry = audit_rows(app, "apply_coupon")  # the unknown coupon's refusal is audited too
    assert refusal.target == "NOPE" and refusal.outcome.startswith("refused: ") and refusal.request_key is None
    assert entry.target == coupon["id"] and entry.reason == "outage credit" and entry.staff_email == STAFF
    assert f"Coupon {coupon['id']} applied" in entry.outcome and entry.request_key.endswith(token)
    # The owner's billing page (its Stripe reads forgotten by the action) shows the discount at once.
    billing = owner.get("/billing/").get_data(as_text=True)
    assert re.search(r'id="discount">\s*<span class="discount-line">Goodwill:\s+25% off, for as long as', billing)
    assert re.search(r'id="next-invoice">\s*\$21\.75 on', billing), billing  # $29.00 less a quarter
    # A second coupon joins the first rather than replacing it.
    other = offline_stripe.api("POST", "/v1/coupons", {"amount_off": 100, "currency": "usd", "duration": "once"})
    done, _ = act(staff, organization.id, "apply_coupon", reason="second credit", coupon=other["id"], code=staff.code())
    assert done.status_code == 303, done.get_data(as_text=True)
    assert len(offline_stripe.subscription(organization.billing_subscription_id)["discounts"]) == 2


def test_a_resync_stripe_does_not_answer_is_retried_by_the_worker_and_audited_when_done(
    make_app: Any,
    offline_stripe: SandboxAccount,
    clock: Clock,  # noqa: F811
) -> None:
    app = make_app(JOB_RETRY_BASE_SECONDS=0, JOB_MAX_ATTEMPTS=2)
    sign_up(client_at(app, "192.0.2.17"), offline_stripe)
    staff_client = client_at(app, "192.0.2.18")
    sign_up(staff_client, offline_stripe, email=STAFF, organization_name="Ledgerline support")
    totp, _ = enrol(staff_client, clock)
    assert cli(app, "users", "grant-staff", STAFF).exit_code == 0
    staff = Staff(staff_client, totp, clock)
    run_jobs(app)
    organization = organization_of(app, "ada@example.com")
    subscription_id = organization.billing_subscription_id
    offline_stripe.api("POST", f"/v1/subscriptions/{subscription_id}", {"cancel_at_period_end": True})

    # Stripe fails the job's first attempt; the worker tries again and the re-sync is done.
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    done, _ = act(staff, organization.id, "resync", reason="ticket 7")
    assert done.status_code == 303, done.get_data(as_text=True)
    run_jobs(app)
    [job] = query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'staff:resync'")
    assert (job.status, job.attempts) == ("succeeded", 2)  # the failed attempt, then the one that did it
    [entry] = audit_rows(app, "resync.done")
    assert entry.after["cancel_at_period_end"] is True and organization_of(app, "ada@example.com").cancel_at_period_end

    # Stripe fails every attempt: the job fails, visible in the queue, and the log says so.
    offline_stripe.api("POST", f"/v1/subscriptions/{subscription_id}", {"cancel_at_period_end": False})
    offline_stripe.fail_next("subscriptions.retrieve", "server", times=10)
    act(staff, organization.id, "resync", reason="ticket 8")
    run_jobs(app)
    failed = query(app, "SELECT * FROM procrastinate_jobs WHERE task_name = 'staff:resync' AND status = 'failed'")
    assert [row.attempts for row in failed] == [2]
    assert "staff:resync 1" in staff.client.get("/admin/queue").get_data(as_text=True)
    gave_up = audit_rows(app, "resync.done")[-1]
    assert gave_up.reason == "ticket 8" and gave_up.outcome.startswith("failed, not retried again")
    assert organization_of(app, "ada@example.com").cancel_at_period_end is True  # left as it was


def test_scheduled_changes_are_shown_beside_stripes_with_the_differences_highlighted(
    app: Flask, staff: Staff, offline_stripe: SandboxAccount
) -> None:
    from tests.test_plan_changes import Owner, Stack

    client = client_at(app, "192.0.2.19")
    sign_up(client, offline_stripe, email="grace@example.com", tier="business", organization_name="Grace Co")
    organization = organization_of(app, "grace@example.com")
    path = f"/admin/organizations/{organization.id}"

    def rows() -> dict[str, tuple[str, str, str]]:
        page = staff.client.get(path).get_data(as_text=True)
        table = re.search(r'<table class="card" id="scheduled">(.*?)</table>', page, re.S)
        assert table, page
        found = re.findall(
            r'<tr class="(drift|same)" data-field="([a-z ]+)">.*?<td>(.*?)</td><td>(.*?)</td>', table.group(1), re.S
        )
        return {name: (state, ours, theirs) for state, name, ours, theirs in found}

    assert rows() == {"cancellation": ("same", "none", "none"), "plan change": ("same", "none", "none")}

    # The owner schedules a downgrade for the period's end: both sides hold it.
    owner = Owner(Stack(app, offline_stripe), client, organization.id, organization.billing_subscription_id)
    _, ticket = owner.preview_plan("starter")
    assert owner.confirm(ticket).status_code == 303
    period_end = owner.subscription()["items"]["data"][0]["current_period_end"]
    day = time.strftime("%Y-%m-%d", time.gmtime(period_end))
    scheduled = rows()
    assert scheduled["plan change"] == ("same", f"Starter (monthly) from {day}", f"Starter (monthly) from {day}")
    # The schedule not read in time: named, not a difference, and the rest of the page is there.
    offline_stripe.fail_next("subscription_schedules.retrieve", "connection")
    page = staff.client.get(path).get_data(as_text=True)
    assert 'id="schedule-unavailable"' in page and 'id="in-agreement"' in page and 'id="timeline"' in page
    assert '<tr class="same" data-field="plan change">' in page

    # At Stripe the schedule is released and a cancellation set; the app heard of neither.
    schedule_id = owner.subscription()["schedule"]
    offline_stripe.api("POST", f"/v1/subscription_schedules/{schedule_id}/release")
    subscription_path = f"/v1/subscriptions/{organization.billing_subscription_id}"
    offline_stripe.api("POST", subscription_path, {"cancel_at_period_end": True})
    drifted = rows()
    assert drifted["plan change"] == ("drift", f"Starter (monthly) from {day}", "none")
    assert drifted["cancellation"] == ("drift", "none", f"ends {day}")
