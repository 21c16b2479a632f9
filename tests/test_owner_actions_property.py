"""The owner-action state machine of docs/system/BILLING.md ("The owner's actions, as a state machine"),
checked by Hypothesis: one organization per example, driven through random owner actions (from fresh
forms and from stale ones, as from a second tab or the back button), changes made at Stripe behind
the app's back, time passing on the customer's test clock, cards that decline or ask for 3-D Secure,
and Stripe failing, against the offline Stripe sandbox reached with the real SDK.

After every step, once Stripe's webhooks are delivered and the worker ran (the product's eventual
consistency), the database equals Stripe: billing status, tier, extra seats, scheduled cancellation;
nothing is granted before it is paid (an upgrade waiting in Stripe's pending_update leaves the old
tier here), every action's answer is the one the state machine says, and every page renders.

Bounded in CI (OWNER_ACTION_EXAMPLES examples of OWNER_ACTION_STEPS steps; 3 x 10 by default, about
half a minute); `make property-test` runs it longer."""

from __future__ import annotations

import html
import os
import re
import uuid
from typing import Any

from flask import Flask
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.conftest import SandboxAccount, csrf_token, query, sign_up
from tests.test_plan_changes import ticket_of

EXAMPLES = int(os.environ.get("OWNER_ACTION_EXAMPLES", "3"))
STEPS = int(os.environ.get("OWNER_ACTION_STEPS", "10"))
TIERS = ("starter", "pro", "business")
TIER_OF_LOOKUP_KEY = {f"{tier}_{every}": tier for tier in TIERS for every in ("monthly", "yearly")}
CARDS = {
    "good": "pm_card_visa",
    "declines": "pm_card_chargeCustomerFail",
    "asks_for_3d_secure": "pm_card_authenticationRequired",
}
PAGES = ("/billing/", "/app", "/billing/plan", "/billing/seats", "/team/")
LIVE = ("active", "trialing", "past_due")


def flashes(page: str) -> str:
    return " ".join(html.unescape(m) for m in re.findall(r'class="flash[^"]*"[^>]*>([^<]*)<', page))


