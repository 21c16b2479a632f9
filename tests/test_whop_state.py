"""Whop memberships read as the billing facts an organization holds (app/services/whop_state.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.models import BillingStatus
from app.services.plans import PlanCatalogue
from app.services.whop_state import membership_as_of, parse_time, subscription_state_from_whop

CATALOGUE = PlanCatalogue.from_mapping(
    {
        "tiers": {
            "starter": {"name": "Starter", "lookup_key": "starter_monthly", "whop_plan_id": "plan_s"},
            "pro": {"name": "Pro", "lookup_key": "pro_monthly", "whop_plan_id": "plan_p"},
        }
    }
)


def membership(**fields: Any) -> dict[str, Any]:
    return {
        "id": "mem_1",
        "member_id": "mber_1",
        "plan_id": "plan_s",
        "status": "active",
        "cancel_at_period_end": False,
        "canceled_at": None,
        "current_period_end": "2026-12-28T12:00:00.000Z",
        "updated_at": "2026-11-28T12:00:05.000Z",
        "metadata": {"pending_signup_id": "abc", "n": 3},
        **fields,
    }


def test_an_active_membership() -> None:
    state = subscription_state_from_whop(membership(), CATALOGUE)
    assert (state.subscription_id, state.customer_id, state.status, state.tier) == (
        "mem_1",
        "mber_1",
        BillingStatus.ACTIVE,
        "starter",
    )
    assert state.current_period_end == datetime(2026, 12, 28, 12, tzinfo=UTC)
    assert (state.cancel_at_period_end, state.trial_end, state.canceled_at, state.ended_at) == (False, None, None, None)
    assert state.metadata == {"pending_signup_id": "abc", "n": "3"}
    assert state.addons == {}


@pytest.mark.parametrize(
    ("fields", "status", "scheduled", "ended"),
    [
        ({"status": "trialing"}, BillingStatus.TRIALING, False, False),
        ({"status": "past_due"}, BillingStatus.PAST_DUE, False, False),
        ({"status": "unresolved"}, BillingStatus.PAST_DUE, False, False),
        ({"status": "drafted"}, BillingStatus.INCOMPLETE, False, False),
        ({"status": "completed"}, BillingStatus.ACTIVE, False, False),
        ({"cancel_at_period_end": True, "canceled_at": "2026-11-29T00:00:00Z"}, BillingStatus.ACTIVE, True, False),
        ({"status": "canceling", "canceled_at": "2026-11-29T00:00:00Z"}, BillingStatus.ACTIVE, True, False),
        ({"status": "canceled", "canceled_at": "2026-11-29T00:00:00Z"}, BillingStatus.CANCELED, False, True),
        ({"status": "expired", "cancel_at_period_end": True}, BillingStatus.CANCELED, False, True),
    ],
)
def test_every_status(fields: dict[str, Any], status: BillingStatus, scheduled: bool, ended: bool) -> None:
    state = subscription_state_from_whop(membership(**fields), CATALOGUE)
    assert (state.status, state.cancel_at_period_end, state.ended_at is not None) == (status, scheduled, ended)
    if status == BillingStatus.TRIALING:
        assert state.trial_end == state.current_period_end
    if scheduled:
        assert state.canceled_at == datetime(2026, 11, 29, tzinfo=UTC)


def test_an_expired_membership_ended_at_its_period_end() -> None:
    state = subscription_state_from_whop(membership(status="expired"), CATALOGUE)
    assert state.ended_at == datetime(2026, 12, 28, 12, tzinfo=UTC)


def test_unknown_plans_keep_the_tier_and_unknown_statuses_are_refused() -> None:
    assert subscription_state_from_whop(membership(plan_id="plan_other"), CATALOGUE).tier is None
    assert subscription_state_from_whop(membership(plan_id="plan_p"), CATALOGUE).tier == "pro"
    with pytest.raises(ValueError, match="unknown membership status 'weird'"):
        subscription_state_from_whop(membership(status="weird"), CATALOGUE)


def test_times() -> None:
    assert membership_as_of(membership()) == int(datetime(2026, 11, 28, 12, 0, 5, tzinfo=UTC).timestamp())
    assert membership_as_of(membership(updated_at=None)) is None
    assert parse_time("not a time") is None
    assert parse_time("2026-11-28T12:00:00") == datetime(2026, 11, 28, 12, tzinfo=UTC)
