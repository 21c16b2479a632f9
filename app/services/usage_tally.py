"""Tallying usage: the worker's step between storing an event (usage_store.py) and reporting its
billable part to Stripe (usage_reports.py).

A usage event is stored "not tallied yet" (billable_quantity NULL), so recording never waits for
another recording of the same organization. The tally (every worker's dispatch pass, every
WORKER_DISPATCH_SECONDS, and first thing in each usage:report run) takes untallied events FOR UPDATE
SKIP LOCKED (two tallies never take the same event), and for each organization, meter and period,
in one fixed order (no deadlocks with another tally or a hard-limited recording):

1. adds their quantity to the period's row (usage_period_total) by one upsert, which locks the row
   until the commit and returns the total before them;
2. from that total and what the organization's tier includes, decides each event's billable part
   (tiers whose overage is "billed"; in the order the events were stored) and the row's billable
   part grows by their sum in the same upsert;
3. a soft limit's total crossing 80% or 100% of what is included records a domain event whose outbox
   consumer emails the owner: the total only grows, under the row's lock, so each threshold is
   crossed once per period (one email each);
4. sets each event's billable_quantity (0 or more): tallied, in the same transaction.

An event is tallied exactly once: the upsert and the events' update commit together, and a tally that
dies before its commit leaves the events untallied for the next one. The tier is the organization's
at the tally, seconds after the recording (a plan change in between bills the new tier's overage).
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text, update

from app.extensions import db
from app.models import Organization, UsageEvent
from app.models.types import Timestamp
from app.services import domain_events
from app.services.billing_common import committed
from app.services.plans import MeterAllowance, PlanCatalogue

WARNING_PERCENTS = (80, 100)
THRESHOLD_EVENT = "usage.threshold_reached"
TALLY_LIMIT = 50_000  # events per tallying transaction
UPDATE_CHUNK = 10_000  # ids per UPDATE ... WHERE id IN (...)

# The billable part of the added quantity (excluded.total) on top of the row's total: what passes
# `included`. In ON CONFLICT ... DO UPDATE SET the row's columns hold what they held before the statement.
ADD = text(
    "INSERT INTO usage_period_total AS t (organization_id, meter, period_start, period_end, total, billable)"
    " VALUES (:organization_id, :meter, :period_start, :period_end, :added, :fresh_billable)"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE"
    " SET total = t.total + excluded.total,"
    " billable = t.billable + CASE WHEN :billed = 0 THEN 0"
    " WHEN t.total >= :included THEN excluded.total"
    " WHEN t.total + excluded.total <= :included THEN 0"
    " ELSE t.total + excluded.total - :included END"
    " RETURNING total"
).bindparams(bindparam("period_start", type_=Timestamp), bindparam("period_end", type_=Timestamp))

_Key = tuple[int, str, datetime]  # organization, meter, period start


def tally(catalogue: PlanCatalogue, *, once: bool = False) -> int:
    """Tally every untallied event, TALLY_LIMIT a transaction (once: one transaction, so a worker's
    dispatch pass stays short under a backlog); returns how many were tallied."""
    done = 0
    while True:
        with committed():
            tallied = tally_in_transaction(catalogue)
        done += tallied
        if once or tallied < TALLY_LIMIT:
            return done


def tally_in_transaction(catalogue: PlanCatalogue, organization_id: int | None = None) -> int:
    """Tally up to TALLY_LIMIT untallied events (of one organization, or any) in the open transaction."""
    query = (
        select(
            UsageEvent.id,
            UsageEvent.organization_id,
            UsageEvent.meter,
            UsageEvent.period_start,
            UsageEvent.period_end,
            UsageEvent.quantity,
            Organization.tier,
        )
        .join(Organization, Organization.id == UsageEvent.organization_id)
        .where(UsageEvent.billable_quantity.is_(None))
        .limit(TALLY_LIMIT)
        .with_for_update(of=UsageEvent, skip_locked=True)
    )
    if organization_id is not None:
        query = query.where(UsageEvent.organization_id == organization_id)
    rows = db.session.execute(query).all()
    groups: dict[_Key, list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.organization_id, row.meter, row.period_start)].append(row)
    zero: list[int] = []
    whole: list[int] = []
    parts: list[tuple[int, int]] = []
    for key in sorted(groups):  # one order for every tally and recording: rows are locked without deadlocks
        events = sorted(groups[key], key=lambda row: row.id)
        meter = catalogue.meter(key[1])
        allowance = meter.allowance(events[0].tier or "") if meter is not None else None
        before = _add(key, events, allowance)
        billables = billable_parts(allowance, before, [event.quantity for event in events])
        for event, billable in zip(events, billables, strict=True):
            if billable == 0:
                zero.append(event.id)
            elif billable == event.quantity:
                whole.append(event.id)
            else:
                parts.append((event.id, billable))
        if meter is not None and allowance is not None and allowance.overage == "soft_limit":
            _warn_on_crossing(key, meter.name, allowance, before, events)
    _settle(zero, 0)
    _settle(whole, UsageEvent.quantity)
    for event_id, billable in parts:
        db.session.execute(update(UsageEvent).where(UsageEvent.id == event_id).values(billable_quantity=billable))
    return len(rows)


def billable_parts(allowance: MeterAllowance | None, before: int, quantities: list[int]) -> list[int]:
    """Each quantity's part past what the tier includes, in order, from the period's total before them
    (none when the tier does not bill its overage)."""
    if allowance is None or not allowance.billed:
        return [0 for _ in quantities]
    total, parts = before, []
    for quantity in quantities:
        parts.append(max(0, total + quantity - max(total, allowance.included)))
        total += quantity
    return parts


def _add(key: _Key, events: list[Any], allowance: MeterAllowance | None) -> int:
    """Add the events to their period's row (locking it); the row's total before them."""
    added = sum(event.quantity for event in events)
    billed = allowance is not None and allowance.billed
    included = allowance.included if allowance is not None else 0
    total = db.session.execute(
        ADD,
        {
            "organization_id": key[0],
            "meter": key[1],
            "period_start": key[2],
            "period_end": events[0].period_end,
            "added": added,
            "fresh_billable": max(0, added - included) if billed else 0,
            "billed": int(billed),
            "included": included,
        },
    ).scalar_one()
    return int(total) - int(added)


def _settle(ids: list[int], billable: Any) -> None:
    for start in range(0, len(ids), UPDATE_CHUNK):
        chunk = ids[start : start + UPDATE_CHUNK]
        db.session.execute(update(UsageEvent).where(UsageEvent.id.in_(chunk)).values(billable_quantity=billable))


def _warn_on_crossing(key: _Key, meter_name: str, allowance: MeterAllowance, before: int, events: list[Any]) -> None:
    """A soft limit's total crossing 80% or 100% of what is included: a domain event whose outbox
    consumer emails the owner, saying what was used with the event that crossed it. The total only
    grows, under its row's lock: each threshold is crossed once a period."""
    organization_id, meter, period_start = key
    thresholds = [(percent, math.ceil(allowance.included * percent / 100)) for percent in WARNING_PERCENTS]
    used = before
    for event in events:
        old, used = used, used + event.quantity
        for percent, threshold in thresholds:
            if old < threshold <= used:
                domain_events.record(
                    THRESHOLD_EVENT,
                    organization_id=organization_id,
                    source=f"usage:{meter}",
                    meter=meter,
                    meter_name=meter_name,
                    percent=percent,
                    included=allowance.included,
                    used=used,
                    period_start=period_start.isoformat(),
                    period_end=event.period_end.isoformat(),
                )
