"""The billing page's usage section: this period's usage from our store, what is included, the
overage so far and its cost at the metered price, the projected next invoice, a daily SVG chart."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flask import Flask

from app import clock
from app.services import usage_page
from app.services.billing_service import BillingService
from tests.conftest import SandboxAccount, query, sign_up


def test_the_billing_page_shows_usage_overage_projection_and_chart(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    sign_up(client, offline_stripe)
    [org] = query(app, "SELECT id FROM organization")
    now = clock.utcnow()
    with app.app_context():
        BillingService.record_usage(org.id, "api_calls", 700, idempotency_key="a")
        BillingService.record_usage(org.id, "api_calls", 500, idempotency_key="b", occurred_at=now)
        # The subscription began moments ago: yesterday's usage belongs to the period before, not this one.
        BillingService.record_usage(org.id, "api_calls", 300, idempotency_key="c", occurred_at=now - timedelta(days=1))
    page = client.get("/billing/").text
    section = re.search(r'<section class="card usage" id="usage-api_calls".*?</section>', page, re.S)
    assert section, page
    usage = section.group(0)
    assert 'data-used="1200" data-included="1000"' in usage
    assert '<span class="usage-overage-units">200</span>' in usage
    assert '<span class="usage-overage-cost">$4.00</span>' in usage  # 200 x 2 cents (plans.toml)
    bars = re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', usage)
    assert 29 <= len(bars) <= 32  # one per day (UTC) the billing period touches
    assert [float(h) for h in bars if float(h) > 0] == [80.0]  # today's 1,200, the busiest day
    upcoming = re.search(r'id="next-invoice">\s*\$([\d,]+\.\d\d)', page)
    assert upcoming, page
    expected = float(upcoming.group(1).replace(",", "")) + 4
    assert f"plus $4.00 of usage so far: about ${expected:,.2f}" in page
    # Reported, the usage is on Stripe's preview too (the metered line): counted once on the page.
    with app.app_context():
        assert BillingService.report_usage().sent == 1
        BillingService.forget_billing_reads(org.id)
    [sub] = query(app, "SELECT billing_subscription_id FROM organization")
    preview = offline_stripe.api("POST", "/v1/invoices/create_preview", {"subscription": sub.billing_subscription_id})
    metered = offline_stripe.price_id("api_calls_overage")
    assert [li["amount"] for li in preview["lines"]["data"] if li["pricing"]["price_details"]["price"] == metered] == [
        400
    ]
    assert preview["amount_due"] == round((expected - 4) * 100) + 400
    assert f"plus $4.00 of usage so far: about ${expected:,.2f}" in client.get("/billing/").text


def test_the_chart_has_a_bar_per_day_scaled_to_the_busiest() -> None:
    start = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    bars, peak = usage_page.chart({"2026-11-21": 10, "2026-11-25": 40}, start, start + timedelta(days=30))
    assert peak == 40 and len(bars) == 31  # the first day starts at 09:30: its date counts too
    assert [(b.day.day, b.height) for b in bars if b.height] == [(21, 20.0), (25, 80.0)]
    assert bars[0].x == 0 and bars[-1].x + bars[-1].width <= usage_page.CHART_WIDTH
    empty, nothing = usage_page.chart({}, start, start + timedelta(days=30))
    assert nothing == 0 and all(b.height == 0 for b in empty)
