"""End-to-end tests: the real server in a subprocess, driven by the real stripe-python SDK, with
a tiny local HTTP receiver standing in for the app's webhook endpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from sandbox import billing, checkout, objects, simtime
from sandbox.params import decode
from sandbox.store import Store
from sandbox.tests.conftest import (
    CARD_ASYNC_FAIL,
    CARD_ASYNC_OK,
    CARD_DECLINED,
    CATALOGUE,
    SECRET,
    Receiver,
    Sandbox,
    checkout_request,
    create_session,
    in_transaction,
    paid_subscription,
    pay,
    server_price,
    wait_until,
)
from sandbox.worker import signature_header

# -- API basics -------------------------------------------------------------------------------


def test_prices_are_seeded_from_the_catalogue(sandbox: Sandbox) -> None:
    listed = sandbox.client.v1.prices.list(
        params={
            "lookup_keys": ["starter_monthly", "extra_seat_monthly"],
            "active": True,
            "expand": ["data.product"],
        }
    )
    assert listed.last_response is not None
    assert listed.last_response.request_id.startswith("req_")
    by_key = {p.lookup_key: p for p in listed.data}
    assert set(by_key) == {"starter_monthly", "extra_seat_monthly"}
    starter, seats = by_key["starter_monthly"], by_key["extra_seat_monthly"]
    assert starter.id.startswith("price_") and starter.unit_amount == 1900
    assert seats.unit_amount == 1000  # the default when sandbox_unit_amount is absent
    assert starter.recurring.interval == "month" and starter.currency == "usd"
    assert starter.type == "recurring" and starter.active and starter.nickname == "Starter"
    assert starter.product.object == "product" and starter.product.name == "Starter"
    assert sandbox.client.v1.prices.list(params={"lookup_keys": ["nope"]}).data == []

    first_page = sandbox.client.v1.prices.list(params={"limit": 1})
    assert first_page.has_more and len(first_page.data) == 1
    paged = [p.lookup_key for p in first_page.auto_paging_iter()]  # follows starting_after
    assert sorted(paged) == [
        "api_calls_metered",
        "extra_seat_monthly",
        "pro_monthly",
        "starter_monthly",
        "starter_yearly",
    ]


def test_authentication_is_required(sandbox: Sandbox) -> None:
    live = stripe.StripeClient("sk_live_123456789", base_addresses={"api": sandbox.url})
    with pytest.raises(stripe.AuthenticationError):
        live.v1.prices.list()
    response = requests.get(f"{sandbox.url}/v1/prices", timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["Request-Id"].startswith("req_")


def test_unknown_urls_get_stripe_errors(sandbox: Sandbox) -> None:
    response = requests.get(f"{sandbox.url}/v1/issuing/cards", auth=("sk_test_x", ""), timeout=5)
    assert response.status_code == 404
    assert "Unrecognized request URL (GET: /v1/issuing/cards)" in response.json()["error"]["message"]


def test_checkout_session_validation(sandbox: Sandbox, prices: dict[str, str]) -> None:
    sessions = sandbox.client.v1.checkout.sessions
    base = {"mode": "subscription", "success_url": "http://app.test/ok"}
    line = [{"price": prices["starter_monthly"], "quantity": 1}]

    cases: list[tuple[dict[str, Any], str, str]] = [
        (base, "parameter_missing", "line_items"),
        ({"line_items": line}, "parameter_missing", "mode"),
        (
            {**base, "line_items": [{"price": "price_nope", "quantity": 1}]},
            "resource_missing",
            "line_items[0][price]",
        ),
        (
            {**base, "line_items": [{"price": prices["starter_monthly"]}]},
            "parameter_missing",
            "line_items[0][quantity]",
        ),
        ({**base, "line_items": line, "colour": "blue"}, "parameter_unknown", "colour"),
        (
            {
                **base,
                "line_items": line,
                "customer": "cus_x",
                "customer_email": "a@b.c",
            },
            "parameters_exclusive",
            "customer_email",
        ),
        (
            {**base, "line_items": line, "customer": "cus_nope"},
            "resource_missing",
            "customer",
        ),
    ]
    for params, code, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            sessions.create(params=params)
        assert (raised.value.code, raised.value.param, raised.value.http_status) == (
            code,
            param,
            400,
        )

    with pytest.raises(stripe.InvalidRequestError) as raised:
        sessions.create(params={**base, "line_items": line, "expires_at": int(time.time()) + 60})
    assert raised.value.param == "expires_at" and "30 minutes" in str(raised.value)

    with pytest.raises(stripe.InvalidRequestError) as raised:
        sessions.retrieve("cs_test_nope")
    assert raised.value.http_status == 404 and raised.value.code == "resource_missing"
    assert raised.value.param == "session"
    assert raised.value.user_message == "No such checkout.session: 'cs_test_nope'"


def test_idempotency_keys_replay_and_conflict(sandbox: Sandbox, prices: dict[str, str]) -> None:
    sessions = sandbox.client.v1.checkout.sessions
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": prices["starter_monthly"], "quantity": 1}],
        "success_url": "http://app.test/ok",
    }
    first = sessions.create(params=params, options={"idempotency_key": "checkout-org-7"})
    again = sessions.create(params=params, options={"idempotency_key": "checkout-org-7"})
    assert again.id == first.id
    assert again.last_response is not None and first.last_response is not None
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert again.last_response.headers["Original-Request"] == first.last_response.request_id

    with pytest.raises(stripe.IdempotencyError):
        sessions.create(
            params={**params, "client_reference_id": "other"},
            options={"idempotency_key": "checkout-org-7"},
        )
    # A failed request is not recorded, so the key still works once the request is fixed.
    with pytest.raises(stripe.InvalidRequestError):
        sessions.create(params={"mode": "subscription"}, options={"idempotency_key": "fix-me"})
    assert sessions.create(params=params, options={"idempotency_key": "fix-me"}).id != first.id


# -- hosted Checkout ----------------------------------------------------------------------------


def test_checkout_page_uses_stripes_element_ids(sandbox: Sandbox, prices: dict[str, str]) -> None:
    session = create_session(sandbox, prices)
    assert session.url == f"{sandbox.url}/checkout/{session.id}"
    page = requests.get(session.url, timeout=5)
    assert page.status_code == 200
    for needle in (
        'id="email"',
        'value="ada@example.com"',
        'id="cardNumber"',
        'id="cardExpiry"',
        'id="cardCvc"',
        'id="billingName"',
        'class="SubmitButton"',
        'id="cancel-link" href="http://app.test/billing/plans"',
        "4242 4242 4242 4242",
        "$39.00",  # 1 × $19 + 2 × $10
    ):
        assert needle in page.text
    assert requests.get(f"{sandbox.url}/checkout/cs_test_nope", timeout=5).status_code == 404


def test_successful_checkout(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    session = create_session(sandbox, prices)
    assert (
        session.status,
        session.payment_status,
        session.customer,
        session.subscription,
    ) == (
        "open",
        "unpaid",
        None,
        None,
    )
    assert session.id.startswith("cs_test_") and session.amount_total == 3900
    assert session.livemode is False and session.expires_at > session.created + 86000

    response = pay(sandbox, session.id)
    assert response.status_code == 303
    assert response.headers["Location"] == f"http://app.test/billing/success?session_id={session.id}"

    session = sandbox.client.v1.checkout.sessions.retrieve(
        session.id, params={"expand": ["subscription", "line_items"]}
    )
    assert (session.status, session.payment_status) == ("complete", "paid")
    assert session.customer.startswith("cus_") and session.url is None
    assert session.customer_details.email == "ada@example.com"
    assert session.customer_details.name == "Ada Lovelace"
    assert [(i.price.lookup_key, i.quantity) for i in session.line_items.data] == [
        ("starter_monthly", 1),
        ("extra_seat_monthly", 2),
    ]
    sub = session.subscription
    assert sub.object == "subscription" and sub.status == "active"
    assert sub.customer == session.customer and sub.metadata.to_dict() == {
        "org_id": "42",
        "plan": "starter",
    }
    item = sub["items"].data[0]
    assert item.id.startswith("si_") and item.price.lookup_key == "starter_monthly"
    assert item.current_period_end > item.current_period_start >= sub.created
    assert "current_period_end" not in sub  # it lives on items in this API version

    customer = sandbox.client.v1.customers.retrieve(session.customer)
    assert (customer.email, customer.name) == ("ada@example.com", "Ada Lovelace")

    events = receiver.wait_for({session.id, sub.id, sub.latest_invoice}, 3)
    assert [e["type"] for e in events] == [
        "customer.subscription.created",
        "invoice.paid",
        "checkout.session.completed",
    ]
    for event in events:
        assert event["id"].startswith("evt_") and event["object"] == "event"
        assert event["api_version"] == "2026-10-28.endive" and event["livemode"] is False
        assert event["request"] == {"id": None, "idempotency_key": None}
    invoice = events[1]["data"]["object"]
    assert invoice["amount_paid"] == 3900 and invoice["status"] == "paid"
    assert invoice["parent"]["subscription_details"]["subscription"] == sub.id
    completed = events[2]["data"]["object"]
    assert completed["client_reference_id"] == "org_42" and completed["metadata"] == {"org_id": "42"}
    assert completed["subscription"] == sub.id and "line_items" not in completed

    stored = sandbox.client.v1.events.retrieve(events[2]["id"])
    assert stored.type == "checkout.session.completed" and stored.pending_webhooks == 0


def test_trial_checkout_needs_no_payment(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    session = create_session(
        sandbox,
        prices,
        line_items=[{"price": prices["pro_monthly"], "quantity": 1}],
        subscription_data={"trial_period_days": 14},
    )
    assert session.amount_total == 0
    assert pay(sandbox, session.id).status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    sub = session.subscription
    assert session.payment_status == "no_payment_required"
    assert sub.status == "trialing" and sub.trial_end - sub.trial_start == 14 * 86400
    assert sub["items"].data[0].current_period_end == sub.trial_end
    events = receiver.wait_for({session.id, sub.id, sub.latest_invoice}, 3)
    assert events[1]["type"] == "invoice.paid" and events[1]["data"]["object"]["amount_paid"] == 0


def test_checkout_for_an_existing_customer(sandbox: Sandbox, prices: dict[str, str]) -> None:
    first, _ = paid_subscription(sandbox, prices)
    session = create_session(sandbox, prices, customer=first.customer, customer_email=None)
    assert session.customer == first.customer and session.customer_email is None
    assert 'value="ada@example.com"' in requests.get(session.url, timeout=5).text  # from the customer
    assert pay(sandbox, session.id, billingName="Ada L.").status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    assert session.subscription.customer == first.customer
    assert sandbox.client.v1.customers.retrieve(first.customer).name == "Ada Lovelace"  # not overwritten


def test_declined_card_keeps_the_session_open(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    session = create_session(sandbox, prices)
    response = pay(sandbox, session.id, CARD_DECLINED)
    assert response.status_code == 400 and "Your card was declined." in response.text
    assert 'value="Ada Lovelace"' in response.text  # the form keeps what was typed
    time.sleep(0.5)  # longer than the worker's poll: any event would have been delivered
    assert sandbox.client.v1.checkout.sessions.retrieve(session.id).status == "open"
    assert receiver.events({session.id}) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cardNumber": "4242 4242 4242 4241"}, "Your card number is invalid."),
        ({"cardNumber": ""}, "Your card number is incomplete."),
        ({"cardNumber": "5555 5555 5555 4444"}, "only accepts the test cards"),
        ({"cardExpiry": "01 / 20"}, "Your card&#39;s expiration year is in the past."),
        ({"cardExpiry": "13/40"}, "Your card&#39;s expiration date is incomplete."),
        ({"cardCvc": "1"}, "Your card&#39;s security code is incomplete."),
        ({"billingName": ""}, "Your name is incomplete."),
        ({"email": "not-an-email"}, "Your email address is invalid."),
    ],
)
def test_invalid_payment_input_is_explained(
    sandbox: Sandbox, prices: dict[str, str], fields: dict[str, str], message: str
) -> None:
    session = create_session(sandbox, prices)
    response = pay(sandbox, session.id, **fields)
    assert response.status_code == 400 and message in response.text
    assert sandbox.client.v1.checkout.sessions.retrieve(session.id).status == "open"


def test_a_completed_session_cannot_be_paid_again(sandbox: Sandbox, prices: dict[str, str]) -> None:
    session, _ = paid_subscription(sandbox, prices)
    response = pay(sandbox, session.id)
    assert response.status_code == 400 and "is complete; it can no longer be paid" in response.text


@pytest.mark.parametrize("succeeds", [True, False])
def test_asynchronous_payments_settle_later(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str], succeeds: bool
) -> None:
    session = create_session(sandbox, prices)
    assert pay(sandbox, session.id, CARD_ASYNC_OK if succeeds else CARD_ASYNC_FAIL).status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    sub = session.subscription
    assert (session.status, session.payment_status, sub.status) == (
        "complete",
        "unpaid",
        "incomplete",
    )

    related = {session.id, sub.id, sub.latest_invoice}
    events = receiver.wait_for(related, 5)
    outcome = "succeeded" if succeeds else "failed"
    assert [e["type"] for e in events] == [
        "customer.subscription.created",
        "checkout.session.completed",
        f"checkout.session.async_payment_{outcome}",
        "invoice.paid" if succeeds else "invoice.payment_failed",
        "customer.subscription.updated",
    ]
    updated = events[-1]["data"]
    assert updated["previous_attributes"]["status"] == "incomplete"
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    if succeeds:
        assert (session.payment_status, session.subscription.status) == (
            "paid",
            "active",
        )
    else:
        assert (session.payment_status, session.subscription.status) == (
            "unpaid",
            "incomplete_expired",
        )
        assert session.subscription.ended_at is not None


def test_expiring_a_session(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    sessions = sandbox.client.v1.checkout.sessions
    session = create_session(sandbox, prices)
    expired = sessions.expire(session.id, options={"idempotency_key": "expire-1"})
    assert (expired.status, expired.url) == ("expired", None)
    [event] = receiver.wait_for({session.id}, 1)
    assert event["type"] == "checkout.session.expired"
    assert expired.last_response is not None
    assert event["request"] == {
        "id": expired.last_response.request_id,
        "idempotency_key": "expire-1",
    }

    with pytest.raises(stripe.InvalidRequestError, match="status of `expired`"):
        sessions.expire(session.id)
    assert "has expired" in requests.get(f"{sandbox.url}/checkout/{session.id}", timeout=5).text
    assert "is expired; it can no longer be paid" in pay(sandbox, session.id).text

    complete, _ = paid_subscription(sandbox, prices)
    with pytest.raises(stripe.InvalidRequestError, match="status of `complete`"):
        sessions.expire(complete.id)


# -- subscriptions and the portal -------------------------------------------------------------


def test_subscription_updates_and_cancellation(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    subscriptions = sandbox.client.v1.subscriptions
    _, sub = paid_subscription(sandbox, prices)

    updated = subscriptions.update(
        sub.id,
        params={"cancel_at_period_end": True},
        options={"idempotency_key": "cancel-later"},
    )
    period_end = updated["items"].data[0].current_period_end
    assert updated.cancel_at_period_end and updated.cancel_at == period_end and updated.canceled_at
    assert updated.cancellation_details.reason == "cancellation_requested"

    subscriptions.update(sub.id, params={"metadata": {"note": "vip", "plan": ""}})
    assert subscriptions.retrieve(sub.id).metadata.to_dict() == {
        "org_id": "42",
        "note": "vip",
    }

    canceled = subscriptions.cancel(sub.id)
    assert canceled.status == "canceled" and canceled.ended_at and canceled.canceled_at

    with pytest.raises(stripe.InvalidRequestError) as raised:
        subscriptions.cancel(sub.id)
    assert (raised.value.code, raised.value.http_status) == ("resource_missing", 404)
    with pytest.raises(stripe.InvalidRequestError, match="canceled subscription can only update"):
        subscriptions.update(sub.id, params={"cancel_at_period_end": False})
    assert subscriptions.retrieve(sub.id).status == "canceled"

    events = [e for e in receiver.wait_for({sub.id}, 4) if e["type"] != "customer.subscription.created"]
    assert [e["type"] for e in events] == [
        "customer.subscription.updated",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ]
    assert updated.last_response is not None
    assert events[0]["request"] == {
        "id": updated.last_response.request_id,
        "idempotency_key": "cancel-later",
    }
    assert events[0]["data"]["previous_attributes"] == {
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"reason": None},
    }
    assert events[1]["data"]["previous_attributes"] == {"metadata": {"note": None, "plan": "starter"}}
    assert "previous_attributes" not in events[2]["data"]
    assert events[2]["data"]["object"]["status"] == "canceled"


def test_customer_portal(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    portal_sessions = sandbox.client.v1.billing_portal.sessions
    session, sub = paid_subscription(sandbox, prices)

    with pytest.raises(stripe.InvalidRequestError) as raised:
        portal_sessions.create(params={"return_url": "http://app.test/account"})
    assert (raised.value.code, raised.value.param) == ("parameter_missing", "customer")
    with pytest.raises(stripe.InvalidRequestError) as raised:
        portal_sessions.create(params={"customer": "cus_nope"})
    assert (raised.value.code, raised.value.param) == ("resource_missing", "customer")

    portal = portal_sessions.create(params={"customer": session.customer, "return_url": "http://app.test/account"})
    assert portal.id.startswith("bps_") and portal.object == "billing_portal.session"
    assert portal.url == f"{sandbox.url}/portal/{portal.id}" and portal.livemode is False

    page = requests.get(portal.url, timeout=5).text
    assert "Starter" in page and "Renews on" in page
    assert 'id="return-link" href="http://app.test/account"' in page
    assert 'id="cancel-at-period-end"' in page and 'id="cancel-now"' in page

    def click(action: str) -> str:
        response = requests.post(f"{portal.url}/subscriptions/{sub.id}/{action}", timeout=5)
        assert response.status_code == 200 and response.history[0].status_code == 303
        return response.text

    page = click("cancel-at-period-end")
    assert "Cancels on" in page and 'id="renew"' in page
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).cancel_at_period_end is True
    page = click("renew")
    assert "Renews on" in page and sandbox.client.v1.subscriptions.retrieve(sub.id).cancel_at is None
    page = click("cancel-now")
    assert "Ended on" in page and 'id="cancel-now"' not in page
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).status == "canceled"

    events = receiver.wait_for({sub.id}, 4)
    assert [e["type"] for e in events[1:]] == [
        "customer.subscription.updated",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ]
    assert events[1]["data"]["previous_attributes"]["cancel_at_period_end"] is False
    assert events[2]["data"]["previous_attributes"]["cancel_at_period_end"] is True


# -- webhook delivery and durability ----------------------------------------------------------


def test_failed_deliveries_are_retried(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    session = create_session(sandbox, prices)
    receiver.fail_next = 1
    sandbox.client.v1.checkout.sessions.expire(session.id)
    [event] = receiver.wait_for({session.id}, 1)

    tries = [json.loads(a["body"])["id"] for a in receiver.attempts]
    assert tries.count(event["id"]) == 2  # one 500, then success
    [delivery] = [d for d in sandbox.deliveries() if d["event"] == event["id"]]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2
    assert delivery["last_status"] == 200


def test_state_survives_a_restart(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.fail_next = 10**6  # the app is "down": deliveries stay queued
    server = Sandbox(tmp_path, receiver.url)
    server.start()
    try:
        params: dict[str, Any] = {
            "mode": "subscription",
            "line_items": [{"price": server_price(server), "quantity": 1}],
            "success_url": "http://app.test/ok",
        }
        session = server.client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
        assert pay(server, session.id).status_code == 303
        price_ids = {p.id for p in server.client.v1.prices.list().data}
        # All three events are queued and have failed at least once before the restart.
        wait_until(lambda: [(d["state"], d["attempts"] > 0) for d in server.deliveries()] == [("pending", True)] * 3)
    finally:
        assert server.stop() == 0

    receiver.fail_next = 0
    server.start()
    try:
        assert {p.id for p in server.client.v1.prices.list().data} == price_ids  # seeding is idempotent
        replayed = server.client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
        assert replayed.id == session.id
        session = server.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
        assert (session.status, session.payment_status) == ("complete", "paid")
        events = receiver.wait_for(
            {session.id, session.subscription.id, session.subscription.latest_invoice},
            3,
        )
        assert [e["type"] for e in events] == [
            "customer.subscription.created",
            "invoice.paid",
            "checkout.session.completed",
        ]
        assert all(d["state"] == "delivered" and d["attempts"] >= 2 for d in server.deliveries())
    finally:
        server.stop()
        receiver.close()


# -- units ------------------------------------------------------------------------------------


def test_form_decoding() -> None:
    params = decode(
        [
            ("line_items[0][price]", "price_a"),
            ("line_items[0][quantity]", "2"),
            ("line_items[1][price]", "price_b"),
            ("expand[]", "subscription"),
            ("expand[]", "line_items"),
            ("metadata[org]", "42"),
        ]
    )
    assert params == {
        "line_items": {
            "0": {"price": "price_a", "quantity": "2"},
            "1": {"price": "price_b"},
        },
        "expand": {"0": "subscription", "1": "line_items"},
        "metadata": {"org": "42"},
    }


def test_signatures_verify_with_the_sdk() -> None:
    payload = json.dumps({"id": "evt_1", "object": "event"})
    header = signature_header(payload, SECRET, int(time.time()))
    stripe.WebhookSignature.verify_header(payload, header, SECRET, 300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload + " ", header, SECRET, 300)


def test_open_sessions_expire_when_due(store: Store) -> None:
    price = next(p for p in store.all("price") if p["lookup_key"] == "starter_monthly")
    request = checkout_request([(price["id"], 1)])

    def create() -> dict[str, Any]:
        return checkout.create_checkout_session(store, request, "http://x")

    by_worker, on_read = in_transaction(store, create), in_transaction(store, create)
    expires_at = by_worker["expires_at"]

    # The worker runs the expiry job once it is due.
    job = next(j for j in store.due_jobs(expires_at) if j["ref"] == by_worker["id"])
    in_transaction(store, lambda: billing.run_job(store, job["kind"], job["ref"], expires_at - 1))
    assert store.get(by_worker["id"])["status"] == "open"  # type: ignore[index]
    in_transaction(store, lambda: billing.run_job(store, job["kind"], job["ref"], expires_at))
    assert store.get(by_worker["id"])["status"] == "expired"  # type: ignore[index]

    # Reading a session past its expiry expires it at once; its job later finds nothing to do.
    with simtime.frozen_at(expires_at + 5):
        read = in_transaction(store, lambda: checkout.get_checkout_session(store, on_read["id"]))
    assert (read["status"], read["url"]) == ("expired", None)
    in_transaction(store, lambda: billing.run_job(store, "expire_session", on_read["id"], expires_at + 5))

    expired = [e["data"]["object"]["id"] for e in store.all("event") if e["type"] == "checkout.session.expired"]
    assert expired == [by_worker["id"], on_read["id"]]


def test_reseeding_a_changed_amount_moves_the_lookup_key(store: Store, tmp_path: Path) -> None:
    before = {p["lookup_key"]: p for p in store.all("price")}
    (tmp_path / "plans.toml").write_text(CATALOGUE.replace("1900", "2500"))
    with store.transaction():
        billing.seed_catalogue(store, tmp_path / "plans.toml")
    prices = store.all("price")
    starter = [p for p in prices if p["lookup_key"] == "starter_monthly"]
    # The yearly price (10 × monthly by default) changes too: two new prices, two retired.
    assert len(prices) == 6 and len(starter) == 1 and starter[0]["unit_amount"] == 2500
    yearly = [p for p in prices if p["lookup_key"] == "starter_yearly"]
    assert yearly[0]["unit_amount"] == 25000 and yearly[0]["recurring"]["interval"] == "year"
    assert yearly[0]["product"] == starter[0]["product"]
    assert starter[0]["product"] == before["starter_monthly"]["product"]
    assert store.get(before["starter_monthly"]["id"])["active"] is False  # type: ignore[index]
    assert store.get(before["pro_monthly"]["id"]) == before["pro_monthly"]


def test_month_arithmetic() -> None:
    jan_31 = 1706659200  # 2024-01-31T00:00:00Z
    assert objects.add_month(jan_31) == 1709164800  # 2024-02-29, clamped to the leap day
