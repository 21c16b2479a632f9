"""Whop as the second provider, end to end over real HTTP: the app (live server, real PostgreSQL and
Redis) and the offline Whop double. Signup through the same SignupService path as Stripe (redirect
first and webhook first), the membership lifecycle from Whop's events, the owner's actions through
Whop's API, and reconcile repairing a missed deactivation."""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app.extensions import db
from tests.conftest import (
    SandboxAccount,
    SmtpSink,
    checkout_session_id,
    csrf_token,
    email_text,
    query,
    run_jobs,
    signup_form,
)
from tests.live_support import LiveServer, free_port, wait_until
from tests.test_two_factor import Clock, clock, enrol  # noqa: F401 (the clock fixture)
from tests.whop_double import WhopDouble

SECRET = "ws_whop_billing_suite_0123456789"
ACCOUNT = "biz_billing_suite"
TOKEN = "0123456789abcdef0123456789abcdef"
PENDING_OBJECTS = "SELECT DISTINCT object_key FROM whop_event WHERE status = 'pending' ORDER BY object_key"


@dataclass
class Pair:
    server: LiveServer
    double: WhopDouble

    @property
    def app(self) -> Flask:
        assert self.server.app is not None
        return self.server.app

    def organizations(self) -> list[Any]:
        return query(self.app, "SELECT * FROM organization ORDER BY id")

    def applied(self) -> Pair:
        """What the worker does with stored Whop events: BillingService.apply_queued_events for each
        object with pending events (called directly, as the webhooks:apply job does, so these tests
        do not start a procrastinate worker beside a live server)."""
        from app.services.billing_service import BillingService

        keys = [row.object_key for row in query(self.app, PENDING_OBJECTS)]
        with self.app.app_context():
            for key in keys:
                BillingService.apply_queued_events("whop", key)
        return self

    def stored(self, count: int) -> Pair:
        """Wait until this many Whop deliveries are stored, then apply them (one worker run, not one
        per poll)."""
        wait_until(lambda: len(query(self.app, "SELECT id FROM whop_event")) >= count, 10, f"{count} events stored")
        return self.applied()

    def organization(self) -> Any:
        [row] = self.organizations()
        return row

    def events(self) -> Counter[str]:
        return Counter(row.name for row in query(self.app, "SELECT name FROM domain_event"))

    def deliver_held(self) -> list[int]:
        """Take the held events and deliver each, as Whop would, to the app's endpoint."""
        taken = self.double.control("deliveries/take")["events"]
        return [
            requests.post(
                f"{self.server.url}/billing/webhooks/whop", data=e["payload"], headers=e["headers"], timeout=10
            ).status_code
            for e in taken
        ]


@pytest.fixture
def pair(live_server: Callable[..., LiveServer], tmp_path: Path) -> Iterator[Pair]:
    port = free_port()
    server = live_server(
        WHOP_API_KEY="apik_billing_suite",
        WHOP_WEBHOOK_SECRET=SECRET,
        WHOP_COMPANY_ID=ACCOUNT,
        WHOP_API_BASE=f"http://127.0.0.1:{port}/whop/api/v1",
    )
    double = WhopDouble(
        port=port,
        webhook_url=f"{server.url}/billing/webhooks/whop",
        secrets=SECRET,
        account_id=ACCOUNT,
        log=tmp_path / "whop.log",
    ).start()
    yield Pair(server, double)
    double.stop()


def start_whop_signup(client: FlaskClient, **fields: Any) -> Any:
    form = signup_form(client, payment_provider="whop", addon_extra_seats="0", **fields)
    return client.post("/auth/signup", data=form)


def pay_on_whop(pair: Pair, client: FlaskClient) -> str:
    """Sign up through Whop and pay on the double's page; returns the app path Whop sends the buyer to."""
    response = start_whop_signup(client)
    assert response.status_code == 303, response.get_data(as_text=True)
    purchase_url = response.headers["Location"]
    assert purchase_url.startswith(f"{pair.double.url}/whop/checkout/ch_")
    paid = pair.double.pay(purchase_url)
    assert paid.status_code == 303, paid.text
    back = urlsplit(paid.headers["Location"])
    assert f"{back.scheme}://{back.netloc}" == pair.server.url
    assert back.path == "/billing/complete-signup-from-whop"
    return f"{back.path}?{back.query}"


# --- Signup ----------------------------------------------------------------------------------------