class OwnerActions(RuleBasedStateMachine):
    def __init__(self, app: Flask, stripe_api: SandboxAccount) -> None:
        super().__init__()
        self.app, self.stripe_api = app, stripe_api
        self.client = app.test_client()
        email = f"owner-{uuid.uuid4().hex[:10]}@example.com"
        session = sign_up(self.client, stripe_api, email=email, tier="starter", addon_extra_seats="1")
        self.subscription_id = session["subscription"]
        [row] = query(app, "SELECT id FROM organization WHERE billing_subscription_id = :s", s=self.subscription_id)
        self.organization_id = row.id
        self.used_tokens: list[str] = []
        self.tickets: list[str] = []  # previews shown earlier (a second tab keeps them)
        self.settle()

    # --- helpers ------------------------------------------------------------------------------------

    def stripe(self) -> dict[str, Any]:
        return self.stripe_api.subscription(self.subscription_id)

    def organization(self) -> Any:
        [row] = query(self.app, "SELECT * FROM organization WHERE id = :o", o=self.organization_id)
        return row

    def settle(self) -> None:
        """Stripe's webhooks delivered and the worker run: what the product promises to agree with."""
        delivered = self.stripe_api.deliver(self.client)
        assert all(status == 200 for _, status in delivered), delivered

    def post(self, path: str, **fields: str) -> str:
        response = self.client.post(
            path, data={"csrf_token": csrf_token(self.client, "/billing/"), **fields}, follow_redirects=True
        )
        assert response.status_code < 500, (path, fields, response.get_data(as_text=True)[-2000:])
        return html.unescape(response.get_data(as_text=True))

    def token(self, stale: bool, data: st.DataObject) -> str:
        if stale and self.used_tokens:
            return data.draw(st.sampled_from(self.used_tokens), label="stale token")
        token = uuid.uuid4().hex
        self.used_tokens.append(token)
        return token

    # --- the owner's actions ------------------------------------------------------------------------

    @rule(stale=st.booleans(), at_period_end=st.booleans(), data=st.data())
    def cancel(self, stale: bool, at_period_end: bool, data: st.DataObject) -> None:
        before, was_stale = self.stripe(), stale and bool(self.used_tokens)
        when = {"when": "period_end"} if at_period_end else {"when": "now", "confirmed": "yes"}
        page = self.post("/billing/cancel", request_token=self.token(stale, data), **when)
        after = self.stripe()
        if was_stale and "That form was already used" in page:
            assert after["status"] == before["status"]  # a replay changes nothing
        elif before["status"] not in LIVE:
            assert "There is no active subscription to cancel." in page or after["status"] == before["status"]
        elif not was_stale and at_period_end and not before["cancel_at_period_end"]:
            assert after["cancel_at_period_end"] is True, flashes(page)
        elif not was_stale and not at_period_end:
            assert after["status"] == "canceled", flashes(page)
        self.settle()

    @rule(stale=st.booleans(), data=st.data())
    def resume(self, stale: bool, data: st.DataObject) -> None:
        before, was_stale = self.stripe(), stale and bool(self.used_tokens)
        page = self.post("/billing/resume", request_token=self.token(stale, data))
        if not was_stale and before["cancel_at_period_end"] and before["status"] in LIVE:
            assert self.stripe()["cancel_at_period_end"] is False, flashes(page)
        elif not before["cancel_at_period_end"]:
            assert "There is no scheduled cancellation to undo." in page or "already used" in page
        self.settle()

    @rule(tier=st.sampled_from(TIERS), yearly=st.booleans(), confirm=st.booleans())
    def change_plan(self, tier: str, yearly: bool, confirm: bool) -> None:
        response = self.client.post(
            "/billing/plan/preview",
            data={
                "csrf_token": csrf_token(self.client, "/billing/"),
                "tier": tier,
                "interval": "year" if yearly else "month",
            },
        )
        assert response.status_code < 500
        ticket = ticket_of(response)
        if ticket:
            self.tickets.append(ticket)
            if confirm:
                self.confirm(ticket)

    @rule(extra_seats=st.integers(min_value=0, max_value=4))
    def change_seats(self, extra_seats: int) -> None:
        before = self.stripe()
        response = self.client.post(
            "/billing/seats/preview",
            data={"csrf_token": csrf_token(self.client, "/billing/"), "extra_seats": str(extra_seats)},
        )
        assert response.status_code < 500
        ticket = ticket_of(response)
        if before.get("schedule"):
            # A seat change never silently withdraws a scheduled downgrade: it is refused.
            assert not ticket
            assert "Changing seats now would withdraw that change" in flashes(
                self.client.get("/billing/").get_data(as_text=True)
            )
            return
        if ticket:
            self.tickets.append(ticket)
            self.confirm(ticket)

    @precondition(lambda self: bool(self.tickets))
    @rule(data=st.data())
    def confirm_an_earlier_preview(self, data: st.DataObject) -> None:
        """A preview kept open in another tab, confirmed later: made once, or refused as stale."""
        self.confirm(data.draw(st.sampled_from(self.tickets), label="earlier ticket"))

    def confirm(self, ticket: str) -> None:
        response = self.client.post(
            "/billing/change/confirm", data={"csrf_token": csrf_token(self.client, "/billing/"), "ticket": ticket}
        )
        assert response.status_code < 500, response.get_data(as_text=True)[-2000:]
        self.settle()

    @rule()
    def keep_plan(self) -> None:
        had_schedule = bool(self.stripe().get("schedule"))
        page = self.post("/billing/plan/keep")
        if had_schedule:
            assert not self.stripe().get("schedule"), flashes(page)
        self.settle()

    # --- Stripe's side --------------------------------------------------------------------------------

    @rule(card=st.sampled_from(sorted(CARDS)))
    def card_changes(self, card: str) -> None:
        if self.stripe()["status"] in LIVE:
            self.stripe_api.api(
                "POST", f"/v1/subscriptions/{self.subscription_id}", {"default_payment_method": CARDS[card]}
            )
        self.settle()

    @rule()
    def owner_pays_the_open_invoice(self) -> None:
        subscription = self.stripe()
        invoice = self.stripe_api.api("GET", f"/v1/invoices/{subscription['latest_invoice']}")
        if invoice["status"] == "open":
            self.stripe_api.pay_invoice_page(invoice["hosted_invoice_url"], "4000 0027 6000 3184")
        self.settle()

    @rule(at_period_end=st.booleans())
    def changed_in_stripes_dashboard(self, at_period_end: bool) -> None:
        if self.stripe()["status"] in LIVE:
            self.stripe_api.api(
                "POST", f"/v1/subscriptions/{self.subscription_id}", {"cancel_at_period_end": at_period_end}
            )
        self.settle()

    @rule(days=st.integers(min_value=1, max_value=3))
    def time_passes(self, days: int) -> None:
        """Days pass on the customer's test clock (within the period, so previews stay meaningful)."""
        customer = self.stripe_api.api("GET", f"/v1/customers/{self.stripe()['customer']}")
        clock = self.stripe_api.api("GET", f"/v1/test_helpers/test_clocks/{customer['test_clock']}")
        self.stripe_api.advance_clock(customer["test_clock"], clock["frozen_time"] + days * 86400)
        self.settle()

    @rule(call=st.sampled_from(["subscriptions.update", "subscriptions.retrieve"]))
    def stripe_is_down_for_one_action(self, call: str) -> None:
        before = self.organization()
        self.stripe_api.fail_next(call, times=3)
        page = self.post("/billing/cancel", request_token=uuid.uuid4().hex, when="period_end")
        self.stripe_api.http.delete(f"{self.stripe_api.url}/_sandbox/faults", timeout=10).raise_for_status()
        after = self.organization()
        if "We could not reach our payment provider" in page:
            assert after.cancel_at_period_end == before.cancel_at_period_end
        self.settle()

    # --- what always holds ----------------------------------------------------------------------------

    @invariant()
    def the_database_equals_stripe(self) -> None:
        subscription = self.stripe()
        row = self.organization()
        tiers = [
            TIER_OF_LOOKUP_KEY[item["price"]["lookup_key"]]
            for item in subscription["items"]["data"]
            if item["price"]["lookup_key"] in TIER_OF_LOOKUP_KEY
        ]
        seats = sum(
            item["quantity"]
            for item in subscription["items"]["data"]
            if item["price"]["lookup_key"].startswith("extra_seat_")
        )
        addons = {
            r.addon_key: r.quantity
            for r in query(self.app, "SELECT * FROM organization_addon WHERE organization_id = :o", o=row.id)
        }
        state = (row.billing_status, row.tier, addons.get("extra_seats", 0), bool(row.cancel_at_period_end))
        truth = (subscription["status"], tiers[0], seats, bool(subscription["cancel_at_period_end"]))
        assert state == truth, (state, truth)

    @invariant()
    def nothing_is_granted_before_it_is_paid(self) -> None:
        subscription = self.stripe()
        if subscription.get("pending_update"):
            waiting = sorted(
                (i["price"]["id"], i["quantity"]) for i in subscription["pending_update"]["subscription_items"]
            )
            held = sorted((i["price"]["id"], i["quantity"]) for i in subscription["items"]["data"])
            assert waiting != held  # the upgrade waits at Stripe ...
            row = self.organization()  # ... and here the old items' tier holds (the_database_equals_stripe)
            assert row.billing_status in LIVE

    @invariant()
    def every_page_renders(self) -> None:
        for path in PAGES:
            response = self.client.get(path)
            assert response.status_code in (200, 303), (path, response.status_code)


def test_owner_actions_never_disagree_with_stripe(make_app: Any, offline_stripe: SandboxAccount) -> None:
    # One signup per example: the per-client signup limit is lifted for this test.
    limits = {"SIGNUP_RATE_LIMIT_PER_CLIENT": "1000/minute", "CHECKOUT_RETURN_RATE_LIMIT": "1000/minute"}
    app = make_app(STRIPE_TEST_CLOCKS=True, **limits)
    run_state_machine_as_test(
        lambda: OwnerActions(app, offline_stripe),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=os.environ.get("OWNER_ACTION_SEED") is None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
