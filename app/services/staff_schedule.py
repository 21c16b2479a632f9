"""The operations console's scheduled changes: a cancellation waiting for a date and a plan change
waiting for the period's end, as the database holds them beside the provider's, each difference marked.

The database holds a scheduled cancellation as `cancel_at_period_end` with the period's end, and a
scheduled plan change as the latest `subscription.change_scheduled` domain event (not since withdrawn,
replaced or taken effect). Stripe holds them as the subscription's `cancel_at_period_end` / `cancel_at`
and its subscription schedule's next phase (read with the page-read timeout, like every console read);
Whop as the membership's `cancel_at_period_end` (Whop schedules no plan changes). Reads only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from app import clock
from app.extensions import db
from app.models import DomainEvent, Organization
from app.services.billing_common import BillingConfigurationError, BillingError, plan_catalogue
from app.services.billing_details import scheduled_change_from_stripe
from app.services.pricing import PriceInfo
from app.services.whop_state import parse_time

NONE = "none"
PLAN_EVENTS = ("subscription.change_scheduled", "subscription.change_withdrawn", "subscription.changed")


@dataclass(frozen=True)
class ScheduledRow:
    name: str  # "cancellation" or "plan change"
    ours: str
    provider: str | None  # None: not read (the provider did not answer, or there is nothing to read)
    differs: bool


def _day(value: Any) -> str | None:
    """A date as the console writes it (YYYY-MM-DD, UTC), from Unix seconds or a datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        try:
            moment = datetime.fromtimestamp(int(value), UTC)
        except (TypeError, ValueError):
            return str(value)
    return f"{moment.astimezone(UTC):%Y-%m-%d}"


def _plan_words(tier_key: str | None, interval: str | None, on: str | None) -> str:
    tier = plan_catalogue().tier(tier_key) if tier_key else None
    name = tier.name if tier is not None else (tier_key or "an unknown plan")
    return f"{name} ({'yearly' if interval == 'year' else 'monthly'}) from {on or 'an unknown date'}"


def held_schedule(organization: Organization) -> tuple[str, str]:
    """(cancellation, plan change) as the database holds them. Call inside a transaction."""
    cancellation = f"ends {_day(organization.current_period_end)}" if organization.cancel_at_period_end else NONE
    latest = db.session.execute(
        select(DomainEvent)
        .where(DomainEvent.organization_id == organization.id, DomainEvent.name.in_(PLAN_EVENTS))
        .order_by(DomainEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    change = NONE
    if latest is not None and latest.name == "subscription.change_scheduled":
        data: Mapping[str, Any] = latest.data or {}
        effective = data.get("effective_at")
        if effective is None or int(effective) > clock.now():
            change = _plan_words(data.get("tier"), data.get("interval"), _day(effective))
    return cancellation, change


def provider_schedule(
    provider_object: Mapping[str, Any],
    *,
    whop: bool,
    read_schedule: Callable[[str], dict[str, Any]],
    prices: Callable[[], dict[str, PriceInfo]],
) -> tuple[str, str | None]:
    """(cancellation, plan change) as the provider holds them; the plan change is None when the
    schedule could not be read. Raises nothing."""
    if whop:
        ends = parse_time(provider_object.get("current_period_end"))
        scheduled = bool(provider_object.get("cancel_at_period_end")) or provider_object.get("status") == "canceling"
        return (f"ends {_day(ends)}" if scheduled else NONE), NONE
    items = (provider_object.get("items") or {}).get("data") or []
    period_end = max((int(i.get("current_period_end") or 0) for i in items), default=0) or None
    if provider_object.get("cancel_at_period_end"):
        cancellation = f"ends {_day(period_end)}"
    elif provider_object.get("cancel_at"):
        cancellation = f"ends {_day(provider_object['cancel_at'])}"
    else:
        cancellation = NONE
    schedule = provider_object.get("schedule")
    schedule_id = schedule.get("id") if isinstance(schedule, Mapping) else schedule
    if not schedule_id:
        return cancellation, NONE
    try:
        change = scheduled_change_from_stripe(read_schedule(str(schedule_id)), clock.now())
    except (BillingError, BillingConfigurationError):
        return cancellation, None
    if change is None:
        return cancellation, NONE
    by_id = {price.id: key for key, price in prices().items()}
    catalogue = plan_catalogue()
    for price_id in change.lookup_keys:
        key = by_id.get(price_id, price_id)
        tier = catalogue.tier_for_lookup_key(key)
        if tier is not None:
            return cancellation, _plan_words(tier.key, catalogue.interval_of_lookup_key(key), _day(change.starts_at))
    return cancellation, f"{', '.join(change.lookup_keys)} from {_day(change.starts_at)}"


def compare(held: tuple[str, str], provider: tuple[str, str | None] | None) -> list[ScheduledRow]:
    """The two rows, each difference marked; a side not read is not a difference."""
    theirs = provider or (None, None)
    return [
        ScheduledRow(name, ours, their, their is not None and their != ours)
        for name, ours, their in zip(("cancellation", "plan change"), held, theirs, strict=True)
    ]
