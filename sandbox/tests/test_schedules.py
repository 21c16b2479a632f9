"""Subscription schedules: a downgrade that waits for the end of the period."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from sandbox import billing, checkout, schedules
from sandbox.store import Store
from sandbox.tests.conftest import Receiver, Sandbox, checkout_request, paid_subscription


def _downgrade_phases(sub: Any, prices: dict[str, str]) -> list[dict[str, Any]]:
    item = sub["items"].data[0]
    return [
        {
            "items": [{"price": i.price.id, "quantity": i.quantity} for i in sub["items"].data],
            "start_date": item.current_period_start,
            "end_date": item.current_period_end,
        },
        {"items": [{"price": prices["starter_monthly"], "quantity": 1}]},
    ]


def test_downgrade_at_period_end_is_scheduled(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    api = sandbox.client.v1.subscription_schedules
    schedule = api.create(params={"from_subscription": sub.id})
    assert schedule.id.startswith("sub_sched_") and schedule.status == "active"
    assert schedule.subscription == sub.id and schedule.end_behavior == "release"
    assert len(schedule.phases) == 1
    phase = schedule.phases[0]
    assert [(i.price, i.quantity) for i in phase["items"]] == [(i.price.id, i.quantity) for i in sub["items"].data]
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).schedule == schedule.id

    with pytest.raises(stripe.InvalidRequestError) as raised:
        api.create(params={"from_subscription": sub.id})
    assert raised.value.param == "from_subscription"  # already on a schedule

    updated = api.update(schedule.id, params={"phases": _downgrade_phases(sub, prices), "end_behavior": "release"})
    assert len(updated.phases) == 2
    first, second = updated.phases
    assert second.start_date == first.end_date == sub["items"].data[0].current_period_end
    assert second.end_date > second.start_date
    assert [(i.price, i.quantity) for i in second["items"]] == [(prices["starter_monthly"], 1)]
    # Nothing changes before the period ends.
    assert len(sandbox.client.v1.subscriptions.retrieve(sub.id)["items"].data) == 2
    assert api.retrieve(schedule.id).phases[1].start_date == second.start_date

    bad: list[tuple[dict[str, Any], str]] = [
        ({"phases": [{**_downgrade_phases(sub, prices)[0], "start_date": 1}]}, "phases[0][start_date]"),
        ({"phases": [{"items": [{"price": "price_nope"}]}]}, "phases[0][items][0][price]"),
        ({"phases": [{"items": [{"price": prices["starter_monthly"], "colour": 1}]}]}, "phases[0][items][0][colour]"),
        ({"end_behavior": "explode"}, "end_behavior"),
    ]
    for params, param in bad:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            api.update(schedule.id, params=params)
        assert raised.value.param == param

    listed = api.list(params={"customer": sub.customer})
    assert [s.id for s in listed.data] == [schedule.id]

    released = api.release(schedule.id)
    assert released.status == "released" and released.released_subscription == sub.id
    assert released.subscription is None and released.current_phase is None
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).schedule is None
    with pytest.raises(stripe.InvalidRequestError):
        api.release(schedule.id)

    events = receiver.wait_for({schedule.id}, 3)
    assert [e["type"] for e in events] == [
        "subscription_schedule.created",
        "subscription_schedule.updated",
        "subscription_schedule.released",
    ]


def test_canceling_a_schedule_cancels_its_subscription(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    schedule = sandbox.client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    canceled = sandbox.client.v1.subscription_schedules.cancel(schedule.id)
    assert canceled.status == "canceled" and canceled.canceled_at is not None
    assert sandbox.client.v1.subscriptions.retrieve(sub.id).status == "canceled"


def _subscribe(store: Store) -> dict[str, Any]:
    by_key = {p["lookup_key"]: p for p in store.all("price")}
    with store.transaction():
        request = checkout_request(
            [(by_key["pro_monthly"]["id"], 1), (by_key["extra_seat_monthly"]["id"], 3)],
            customer_email="ada@example.com",
        )
        session = checkout.create_checkout_session(store, request, "http://sandbox.test")
        session = checkout.pay_checkout_session(
            store, session["id"], card_number="4242424242424242", email="ada@example.com", name="Ada", async_delay=1
        )
    subscription = store.get(session["subscription"])
    assert subscription is not None
    return subscription


def test_due_phases_apply_when_the_period_ends(store: Store) -> None:
    sub = _subscribe(store)
    by_key = {p["lookup_key"]: p for p in store.all("price")}
    start, end = sub["items"]["data"][0]["current_period_start"], sub["items"]["data"][0]["current_period_end"]
    seats = next(i for i in sub["items"]["data"] if i["price"]["lookup_key"] == "extra_seat_monthly")
    with store.transaction():
        schedule = schedules.create_from_subscription(store, sub["id"])
        schedules.update_schedule(
            store,
            schedule["id"],
            phases=[
                schedules.PhaseInput(
                    items=[(by_key["pro_monthly"]["id"], 1), (seats["price"]["id"], 3)], start_date=start, end_date=end
                ),
                schedules.PhaseInput(
                    items=[(by_key["starter_monthly"]["id"], 1), (seats["price"]["id"], 1)],
                    start_date=None,
                    end_date=None,
                ),
            ],
            end_behavior="release",
            metadata=None,
        )
    with store.transaction():
        assert schedules.apply_due_phases(store, end - 1) == []  # not yet
    with store.transaction():
        assert schedules.apply_due_phases(store, end) == [schedule["id"]]
    with store.transaction():
        assert schedules.apply_due_phases(store, end + 10) == []  # idempotent
    after = store.get(sub["id"])
    assert after is not None
    assert sorted((i["price"]["lookup_key"], i["quantity"]) for i in after["items"]["data"]) == [
        ("extra_seat_monthly", 1),
        ("starter_monthly", 1),
    ]
    seat_item = next(i for i in after["items"]["data"] if i["price"]["lookup_key"] == "extra_seat_monthly")
    assert seat_item["id"] == seats["id"]  # an item whose price stays keeps its id
    assert not [ii for ii in store.all("invoiceitem")]  # no prorations at a phase boundary
    updated = [e for e in store.all("event") if e["type"] == "customer.subscription.updated"]
    assert updated[-1]["data"]["previous_attributes"]["items"]["data"][0]["price"]["lookup_key"] == "pro_monthly"
    current = store.get(schedule["id"])
    assert current is not None and current["current_phase"]["start_date"] == end

    # After the last phase, the schedule releases the subscription, which carries on.
    last_end = current["phases"][-1]["end_date"]
    with store.transaction():
        billing.run_job(store, schedules.JOB_KIND, schedule["id"], last_end)
    done = store.get(schedule["id"])
    assert done is not None and done["status"] == "released"
    final = store.get(sub["id"])
    assert final is not None and final["schedule"] is None and final["status"] == "active"
