"""List endpoints: filters and Stripe's cursor pagination, newest first."""

from __future__ import annotations

import time

import pytest
import stripe

from sandbox.tests.conftest import Receiver, Sandbox, create_session, paid_subscription


def test_subscription_and_customer_lists(sandbox: Sandbox, prices: dict[str, str]) -> None:
    subs = [paid_subscription(sandbox, prices)[1] for _ in range(3)]
    api = sandbox.client.v1.subscriptions
    listed = [s.id for s in api.list(params={"limit": 100}).data]
    assert listed[:3] == [s.id for s in reversed(subs)]  # newest first

    first = api.list(params={"limit": 1})
    assert first.has_more and [s.id for s in first.data] == [subs[2].id]
    second = api.list(params={"limit": 1, "starting_after": subs[2].id})
    assert [s.id for s in second.data] == [subs[1].id]
    back = api.list(params={"limit": 1, "ending_before": subs[0].id})
    assert [s.id for s in back.data] == [subs[1].id] and back.has_more
    walked = [s.id for s in api.list(params={"limit": 2}).auto_paging_iter()]
    assert walked[:3] == listed[:3] and len(walked) == len(set(walked))

    api.cancel(subs[0].id)
    default = {s.id for s in api.list(params={"limit": 100}).data}
    assert subs[0].id not in default and subs[1].id in default  # canceled ones only on request
    canceled = {s.id for s in api.list(params={"status": "canceled", "limit": 100}).data}
    assert subs[0].id in canceled and subs[1].id not in canceled
    assert subs[0].id in {s.id for s in api.list(params={"status": "all", "limit": 100}).data}
    assert [s.id for s in api.list(params={"customer": subs[1].customer}).data] == [subs[1].id]
    by_price = {s.id for s in api.list(params={"price": prices["extra_seat_monthly"], "limit": 100}).data}
    assert {subs[1].id, subs[2].id} <= by_price
    future = api.list(params={"created": {"gt": int(time.time()) + 60}})
    assert future.data == []

    for params, param in [
        ({"status": "sleeping"}, "status"),
        ({"limit": 101}, "limit"),
        ({"starting_after": "sub_nope"}, "starting_after"),
        ({"starting_after": subs[1].id, "ending_before": subs[2].id}, "ending_before"),
        ({"created": {"after": 1}}, "created[after]"),
        ({"colour": "red"}, "colour"),
    ]:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            api.list(params=params)
        assert raised.value.param == param

    customers = sandbox.client.v1.customers.list(params={"email": "ada@example.com", "limit": 100}).data
    assert {c.id for c in customers} >= {s.customer for s in subs}
    assert sandbox.client.v1.customers.list(params={"email": "nobody@example.com"}).data == []


def test_checkout_session_list(sandbox: Sandbox, prices: dict[str, str]) -> None:
    open_session = create_session(sandbox, prices)
    paid, sub = paid_subscription(sandbox, prices)
    sessions = sandbox.client.v1.checkout.sessions
    assert [s.id for s in sessions.list(params={"subscription": sub.id}).data] == [paid.id]
    assert [s.id for s in sessions.list(params={"customer": sub.customer}).data] == [paid.id]
    open_ids = {s.id for s in sessions.list(params={"status": "open", "limit": 100}).data}
    assert open_session.id in open_ids and paid.id not in open_ids
    assert sessions.list(params={"limit": 2}).data[0].id == paid.id


def test_event_list(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    events = sandbox.client.v1.events
    receiver.wait_for({sub.id}, 1)
    created = events.list(params={"type": "customer.subscription.created", "limit": 100}).data
    assert sub.id in {e.data.object.id for e in created}
    assert all(e.type == "customer.subscription.created" for e in created)
    wildcard = {e.type for e in events.list(params={"type": "invoice.*", "limit": 100}).data}
    assert wildcard == {"invoice.paid"}
    several = {e.type for e in events.list(params={"types": ["invoice.paid", "checkout.session.completed"]}).data}
    assert several == {"invoice.paid", "checkout.session.completed"}
    assert events.list(params={"created": {"lt": int(time.time()) - 3600}}).data == []

    receiver.fail_next = 1000  # the next deliveries fail until we stop it
    sandbox.client.v1.subscriptions.update(sub.id, params={"metadata": {"n": "1"}})
    deadline = time.monotonic() + 10
    failing: list[str] = []
    while time.monotonic() < deadline and not failing:
        failing = [
            e.id
            for e in events.list(params={"delivery_success": False, "type": "customer.subscription.updated"}).data
            if e.data.object.id == sub.id
        ]
        time.sleep(0.1)
    assert failing
    receiver.fail_next = 0
    delivered: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and failing[0] not in delivered:
        delivered = [e.id for e in events.list(params={"delivery_success": True, "limit": 100}).data]
        time.sleep(0.2)
    assert failing[0] in delivered


def test_expanding_through_a_nested_hash(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    customer = sandbox.client.v1.customers.retrieve(
        sub.customer, params={"expand": ["invoice_settings.default_payment_method"]}
    )
    method = customer.invoice_settings.default_payment_method
    assert method.object == "payment_method" and method.card.last4 == "4242"
    with pytest.raises(stripe.InvalidRequestError) as raised:
        sandbox.client.v1.customers.retrieve(sub.customer, params={"expand": ["invoice_settings.footer"]})
    assert raised.value.param == "expand"