def test_signup_through_whop_redirect_first(pair: Pair) -> None:
    pair.double.control("delivery", {"mode": "hold"})  # the webhooks wait until the redirect is done
    client = pair.app.test_client()
    back = pay_on_whop(pair, client)
    landed = client.get(back)
    assert landed.status_code == 303 and landed.headers["Location"] == "/app"
    assert client.get("/app").status_code == 200  # signed in, in the browser that signed up

    org = pair.organization()
    assert (org.billing_provider, org.billing_status, org.tier) == ("whop", "active", "starter")
    assert org.billing_customer_id.startswith("mber_") and org.billing_subscription_id.startswith("mem_")
    assert org.signup_checkout_session_id.startswith("ch_")
    assert org.last_payment_status == "paid" and org.current_period_end is not None
    [pending] = query(pair.app, "SELECT status, checkout_session_id FROM pending_signup")
    assert (pending.status, pending.checkout_session_id) == ("completed", org.signup_checkout_session_id)

    # The webhooks arrive afterwards: nothing is created twice.
    assert pair.deliver_held() == [200, 200]
    pair.applied()
    assert len(pair.organizations()) == 1
    assert pair.events()["organization.created"] == 1 and pair.events()["signup.completed"] == 1
    assert client.get(back).status_code == 303  # the redirect again: already provisioned
    assert len(pair.organizations()) == 1


def test_a_declined_card_is_recorded_as_declined_and_ops_see_whop_events_by_default(pair: Pair) -> None:
    """Whop's payment.failed for a card declined at checkout names no membership: it is what it is (a
    declined payment, the signup still open), not a malformed event; `flask billing status` and
    `flask billing events` count and list Whop's events without --provider."""
    client = pair.app.test_client()
    response = start_whop_signup(client)
    declined = pair.double.pay(response.headers["Location"], card="4000 0000 0000 0002")
    assert declined.status_code != 303, declined.text
    [event] = query(pair.stored(1).app, "SELECT * FROM whop_event")
    assert (event.type, event.status, event.last_error) == ("payment.failed", "processed", None)
    assert event.outcome.startswith("declined at Whop's checkout: Your card was declined. (generic_decline)")
    assert "no membership was made" in event.outcome and "stays open" in event.outcome
    assert pair.organizations() == []
    assert [row.status for row in query(pair.app, "SELECT status FROM pending_signup")] == ["pending"]

    runner = pair.app.test_cli_runner()
    status = runner.invoke(args=["billing", "status"])
    assert status.exit_code == 0, status.output
    assert "webhook events:  pending=0  processed=1  ignored=0  failed=0" in status.output, status.output
    assert "  whop:          pending=0  processed=1  ignored=0  failed=0" in status.output, status.output
    listing = runner.invoke(args=["billing", "events"])
    assert "payment.failed" in listing.output and "declined at Whop's checkout" in listing.output, listing.output
    assert "malformed" not in listing.output


def test_signup_through_whop_webhook_first(pair: Pair) -> None:
    client = pair.app.test_client()
    back = pay_on_whop(pair, client)
    assert len(pair.stored(2).organizations()) == 1  # membership.activated provisioned the signup
    org = pair.organization()
    assert (org.billing_provider, org.billing_status) == ("whop", "active")
    landed = client.get(back)  # the buyer comes back later: signed in, nothing created again
    assert landed.status_code == 303 and landed.headers["Location"] == "/app"
    assert client.get("/app").status_code == 200
    wait_until(lambda: len(query(pair.app, "SELECT id FROM whop_event")) == 2, 10, "both webhooks stored")
    org = pair.applied().organization()
    assert org.last_payment_status == "paid"  # provisioning records the paid checkout, whatever came first
    assert len(pair.organizations()) == 1 and pair.events()["organization.created"] == 1


def test_a_trial_tier_starts_trialing_through_whop(pair: Pair) -> None:
    pair.double.control("delivery", {"mode": "hold"})
    client = pair.app.test_client()
    response = start_whop_signup(client, tier="pro")
    paid = pair.double.pay(response.headers["Location"])
    back = urlsplit(paid.headers["Location"])
    assert client.get(f"{back.path}?{back.query}").status_code == 303
    org = pair.organization()
    assert (org.billing_status, org.tier, org.trial_end is not None) == ("trialing", "pro", True)


def test_the_redirect_refuses_a_membership_of_another_signup(pair: Pair) -> None:
    pair.double.control("delivery", {"mode": "hold"})
    client = pair.app.test_client()
    back = pay_on_whop(pair, client)
    query_string = dict(part.split("=", 1) for part in urlsplit(back).query.split("&"))
    other = "00000000-0000-4000-8000-000000000000"
    for path in (
        f"/billing/complete-signup-from-whop?signup={other}&membership_id={query_string['membership_id']}",
        f"/billing/complete-signup-from-whop?signup={query_string['signup']}&membership_id=mem_nope",
        "/billing/complete-signup-from-whop?signup=x&membership_id=y",
    ):
        assert client.get(path).status_code == 404
    assert pair.organizations() == []


