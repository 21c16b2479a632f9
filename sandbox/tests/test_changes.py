"""Subscription changes and invoice previews, against the real server with the real SDK."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
import stripe

from sandbox.tests.conftest import Receiver, Sandbox, create_session, paid_subscription, pay


def _item(sub: Any, lookup_key: str) -> Any:
    return next(i for i in sub["items"].data if i.price.lookup_key == lookup_key)


def _prorated(amount: int, remaining: int, total: int) -> int:
    return (2 * amount * remaining + total) // (2 * total)


def test_upgrade_with_always_invoice_charges_the_proration(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    _, sub = paid_subscription(sandbox, prices)  # starter × 1 + extra seats × 2
    starter = _item(sub, "starter_monthly")
    start, end = starter.current_period_start, starter.current_period_end
    when = start + (end - start) // 3
    change = {
        "items": [{"id": starter.id, "price": prices["pro_monthly"]}],
        "proration_behavior": "always_invoice",
        "proration_date": when,
    }
    preview = sandbox.client.v1.invoices.create_preview(
        params={
            "subscription": sub.id,
            "subscription_details": {
                "items": change["items"],
                "proration_date": when,
                "proration_behavior": "always_invoice",
            },
        }
    )
    remaining, total = end - when, end - start
    credit, charge = -_prorated(1900, remaining, total), _prorated(4900, remaining, total)
    assert preview.id.startswith("upcoming_in_") and preview.status == "draft" and preview.number is None
    with pytest.raises(stripe.InvalidRequestError, match="No such invoice"):
        sandbox.client.v1.invoices.retrieve(preview.id)  # a preview is not kept
    assert [line.amount for line in preview.lines.data] == [credit, charge]
    assert all(line.parent.subscription_item_details.proration for line in preview.lines.data)
    assert preview.amount_due == preview.total == preview.subtotal == credit + charge
    assert preview.lines.data[0].description.startswith("Unused time on Starter after")
    assert preview.lines.data[1].description.startswith("Remaining time on Pro after")

    updated = sandbox.client.v1.subscriptions.update(sub.id, params=change, options={"idempotency_key": "up-1"})
    assert _item(updated, "pro_monthly").id == starter.id  # the item keeps its id, changes its price
    assert _item(updated, "extra_seat_monthly").quantity == 2
    assert updated.status == "active" and updated.latest_invoice != sub.latest_invoice
    invoice = sandbox.client.v1.invoices.retrieve(updated.latest_invoice, params={"expand": ["payments"]})
    assert invoice.status == "paid" and invoice.billing_reason == "subscription_update"
    assert invoice.amount_paid == preview.amount_due  # the preview's totals are what is charged
    assert [line.amount for line in invoice.lines.data] == [credit, charge]
    assert invoice.payments.data[0].payment.payment_intent.startswith("pi_")

    events = receiver.wait_for({sub.id, invoice.id}, 5)
    types = [e["type"] for e in events]
    assert types[-4:] == ["customer.subscription.updated", "invoice.created", "invoice.finalized", "invoice.paid"]
    updated_event = events[-4]
    previous = updated_event["data"]["previous_attributes"]
    assert previous["items"]["data"][0]["price"]["lookup_key"] == "starter_monthly"
    assert previous["latest_invoice"] == sub.latest_invoice
    assert updated_event["request"]["idempotency_key"] == "up-1"


def test_quantity_change_with_create_prorations_waits_for_the_next_invoice(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    _, sub = paid_subscription(sandbox, prices)
    seats = _item(sub, "extra_seat_monthly")
    start, end = seats.current_period_start, seats.current_period_end
    when = start + (end - start) // 2
    details = {"items": [{"id": seats.id, "quantity": 5}], "proration_date": when}
    preview = sandbox.client.v1.invoices.create_preview(
        params={"customer": sub.customer, "subscription": sub.id, "subscription_details": details}
    )
    remaining, total = end - when, end - start
    credit, charge = -_prorated(2000, remaining, total), _prorated(5000, remaining, total)
    amounts = [line.amount for line in preview.lines.data]
    assert amounts == [credit, charge, 1900, 5000]  # prorations, then next period's recurring lines
    assert (preview.period_start, preview.period_end) == (start, end)  # the period that ends
    assert preview.lines.data[-1].period.start == end  # the next period's recurring line
    assert preview.amount_due == credit + charge + 6900
    assert preview.next_payment_attempt is not None and preview.next_payment_attempt >= end

    updated = sandbox.client.v1.subscriptions.update(
        sub.id, params={**details, "proration_behavior": "create_prorations"}
    )
    assert _item(updated, "extra_seat_monthly").quantity == 5
    assert updated.latest_invoice == sub.latest_invoice  # nothing invoiced yet
    # The next invoice now carries those prorations: the plain preview shows the same total.
    again = sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id})
    assert again.amount_due == preview.amount_due
    assert [line.amount for line in again.lines.data] == amounts

    # Sending the quantity it already has bills nothing, even with always_invoice.
    _, fresh = paid_subscription(sandbox, prices)
    fresh_seats = _item(fresh, "extra_seat_monthly")
    same = sandbox.client.v1.subscriptions.update(
        fresh.id, params={"items": [{"id": fresh_seats.id, "quantity": 2}], "proration_behavior": "always_invoice"}
    )
    assert same.latest_invoice == fresh.latest_invoice

    # Adding an item and deleting one, with no prorations.
    added = sandbox.client.v1.subscriptions.update(
        sub.id,
        params={
            "items": [{"price": prices["pro_monthly"], "quantity": 1}, {"id": seats.id, "deleted": True}],
            "proration_behavior": "none",
        },
    )
    assert sorted(i.price.lookup_key for i in added["items"].data) == ["pro_monthly", "starter_monthly"]


def test_item_errors_are_stripes(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    starter = _item(sub, "starter_monthly")
    cases: list[tuple[dict[str, Any], str | None, str]] = [
        ({"items": [{"id": "si_nope", "quantity": 2}]}, "resource_missing", "items[0][id]"),
        ({"items": [{"id": starter.id, "price": "price_nope"}]}, "resource_missing", "items[0][price]"),
        ({"items": [{"id": starter.id, "colour": "red"}]}, "parameter_unknown", "items[0][colour]"),
        ({"items": [{"quantity": 2}]}, "parameter_missing", "items[0][price]"),
        ({"items": [{"price": prices["starter_monthly"]}]}, None, "items"),  # the same price twice
        ({"items": [{"id": i.id, "deleted": True} for i in sub["items"].data]}, None, "items"),
        ({"proration_behavior": "sometimes"}, None, "proration_behavior"),
        ({"payment_behavior": "pending_if_incomplete", "metadata": {"a": "b"}}, None, "metadata"),
        ({"proration_date": 1, "items": [{"id": starter.id, "quantity": 2}]}, None, "proration_date"),
        ({"cancel_at": int(time.time()) - 10}, None, "cancel_at"),
        ({"pause_collection": {"behavior": "forever"}}, None, "pause_collection[behavior]"),
        ({"default_payment_method": "pm_nope"}, "resource_missing", "default_payment_method"),
    ]
    for params, code, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            sandbox.client.v1.subscriptions.update(sub.id, params=params)
        assert (raised.value.http_status, raised.value.code, raised.value.param) == (400, code, param), params
    unchanged = sandbox.client.v1.subscriptions.retrieve(sub.id)
    assert [(i.id, i.quantity) for i in unchanged["items"].data] == [(i.id, i.quantity) for i in sub["items"].data]


def test_cancel_at_pause_and_payment_method(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    subs = sandbox.client.v1.subscriptions
    when = int(time.time()) + 7 * 86400
    scheduled = subs.update(sub.id, params={"cancel_at": when})
    assert (scheduled.cancel_at, scheduled.cancel_at_period_end) == (when, False)
    assert scheduled.cancellation_details.reason == "cancellation_requested"
    at_end = subs.update(sub.id, params={"cancel_at_period_end": True})
    assert at_end.cancel_at == sub["items"].data[0].current_period_end and at_end.cancel_at_period_end
    # Resuming clears either kind of scheduled cancellation.
    subs.update(sub.id, params={"cancel_at": when})
    resumed = subs.update(sub.id, params={"cancel_at_period_end": False})
    assert (resumed.cancel_at, resumed.cancel_at_period_end, resumed.canceled_at) == (None, False, None)
    subs.update(sub.id, params={"cancel_at": when})
    assert subs.update(sub.id, params={"cancel_at": ""}).cancel_at is None

    paused = subs.update(sub.id, params={"pause_collection": {"behavior": "void", "resumes_at": when}})
    assert paused.pause_collection.behavior == "void" and paused.pause_collection.resumes_at == when
    assert subs.update(sub.id, params={"pause_collection": ""}).pause_collection is None

    with_pm = subs.update(sub.id, params={"default_payment_method": "pm_card_visa", "metadata": {"k": "v"}})
    assert with_pm.default_payment_method.startswith("pm_") and with_pm.metadata["k"] == "v"

    events = receiver.wait_for({sub.id}, 10)
    paused_event = next(e for e in events if "pause_collection" in e["data"].get("previous_attributes", {}))
    assert paused_event["data"]["previous_attributes"]["pause_collection"] is None
    assert paused_event["data"]["object"]["pause_collection"]["behavior"] == "void"


def test_failed_payment_per_payment_behavior(sandbox: Sandbox, prices: dict[str, str]) -> None:
    subs = sandbox.client.v1.subscriptions
    upgrade = {"proration_behavior": "always_invoice"}

    _, sub = paid_subscription(sandbox, prices)
    subs.update(sub.id, params={"default_payment_method": "pm_card_chargeCustomerFail"})
    starter = _item(sub, "starter_monthly")
    with pytest.raises(stripe.CardError) as raised:
        subs.update(
            sub.id,
            params={
                **upgrade,
                "items": [{"id": starter.id, "price": prices["pro_monthly"]}],
                "payment_behavior": "error_if_incomplete",
            },
        )
    assert raised.value.http_status == 402 and raised.value.code == "card_declined"
    unchanged = subs.retrieve(sub.id)
    assert _item(unchanged, "starter_monthly").id == starter.id and unchanged.latest_invoice == sub.latest_invoice

    pending = subs.update(
        sub.id,
        params={
            **upgrade,
            "items": [{"id": starter.id, "price": prices["pro_monthly"]}],
            "payment_behavior": "pending_if_incomplete",
        },
    )
    assert _item(pending, "starter_monthly").id == starter.id  # not applied
    assert pending.pending_update.subscription_items[0].price.lookup_key == "pro_monthly"
    assert pending.status == "active"
    invoice = sandbox.client.v1.invoices.retrieve(pending.latest_invoice)
    assert invoice.status == "open" and invoice.attempt_count == 1 and invoice.amount_remaining > 0

    _, other = paid_subscription(sandbox, prices)
    subs.update(other.id, params={"default_payment_method": "pm_card_chargeCustomerFail"})
    applied = subs.update(
        other.id,
        params={**upgrade, "items": [{"id": _item(other, "starter_monthly").id, "price": prices["pro_monthly"]}]},
    )
    assert applied.status == "past_due" and _item(applied, "pro_monthly")
    assert sandbox.client.v1.invoices.retrieve(applied.latest_invoice).status == "open"


def test_interval_change_restarts_the_period(sandbox: Sandbox, prices: dict[str, str]) -> None:
    yearly = sandbox.client.v1.prices.list(params={"lookup_keys": ["starter_yearly"]}).data
    if not yearly:
        pytest.fail("the test catalogue seeds starter_yearly")
    _, sub = paid_subscription(sandbox, prices)
    seats = _item(sub, "extra_seat_monthly")
    with pytest.raises(stripe.InvalidRequestError) as raised:
        sandbox.client.v1.subscriptions.update(
            sub.id, params={"items": [{"id": _item(sub, "starter_monthly").id, "price": yearly[0].id}]}
        )
    assert "interval" in str(raised.value)
    change = [
        {"id": _item(sub, "starter_monthly").id, "price": yearly[0].id},
        {"id": seats.id, "deleted": True},
    ]
    when = int(time.time())
    preview = sandbox.client.v1.invoices.create_preview(
        params={"subscription": sub.id, "subscription_details": {"items": change, "proration_date": when}}
    )
    assert preview.billing_reason == "subscription_update"  # an interval change is invoiced at once
    updated = sandbox.client.v1.subscriptions.update(sub.id, params={"items": change, "proration_date": when})
    item = updated["items"].data[0]
    assert item.current_period_end - item.current_period_start >= 365 * 86400
    assert item.current_period_start == when
    invoice = sandbox.client.v1.invoices.retrieve(updated.latest_invoice)
    assert invoice.status == "paid" and invoice.lines.data[-1].amount == yearly[0].unit_amount
    assert invoice.amount_paid == preview.amount_due
    assert [line.amount for line in invoice.lines.data] == [line.amount for line in preview.lines.data]
    assert sum(line.amount < 0 for line in invoice.lines.data) == 2  # unused starter and seats credited


def test_trial_end_moves_a_trialing_subscriptions_trial_and_period(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    session = create_session(sandbox, prices, subscription_data={"metadata": {"org_id": "42"}, "trial_period_days": 14})
    assert pay(sandbox, session.id).status_code == 303
    sub = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]}).subscription
    assert sub.status == "trialing"
    later = sub.trial_end + 7 * 86400
    moved = sandbox.client.v1.subscriptions.update(sub.id, params={"trial_end": later})
    assert moved.trial_end == later and moved.billing_cycle_anchor == later
    assert {item.current_period_end for item in moved["items"].data} == {later}
    with pytest.raises(stripe.InvalidRequestError) as past:
        sandbox.client.v1.subscriptions.update(sub.id, params={"trial_end": int(time.time()) - 60})
    assert past.value.param == "trial_end"
    with pytest.raises(stripe.InvalidRequestError):
        sandbox.client.v1.subscriptions.update(sub.id, params={"trial_end": int(time.time()) + 800 * 86400})
    _, paid = paid_subscription(sandbox, prices)
    with pytest.raises(stripe.InvalidRequestError, match="only on a trialing subscription"):
        sandbox.client.v1.subscriptions.update(paid.id, params={"trial_end": later})


def test_a_card_that_asks_for_3d_secure_leaves_the_update_pending_until_paid_on_the_hosted_page(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    """4000 0027 6000 3184 (pm_card_authenticationRequired): a charge made without the customer leaves
    the PaymentIntent requires_action (invoice.payment_action_required, not payment_failed); paying
    on the hosted invoice page, where the customer authenticates, pays it and applies the update."""
    subs = sandbox.client.v1.subscriptions
    _, sub = paid_subscription(sandbox, prices)
    subs.update(sub.id, params={"default_payment_method": "pm_card_authenticationRequired"})
    pending = subs.update(
        sub.id,
        params={
            "proration_behavior": "always_invoice",
            "items": [{"id": _item(sub, "starter_monthly").id, "price": prices["pro_monthly"]}],
            "payment_behavior": "pending_if_incomplete",
            "expand": ["latest_invoice.payments"],
        },
    )
    assert _item(pending, "starter_monthly") and pending.pending_update.expires_at > 0
    invoice = pending.latest_invoice
    assert invoice.status == "open" and invoice.attempt_count == 1
    intent = sandbox.client.v1.payment_intents.retrieve(invoice.payments.data[0].payment.payment_intent)
    assert intent.status == "requires_action" and intent.next_action.type == "use_stripe_sdk"
    assert intent.last_payment_error.code == "authentication_required" and intent.latest_charge is None
    types = [e.type for e in sandbox.client.v1.events.list(params={"limit": 20}).data]
    assert "invoice.payment_action_required" in types and "invoice.payment_failed" not in types[:3]
    # Off-session again (POST /v1/invoices/:id/pay): still the customer's action.
    with pytest.raises(stripe.CardError):
        sandbox.client.v1.invoices.pay(invoice.id)

    page = requests.post(
        f"{sandbox.url}/invoice/{invoice.id}",
        data={
            "email": "ada@example.com",
            "cardNumber": "4000 0027 6000 3184",
            "cardExpiry": "12 / 34",
            "cardCvc": "123",
            "billingName": "Ada Lovelace",
        },
        allow_redirects=False,
        timeout=30,
    )
    assert page.status_code == 303, page.text[-1500:]
    paid = subs.retrieve(sub.id)
    assert _item(paid, "pro_monthly") and paid.pending_update is None
