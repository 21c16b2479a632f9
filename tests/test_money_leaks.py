"""Stripe and the database never disagree: each money leak of the "never disagree" issue, reproduced
first (these tests fail on the code before the fix), then closed. Stripe is the one double of
conftest.py, driven only through its fixture's public methods."""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Any

import pytest
from flask import Flask

from app.templating import money
from tests.conftest import (
    OfflineStripe,
    checkout_session_id,
    csrf_token,
    post_webhook,
    query,
    run_jobs,
    sign_up,
    start_signup,
)

TOKEN = "0123456789abcdef0123456789abcdef"


class Owner:
    def __init__(self, app: Flask, stripe_api: OfflineStripe, **fields: Any) -> None:
        self.client = app.test_client()
        session = sign_up(self.client, stripe_api, **fields)
        self.checkout_session_id: str = session["id"]
        self.subscription_id: str = session["subscription"]
        self.customer_id: str = session["customer"]
        [row] = query(app, "SELECT id FROM organization WHERE stripe_subscription_id = :s", s=self.subscription_id)
        self.organization_id: int = row.id

    def post(self, path: str, **fields: Any) -> Any:
        return self.client.post(path, data={"csrf_token": csrf_token(self.client, "/billing/"), **fields})

    def page(self) -> str:
        return str(self.client.get("/billing/").get_data(as_text=True))


@pytest.fixture
def owner(app: Flask, offline_stripe: OfflineStripe) -> Owner:
    return Owner(app, offline_stripe)


def organization(app: Flask, organization_id: int) -> Any:
    [row] = query(app, "SELECT * FROM organization WHERE id = :id", id=organization_id)
    return row


def addons(app: Flask, organization_id: int) -> dict[str, int]:
    rows = query(
        app, "SELECT addon_key, quantity FROM organization_addon WHERE organization_id = :id", id=organization_id
    )
    return {row.addon_key: row.quantity for row in rows}


