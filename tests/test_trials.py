"""Trials without a card, the parts with no Stripe: the catalogue's rule, what a signup Checkout asks
for, and when the banner shows. The lifecycle (converted, lapsed and resumed) runs against the sandbox
in tests/test_signup_stripe_flow.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.models import Organization
from app.services import trials
from app.services.plans import CatalogueError, PlanCatalogue

NOW = datetime(2027, 1, 10, 12, tzinfo=UTC)


def catalogue(**pro: object) -> PlanCatalogue:
    return PlanCatalogue.from_mapping({"tiers": {"pro": {"name": "Pro", "lookup_key": "pro_monthly", **pro}}})


def test_a_card_less_trial_asks_for_no_card_and_cancels_without_one() -> None:
    tier = catalogue(trial_days=14, trial_without_card=True).tiers["pro"]
    assert trials.checkout_collection(tier) == {"payment_method_collection": "if_required"}
    assert trials.checkout_subscription_data(tier) == {
        "trial_period_days": 14,
        "trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}},
    }
    with_card = catalogue(trial_days=14).tiers["pro"]
    assert trials.checkout_collection(with_card) == {}
    assert trials.checkout_subscription_data(with_card) == {"trial_period_days": 14}
    assert trials.checkout_subscription_data(catalogue().tiers["pro"]) == {}


@pytest.mark.parametrize("fields", [{"trial_without_card": True}, {"trial_days": 14, "trial_without_card": "yes"}])
def test_trial_without_card_needs_a_trial_and_a_yes_or_no(fields: dict[str, object]) -> None:
    with pytest.raises(CatalogueError, match="trial_without_card must be true or false"):
        catalogue(**fields)


def test_the_banner_shows_in_the_last_three_days_of_a_card_less_trial(app: object) -> None:
    plans = catalogue(trial_days=14, trial_without_card=True)

    def organization(status: str, trial_end: datetime | None) -> Organization:
        return Organization(id=1, name="A", tier="pro", billing_status=status, trial_end=trial_end)

    soon = NOW + timedelta(days=2)
    assert trials.reminder(organization("trialing", soon), plans, NOW) == soon
    assert trials.reminder(organization("active", soon), plans, NOW) is None
    assert trials.reminder(organization("trialing", None), plans, NOW) is None
    assert trials.reminder(organization("trialing", soon), catalogue(trial_days=14), NOW) is None
    with app.app_context():  # type: ignore[attr-defined]
        # Ten days out, and Stripe has not said the trial ends soon: no banner.
        assert trials.reminder(organization("trialing", NOW + timedelta(days=10)), plans, NOW) is None


def test_what_a_subscription_does_at_the_trial_end_without_a_card() -> None:
    assert trials.ends_without_card({"trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}}}) == (
        "cancel"
    )
    assert trials.ends_without_card({"trial_settings": {"end_behavior": {"missing_payment_method": "pause"}}}) == (
        "pause"
    )
    create_invoice = {"trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}}}
    assert trials.ends_without_card(create_invoice) is None and trials.ends_without_card({}) is None
