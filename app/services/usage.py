"""Recording usage: validation, the billing period an event falls in, hard limits, soft-limit warnings
and the durable, idempotent insert. BillingService.record_usage is the entry point; the HTTP API
(app/api/routes.py) and code inside the app both go through it.

One recording is one short transaction, with no provider call in it:

1. INSERT the event ... ON CONFLICT (organization_id, idempotency_key) DO NOTHING. A repeated key is
   acknowledged as a duplicate (the first event's answer) and nothing else happens; the same key with
   other usage is refused (409), as Stripe refuses an idempotency key reused with other parameters.
2. Add the quantity to the period's counter row (usage_period_total): an UPDATE under the row's lock,
   conditional on the hard limit where the tier has one. An update that would pass a hard limit matches
   no row: the transaction rolls back (the event is not stored) and the caller gets UsageLimitReached.
3. The part of the event past what the tier includes is its billable quantity (tiers whose overage is
   "billed"); the worker reports it to Stripe (app/services/usage_reports.py).
4. A soft limit's counter crossing 80% or 100% of the included quantity records a domain event whose
   outbox consumer emails the owner. The counter only grows and is updated one recording at a time,
   so each threshold is crossed once per period: one email each.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import case, select, update

from app import clock
from app.extensions import db
from app.models import Organization, UsageEvent, UsagePeriodTotal
from app.models.organization import BillingStatus
from app.services import domain_events
from app.services.billing_common import portable_insert
from app.services.plans import Meter, MeterAllowance, PlanCatalogue

# Stripe refuses meter events whose timestamp is more than 35 days old or more than 5 minutes ahead.
OLDEST = timedelta(days=35)
FUTURE_SKEW = timedelta(minutes=5)
MAX_QUANTITY = 10**12
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
WARNING_PERCENTS = (80, 100)
THRESHOLD_EVENT = "usage.threshold_reached"
NOT_BILLING = frozenset({BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED, BillingStatus.INCOMPLETE})


class UsageRejected(Exception):
    """The usage is refused and nothing was stored. `status` is the HTTP status the API answers with,
    `code` a stable machine-readable word."""

    status = 400
    code = "invalid_usage"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code
        self.status = status or self.status


class UsageLimitReached(UsageRejected):
    """The tier's hard limit for the meter would be passed: refused until the period resets."""

    status = 429
    code = "usage_limit_reached"

    def __init__(self, meter: Meter, *, limit: int, used: int, resets_at: datetime) -> None:
        super().__init__(
            f"{meter.name}: your plan includes {limit:,} per billing period and {used:,} are used;"
            f" the limit resets at {resets_at.isoformat()}. Upgrade your plan for more."
        )
        self.limit = limit
        self.used = used
        self.resets_at = resets_at


@dataclass(frozen=True)
class RecordedUsage:
    event_id: int
    meter: str
    quantity: int
    occurred_at: datetime
    duplicate: bool  # the idempotency key was seen before: acknowledged, not counted again


Recorded = RecordedUsage | UsageRejected  # a batch's answer for one event


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime


# --- validation (pure) ----------------------------------------------------------------------------


def meter_for(catalogue: PlanCatalogue, meter_key: Any) -> Meter:
    meter = catalogue.meter(meter_key) if isinstance(meter_key, str) else None
    if meter is None:
        known = ", ".join(sorted(catalogue.meters)) or "none"
        raise UsageRejected(f"Unknown meter {meter_key!r} (meters: {known}).", code="unknown_meter")
    return meter


def quantity_of(meter: Meter, value: Any) -> int:
    """A whole number of at least 0 (a JSON number or a string of digits); a count meter's event is 1."""
    if value is None and meter.aggregation == "count":
        return 1
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise UsageRejected("quantity must be a number.", code="invalid_quantity")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise UsageRejected(f"quantity {value!r} is not a number.", code="invalid_quantity") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise UsageRejected(f"quantity {value!r} must be a whole number.", code="invalid_quantity")
    if number < 0:
        raise UsageRejected(f"quantity {value!r} must not be negative.", code="invalid_quantity")
    if number > MAX_QUANTITY:
        raise UsageRejected(f"quantity {value!r} is larger than {MAX_QUANTITY:,}.", code="invalid_quantity")
    if meter.aggregation == "count" and number != 1:
        raise UsageRejected(f"{meter.name} counts events: each event's quantity is 1.", code="invalid_quantity")
    return int(number)


