"""The billing page's usage section: per meter the plan includes, this period's usage from our own
store (never delayed by Stripe's aggregation), what is included, the overage so far and what it
costs at the metered price, and a small server-rendered chart of daily usage."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from app.extensions import db
from app.models import Organization, UsageEvent, UsagePeriodTotal
from app.services import usage_store, usage_tally
from app.services.billing_common import BillingConfigurationError, BillingError
from app.services.plans import PlanCatalogue
from app.services.pricing import PriceInfo
from app.services.usage import period_containing

logger = logging.getLogger(__name__)
CHART_WIDTH = 360
CHART_HEIGHT = 80


@dataclass(frozen=True)
class ChartBar:
    day: datetime
    quantity: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class MeterUsage:
    key: str
    name: str
    unit: str
    overage: str  # billed, soft_limit or hard_limit
    used: int
    included: int
    billed_overage: int  # units past the included quantity that are billed
    overage_cost: int | None  # cents, at the metered price (None: price not known right now)
    currency: str
    period_start: datetime
    period_end: datetime
    bars: list[ChartBar]
    peak: int

    @property
    def percent(self) -> int:
        return min(100, round(100 * self.used / self.included)) if self.included else 100

    @property
    def past_included(self) -> int:
        return max(0, self.used - self.included)


def metered_prices(
    catalogue: PlanCatalogue, fetch: Callable[[list[str]], Mapping[str, PriceInfo]]
) -> Mapping[str, PriceInfo]:
    """The metered prices by lookup key (through the price cache); none when Stripe cannot say: the
    page then shows usage without its cost."""
    keys = catalogue.meter_lookup_keys()
    db.session.rollback()  # no transaction is held while Stripe is asked (the page reloads what it shows)
    try:
        return fetch(keys) if keys else {}
    except (BillingError, BillingConfigurationError) as exc:
        logger.warning("metered prices not shown: %s", exc)
        return {}


def meters_for(
    catalogue: PlanCatalogue, organization: Organization, prices: Mapping[str, PriceInfo], now: datetime
) -> list[MeterUsage]:
    """Each meter the organization's plan includes, as it stands this period."""
    period = period_containing(organization.current_period_end, now)
    shown = []
    for meter in catalogue.meters.values():
        allowance = meter.allowance(organization.tier)
        if allowance is None:
            continue
        total = db.session.execute(
            select(UsagePeriodTotal.total, UsagePeriodTotal.billable).where(
                UsagePeriodTotal.organization_id == organization.id,
                UsagePeriodTotal.meter == meter.key,
                UsagePeriodTotal.period_start == period.start,
            )
        ).first()
        tallied, billable = (int(total.total), int(total.billable)) if total else (0, 0)
        # What the worker has not tallied yet (seconds of usage), as its tally will bill it.
        untallied = db.session.execute(
            usage_store.UNTALLIED,
            {"organization_id": organization.id, "meter": meter.key, "period_start": period.start},
        ).scalar_one()
        used = tallied + int(untallied)
        billable += sum(usage_tally.billable_parts(allowance, tallied, [int(untallied)]))
        price = prices.get(meter.lookup_key)
        cost = billable * price.unit_amount if price is not None and price.unit_amount is not None else None
        daily = _daily(organization.id, meter.key, period.start, min(period.end, now + timedelta(days=1)))
        bars, peak = chart(daily, period.start, period.end)
        shown.append(
            MeterUsage(
                key=meter.key,
                name=meter.name,
                unit=meter.unit,
                overage=allowance.overage,
                used=used,
                included=allowance.included,
                billed_overage=billable,
                overage_cost=cost if allowance.billed else 0,
                currency=price.currency if price is not None and price.currency else "usd",
                period_start=period.start,
                period_end=period.end,
                bars=bars,
                peak=peak,
            )
        )
    db.session.rollback()
    return shown


def _daily(organization_id: int, meter: str, start: datetime, end: datetime) -> dict[str, int]:
    day = (
        func.date(func.timezone("UTC", UsageEvent.occurred_at))
        if db.engine.dialect.name == "postgresql"
        else (func.date(UsageEvent.occurred_at))
    )
    rows = db.session.execute(
        select(day.label("day"), func.sum(UsageEvent.quantity))
        .where(
            UsageEvent.organization_id == organization_id,
            UsageEvent.meter == meter,
            UsageEvent.occurred_at >= start,
            UsageEvent.occurred_at < end,
        )
        .group_by(day)
    ).all()
    return {str(row[0]): int(row[1] or 0) for row in rows}


def chart(daily: Mapping[str, int], start: datetime, end: datetime) -> tuple[list[ChartBar], int]:
    """One bar per day of the period (UTC), scaled to the busiest day, in a CHART_WIDTH x CHART_HEIGHT box."""
    first = start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = []
    current = first
    while current < end:
        days.append(current)
        current += timedelta(days=1)
    peak = max(daily.values(), default=0)
    width = CHART_WIDTH / max(1, len(days))
    bars = []
    for index, day in enumerate(days):
        quantity = daily.get(day.date().isoformat(), 0)
        height = round(CHART_HEIGHT * quantity / peak, 1) if peak else 0.0
        bars.append(
            ChartBar(
                day=day,
                quantity=quantity,
                x=round(index * width, 1),
                y=round(CHART_HEIGHT - height, 1),
                width=round(max(1.0, width - 1), 1),
                height=height,
            )
        )
    return bars, peak
