"""A Whop membership, read into the same facts a Stripe subscription gives (SubscriptionState), so
one apply_subscription_state moves an organization whichever provider bills it. Plain dicts in (webhook
`data` and API answers as dicts), no SDK."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from app.models import BillingStatus
from app.services.plans import PlanCatalogue
from app.services.subscription_state import SubscriptionState

# Whop's membership statuses (whop_sdk.types.MembershipStatus) as the billing statuses organizations
# hold. `canceling` is Whop's bucket for an active membership set to cancel at period end; `completed`
# is a one-time purchase that keeps access; `expired` is a membership that ran out (ended, like
# canceled); `unresolved` is a payment under dispute or review; `drafted` was never paid.
WHOP_STATUS = {
    "trialing": BillingStatus.TRIALING,
    "active": BillingStatus.ACTIVE,
    "canceling": BillingStatus.ACTIVE,
    "completed": BillingStatus.ACTIVE,
    "past_due": BillingStatus.PAST_DUE,
    "unresolved": BillingStatus.PAST_DUE,
    "canceled": BillingStatus.CANCELED,
    "expired": BillingStatus.CANCELED,
    "drafted": BillingStatus.INCOMPLETE,
}
ENDED = frozenset({"canceled", "expired"})


def minor_units(money: Any) -> int | None:
    """A Whop amount in the currency's smallest unit (cents), as Stripe's amounts are and as the pages
    and emails format them: Whop's Money object (`{"amount": "19.00", "decimals": 2}`), or a bare
    decimal amount (`19.0`, `"19.00"`, in the currency's main unit). None when there is none."""
    decimals = 2
    if isinstance(money, Mapping):
        given = money.get("decimals")
        decimals = given if isinstance(given, int) and not isinstance(given, bool) and 0 <= given <= 4 else 2
        money = money.get("amount")
    if money is None or isinstance(money, bool):
        return None
    try:
        return int((Decimal(str(money)) * 10**decimals).to_integral_value())
    except (InvalidOperation, ValueError, OverflowError):  # not a number, NaN, infinity
        return None


def money_currency(money: Any, fallback: Any = None) -> str | None:
    currency = money.get("currency") if isinstance(money, Mapping) else None
    value = currency or fallback
    return str(value).lower() if value else None


def parse_time(value: Any) -> datetime | None:
    """Whop's ISO 8601 timestamps ("2026-11-28T12:00:00.000Z"); None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def membership_as_of(membership: Mapping[str, Any]) -> int | None:
    """The membership's `updated_at` in unix seconds: Whop's own clock for the state it describes,
    which orders deliveries and API reads (Whop documents it for reconciling against retries)."""
    updated = parse_time(membership.get("updated_at"))
    return int(updated.timestamp()) if updated else None


def subscription_state_from_whop(membership: Mapping[str, Any], catalogue: PlanCatalogue) -> SubscriptionState:
    raw_status = membership.get("status")
    if raw_status not in WHOP_STATUS:
        raise ValueError(f"unknown membership status {raw_status!r}")
    status = WHOP_STATUS[raw_status]
    ended = raw_status in ENDED
    tier = catalogue.tier_for_whop_plan_id(membership.get("plan_id"))
    period_end = parse_time(membership.get("current_period_end"))
    canceled_at = parse_time(membership.get("canceled_at"))
    scheduled = bool(membership.get("cancel_at_period_end")) or raw_status == "canceling"
    if ended:
        ended_at = (parse_time(membership.get("expires_at")) or period_end) if raw_status == "expired" else None
        ended_at = ended_at or canceled_at or parse_time(membership.get("updated_at"))
    else:
        ended_at = None
    member = membership.get("member_id")
    metadata = membership.get("metadata") or {}
    return SubscriptionState(
        subscription_id=str(membership["id"]),
        customer_id=member if isinstance(member, str) and member else None,
        status=status,
        tier=tier.key if tier else None,
        addons={},  # a Whop plan sells the tier alone
        cancel_at_period_end=scheduled and not ended,
        current_period_end=period_end,
        trial_end=period_end if status == BillingStatus.TRIALING else None,
        canceled_at=canceled_at if (scheduled or ended) else None,
        ended_at=ended_at,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
    )