def idempotency_key_of(value: Any) -> str:
    if not isinstance(value, str) or not IDEMPOTENCY_KEY.match(value):
        raise UsageRejected(
            "idempotency_key must be 1 to 255 printable characters without spaces.", code="invalid_idempotency_key"
        )
    return value


def occurred_at_of(value: Any, now: datetime) -> datetime:
    """When the usage happened: None (now), an aware datetime, Unix seconds, or an ISO 8601 string with
    its offset; refused when Stripe would refuse it (older than 35 days, more than 5 minutes ahead)."""
    at = _instant(value, now)
    if at < now - OLDEST:
        raise UsageRejected(f"timestamp {at.isoformat()} is more than 35 days old.", code="timestamp_too_old")
    if at > now + FUTURE_SKEW:
        raise UsageRejected(
            f"timestamp {at.isoformat()} is more than 5 minutes in the future.", code="timestamp_in_future"
        )
    return at


def _instant(value: Any, now: datetime) -> datetime:
    if value is None:
        return now
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise UsageRejected("timestamp must say its time zone.", code="invalid_timestamp")
        return value.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            pass
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    raise UsageRejected("timestamp must be Unix seconds or an ISO 8601 time with its offset.", code="invalid_timestamp")


def period_containing(anchor_end: datetime | None, at: datetime) -> Period:
    """The monthly billing period `at` falls in: periods end on the subscription's period end and every
    month before or after it; with no period end known, the calendar month (UTC)."""
    if anchor_end is None:
        start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return Period(start, add_months(start, 1))
    months = (anchor_end.year - at.year) * 12 + anchor_end.month - at.month
    for k in range(months - 2, months + 3):  # the month difference is within one of the period's index
        start, end = add_months(anchor_end, -k - 1), add_months(anchor_end, -k)
        if start <= at < end:
            return Period(start, end)
    raise AssertionError(f"no period around {at} for the period end {anchor_end}")  # pragma: no cover


def add_months(moment: datetime, months: int) -> datetime:
    """The same day and time `months` later (or earlier), on the month's last day where it is shorter
    (Stripe's billing cycle anchor does the same: the 31st bills on the 30th in April)."""
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


# --- recording ---------------------------------------------------------------------------------------


def record(
    catalogue: PlanCatalogue,
    organization_id: int,
    meter_key: Any,
    quantity: Any,
    *,
    idempotency_key: Any,
    occurred_at: Any,
    now: datetime | None = None,
) -> RecordedUsage:
    """Validate and store one usage event in one short transaction, committed here (call it with no
    transaction of your own open). Raises UsageRejected (nothing stored) for bad input, a plan without
    the meter, or a hard limit."""
    [outcome] = record_batch(
        catalogue,
        organization_id,
        [{"meter": meter_key, "quantity": quantity, "idempotency_key": idempotency_key, "timestamp": occurred_at}],
        now=now,
    )
    if isinstance(outcome, UsageRejected):
        raise outcome
    return outcome


def record_batch(
    catalogue: PlanCatalogue,
    organization_id: int,
    events: Sequence[Mapping[str, Any]],
    *,
    now: datetime | None = None,
) -> list[Recorded]:
    """Validate and store each event ({"meter", "quantity", "idempotency_key", "timestamp"}) in one
    transaction with a savepoint per event, committed once: an event refused (UsageRejected, in its
    place in the answer) is rolled back alone and the others are stored."""
    now = now or clock.utcnow()
    organization = db.session.get(Organization, organization_id)
    if organization is None:
        db.session.rollback()
        return [UsageRejected("No such organization.", code="unknown_organization", status=404) for _ in events]
    tier, status, anchor = organization.tier, organization.billing_status, organization.current_period_end
    outcomes: list[Recorded] = []
    ensured: set[tuple[str, datetime]] = set()  # counter rows known to exist in this transaction
    try:
        for event in events:
            try:
                meter = meter_for(catalogue, event.get("meter"))
                amount = quantity_of(meter, event.get("quantity"))
                key = idempotency_key_of(event.get("idempotency_key"))
                at = occurred_at_of(event.get("timestamp"), now)
                allowance = meter.allowance(tier)
                if allowance is None:
                    raise UsageRejected(
                        f"Your plan does not include {meter.name}.", code="meter_not_in_plan", status=403
                    )
                if status in NOT_BILLING:
                    raise UsageRejected(
                        "The organization has no active subscription.", code="no_subscription", status=402
                    )
                period = period_containing(anchor, at)
            except UsageRejected as exc:  # refused before anything was written
                outcomes.append(exc)
                continue
            try:
                if len(events) == 1:  # the transaction is the event's: a refusal rolls it all back
                    outcomes.append(_store(organization_id, meter, allowance, amount, key, at, period, now, ensured))
                else:
                    with db.session.begin_nested():  # a refused event's writes are undone alone
                        outcomes.append(
                            _store(organization_id, meter, allowance, amount, key, at, period, now, ensured)
                        )
            except UsageRejected as exc:
                if len(events) == 1:
                    db.session.rollback()
                outcomes.append(exc)
                continue
            ensured.add((meter.key, period.start))  # the counter row exists now (its savepoint held)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return outcomes


