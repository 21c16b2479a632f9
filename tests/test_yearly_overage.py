"""Yearly plans bill overage: a yearly subscription carries each billed meter's yearly metered price
(plans.toml [meters.*] yearly_lookup_key; Stripe bills a classic subscription's items on one interval),
so the year's reported overage is invoiced with the yearly renewal, in arrears. A plan change moves the
metered items to the target's interval at the change."""

from __future__ import annotations

from typing import Any

from flask import Flask

from tests.conftest import SandboxAccount, query, sign_up
from tests.test_plan_changes import Owner, Stack
from tests.test_signup_stripe_flow import usage_in_period

HOUR = 3600


def signed_up(stack: Stack, tier: str, extra_seats: int, interval: str = "month") -> Owner:
    client = stack.app.test_client()
    session = sign_up(client, stack.stripe_api, tier=tier, addon_extra_seats=str(extra_seats), interval=interval)
    [row] = query(
        stack.app, "SELECT id FROM organization WHERE billing_subscription_id = :s", s=session["subscription"]
    )
    return Owner(stack, client, row.id, session["subscription"])


def metered_line(stripe_api: SandboxAccount, invoice_id: str, price_id: str) -> tuple[int, int, int]:
    invoice = stripe_api.api("GET", f"/v1/invoices/{invoice_id}")
    [line] = [li for li in invoice["lines"]["data"] if li["pricing"]["price_details"]["price"] == price_id]
    return line["quantity"], line["amount"], line["period"]["end"]


def test_a_yearly_plans_overage_is_invoiced_with_its_yearly_renewal(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app: Flask = make_app(STRIPE_TEST_CLOCKS=True)
    stack = Stack(app, offline_stripe)
    owner = signed_up(stack, "starter", 0, "year")
    yearly_metered = offline_stripe.price_id("api_calls_overage_yearly")
    subscription = owner.subscription()
    assert owner.items() == {"starter_yearly": 1}
    assert owner.metered_items() == ["api_calls_overage_yearly"]
    [checkout] = offline_stripe.calls_to("checkout.sessions.create")
    assert {"price": yearly_metered} in checkout[1]["params"]["line_items"]
    clock_id = stack.stripe("GET", f"/customers/{subscription['customer']}")["test_clock"]
    start, year_end = (subscription["items"]["data"][0][f"current_period_{k}"] for k in ("start", "end"))
    assert year_end - start >= 365 * 86400  # a year's period
    # Starter includes 1,000 calls a month: 250 over in the first month, 40 over in the second.
    usage_in_period(app, offline_stripe, clock_id, owner.organization_id, [800, 450])
    first_month_end = int(query(app, "SELECT max(period_end) AS e FROM usage_period_total")[0].e.timestamp())
    offline_stripe.advance_clock(clock_id, first_month_end + HOUR)
    usage_in_period(app, offline_stripe, clock_id, owner.organization_id, [1_040])
    offline_stripe.advance_clock(clock_id, year_end + 2 * HOUR)
    delivered = offline_stripe.deliver(owner.client)
    assert all(status == 200 for _, status in delivered), delivered
    renewed = owner.subscription()
    assert renewed["items"]["data"][0]["current_period_end"] > year_end
    assert metered_line(offline_stripe, renewed["latest_invoice"], yearly_metered) == (290, 290 * 2, year_end)
    [billed] = query(app, "SELECT sum(billable) AS b FROM usage_period_total")
    assert billed.b == 290  # what we billed is what Stripe invoiced


def test_a_change_from_yearly_to_monthly_gains_the_monthly_metered_item_at_once(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    stack = Stack(app, offline_stripe)
    owner = signed_up(stack, "starter", 1, "year")
    assert owner.metered_items() == ["api_calls_overage_yearly"]
    _, ticket = owner.preview_plan("starter", interval="month")  # more per month: at once
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 1}
    assert owner.metered_items() == ["api_calls_overage"]  # not only at the next checkout
    [row] = query(app, "SELECT tier, unmapped_items FROM organization")
    assert (row.tier, row.unmapped_items) == ("starter", None)


def test_a_change_to_yearly_at_the_period_end_carries_the_yearly_metered_price(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    stack = Stack(app, offline_stripe)
    owner = signed_up(stack, "starter", 1)
    _, ticket = owner.preview_plan("starter", interval="year")  # cheaper per month: at the period end
    assert owner.confirm(ticket).status_code == 303
    schedule = stack.stripe("GET", f"/subscription_schedules/{owner.subscription()['schedule']}")
    monthly, yearly = (offline_stripe.price_id(k) for k in ("api_calls_overage", "api_calls_overage_yearly"))
    now, then = ([item["price"] for item in phase["items"]] for phase in schedule["phases"])
    assert monthly in now and yearly not in now
    assert yearly in then and monthly not in then
    [update] = stack.requests_to("POST", r"/v1/subscription_schedules/sub_sched_[^/]+")
    assert {"price": yearly} in update["params"]["phases"][1]["items"]  # a metered price takes no quantity