def test_a_membership_of_another_plan_never_provisions_the_tier_the_signup_chose(pair: Pair) -> None:
    """The signup chose Pro; the membership carrying its id sells Starter (issue 23, finding 8)."""
    pair.double.control("delivery", {"mode": "hold"})
    client = pair.app.test_client()
    back = pay_on_whop(pair, client)  # the form's default tier, sold by plan_ledgerline_starter
    with pair.app.app_context():
        db.session.execute(text("UPDATE pending_signup SET tier = 'pro'"))
        db.session.commit()
    assert client.get(back).status_code == 404
    assert pair.deliver_held() and pair.applied().organizations() == []
    outcomes = {row.outcome for row in query(pair.app, "SELECT outcome FROM whop_event WHERE type LIKE 'membership.%'")}
    assert any("another plan than the pro plan" in (outcome or "") for outcome in outcomes), outcomes


def test_whop_is_offered_only_for_tiers_with_a_whop_plan_and_without_add_ons(pair: Pair, make_app: Any) -> None:
    client = pair.app.test_client()
    page = client.get("/auth/signup").get_data(as_text=True)
    assert 'id="payment-provider"' in page and 'value="whop"' in page
    business = start_whop_signup(client, tier="business")
    assert business.status_code == 422 and "cannot be paid through Whop" in business.get_data(as_text=True)
    seats = client.post("/auth/signup", data=signup_form(client, payment_provider="whop", addon_extra_seats="2"))
    assert seats.status_code == 422 and "Add-ons can only be bought with card" in seats.get_data(as_text=True)
    assert pair.organizations() == []
    without_whop = make_app().test_client()
    assert 'id="payment-provider"' not in without_whop.get("/auth/signup").get_data(as_text=True)


# --- The membership's life -------------------------------------------------------------------------


def signed_up(pair: Pair) -> tuple[FlaskClient, Any]:
    client = pair.app.test_client()
    client.get(pay_on_whop(pair, client))
    wait_until(lambda: len(query(pair.app, "SELECT id FROM whop_event")) == 2, 10, "signup webhooks stored")
    return client, pair.applied().organization()


def owner_post(client: FlaskClient, path: str, **fields: Any) -> Any:
    data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": TOKEN, **fields}
    return client.post(path, data=data)


def test_the_billing_page_shows_what_whop_knows_and_plan_changes_offer_only_whop(pair: Pair) -> None:
    """A Whop-billed organization's billing page: the renewal date beside the next charge at the price
    Whop renews at, the card Whop charged as Whop reports it, Whop's payments; /billing/plan and
    /billing/seats offer only what can be done (managing the membership on Whop), no form."""
    client, org = signed_up(pair)
    page = re.sub(r"\s+", " ", html.unescape(client.get("/billing/").get_data(as_text=True)))
    renews = org.current_period_end.strftime("%-d %B %Y")
    assert f'<dd id="renews">{renews}</dd>' in page, page
    assert re.search(r'id="plan-price">.*\$19\.00 / month', page), page
    assert f'id="next-invoice"> $19.00 on {renews} </dd>' in page, page
    assert 'id="payment-method"> Visa ending in 4242, expires 12/2034 </dd>' in page, page
    assert "None scheduled" not in page and "None on file" not in page
    assert re.search(r'id="last-payment">\$19\.00 paid on \d{1,2} \w+ \d{4}</dd>', page), page
    assert re.search(r'<tr class="invoice" data-invoice="pay_\w+">.*?\$19\.00.*?paid', page), page

    for path in ("/billing/plan", "/billing/seats"):
        offered = re.sub(r"\s+", " ", html.unescape(client.get(path).get_data(as_text=True)))
        assert 'id="change-plan-form"' not in offered and 'id="preview-seats"' not in offered, offered
        assert "You are on <strong>Starter</strong>, $19.00 / month, paid through Whop." in offered, offered
        assert 'id="open-portal"' in offered and "Manage your membership on Whop" in offered


