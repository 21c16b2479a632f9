"""The catalogue's features and limits, entitlements, the feature guard (decorator and template helper),
and prices on the signup page read from Stripe through the cached lookup."""

from __future__ import annotations

import html
import re
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask

from app.services.billing_service import BillingService
from app.services.entitlements import SeatUse, entitlements_for, minimum_extra_seats
from app.services.plans import CatalogueError, PlanCatalogue
from app.services.pricing import PriceInfo, format_money
from tests.conftest import SandboxAccount, checkout_session_id, query, sign_up, start_signup


def catalogue(app: Flask) -> PlanCatalogue:
    found: PlanCatalogue = app.extensions["plan_catalogue"]
    return found


# --- The catalogue and entitlements ---------------------------------------------------------------


def test_the_catalogue_says_each_tiers_features_limits_and_yearly_price(app: Flask) -> None:
    plans = catalogue(app)
    assert plans.tiers["business"].features == {"audit_log", "priority_support"}
    assert plans.tiers["starter"].features == frozenset()
    assert plans.tiers["starter"].limits == {"seats": 5} and plans.tiers["business"].limits == {"seats": 10}
    assert plans.tiers["pro"].lookup_key_for("year") == "pro_yearly"
    assert plans.addons["extra_seats"].adds_to_limit == "seats"
    assert plans.tier_for_lookup_key("pro_yearly") is plans.tiers["pro"]
    assert plans.interval_of_lookup_key("extra_seat_yearly") == "year"
    assert [t.key for t in plans.tiers_with_feature("audit_log")] == ["business"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"features": ["teleport"]}, "features not listed in [features]: teleport"),
        ({"features": "audit_log"}, "features must be a list of feature keys"),
        ({"limits": {"seats": -1}}, "limits must map names to whole numbers of at least 0"),
        ({"yearly_lookup_key": 3}, "yearly_lookup_key must be a non-empty string"),
        ({"yearly_lookup_key": "a_monthly"}, "lookup keys used twice: a_monthly"),
    ],
)
def test_a_malformed_catalogue_entry_is_named(entry: dict[str, Any], problem: str) -> None:
    raw = {"features": {"audit_log": "Audit log"}, "tiers": {"a": {"name": "A", "lookup_key": "a_monthly", **entry}}}
    with pytest.raises(CatalogueError, match=re.escape(problem)):
        PlanCatalogue.from_mapping(raw)


def test_entitlements_come_from_the_tier_its_add_ons_and_billing_status(app: Flask) -> None:
    plans = catalogue(app)
    business = entitlements_for(plans, "business", {"extra_seats": 3}, billing_allows_use=True)
    assert business.has("audit_log") and business.seats == 13 and business.included_seats == 10
    assert not entitlements_for(plans, "starter", {}, billing_allows_use=True).has("audit_log")
    assert not entitlements_for(plans, "business", {}, billing_allows_use=False).has("audit_log")
    gone = entitlements_for(plans, "retired_tier", {"extra_seats": 2}, billing_allows_use=True)
    assert gone.features == frozenset() and gone.seats == 3  # one included by default, two paid for
    assert minimum_extra_seats(plans, "starter", members=8) == 3
    assert minimum_extra_seats(plans, "business", members=8) == 0
    use = SeatUse(members=6, pending_invitations=1, seats=7)
    assert not use.can_invite and not use.over_limit and use.free == 0
    assert SeatUse(members=8, pending_invitations=0, seats=7).over_limit


def test_money_is_written_the_way_people_write_it() -> None:
    assert format_money(1900, "usd") == "$19.00"
    assert format_money(-450, "eur") == "-€4.50"
    assert format_money(500, "jpy") == "¥500"
    assert format_money(1234567, "chf") == "12,345.67 CHF"
    yearly = PriceInfo("price_1", "pro_yearly", 49000, "usd", "year")
    assert yearly.describe() == "$490.00 / year"
    assert yearly.monthly_equivalent() == Decimal(49000) / 12


# --- The feature guard ------------------------------------------------------------------------------


def test_a_page_behind_a_feature_the_plan_lacks_shows_an_upgrade_prompt(
    client: Any, app: Flask, offline_stripe: SandboxAccount
) -> None:
    sign_up(client, offline_stripe)  # Starter: no audit log
    response = client.get("/app/audit-log")
    page = response.get_data(as_text=True)
    assert response.status_code == 402  # a prompt to upgrade, not a 403 page
    assert 'id="upgrade-prompt"' in page and 'data-feature="audit_log"' in page
    assert "Audit log of billing and team changes is not in your plan" in page
    assert '<strong class="upgrade-tier">Business</strong>' in page and 'href="/billing/plan"' in page
    # The template helper: the dashboard says the audit log is in higher plans.
    assert 'id="audit-log-upgrade"' in client.get("/app").get_data(as_text=True)