def _store(
    organization_id: int,
    meter: Meter,
    allowance: MeterAllowance,
    amount: int,
    key: str,
    at: datetime,
    period: Period,
    now: datetime,
    ensured: set[tuple[str, datetime]],
) -> RecordedUsage:
    inserted = db.session.execute(
        portable_insert(UsageEvent)
        .values(
            organization_id=organization_id,
            meter=meter.key,
            quantity=amount,
            billable_quantity=0,
            idempotency_key=key,
            occurred_at=at,
            period_start=period.start,
            recorded_at=now,
        )
        .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
        .returning(UsageEvent.id)
    ).scalar()
    if inserted is None:
        return _duplicate(organization_id, meter, amount, key)
    if (meter.key, period.start) not in ensured:  # once per meter and period in a batch
        db.session.execute(
            portable_insert(UsagePeriodTotal)
            .values(
                organization_id=organization_id,
                meter=meter.key,
                period_start=period.start,
                period_end=period.end,
                total=0,
                billable=0,
            )
            .on_conflict_do_nothing(index_elements=["organization_id", "meter", "period_start"])
        )
    row, included = UsagePeriodTotal, allowance.included
    where = [row.organization_id == organization_id, row.meter == meter.key, row.period_start == period.start]
    if allowance.overage == "hard_limit":
        where.append(row.total + amount <= included)
    # The part past what is included, from the total before this event (SET reads the row as it was).
    billed_part = case(
        (row.total + amount <= included, 0), (row.total >= included, amount), else_=row.total + amount - included
    )
    new_total = db.session.execute(
        update(row)
        .where(*where)
        .values(total=row.total + amount, billable=row.billable + (billed_part if allowance.billed else 0))
        .returning(row.total)
    ).scalar()
    if new_total is None:  # the caller's savepoint (or transaction) is rolled back
        used = db.session.execute(select(row.total).where(*where[:3])).scalar_one()
        raise UsageLimitReached(meter, limit=included, used=used, resets_at=period.end)
    old_total = new_total - amount
    billable = max(0, new_total - max(old_total, included)) if allowance.billed else 0
    if billable:
        db.session.execute(update(UsageEvent).where(UsageEvent.id == inserted).values(billable_quantity=billable))
    if allowance.overage == "soft_limit":
        _warn_on_crossing(organization_id, meter, allowance, old_total, new_total, period)
    return RecordedUsage(inserted, meter.key, amount, at, duplicate=False)


def _duplicate(organization_id: int, meter: Meter, amount: int, key: str) -> RecordedUsage:
    first = db.session.execute(
        select(UsageEvent).where(UsageEvent.organization_id == organization_id, UsageEvent.idempotency_key == key)
    ).scalar_one()
    if first.meter != meter.key or first.quantity != amount:
        raise UsageRejected(
            f"idempotency_key {key!r} was already used for other usage ({first.quantity} of {first.meter}).",
            code="idempotency_key_reused",
            status=409,
        )
    return RecordedUsage(first.id, first.meter, first.quantity, first.occurred_at, duplicate=True)


def _warn_on_crossing(
    organization_id: int, meter: Meter, allowance: MeterAllowance, old: int, new: int, period: Period
) -> None:
    for percent in WARNING_PERCENTS:
        threshold = math.ceil(allowance.included * percent / 100)
        if old < threshold <= new:
            domain_events.record(
                THRESHOLD_EVENT,
                organization_id=organization_id,
                source=f"usage:{meter.key}",
                meter=meter.key,
                meter_name=meter.name,
                percent=percent,
                included=allowance.included,
                used=new,
                period_start=period.start.isoformat(),
                period_end=period.end.isoformat(),
            )