def test_renewals_failed_payments_recovery_and_the_end_follow_whops_events(pair: Pair) -> None:
    _, org = signed_up(pair)
    membership = org.billing_subscription_id

    pair.double.control(f"memberships/{membership}/period_end", {"outcome": "failed"})
    assert pair.stored(5).organization().billing_status == "past_due"  # after a failed renewal
    assert pair.organization().past_due_since is not None
    assert pair.events()["billing.payment_failed"] == 1

    pair.double.control(f"memberships/{membership}/period_end", {"outcome": "paid"})
    assert pair.stored(8).organization().billing_status == "active"  # recovered
    assert pair.organization().last_payment_status == "paid"
    assert pair.organization().past_due_since is None
    assert pair.organization().current_period_end > org.current_period_end

    pair.double.control(f"memberships/{membership}/deactivate", {"status": "canceled"})
    assert pair.stored(9).organization().billing_status == "canceled"  # deactivated
    assert pair.organization().ended_at is not None
    stored = query(pair.app, "SELECT status FROM whop_event")
    assert {row.status for row in stored} == {"processed"}


def test_the_owner_cancels_and_resumes_through_whop_and_manages_it_on_whop(pair: Pair) -> None:
    client, org = signed_up(pair)
    page = client.get("/billing/").get_data(as_text=True)
    assert "Manage your membership on Whop" in page and 'id="billed-by"' in page

    canceled = owner_post(client, "/billing/cancel", when="period_end")
    assert canceled.status_code == 303
    assert pair.organization().cancel_at_period_end is True  # Whop's answer, applied at once
    membership = pair.double.deliveries()[0]["event"]["data"]
    assert membership["id"] == org.billing_subscription_id and membership["cancel_at_period_end"] is True
    # The webhooks that follow change nothing more.
    assert pair.stored(4).events()["subscription.cancellation_scheduled"] == 1

    resumed = owner_post(client, "/billing/resume")
    assert resumed.status_code == 303 and pair.organization().cancel_at_period_end is False
    assert pair.events()["subscription.cancellation_withdrawn"] == 1

    portal = client.post("/billing/portal", data={"csrf_token": csrf_token(client, "/billing/")})
    assert portal.status_code == 303
    assert portal.headers["Location"] == f"{pair.double.url}/whop/manage/{org.billing_subscription_id}"

    ended = owner_post(client, "/billing/cancel", when="now", confirmed="yes")
    assert ended.status_code == 303 and pair.organization().billing_status == "canceled"


# --- Reconcile -------------------------------------------------------------------------------------


def test_reconcile_repairs_a_missed_deactivation(pair: Pair) -> None:
    _, org = signed_up(pair)
    pair.double.control("delivery", {"mode": "hold"})  # Whop's deliveries are lost from here on
    pair.double.control(f"memberships/{org.billing_subscription_id}/deactivate", {"status": "canceled"})
    assert pair.organization().billing_status == "active"
    runner = pair.app.test_cli_runner()

    only = ["--org", str(org.id)]  # this organization: Whop alone is read (Stripe is not part of this test)
    report = runner.invoke(args=["billing", "reconcile", *only])
    assert report.exit_code == 1
    assert f"({org.billing_subscription_id}): status is 'active' here, 'canceled' at Whop" in report.output

    repaired = runner.invoke(args=["billing", "reconcile", "--apply", *only])
    assert repaired.exit_code == 0, repaired.output
    assert f"follows Whop membership {org.billing_subscription_id}" in repaired.output
    assert pair.organization().billing_status == "canceled"
    assert runner.invoke(args=["billing", "reconcile", *only]).exit_code == 0


# --- Moving to card billing -------------------------------------------------------------------------


def test_a_whop_billed_organization_resubscribes_by_card_with_a_stripe_customer_of_its_own(
    pair: Pair, offline_stripe: SandboxAccount
) -> None:
    """Issue 21, item 4: Whop's member id is no Stripe customer. The resubscribe checkout is opened for
    the owner's email (Checkout makes the customer); once paid, the organization is billed by Stripe
    with that customer, and its Whop history (events, domain events) stays."""
    client, org = signed_up(pair)
    member_id = org.billing_customer_id
    assert owner_post(client, "/billing/cancel", when="now", confirmed="yes").status_code == 303
    assert pair.organization().billing_status == "canceled"
    whop_events_before = len(query(pair.app, "SELECT id FROM whop_event"))

    response = owner_post(client, "/billing/resubscribe", tier="starter")
    assert response.status_code == 303, response.get_data(as_text=True)
    session_id = checkout_session_id(response)
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert "customer" not in call["params"] and call["params"]["customer_email"] == "ada@example.com"
    session = offline_stripe.pay(session_id)
    back = client.get(f"/billing/checkout-complete?session_id={session_id}")
    assert back.status_code == 303 and back.headers["Location"] == "/billing/"
    row = pair.organization()
    assert (row.billing_provider, row.billing_status, row.tier) == ("stripe", "active", "starter")
    assert row.billing_customer_id == session["customer"] != member_id
    assert row.billing_customer_id.startswith("cus_")
    assert row.billing_subscription_id == session["subscription"]
    assert len(query(pair.app, "SELECT id FROM whop_event")) >= whop_events_before
    assert pair.events()["signup.completed"] == 1