def test_a_plan_with_the_feature_opens_the_page(client: Any, app: Flask, offline_stripe: SandboxAccount) -> None:
    sign_up(client, offline_stripe, tier="business")
    response = client.get("/app/audit-log")
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and 'id="audit-log"' in page and "created on the Business plan" in page
    assert 'id="audit-log-upgrade"' not in client.get("/app").get_data(as_text=True)


def test_the_guard_follows_the_billing_status(client: Any, app: Flask, offline_stripe: SandboxAccount) -> None:
    session = sign_up(client, offline_stripe, tier="business")
    from sqlalchemy import text

    from app.extensions import db

    with app.app_context():
        db.session.execute(
            text("UPDATE organization SET billing_status = 'past_due', past_due_since = now() - interval '30 days'")
        )
        db.session.commit()
    # Blocked by billing: the sign-in guard sends the owner to billing before any feature is considered.
    response = client.get("/app/audit-log")
    assert response.status_code == 303 and response.headers["Location"] == "/billing/"
    assert session["subscription"]


# --- Prices on the signup page ----------------------------------------------------------------------


def stripe_prices(app: Flask) -> dict[str, PriceInfo]:
    with app.app_context():
        return BillingService.prices_for_lookup_keys(catalogue(app).lookup_keys(), required=False)


def test_the_signup_page_shows_each_price_as_stripe_has_it(
    client: Any, app: Flask, offline_stripe: SandboxAccount
) -> None:
    page = html.unescape(client.get("/auth/signup").get_data(as_text=True))
    prices = stripe_prices(app)
    plans = catalogue(app)
    for tier in plans.paid_tiers():
        monthly = prices[tier.lookup_key]
        assert f'id="price-{tier.key}-month">{monthly.describe()}' in page
        assert monthly.unit_amount is not None
        if tier.yearly_lookup_key in prices:
            assert f'id="price-{tier.key}-year">or {prices[tier.yearly_lookup_key].describe()}' in page
        else:
            assert f'id="price-{tier.key}-year"' not in page
    assert f"{prices['extra_seat_monthly'].describe()} each" in page
    assert 'id="trial-pro">14-day free trial' in page and 'id="trial-starter"' not in page
    assert "10 seats included" in page and "Audit log of billing and team changes" in page
    # The free plan has no price at Stripe: the page says it is free.
    assert 'id="price-free-free">Free, no card needed' in page and 'id="price-free-month"' not in page
    # Monthly or yearly is offered exactly when Stripe sells a tier yearly.
    yearly_sold = any(tier.yearly_lookup_key in prices for tier in plans.tiers.values())
    assert ('id="interval-choice"' in page) == yearly_sold


def test_a_yearly_signup_buys_the_yearly_prices_or_is_refused_when_stripe_has_none(
    client: Any, app: Flask, offline_stripe: SandboxAccount
) -> None:
    prices = stripe_prices(app)
    with app.app_context():  # and the yearly metered price: Starter bills its overage once a year
        prices |= BillingService.prices_for_lookup_keys(["api_calls_overage_yearly"], required=False)
    response = start_signup(client, interval="year")
    wanted = ("starter_yearly", "extra_seat_yearly", "api_calls_overage_yearly")
    if all(key in prices for key in wanted):
        checkout_session_id(response)
        [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
        assert [item["price"] for item in call["params"]["line_items"]] == [prices[key].id for key in wanted]
        assert "quantity" not in call["params"]["line_items"][-1]  # metered: no quantity
    else:
        assert response.status_code == 422
        missing = next(key for key in wanted if key not in prices)
        assert missing in html.unescape(response.get_data(as_text=True))
        assert query(app, "SELECT id FROM pending_signup") == []


def test_the_signup_page_works_while_stripe_is_down(client: Any, app: Flask, offline_stripe: SandboxAccount) -> None:
    offline_stripe.fail_next("prices.list")
    response = client.get("/auth/signup")
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and page.count("Price shown at checkout") == len(catalogue(app).paid_tiers())
    # The failure is remembered briefly: the next views do not wait on Stripe again.
    calls = len(offline_stripe.calls_to("prices.list"))
    client.get("/auth/signup")
    assert len(offline_stripe.calls_to("prices.list")) == calls
