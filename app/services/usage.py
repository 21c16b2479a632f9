"""Recording usage: validation, the billing period an event falls in, hard limits, soft-limit warnings
and the durable, idempotent insert. BillingService.record_usage is the entry point; the HTTP API
(app/api/routes.py) and code inside the app both go through it.

Recording is one short transaction per request (one event or a batch), with no provider call in it.
Each event is validated here (a bad one gets its own UsageRejected, 4xx, and the others go on); the
valid ones are stored set-based by app/services/usage_store.py, which says how:

1. All the events are inserted by one INSERT ... ON CONFLICT (organization_id, idempotency_key) DO
   NOTHING RETURNING, not tallied yet. A repeated key (from an earlier request, a concurrent one, or
   earlier in the same batch) is acknowledged as a duplicate (the first event's answer) and not counted
   again; the same key with other usage is refused (409), as Stripe refuses an idempotency key reused
   with other parameters.
2. A hard limit is judged as the events are stored, under their period's row lock (the events that
   would pass it are refused, UsageLimitReached, and not stored).
3. The worker's tally (app/services/usage_tally.py) then adds each event to its period's total, sets
   its billable quantity (the part past what the tier includes, under "billed" overage) and warns the
   owner at a soft limit's 80% and 100%, once each per period; the worker reports the billable part to
   Stripe (app/services/usage_reports.py). On the SQLite stand-in (no worker) the tally runs here.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from app import clock
from app.extensions import db
from app.models.organization import BillingStatus
from app.services import usage_store, usage_tally
from app.services.plans import Meter, MeterAllowance, PlanCatalogue

# Stripe refuses meter events whose timestamp is more than 35 days old or more than 5 minutes ahead.
OLDEST = timedelta(days=35)
FUTURE_SKEW = timedelta(minutes=5)
MAX_QUANTITY = 10**12
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
ACCOUNT_REFUSALS = frozenset({"meter_not_in_plan", "no_subscription"})  # decided on the organization's state
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


# A stored event's answer: event_id, meter, quantity, occurred_at, and duplicate (the idempotency key
# was seen before: acknowledged, not counted again). The store's own record, handed on as it is.
RecordedUsage = usage_store.RecordedUsage
Recorded = RecordedUsage | UsageRejected  # a batch's answer for one event


Period = usage_store.Period
AccountChanged = usage_store.AccountChanged
iso = usage_store.iso  # datetime.isoformat, remembered (a batch's events mostly share one time)


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
    account: usage_store.Account | None = None,
) -> list[Recorded]:
    """Validate each event ({"meter", "quantity", "idempotency_key", "timestamp"}) and store the valid
    ones set-based (app/services/usage_store.py) in one transaction, committed here. An event refused
    (UsageRejected, in its place in the answer) is not stored and the others are. `account` is the
    organization as the caller read it (the usage API, with the API key; when remembered from an
    earlier request it is checked as it is used, and usage_store.AccountChanged means it is out of
    date: nothing was stored)."""
    now = now or clock.utcnow()
    try:
        account = account or usage_store.account(organization_id)
        if account is None:
            db.session.rollback()
            return [UsageRejected("No such organization.", code="unknown_organization", status=404) for _ in events]
        outcomes: list[Recorded | None] = [None] * len(events)
        pending = _validated(catalogue, account, events, now, outcomes)
        if any(isinstance(outcome, UsageRejected) and outcome.code in ACCOUNT_REFUSALS for outcome in outcomes):
            usage_store.check(organization_id, account)  # refused for the plan or status: as they are now?
        while pending:  # a key repeated within the batch is stored (or judged) after its first event
            firsts: dict[str, usage_store.Candidate] = {}
            repeats = [c for c in pending if firsts.setdefault(c.key, c) is not c]
            for index, stored in usage_store.store(organization_id, account, list(firsts.values()), now).items():
                outcomes[index] = _recorded(stored)
            pending = repeats
        if not usage_store.is_postgresql():  # the embedded development run has no worker to tally
            usage_tally.tally_in_transaction(catalogue, organization_id)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return [outcome for outcome in outcomes if outcome is not None]


def _validated(
    catalogue: PlanCatalogue,
    account: usage_store.Account,
    events: Sequence[Mapping[str, Any]],
    now: datetime,
    outcomes: list[Recorded | None],
) -> list[usage_store.Candidate]:
    """The events that may be stored; each refused one's UsageRejected goes in its place in `outcomes`."""
    valid: list[usage_store.Candidate] = []
    period: Period | None = None
    allowances: dict[str, MeterAllowance | None] = {}
    billing = account.billing_status not in NOT_BILLING
    meters = catalogue.meters
    for index, event in enumerate(events):
        try:
            meter_key = event.get("meter")
            meter = meters.get(meter_key) if type(meter_key) is str else None
            if meter is None:
                meter = meter_for(catalogue, meter_key)  # refused with the known meters
            amount = event.get("quantity")
            if type(amount) is not int or not 0 <= amount <= MAX_QUANTITY or meter.aggregation == "count":
                amount = quantity_of(meter, amount)  # anything but a plain whole number (the usual case)
            key = event.get("idempotency_key")
            if type(key) is not str or not IDEMPOTENCY_KEY.match(key):
                key = idempotency_key_of(key)  # refused with its message
            sent_at = event.get("timestamp")
            at = now if sent_at is None else occurred_at_of(sent_at, now)
            if meter.key not in allowances:
                allowances[meter.key] = meter.allowance(account.tier or "")
            allowance = allowances[meter.key]
            if allowance is None:
                raise UsageRejected(f"Your plan does not include {meter.name}.", code="meter_not_in_plan", status=403)
            if not billing:
                raise UsageRejected("The organization has no active subscription.", code="no_subscription", status=402)
        except UsageRejected as exc:
            outcomes[index] = exc
            continue
        if period is None or not period.start <= at < period.end:  # a batch's events mostly share one
            period = period_containing(account.current_period_end, at)
        valid.append(usage_store.Candidate(index, meter, allowance, amount, key, at, period))
    return valid


def _recorded(outcome: usage_store.Outcome) -> Recorded:
    if type(outcome) is RecordedUsage:
        return outcome
    if isinstance(outcome, usage_store.Refused):
        return UsageLimitReached(outcome.meter, limit=outcome.limit, used=outcome.used, resets_at=outcome.resets_at)
    if isinstance(outcome, usage_store.Reused):
        return UsageRejected(
            f"idempotency_key {outcome.key!r} was already used for other usage ({outcome.quantity} of"
            f" {outcome.meter}).",
            code="idempotency_key_reused",
            status=409,
        )
    return outcome