# --- Conflicts, amounts and stale forms at Whop --------------------------------------------------------


def test_a_second_paid_whop_signup_of_an_email_is_settled_at_whop(pair: Pair) -> None:
    """Issue 21, item 5: the conflict is canceled and refunded at Whop (not sent to Stripe), the page
    says how much was refunded, and nothing is left for reconcile to settle."""
    signed_up(pair)
    again = pair.app.test_client()
    back = again.get(pay_on_whop(pair, again))
    page = back.get_data(as_text=True)
    assert back.status_code == 409, page[-1500:]
    assert "This email already has an account" in page and "refunded $19.00" in page
    [conflict] = query(pair.app, "SELECT * FROM pending_signup WHERE status = 'failed'")
    assert conflict.settled_at is not None and conflict.settlement["amount_refunded"] == 1900
    from app.services import reconcile_reads

    with pair.app.app_context():
        assert reconcile_reads.unsettled(None) == []
    assert len(pair.organizations()) == 1
    assert pair.events()["signup.conflict_refunded"] == 1


def test_whop_payments_carry_their_amount_into_events_and_emails(pair: Pair, smtp_server: SmtpSink) -> None:
    """Issue 21, item 7: Whop's amounts (Money objects) become cents, as Stripe's are: the payment
    events and the failed-payment email show $19.00, not "—"."""
    _, org = signed_up(pair)
    [paid] = query(pair.app, "SELECT data FROM domain_event WHERE name = 'billing.payment_succeeded'")
    assert (paid.data["amount_paid"], paid.data["currency"]) == (1900, "usd")
    pair.double.control(f"memberships/{org.billing_subscription_id}/period_end", {"outcome": "failed"})
    pair.stored(5)
    [failed] = query(pair.app, "SELECT data FROM domain_event WHERE name = 'billing.payment_failed'")
    assert failed.data["amount_due"] == 1900
    run_jobs(pair.app)
    [email] = [m for m in smtp_server.to("ada@example.com") if "payment failed" in str(m["Subject"]).lower()]
    assert "$19.00" in email_text(email) and "—" not in email_text(email)


def test_a_stale_whop_form_is_refused_and_the_membership_read_as_it_is(pair: Pair) -> None:
    """Issue 21, item 1 for Whop: cancel (form A), resume, then form A again: Whop replays its stored
    answer for A's key; the product reads the membership as it is now and says the form was used."""
    client, _ = signed_up(pair)
    form_a, form_b = "a" * 32, "b" * 32
    assert owner_post(client, "/billing/cancel", when="period_end", request_token=form_a).status_code == 303
    assert owner_post(client, "/billing/resume", request_token=form_b).status_code == 303
    assert pair.organization().cancel_at_period_end is False
    stale = owner_post(client, "/billing/cancel", when="period_end", request_token=form_a)
    assert stale.status_code == 303
    assert "That form was already used, so nothing was changed now." in client.get("/billing/").get_data(True)
    assert pair.organization().cancel_at_period_end is False


def test_the_console_reads_whop_within_the_page_read_timeout(pair: Pair, clock: Clock) -> None:  # noqa: F811
    """The operations console's live column for a Whop-billed organization: Whop's membership beside
    the database; a Whop slower than the page-read timeout costs the page that column, not the page."""
    client, org = signed_up(pair)
    enrol(client, clock)
    granted = pair.app.test_cli_runner().invoke(args=["users", "grant-staff", "ada@example.com"])
    assert granted.exit_code == 0, granted.output
    path = f"/admin/organizations/{org.id}"
    page = client.get(path).get_data(as_text=True)
    assert 'id="in-agreement"' in page and "The database and Whop agree." in page, page
    assert '<tr class="same" data-field="cancellation">' in page and 'class="drift"' not in page
    pair.app.config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"] = 0.3  # Whop's own client would wait 20 s, 3 times
    pair.double.control("latency", {"seconds": 2})
    try:
        slow = client.get(path)
    finally:
        pair.double.control("latency", {"seconds": 0})
    text = slow.get_data(as_text=True)
    assert slow.status_code == 200 and 'id="provider-unavailable"' in text and "Whop did not answer" in text, text
    assert "ada@example.com" in text and 'id="timeline"' in text and 'id="in-agreement"' not in text