def events_named(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def event_data(app: Flask, name: str) -> list[dict[str, Any]]:
    return [row.data for row in query(app, "SELECT data FROM domain_event WHERE name = :n ORDER BY id", n=name)]


def later(seconds: int = 600) -> int:
    return int(time.time()) + seconds


def stripe_changes(owner: Owner, stripe_api: OfflineStripe, created: int | None = None, **fields: Any) -> Any:
    """A change made at Stripe (Dashboard, portal, API), and the webhook Stripe sends for it."""
    subscription = stripe_api.change_subscription(owner.subscription_id, **fields)
    event = OfflineStripe.event("customer.subscription.updated", subscription, created=created or later())
    response = post_webhook(owner.client, event)
    assert response.status_code == 200, response.get_data(as_text=True)
    return subscription


# --- Leak 3: "Keep my plan" that does not --------------------------------------------------------


def test_resume_clears_a_cancellation_scheduled_with_cancel_at(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    """A cancellation set as a date (Dashboard, API) is undone by "Keep my plan" too."""
    ends = later(10 * 86400)
    stripe_changes(owner, offline_stripe, cancel_at=ends)
    page = owner.page()
    assert 'id="plan-ends"' in page and 'id="renews"' not in page and 'id="resume"' in page

    assert owner.post("/billing/resume", request_token=TOKEN).status_code == 303
    at_stripe = offline_stripe.change_subscription(owner.subscription_id)
    assert at_stripe["cancel_at"] is None and at_stripe["cancel_at_period_end"] is False
    assert organization(app, owner.organization_id).cancel_at_period_end is False
    page = owner.page()
    assert 'id="renews"' in page and 'id="plan-ends"' not in page
    assert events_named(app)["subscription.cancellation_withdrawn"] == 1


def test_the_page_never_says_renews_while_stripe_will_end_the_plan(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    ends = later(5 * 86400)
    stripe_changes(owner, offline_stripe, cancel_at=ends, cancel_at_period_end=False)
    row = organization(app, owner.organization_id)
    assert row.cancel_at_period_end is True and int(row.current_period_end.timestamp()) == ends
    assert 'id="renews"' not in owner.page()


# --- Leak 8: pause_collection --------------------------------------------------------------------


def test_paused_collection_shows_in_the_billing_state_and_page(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    resumes = later(20 * 86400)
    stripe_changes(owner, offline_stripe, pause_collection={"behavior": "keep_as_draft", "resumes_at": resumes})
    row = organization(app, owner.organization_id)
    assert row.collection_paused == "keep_as_draft"
    assert int(row.collection_resumes_at.timestamp()) == resumes
    page = owner.page()
    assert 'id="collection-paused"' in page and "Payment collection is paused" in page

    # A redelivery changes nothing; resuming collection clears it.
    stripe_changes(owner, offline_stripe, created=later(700))
    stripe_changes(owner, offline_stripe, created=later(800), pause_collection=None)
    row = organization(app, owner.organization_id)
    assert row.collection_paused is None and row.collection_resumes_at is None
    assert 'id="collection-paused"' not in owner.page()
    events = events_named(app)
    assert events["subscription.collection_paused"] == 1 and events["subscription.collection_resumed"] == 1
    assert event_data(app, "subscription.collection_paused")[0]["behavior"] == "keep_as_draft"


# --- Leak 4: a price migration wipes add-ons ------------------------------------------------------


def _items_after_migration(subscription: dict[str, Any], **quantities: int) -> dict[str, Any]:
    """The subscription's items as they are after `transfer_lookup_key` moved every lookup key to a
    new price: same prices, now without a lookup key."""
    items = copy.deepcopy(subscription["items"])
    for item in items["data"]:
        key = item["price"]["lookup_key"]
        item["price"]["lookup_key"] = None
        if key in quantities:
            item["quantity"] = quantities[key]
    return items


def test_items_on_a_migrated_price_keep_their_tier_and_add_ons(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    assert addons(app, owner.organization_id) == {"extra_seats": 2}
    subscription = offline_stripe.change_subscription(owner.subscription_id)
    stripe_changes(owner, offline_stripe, items=_items_after_migration(subscription, extra_seat_monthly=3))
    row = organization(app, owner.organization_id)
    assert row.tier == "starter" and row.unmapped_items is None
    assert addons(app, owner.organization_id) == {"extra_seats": 3}  # still mapped, by price id


def test_an_item_that_maps_to_nothing_is_reported_and_never_deleted(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    subscription = offline_stripe.change_subscription(owner.subscription_id)
    items = copy.deepcopy(subscription["items"])
    for item in items["data"]:
        # Both items move to prices this app has never seen, on products it has never seen.
        item["id"] = f"{item['id']}_new"
        item["price"] = {**item["price"], "id": f"{item['price']['id']}_elsewhere", "lookup_key": None}
    stripe_changes(owner, offline_stripe, items=items)
    row = organization(app, owner.organization_id)
    assert row.tier == "starter"
    assert addons(app, owner.organization_id) == {"extra_seats": 2}
    assert sorted(entry["price"] for entry in row.unmapped_items) == [
        "price_extra_seat_monthly_elsewhere",
        "price_starter_monthly_elsewhere",
    ]
    assert events_named(app)["subscription.items_unmapped"] == 1
    assert "organization.plan_changed" not in events_named(app)


# --- Leak 1: a paid subscription with no account --------------------------------------------------


def _second_paid_checkout(app: Flask, offline_stripe: OfflineStripe) -> tuple[Any, str, dict[str, Any]]:
    """Two signups for one email, both paid: the first becomes the account, the second has none."""
    first_browser, second_browser = app.test_client(), app.test_client()
    first = checkout_session_id(start_signup(first_browser))
    offline_stripe.fail_next("checkout.sessions.expire")  # the older checkout could not be closed in time
    second = checkout_session_id(start_signup(second_browser))
    offline_stripe.pay(first)
    assert first_browser.get(f"/billing/complete-signup-from-stripe?session_id={first}").status_code == 303
    return second_browser, second, offline_stripe.pay(second)


def test_a_second_paid_signup_is_canceled_and_refunded_at_once(app: Flask, offline_stripe: OfflineStripe) -> None:
    browser, second, paid = _second_paid_checkout(app, offline_stripe)
    [pending] = query(app, "SELECT id FROM pending_signup WHERE checkout_session_id = :c", c=second)

    response = browser.get(f"/billing/complete-signup-from-stripe?session_id={second}")
    page = response.get_data(as_text=True)
    assert response.status_code == 409
    assert "already has an account" in page and "We canceled the new subscription and refunded" in page

    [(args, cancel)] = offline_stripe.calls_to("subscriptions.cancel")
    assert args == (paid["subscription"],)
    assert cancel["options"] == {"idempotency_key": f"signup-{pending.id}-conflict-cancel"}
    [(_, refund)] = offline_stripe.calls_to("refunds.create")
    assert refund["options"] == {"idempotency_key": f"signup-{pending.id}-conflict-refund"}
    assert offline_stripe.change_subscription(paid["subscription"])["status"] == "canceled"
    assert len(query(app, "SELECT id FROM organization")) == 1

    [event] = event_data(app, "signup.conflict_refunded")
    assert event["pending_signup_id"] == str(pending.id) and event["email"] == "ada@example.com"
    assert event["stripe_subscription_id"] == paid["subscription"] and event["amount_refunded"] > 0
    assert event["currency"] == "usd" and event["refund_id"].startswith("re_")
    assert f"refunded {money(event['amount_refunded'], 'usd')} to your payment method" in page

    # Coming back (or the webhook arriving late) repeats nothing.
    again = browser.get(f"/billing/complete-signup-from-stripe?session_id={second}")
    assert again.status_code == 409 and money(event["amount_refunded"], "usd") in again.get_data(as_text=True)
    post_webhook(browser, OfflineStripe.event("checkout.session.completed", paid))
    assert len(offline_stripe.calls_to("refunds.create")) == 1
    assert events_named(app)["signup.conflict_refunded"] == 1


def test_a_second_paid_signup_seen_first_by_the_webhook_is_refunded_too(
    app: Flask, offline_stripe: OfflineStripe, smtp_server: Any
) -> None:
    """The customer may never come back to the success page: the webhook settles it."""
    browser, second, paid = _second_paid_checkout(app, offline_stripe)
    assert post_webhook(browser, OfflineStripe.event("checkout.session.completed", paid)).status_code == 200
    run_jobs(app)  # the worker settles it: cancel and refund at Stripe, outside any transaction
    assert offline_stripe.change_subscription(paid["subscription"])["status"] == "canceled"
    assert len(offline_stripe.calls_to("refunds.create")) == 1
    assert events_named(app)["signup.conflict_refunded"] == 1
    [row] = query(app, "SELECT status, settled_at FROM pending_signup WHERE checkout_session_id = :c", c=second)
    assert row.status == "failed" and row.settled_at is not None
    # The email hangs on signup.conflict_refunded, so it is sent only once the refund is made.
    run_jobs(app)
    [message] = [m for m in smtp_server.messages if m["Subject"] == "Your second signup was refunded"]
    assert message["To"] == "ada@example.com"


# --- Leak 2: two live subscriptions after resubscribing twice --------------------------------------


def test_two_resubscribe_checkouts_paid_leave_one_live_subscription(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    assert owner.post("/billing/cancel", request_token=TOKEN, when="now").status_code == 303
    first = checkout_session_id(owner.post("/billing/resubscribe", request_token="a" * 32, tier="pro"))
    second = checkout_session_id(owner.post("/billing/resubscribe", request_token="b" * 32, tier="business"))
    # Opening the second expires the first at Stripe.
    assert [args for args, _ in offline_stripe.calls_to("checkout.sessions.expire")] == [(first,)]

    # Both paid anyway (the first before it could be expired).
    paid_first = offline_stripe.pay(first)
    paid_second = offline_stripe.pay(second)
    assert owner.client.get(f"/billing/checkout-complete?session_id={second}").status_code == 303
    response = owner.client.get(f"/billing/checkout-complete?session_id={first}")
    assert response.status_code == 409
    assert "refunded" in response.get_data(as_text=True)

    row = organization(app, owner.organization_id)
    assert row.stripe_subscription_id == paid_second["subscription"] and row.billing_status == "active"
    assert row.tier == "business"
    assert offline_stripe.change_subscription(paid_first["subscription"])["status"] == "canceled"
    [(_, refund)] = offline_stripe.calls_to("refunds.create")
    assert refund["options"] == {"idempotency_key": f"org-{owner.organization_id}-surplus-{first}-refund"}
    [event] = event_data(app, "organization.surplus_subscription_refunded")
    assert event["stripe_subscription_id"] == paid_first["subscription"] and event["amount_refunded"] > 0

    # The webhooks for both checkouts change nothing more.
    for paid in (paid_first, paid_second):
        assert post_webhook(owner.client, OfflineStripe.event("checkout.session.completed", paid)).status_code == 200
    assert organization(app, owner.organization_id).stripe_subscription_id == paid_second["subscription"]
    assert len(offline_stripe.calls_to("refunds.create")) == 1
    assert events_named(app)["organization.subscription_replaced"] == 1


def test_a_resubscription_is_not_provisioned_for_an_organization_that_is_live(
    app: Flask, owner: Owner, offline_stripe: OfflineStripe
) -> None:
    """Webhooks only: once one resubscription is attached the organization is live again, so the
    other paid checkout is surplus, canceled and refunded after its event commits, never attached."""
    assert owner.post("/billing/cancel", request_token=TOKEN, when="now").status_code == 303
    first = checkout_session_id(owner.post("/billing/resubscribe", request_token="a" * 32, tier="pro"))
    second = checkout_session_id(owner.post("/billing/resubscribe", request_token="b" * 32, tier="pro"))
    paid_first, paid_second = offline_stripe.pay(first), offline_stripe.pay(second)
    for paid in (paid_second, paid_first):
        assert post_webhook(owner.client, OfflineStripe.event("checkout.session.completed", paid)).status_code == 200
    run_jobs(app)
    row = organization(app, owner.organization_id)
    assert row.stripe_subscription_id == paid_second["subscription"] and row.billing_status == "active"
    assert offline_stripe.change_subscription(paid_first["subscription"])["status"] == "canceled"
    assert len(offline_stripe.calls_to("refunds.create")) == 1
    statuses = dict(query(app, "SELECT checkout_session_id, status FROM resubscribe_checkout"))
    assert statuses == {first: "refunded", second: "attached"}
    assert events_named(app)["organization.surplus_subscription_refunded"] == 1
