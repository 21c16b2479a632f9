"""Subscription changes as time passes on a test clock: prorations on the renewal invoice, a
scheduled downgrade at the period's end, a failed upgrade charge retried like a renewal."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from sandbox.objects import add_month
from sandbox.tests.conftest import Receiver, Sandbox
from sandbox.tests.test_clock import DAY, HOUR, T0, advance, clock_customer, subscribe


def _renewal(sandbox: Sandbox, sub_id: str) -> Any:
    sub = sandbox.client.v1.subscriptions.retrieve(sub_id)
    return sandbox.client.v1.invoices.retrieve(sub.latest_invoice)


def test_prorations_land_on_the_renewal_invoice_the_preview_promised(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    assert sub.start_date == T0
    item = sub["items"].data[0]
    advance(sandbox, clock, T0 + 10 * DAY)
    when = T0 + 10 * DAY
    details = {"items": [{"id": item.id, "price": prices["pro_monthly"]}], "proration_date": when}
    preview = sandbox.client.v1.invoices.create_preview(
        params={"customer": customer, "subscription": sub.id, "subscription_details": details}
    )
    end = add_month(T0)
    assert preview.period_end == end and preview.lines.data[-1].period.end == add_month(end)
    credit = -((2 * 1900 * (end - when) + (end - T0)) // (2 * (end - T0)))
    assert preview.lines.data[0].amount == credit
    updated = sandbox.client.v1.subscriptions.update(sub.id, params=details)
    assert updated["items"].data[0].price.id == prices["pro_monthly"]

    advance(sandbox, clock, end + 2 * HOUR, receiver)  # renewal, then finalized and charged
    invoice = _renewal(sandbox, sub.id)
    assert invoice.billing_reason == "subscription_cycle" and invoice.status == "paid"
    assert invoice.amount_paid == preview.amount_due
    assert (invoice.period_start, invoice.period_end) == (preview.period_start, preview.period_end)
    assert [line.amount for line in invoice.lines.data] == [line.amount for line in preview.lines.data]
    assert sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id}).amount_due == 4900


def test_scheduled_downgrade_takes_effect_at_renewal(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    api = sandbox.client.v1.subscriptions
    item = sub["items"].data[0]
    api.update(
        sub.id, params={"items": [{"id": item.id, "price": prices["pro_monthly"]}], "proration_behavior": "none"}
    )
    schedule = sandbox.client.v1.subscription_schedules.create(params={"from_subscription": sub.id})
    end = add_month(T0)
    sandbox.client.v1.subscription_schedules.update(
        schedule.id,
        params={
            "phases": [
                {"items": [{"price": prices["pro_monthly"], "quantity": 1}], "start_date": T0, "end_date": end},
                {"items": [{"price": prices["starter_monthly"], "quantity": 1}]},
            ],
            "end_behavior": "release",
        },
    )
    # The schedule's preview is the renewal at the new price; the subscription's alone still bills Pro.
    promised = sandbox.client.v1.invoices.create_preview(params={"schedule": schedule.id})
    assert promised.amount_due == 1900 and promised.lines.data[-1].period.start == end
    assert sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id}).amount_due == 4900
    # schedule_details previews other phases without changing the schedule.
    other = sandbox.client.v1.invoices.create_preview(
        params={
            "schedule": schedule.id,
            "schedule_details": {
                "phases": [
                    {"items": [{"price": prices["pro_monthly"], "quantity": 1}], "start_date": T0, "end_date": end},
                    {"items": [{"price": prices["starter_monthly"], "quantity": 3}]},
                ]
            },
        }
    )
    assert other.amount_due == 3 * 1900
    with pytest.raises(stripe.InvalidRequestError) as both:
        sandbox.client.v1.invoices.create_preview(params={"schedule": schedule.id, "subscription": sub.id})
    assert both.value.param == "subscription"
    advance(sandbox, clock, end - DAY)
    assert api.retrieve(sub.id)["items"].data[0].price.id == prices["pro_monthly"]  # not yet

    advance(sandbox, clock, end + 2 * HOUR, receiver)
    after = api.retrieve(sub.id)
    assert [i.price.id for i in after["items"].data] == [prices["starter_monthly"]]
    assert after["items"].data[0].current_period_start == end
    invoice = _renewal(sandbox, sub.id)
    assert invoice.amount_paid == 1900 == promised.amount_due  # the new period at the downgraded price
    current = sandbox.client.v1.subscription_schedules.retrieve(schedule.id)
    assert current.current_phase.start_date == end and current.status == "active"


def test_failed_upgrade_charge_is_retried_and_recovers(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)
    api = sandbox.client.v1.subscriptions
    api.update(sub.id, params={"default_payment_method": "pm_card_chargeCustomerFail"})
    updated = api.update(
        sub.id,
        params={
            "items": [{"id": sub["items"].data[0].id, "price": prices["pro_monthly"]}],
            "proration_behavior": "always_invoice",
        },
    )
    assert updated.status == "past_due"
    invoice = sandbox.client.v1.invoices.retrieve(updated.latest_invoice)
    assert invoice.status == "open" and invoice.next_payment_attempt == T0 + 3 * DAY
    assert invoice.hosted_invoice_url

    api.update(sub.id, params={"default_payment_method": "pm_card_visa"})
    advance(sandbox, clock, T0 + 3 * DAY + HOUR, receiver)  # the smart retry succeeds
    assert sandbox.client.v1.invoices.retrieve(invoice.id).status == "paid"
    assert api.retrieve(sub.id).status == "active"


def test_a_credit_larger_than_the_charge_goes_to_the_balance_and_the_next_invoice(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    clock, customer = clock_customer(sandbox)
    sub = subscribe(sandbox, prices, customer)  # starter, $19
    api = sandbox.client.v1.subscriptions
    api.update(
        sub.id, params={"items": [{"price": prices["extra_seat_monthly"], "quantity": 3}], "proration_behavior": "none"}
    )
    seats = next(i for i in api.retrieve(sub.id)["items"].data if i.price.id == prices["extra_seat_monthly"])
    when = T0 + 15 * DAY
    advance(sandbox, clock, when)
    end = add_month(T0)
    down = api.update(
        sub.id,
        params={
            "items": [{"id": seats.id, "quantity": 1}],
            "proration_behavior": "always_invoice",
            "proration_date": when,
        },
    )
    credit = (2 * 2000 * (end - when) + (end - T0)) // (2 * (end - T0))
    invoice = sandbox.client.v1.invoices.retrieve(down.latest_invoice)
    assert invoice.total == -credit and invoice.amount_due == 0 and invoice.status == "paid"
    assert invoice.ending_balance == -credit
    assert sandbox.client.v1.customers.retrieve(customer).balance == -credit

    preview = sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id})
    assert preview.starting_balance == -credit and preview.amount_due == 1900 + 1000 - credit
    advance(sandbox, clock, end + 2 * HOUR, receiver)
    renewal = _renewal(sandbox, sub.id)
    assert renewal.amount_paid == preview.amount_due and renewal.starting_balance == -credit
    assert sandbox.client.v1.customers.retrieve(customer).balance == 0
