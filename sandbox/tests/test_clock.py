"""Time in the sandbox: customers, test clocks, cards, renewals, dunning, trials, scheduled
cancellations and the portal's card update, through the real server, the real stripe-python
client and the hosted pages driven with requests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from sandbox.config import Dunning
from sandbox.objects import add_month
from sandbox.tests.conftest import (
    CARD_DECLINED,
    CARD_OK,
    Receiver,
    Sandbox,
    create_session,
    pay,
    started,
)

CARD_CHARGES_FAIL = "4000 0000 0000 0341"
DAY = 86400
HOUR = 3600
T0 = int(datetime(2030, 1, 15, 12, 0, tzinfo=UTC).timestamp())


# -- harness ----------------------------------------------------------------------------------


def events_of(receiver: Receiver, customer: str) -> list[dict[str, Any]]:
    """Delivered, signature-checked events about one customer and what it owns, in order."""
    with receiver.lock:
        bodies = [a["body"] for a in receiver.attempts if a["status"] == 200]
    found = []
    for body in bodies:
        event = json.loads(body)
        obj = event["data"]["object"]
        if obj.get("customer") == customer or obj["id"] == customer:
            found.append(event)
    return sorted(found, key=lambda e: e["created"])


def wait_events(receiver: Receiver, customer: str, last_type: str, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = events_of(receiver, customer)
        if sum(e["type"] == last_type for e in events) >= count:
            return events
        time.sleep(0.05)
    raise AssertionError(f"no {last_type} x{count}: {[e['type'] for e in events_of(receiver, customer)]}")


def advance(sandbox: Sandbox, clock_id: str, to: int, receiver: Receiver | None = None) -> Any:
    """Advance a clock and wait until it is ready, as a test against Stripe would; with a
    receiver, also until test_helpers.test_clock.ready (always the last event) has arrived."""
    ready_before = len(ready_events(receiver, clock_id)) if receiver else 0
    started = sandbox.client.v1.test_helpers.test_clocks.advance(clock_id, params={"frozen_time": to})
    assert started.status == "advancing"
    assert started.status_details.advancing.target_frozen_time == to
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        clock = sandbox.client.v1.test_helpers.test_clocks.retrieve(clock_id)
        if clock.status == "ready" and (receiver is None or len(ready_events(receiver, clock_id)) > ready_before):
            assert clock.frozen_time == to and clock.status_details.advancing is None
            return clock
        time.sleep(0.05)
    raise AssertionError("the clock never became ready")


def ready_events(receiver: Receiver, clock_id: str) -> list[dict[str, Any]]:
    return [e for e in receiver.events({clock_id}) if e["type"] == "test_helpers.test_clock.ready"]


def clock_customer(sandbox: Sandbox, frozen_time: int = T0, **params: Any) -> tuple[str, str]:
    clock = sandbox.client.v1.test_helpers.test_clocks.create(params={"frozen_time": frozen_time, "name": "life"})
    customer = sandbox.client.v1.customers.create(
        params={"email": "grace@example.com", "name": "Grace Hopper", "test_clock": clock.id, **params}
    )
    return clock.id, customer.id


def subscribe(sandbox: Sandbox, prices: dict[str, str], customer: str, card: str = CARD_OK, **params: Any) -> Any:
    params.setdefault("line_items", [{"price": prices["starter_monthly"], "quantity": 1}])
    session = create_session(sandbox, prices, customer=customer, customer_email=None, **params)
    fields = {"email": "grace@example.com", "billingName": "Grace Hopper"}
    if card == "":
        fields.update(cardExpiry="", cardCvc="")
    response = pay(sandbox, session.id, card, **fields)
    assert response.status_code == 303, response.text
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    return session.subscription


def portal_update_card(sandbox: Sandbox, customer: str, card: str) -> requests.Response:
    portal = sandbox.client.v1.billing_portal.sessions.create(params={"customer": customer})
    page = requests.get(portal.url, timeout=5)
    assert 'id="update-card"' in page.text
    form_url = f"{sandbox.url}/portal/{portal.id}/payment-method"
    assert 'id="cardNumber"' in requests.get(form_url, timeout=5).text
    form = {
        "email": "grace@example.com",
        "cardNumber": card,
        "cardExpiry": "11 / 39",
        "cardCvc": "123",
        "billingName": "Grace Hopper",
    }
    return requests.post(form_url, data=form, allow_redirects=False, timeout=10)


def period(sub: Any) -> tuple[int, int]:
    item = sub["items"].data[0]
    return item.current_period_start, item.current_period_end


# -- customers, clocks and cards ----------------------------------------------------------------


def test_customers_on_a_clock_live_at_its_time(sandbox: Sandbox, receiver: Receiver) -> None:
    clocks = sandbox.client.v1.test_helpers.test_clocks
    clock = clocks.create(params={"frozen_time": T0, "name": "Customers"})
    assert clock.id.startswith("clock_") and clock.object == "test_helpers.test_clock"
    assert (clock.status, clock.frozen_time, clock.name) == ("ready", T0, "Customers")
    assert clocks.retrieve(clock.id).frozen_time == T0
    assert clock.id in [c.id for c in clocks.list().data]

    customer = sandbox.client.v1.customers.create(
        params={
            "email": "grace@example.com",
            "name": "Grace",
            "metadata": {"org_id": "7"},
            "test_clock": clock.id,
            "payment_method": "pm_card_visa",
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        }
    )
    assert customer.created == T0 and customer.test_clock == clock.id
    assert customer.metadata.to_dict() == {"org_id": "7"}
    method_id = customer.invoice_settings.default_payment_method
    method = sandbox.client.v1.payment_methods.retrieve(method_id)
    assert (method.type, method.customer, method.card.brand, method.card.last4) == ("card", customer.id, "visa", "4242")
    listed = sandbox.client.v1.customers.payment_methods.list(customer.id)
    assert [m.id for m in listed.data] == [method_id]
    by_query = sandbox.client.v1.payment_methods.list(params={"customer": customer.id, "type": "card"})
    assert [m.id for m in by_query.data] == [method_id]
    with pytest.raises(stripe.CardError):
        sandbox.client.v1.customers.create(params={"payment_method": "pm_card_chargeDeclined"})

    updated = sandbox.client.v1.customers.update(
        customer.id, params={"name": "Grace Hopper", "metadata": {"plan": "pro"}}
    )
    assert updated.name == "Grace Hopper" and updated.metadata.to_dict() == {"org_id": "7", "plan": "pro"}
    assert sandbox.client.v1.customers.retrieve(customer.id).name == "Grace Hopper"

    events = wait_events(receiver, customer.id, "customer.updated")
    assert [e["type"] for e in events] == ["customer.created", "payment_method.attached", "customer.updated"]
    assert all(e["created"] == T0 for e in events)  # the clock's time, not the wall clock's
    assert events[2]["data"]["previous_attributes"] == {"name": "Grace", "metadata": {"plan": None}}

    with pytest.raises(stripe.InvalidRequestError) as missing:
        sandbox.client.v1.customers.create(params={"test_clock": "clock_nope"})
    assert missing.value.param == "test_clock"
    with pytest.raises(stripe.InvalidRequestError) as not_attached:
        sandbox.client.v1.customers.update(
            customer.id, params={"invoice_settings": {"default_payment_method": "pm_nope"}}
        )
    assert not_attached.value.param == "invoice_settings[default_payment_method]"


def test_advancing_is_validated_as_on_stripe(sandbox: Sandbox, prices: dict[str, str]) -> None:
    clocks = sandbox.client.v1.test_helpers.test_clocks
    clock_id, customer = clock_customer(sandbox)
    with pytest.raises(stripe.InvalidRequestError) as backwards:
        clocks.advance(clock_id, params={"frozen_time": T0})
    assert backwards.value.param == "frozen_time"
    with pytest.raises(stripe.InvalidRequestError):  # no subscriptions: at most two years
        clocks.advance(clock_id, params={"frozen_time": T0 + 800 * DAY})
    subscribe(sandbox, prices, customer)
    limit = add_month(add_month(T0))  # two monthly intervals
    with pytest.raises(stripe.InvalidRequestError) as too_far:
        clocks.advance(clock_id, params={"frozen_time": limit + 1})
    assert "two billing intervals" in str(too_far.value.user_message)
    assert advance(sandbox, clock_id, limit).frozen_time == limit

    # With a yearly subscription the limit is two years.
    starter = sandbox.client.v1.prices.retrieve(prices["starter_monthly"])
    yearly = sandbox.client.v1.prices.create(
        params={"currency": "usd", "unit_amount": 19000, "product": starter.product, "recurring": {"interval": "year"}}
    )
    clock_id, customer = clock_customer(sandbox)
    subscribe(sandbox, prices, customer, line_items=[{"price": yearly.id, "quantity": 1}])
    two_years = add_month(T0)
    for _ in range(23):
        two_years = add_month(two_years)
    with pytest.raises(stripe.InvalidRequestError):
        clocks.advance(clock_id, params={"frozen_time": two_years + 1})
    assert advance(sandbox, clock_id, two_years).frozen_time == two_years


def test_checkout_attaches_a_card_and_records_the_payment(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    assert sub.created == T0 and sub.start_date == T0 and period(sub) == (T0, add_month(T0))
    method = sandbox.client.v1.payment_methods.retrieve(sub.default_payment_method)
    assert method.id.startswith("pm_") and method.customer == customer
    assert (method.card.brand, method.card.last4, method.card.exp_month, method.card.exp_year) == (
        "visa",
        "4242",
        12,
        2040,
    )
    assert method.card.funding == "credit"
    assert sandbox.client.v1.customers.retrieve(customer).invoice_settings.default_payment_method == method.id

    invoice = sandbox.client.v1.invoices.retrieve(sub.latest_invoice, params={"expand": ["payments"]})
    assert "payments" not in sandbox.client.v1.invoices.retrieve(sub.latest_invoice)  # only when expanded
    assert (invoice.status, invoice.amount_paid, invoice.created) == ("paid", 1900, T0)
    assert invoice.parent.subscription_details.subscription == sub.id
    payment = invoice.payments.data[0]
    listed = sandbox.client.v1.invoice_payments.list(params={"invoice": invoice.id})
    assert [p.id for p in listed.data] == [payment.id]
    assert (payment.object, payment.status, payment.amount_paid) == ("invoice_payment", "paid", 1900)
    intent = sandbox.client.v1.payment_intents.retrieve(payment.payment.payment_intent)
    assert (intent.status, intent.amount_received, intent.payment_method) == ("succeeded", 1900, method.id)
    charge = sandbox.client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.status, charge.paid, charge.amount, charge.payment_intent) == ("succeeded", True, 1900, intent.id)
    assert charge.payment_method_details.card.last4 == "4242"
    refund = sandbox.client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert refund.created == T0  # made for a clock customer: at the clock's time


def test_card_0341_is_declined_when_paying_and_attaches_for_a_trial(sandbox: Sandbox, prices: dict[str, str]) -> None:
    session = create_session(sandbox, prices)
    declined = pay(sandbox, session.id, CARD_CHARGES_FAIL)
    assert declined.status_code == 400 and "Your card was declined." in declined.text
    assert sandbox.client.v1.checkout.sessions.retrieve(session.id).status == "open"

    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer, CARD_CHARGES_FAIL, subscription_data={"trial_period_days": 14})
    assert sub.status == "trialing"
    assert sandbox.client.v1.payment_methods.retrieve(sub.default_payment_method).card.last4 == "0341"


# -- the lifecycle ------------------------------------------------------------------------------


def test_a_subscription_lives_renews_fails_recovers_and_ends(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    started = time.monotonic()
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    first_end = period(sub)[1]

    # A renewal: a draft at the period end, finalized an hour later and paid.
    advance(sandbox, clock_id, first_end + 2 * HOUR, receiver)
    events = wait_events(receiver, customer, "invoice.paid", 2)
    renewal = [e for e in events if e["created"] >= first_end]
    assert [(e["type"], e["created"] - first_end) for e in renewal] == [
        ("invoice.created", 0),
        ("customer.subscription.updated", 0),
        ("invoice.finalized", HOUR),
        ("invoice.paid", HOUR),
    ]
    assert renewal[0]["data"]["object"]["status"] == "draft"
    assert renewal[1]["data"]["previous_attributes"]["items"]  # the period moved on
    sub = sandbox.client.v1.subscriptions.retrieve(sub.id)
    second_end = add_month(first_end)
    assert (sub.status, period(sub)) == ("active", (first_end, second_end))
    invoice = sandbox.client.v1.invoices.retrieve(sub.latest_invoice)
    assert (invoice.status, invoice.billing_reason, invoice.amount_paid) == ("paid", "subscription_cycle", 1900)
    assert (invoice.period_start, invoice.period_end) == (T0, first_end)
    assert invoice.lines.data[0].period.start == first_end

    # The owner switches to a card whose charges fail; the next renewal fails: past_due.
    refused = portal_update_card(sandbox, customer, CARD_DECLINED)
    assert refused.status_code == 400 and "Your card was declined." in refused.text
    assert portal_update_card(sandbox, customer, CARD_CHARGES_FAIL).status_code == 303
    sub = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert sandbox.client.v1.payment_methods.retrieve(sub.default_payment_method).card.last4 == "0341"
    advance(sandbox, clock_id, second_end + 2 * HOUR, receiver)
    events = wait_events(receiver, customer, "invoice.payment_failed")
    failed = next(e for e in events if e["type"] == "invoice.payment_failed")["data"]["object"]
    assert failed["attempt_count"] == 1 and failed["next_payment_attempt"] == second_end + HOUR + 3 * DAY
    sub = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "past_due" and sub.latest_invoice == failed["id"]
    past_due = [e for e in events if e["type"] == "customer.subscription.updated"][-1]
    assert past_due["data"]["previous_attributes"] == {"status": "active"}
    assert past_due["created"] == second_end + HOUR

    # A smart retry three days later fails again.
    advance(sandbox, clock_id, second_end + 4 * DAY, receiver)
    events = wait_events(receiver, customer, "invoice.payment_failed", 2)
    retried = [e for e in events if e["type"] == "invoice.payment_failed"][-1]["data"]["object"]
    assert retried["attempt_count"] == 2 and retried["next_payment_attempt"] == second_end + HOUR + 5 * DAY

    # The owner pays the open invoice on its hosted page with a good card: active again.
    open_invoice = sandbox.client.v1.invoices.retrieve(failed["id"])
    assert open_invoice.status == "open" and open_invoice.number and open_invoice.amount_remaining == 1900
    page = requests.get(open_invoice.hosted_invoice_url, timeout=5)
    assert 'id="cardNumber"' in page.text and open_invoice.number in page.text
    form = {
        "email": "grace@example.com",
        "cardNumber": CARD_CHARGES_FAIL,
        "cardExpiry": "11 / 39",
        "cardCvc": "123",
        "billingName": "Grace Hopper",
    }
    refused = requests.post(open_invoice.hosted_invoice_url, data=form, timeout=10)
    assert refused.status_code == 400 and "Your card was declined." in refused.text
    paid = requests.post(open_invoice.hosted_invoice_url, data={**form, "cardNumber": CARD_OK}, timeout=10)
    assert paid.status_code == 200 and "This invoice has been paid" in paid.text
    events = wait_events(receiver, customer, "customer.subscription.updated", 5)
    recovered = [e["type"] for e in events if e["created"] == second_end + 4 * DAY]
    assert recovered == ["payment_method.attached", "invoice.paid", "customer.subscription.updated"]
    sub = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "active"
    assert sandbox.client.v1.invoices.retrieve(failed["id"]).next_payment_attempt is None

    # Cancel at period end; when the clock passes it, the subscription ends without an invoice.
    portal = sandbox.client.v1.billing_portal.sessions.create(params={"customer": customer})
    assert "ending in 0341" in requests.get(portal.url, timeout=5).text  # the card it saved
    requests.post(f"{sandbox.url}/portal/{portal.id}/subscriptions/{sub.id}/cancel-at-period-end", timeout=5)
    sub = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert sub.cancel_at == add_month(second_end) and sub.canceled_at == second_end + 4 * DAY  # clock time
    advance(sandbox, clock_id, add_month(second_end) + DAY, receiver)
    events = wait_events(receiver, customer, "customer.subscription.deleted")
    ended = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert (ended.status, ended.ended_at) == ("canceled", add_month(second_end))
    assert [e["type"] for e in events if e["created"] >= add_month(second_end)] == ["customer.subscription.deleted"]
    invoices = sandbox.client.v1.invoices.list(params={"subscription": sub.id})
    assert [i.status for i in invoices.data] == ["paid", "paid", "paid"]  # newest first, no fourth

    wall = time.monotonic() - started
    print(f"three simulated months in {wall:.2f} s of wall time")
    assert [e["data"]["object"]["frozen_time"] for e in ready_events(receiver, clock_id)] == [
        first_end + 2 * HOUR,
        second_end + 2 * HOUR,
        second_end + 4 * DAY,
        add_month(second_end) + DAY,
    ]


def test_failed_retries_end_in_cancellation_by_default(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    assert portal_update_card(sandbox, customer, CARD_CHARGES_FAIL).status_code == 303
    end = period(sub)[1]
    advance(sandbox, clock_id, end + 8 * DAY, receiver)
    events = wait_events(receiver, customer, "customer.subscription.deleted")
    failures = [e["data"]["object"] for e in events if e["type"] == "invoice.payment_failed"]
    assert [(f["attempt_count"], f["next_payment_attempt"]) for f in failures] == [
        (1, end + HOUR + 3 * DAY),
        (2, end + HOUR + 5 * DAY),
        (3, end + HOUR + 7 * DAY),
        (4, None),
    ]
    ended = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert (ended.status, ended.ended_at) == ("canceled", end + HOUR + 7 * DAY)
    assert ended.cancellation_details.reason == "payment_failed"


def test_unpaid_and_the_retry_schedule_are_configurable(
    tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> None:
    for server in started(
        tmp_path_factory.mktemp("unpaid"),
        receiver,
        SANDBOX_DUNNING_RETRY_DAYS="1,2",
        SANDBOX_DUNNING_FINAL_ACTION="unpaid",
    ):
        listed = server.client.v1.prices.list(params={"lookup_keys": ["starter_monthly", "extra_seat_monthly"]})
        prices = {p.lookup_key: p.id for p in listed.data if p.lookup_key}
        clock_id, customer = clock_customer(server, payment_method="pm_card_chargeCustomerFail")
        sub = subscribe(server, prices, customer, CARD_CHARGES_FAIL, subscription_data={"trial_period_days": 7})
        advance(server, clock_id, sub.trial_end + 3 * DAY, receiver)
        events = wait_events(receiver, customer, "invoice.payment_failed", 3)
        types = [e["type"] for e in events]
        assert types.index("customer.subscription.trial_will_end") < types.index("invoice.created")
        reminder = next(e for e in events if e["type"] == "customer.subscription.trial_will_end")
        assert reminder["created"] == sub.trial_end - 3 * DAY
        failures = [e["data"]["object"] for e in events if e["type"] == "invoice.payment_failed"]
        start = sub.trial_end + HOUR
        assert [f["next_payment_attempt"] for f in failures] == [start + DAY, start + 2 * DAY, None]
        unpaid = server.client.v1.subscriptions.retrieve(sub.id)
        assert unpaid.status == "unpaid"
        statuses = [e["data"]["object"]["status"] for e in events if e["type"] == "customer.subscription.updated"]
        assert statuses[-2:] == ["past_due", "unpaid"]

        # Paying the open invoice through the API with a good card brings it back.
        with pytest.raises(stripe.CardError):
            server.client.v1.invoices.pay(failures[0]["id"])  # the default card still fails
        paid = server.client.v1.invoices.pay(failures[0]["id"], params={"payment_method": "pm_card_visa"})
        assert (paid.status, paid.amount_remaining) == ("paid", 0)
        assert server.client.v1.subscriptions.retrieve(sub.id).status == "active"
        with pytest.raises(stripe.InvalidRequestError):
            server.client.v1.invoices.pay(failures[0]["id"])


# -- trials -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "status", "last_event"),
    [
        ("cancel", "canceled", "customer.subscription.deleted"),
        ("pause", "paused", "customer.subscription.paused"),
        ("create_invoice", "past_due", "invoice.payment_failed"),
    ],
)
def test_a_trial_without_a_card_ends_per_its_setting(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str], behavior: str, status: str, last_event: str
) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(
        sandbox,
        prices,
        customer,
        "",
        payment_method_collection="if_required",
        subscription_data={
            "trial_period_days": 14,
            "trial_settings": {"end_behavior": {"missing_payment_method": behavior}},
        },
    )
    assert sub.status == "trialing" and sub.default_payment_method is None
    assert sub.trial_settings.end_behavior.missing_payment_method == behavior
    advance(sandbox, clock_id, sub.trial_end + 2 * HOUR, receiver)
    wait_events(receiver, customer, last_event)
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).status == status
    if behavior == "pause":  # a card, then resume: a new period starts now and is paid
        assert portal_update_card(sandbox, customer, CARD_OK).status_code == 303
        resumed = sandbox.client.v1.subscriptions.resume(sub.id)
        now = sub.trial_end + 2 * HOUR
        assert (resumed.status, period(resumed)) == ("active", (now, add_month(now)))
        invoice = sandbox.client.v1.invoices.retrieve(resumed.latest_invoice)
        assert (invoice.status, invoice.amount_paid, invoice.created) == ("paid", 1900, now)
        events = wait_events(receiver, customer, "invoice.paid", 2)
        assert [e["type"] for e in events if e["created"] == now][-5:] == [
            "customer.subscription.resumed",
            "customer.subscription.updated",
            "invoice.created",
            "invoice.finalized",
            "invoice.paid",
        ]
        with pytest.raises(stripe.InvalidRequestError):
            sandbox.client.v1.subscriptions.resume(sub.id)  # no longer paused


def test_a_trial_with_a_card_renews_into_a_paid_period(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer, subscription_data={"trial_period_days": 14})
    advance(sandbox, clock_id, sub.trial_end + 2 * HOUR, receiver)
    events = wait_events(receiver, customer, "invoice.paid", 2)
    after = [e["type"] for e in events if e["created"] >= sub.trial_end - 3 * DAY]
    assert after == [
        "customer.subscription.trial_will_end",
        "invoice.created",
        "customer.subscription.updated",
        "invoice.finalized",
        "invoice.paid",
    ]
    renewed = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert renewed.status == "active" and period(renewed) == (sub.trial_end, add_month(sub.trial_end))
    assert sandbox.client.v1.invoices.retrieve(renewed.latest_invoice).amount_paid == 1900


def test_cancel_at_ends_a_subscription_mid_period(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    sandbox.client.v1.subscriptions.update(sub.id, params={"cancel_at": T0 + 10 * DAY})
    advance(sandbox, clock_id, T0 + 10 * DAY - 1, receiver)
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).status == "active"
    advance(sandbox, clock_id, T0 + 40 * DAY, receiver)
    events = wait_events(receiver, customer, "customer.subscription.deleted")
    assert events[-1]["created"] == T0 + 10 * DAY
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).ended_at == T0 + 10 * DAY
    assert len(sandbox.client.v1.invoices.list(params={"customer": customer}).data) == 1  # no renewal


def test_a_schedule_downgrades_at_the_period_end_on_the_clock(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer, line_items=[{"price": prices["pro_monthly"], "quantity": 1}])
    start, end = period(sub)
    api = sandbox.client.v1.subscription_schedules
    schedule = api.create(params={"from_subscription": sub.id})
    assert schedule.phases[0].start_date == T0  # the clock's time, not the wall clock's
    phases = [
        {"items": [{"price": prices["pro_monthly"], "quantity": 1}], "start_date": start, "end_date": end},
        {"items": [{"price": prices["starter_monthly"], "quantity": 1}]},
    ]
    api.update(schedule.id, params={"phases": phases, "end_behavior": "release"})
    advance(sandbox, clock_id, end - HOUR, receiver)
    assert sandbox.client.v1.subscriptions.retrieve(sub.id)["items"].data[0].price.id == prices["pro_monthly"]
    advance(sandbox, clock_id, end + 2 * HOUR, receiver)
    renewed = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert [i.price.id for i in renewed["items"].data] == [prices["starter_monthly"]]
    invoice = sandbox.client.v1.invoices.retrieve(renewed.latest_invoice)
    assert (invoice.status, invoice.amount_paid, invoice.billing_reason) == ("paid", 1900, "subscription_cycle")
    assert api.retrieve(schedule.id).current_phase.start_date == end


def test_paused_collection_voids_renewals(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    sandbox.client.v1.subscriptions.update(sub.id, params={"pause_collection": {"behavior": "void"}})
    advance(sandbox, clock_id, period(sub)[1] + 2 * HOUR, receiver)
    renewed = sandbox.client.v1.subscriptions.retrieve(sub.id)
    voided = sandbox.client.v1.invoices.retrieve(renewed.latest_invoice)
    assert (renewed.status, voided.status, voided.amount_paid, voided.attempt_count) == ("active", "void", 0, 0)
    types = [e["type"] for e in events_of(receiver, customer) if e["created"] >= period(sub)[1]]
    assert types == ["invoice.created", "customer.subscription.updated", "invoice.finalized", "invoice.voided"]


def test_a_failed_advance_reports_internal_failure(sandbox: Sandbox) -> None:
    clock_id, _ = clock_customer(sandbox)
    # As if the worker had dropped the advance: advancing, with no advance job left to run.
    stuck: dict[str, Any] = {"status": "advancing", "status_details": {"advancing": {"target_frozen_time": T0 + DAY}}}
    assert requests.post(f"{sandbox.url}/_sandbox/objects/{clock_id}", json=stuck, timeout=5).ok
    assert sandbox.client.v1.test_helpers.test_clocks.retrieve(clock_id).status == "internal_failure"
    with pytest.raises(stripe.InvalidRequestError):
        sandbox.client.v1.test_helpers.test_clocks.advance(clock_id, params={"frozen_time": T0 + DAY})


# -- invoices and clocks' deletion ----------------------------------------------------------------


def test_invoices_list_and_pdf(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    listed = sandbox.client.v1.invoices.list(params={"customer": customer, "status": "paid", "limit": 1})
    assert [i.id for i in listed.data] == [sub.latest_invoice] and listed.has_more is False
    assert sandbox.client.v1.invoices.list(params={"customer": customer, "status": "open"}).data == []
    invoice = listed.data[0]
    pdf = requests.get(invoice.invoice_pdf, timeout=5)
    assert pdf.headers["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-1.4") and pdf.content.rstrip().endswith(b"%%EOF")
    assert f"Invoice {invoice.number}".encode() in pdf.content and b"19.00 USD" in pdf.content
    xref = int(pdf.content.rsplit(b"startxref", 1)[1].split()[0])
    assert pdf.content[xref:].startswith(b"xref")
    with pytest.raises(stripe.InvalidRequestError):
        sandbox.client.v1.invoices.list(params={"status": "bogus"})


def test_deleting_a_clock_deletes_its_customers(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    clock_id, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    deleted = sandbox.client.v1.test_helpers.test_clocks.delete(clock_id)
    assert deleted.deleted is True
    for retrieve, object_id in (
        (sandbox.client.v1.test_helpers.test_clocks.retrieve, clock_id),
        (sandbox.client.v1.customers.retrieve, customer),
        (sandbox.client.v1.subscriptions.retrieve, sub.id),
    ):
        with pytest.raises(stripe.InvalidRequestError):
            retrieve(object_id)
    events = wait_events(receiver, customer, "customer.deleted")
    assert [e["type"] for e in events][-2:] == ["customer.subscription.deleted", "customer.deleted"]


# -- settings -----------------------------------------------------------------------------------


def test_dunning_settings_are_validated(tmp_path: Path) -> None:
    assert Dunning.from_env({}) == Dunning((3, 5, 7), "cancel")
    assert Dunning.from_env({"SANDBOX_DUNNING_RETRY_DAYS": "1, 4", "SANDBOX_DUNNING_FINAL_ACTION": "unpaid"}) == (
        Dunning((1, 4), "unpaid")
    )
    bad_settings = (
        {"SANDBOX_DUNNING_RETRY_DAYS": "5,3"},
        {"SANDBOX_DUNNING_RETRY_DAYS": "x"},
        {"SANDBOX_DUNNING_FINAL_ACTION": "void"},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError, match="SANDBOX_DUNNING"):
            Dunning.from_env(bad)
    # The server refuses to start with a bad setting, and says which.
    server = Sandbox(tmp_path, "http://127.0.0.1:9/webhooks")
    env = {**server.env, "SANDBOX_DUNNING_FINAL_ACTION": "void"}
    done = subprocess.run([sys.executable, "-m", "sandbox"], env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode != 0 and b"SANDBOX_DUNNING_FINAL_ACTION" in done.stderr
