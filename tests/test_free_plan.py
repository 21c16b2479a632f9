"""The free plan: the catalogue's tier with no price, its signup through SignupService with no payment
provider (exactly once), and what its organization may and may not do. The lifecycle with Stripe (upgrade
through Checkout, downgrade at the period's end) is in tests/test_signup_stripe_flow.py."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from app.services.plans import CatalogueError, PlanCatalogue
from app.services.signup_service import ProvisionState, SignupService
from tests.conftest import SandboxAccount, csrf_token, query, start_signup

PAID = {"name": "Pro", "lookup_key": "pro_monthly"}


def test_a_tier_without_a_lookup_key_is_the_free_plan_and_sells_nothing() -> None:
    catalogue = PlanCatalogue.from_mapping({"tiers": {"free": {"name": "Free", "limits": {"seats": 2}}, "pro": PAID}})
    free = catalogue.free_tier()
    assert free is not None and free.key == "free" and free.is_free and free.limits == {"seats": 2}
    assert [tier.key for tier in catalogue.paid_tiers()] == ["pro"]
    assert catalogue.lookup_keys() == ["pro_monthly"]  # nothing to look up at Stripe for it
    assert catalogue.tier_for_lookup_key("") is None and free.lookup_key_for("month") is None
    assert PlanCatalogue.from_mapping({"tiers": {"pro": PAID}}).free_tier() is None


@pytest.mark.parametrize(
    ("tiers", "problem"),
    [
        ({"a": {"name": "A"}, "b": {"name": "B"}}, "only one tier may be free"),
        ({"free": {"name": "Free", "trial_days": 14}}, "has no lookup_key (free) but sets trial_days"),
        ({"free": {"name": "Free", "yearly_lookup_key": "free_yearly"}}, "sets yearly_lookup_key"),
        ({"free": {"name": "Free", "whop_plan_id": "plan_free"}}, "sets whop_plan_id"),
        ({"free": {"name": "Free", "lookup_key": ""}}, "needs lookup_key"),
    ],
)
def test_a_free_tier_that_would_sell_something_is_refused(tiers: dict[str, object], problem: str) -> None:
    with pytest.raises(CatalogueError, match=re.escape(problem)):
        PlanCatalogue.from_mapping({"tiers": tiers})


def test_the_free_plan_takes_no_add_ons(app: Flask, offline_stripe: SandboxAccount) -> None:
    response = start_signup(app.test_client(), tier="free", addon_extra_seats="1")
    assert response.status_code == 422
    assert "Add-ons need a paid plan" in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM pending_signup") == [] and query(app, "SELECT id FROM organization") == []


def test_a_free_signup_is_completed_exactly_once(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    assert start_signup(client, tier="free", addon_extra_seats="0").headers["Location"] == "/app"
    [pending] = query(app, "SELECT * FROM pending_signup")
    with app.app_context():
        again = SignupService.complete_free_signup(pending.id, source="test")
    [organization] = query(app, "SELECT * FROM organization")
    assert again.state == ProvisionState.ALREADY_PROVISIONED and again.organization_id == organization.id
    assert len(query(app, "SELECT id FROM user_account")) == 1
    assert len(query(app, "SELECT id FROM domain_event WHERE name = 'organization.created'")) == 1
    assert offline_stripe.calls_to("checkout.sessions.create") == offline_stripe.calls_to("customers.create") == []


def test_a_free_signup_for_an_email_with_an_account_makes_none_and_tells_the_mailbox(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    start_signup(app.test_client(), tier="free", addon_extra_seats="0")
    response = start_signup(app.test_client(), tier="free", addon_extra_seats="0", organization_name="Other Org")
    assert response.status_code == 303 and response.headers["Location"] == "/auth/login"
    assert [row.name for row in query(app, "SELECT name FROM organization")] == ["Analytical Engines"]
    assert len(query(app, "SELECT id FROM domain_event WHERE name = 'signup.started_for_existing_account'")) == 1
    failed = query(app, "SELECT * FROM pending_signup WHERE status = 'failed'")
    assert [(row.failure_reason, row.password_hash) for row in failed] == [("email already has an account", None)]


def test_a_free_organization_has_nothing_to_cancel_or_downgrade(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    start_signup(client, tier="free", addon_extra_seats="0")
    for path in ("/billing/downgrade-to-free", "/billing/cancel"):
        data = {"csrf_token": csrf_token(client, "/billing/"), "request_token": "a" * 32, "when": "period_end"}
        page = client.post(path, data=data, follow_redirects=True).get_data(as_text=True)
        assert "This organization has no subscription." in page
    assert offline_stripe.calls_to("subscriptions.update") == []
    [organization] = query(app, "SELECT * FROM organization")
    assert (organization.tier, organization.billing_status) == ("free", "active")
