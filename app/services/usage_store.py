"""Storing validated usage set-based: a whole batch (or one event) in a few statements, whatever its size.
app/services/usage.py validates each event and calls `store` inside its transaction; the caller commits.

Per (organization, meter, period) the batch touches, in a fixed order (so two batches never deadlock on
the counters):

1. One upsert of the counter row (usage_period_total) adding the quantity of the group's events,
   RETURNING the new total: the row is locked from here to the commit, and the part of the added quantity
   past what the tier includes (its billable part) is computed by the statement from the total it found.
   With a hard limit the statement adds only when the whole group fits (`WHERE total + added <= limit`);
   when it does not, the row (locked all the same) is read, the events already stored are looked up, and
   each event is judged in order: one that would pass the limit is refused (UsageLimitReached) and is not
   stored; the others are, and their sum is added.
2. One INSERT ... ON CONFLICT (organization_id, idempotency_key) DO NOTHING RETURNING for all the batch's
   events of all groups (PostgreSQL: one parameter, `jsonb_to_recordset`), each with its billable quantity,
   computed from the total before the batch and the running sum in the batch's order.
3. Only if the database refused some events as already stored (a key repeated from an earlier request, or
   sent by a concurrent one; the counter row's lock makes those of the same meter and period wait for each
   other, so they see each other's events): the counter is corrected to the events actually inserted and
   their billable quantities recomputed (one UPDATE each), and the stored events are read to answer the
   repeats (a duplicate, or 409 when the key was used for other usage).

On PostgreSQL a batch of one meter and period without a hard limit (the common case) does 1 and 2 in
one statement (COUNT_AND_INSERT). So a batch costs one statement (two on SQLite) whatever its size, and
no savepoint: nothing is written that has to be undone. The counter's total always equals the quantity
of the stored events, and its billable part the sum of their billable quantities.

The organization's state (Account) comes from the caller. When it was remembered from an earlier
request (the usage API's keys, app/services/api_keys.py) rather than read now, the first statement
checks that the key is still live and the organization unchanged, and AccountChanged is raised, with
nothing written, when not.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, select, text, update

from app.extensions import db
from app.models import Organization, UsageEvent
from app.models.types import Timestamp
from app.services import domain_events
from app.services.billing_common import portable_insert
from app.services.plans import Meter, MeterAllowance

WARNING_PERCENTS = (80, 100)
THRESHOLD_EVENT = "usage.threshold_reached"


class Account(NamedTuple):
    """What recording needs of the organization. Read in the request's transaction (key_id None), or
    remembered with the API key `key_id` from an earlier request: then storing checks, in its first
    statement, that the key is still live and the organization still as remembered, and raises
    AccountChanged (nothing written) when not."""

    tier: str | None
    billing_status: str
    current_period_end: datetime | None
    key_id: int | None = None


class AccountChanged(Exception):
    """The remembered key was revoked, or its organization's plan, status or period changed: read
    them again and record again."""


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime


class Candidate(NamedTuple):
    """A validated event of the batch, not yet stored (at most one per idempotency key in a `store`)."""

    place: int  # its index in the request
    meter: Meter
    allowance: MeterAllowance
    quantity: int
    key: str
    at: datetime
    period: Period


class Stored(NamedTuple):
    event_id: int
    meter: str
    quantity: int
    occurred_at: datetime
    duplicate: bool


@dataclass(frozen=True)
class Refused:
    """A hard limit refused the event: limit, what was used, and when the period resets."""

    meter: Meter
    limit: int
    used: int
    resets_at: datetime


@dataclass(frozen=True)
class Reused:
    """The key was stored before for other usage."""

    key: str
    quantity: int
    meter: str


Outcome = Stored | Refused | Reused


@dataclass
class _Group:
    meter: Meter
    allowance: MeterAllowance
    period: Period
    events: list[Candidate] = field(default_factory=list)
    before: int = 0  # the counter's total before this batch (read under the row's lock)
    counted: list[Candidate] = field(default_factory=list)  # the events whose quantity the counter holds


# --- statements (portable: PostgreSQL and SQLite, but INSERT_EVENTS) -----------------------------------

# The billable part of the added quantity (excluded.total) on top of the row's total: what passes
# `included`. In ON CONFLICT ... DO UPDATE SET the row's columns hold what they held before the statement.
_TIMES = (bindparam("period_start", type_=Timestamp), bindparam("period_end", type_=Timestamp))
ADD = text(
    "INSERT INTO usage_period_total (organization_id, meter, period_start, period_end, total, billable)"
    " VALUES (:organization_id, :meter, :period_start, :period_end, :added, :fresh_billable)"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE"
    " SET total = usage_period_total.total + excluded.total,"
    " billable = usage_period_total.billable + CASE WHEN :billed = 0 THEN 0"
    " WHEN usage_period_total.total >= :included THEN excluded.total"
    " WHEN usage_period_total.total + excluded.total <= :included THEN 0"
    " ELSE usage_period_total.total + excluded.total - :included END"
    " RETURNING total"
).bindparams(*_TIMES)
ADD_WITHIN_LIMIT = text(
    "INSERT INTO usage_period_total (organization_id, meter, period_start, period_end, total, billable)"
    " VALUES (:organization_id, :meter, :period_start, :period_end, :added, 0)"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE"
    " SET total = usage_period_total.total + excluded.total"
    " WHERE usage_period_total.total + excluded.total <= :limit RETURNING total"
).bindparams(*_TIMES)
# Locks the row (creating it at 0) without changing it, and returns its total. (PostgreSQL locks the
# conflicting row of ON CONFLICT DO UPDATE even where its WHERE is false, as ADD_WITHIN_LIMIT's may be.)
LOCK = text(
    "INSERT INTO usage_period_total (organization_id, meter, period_start, period_end, total, billable)"
    " VALUES (:organization_id, :meter, :period_start, :period_end, 0, 0)"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE SET total = usage_period_total.total"
    " RETURNING total"
).bindparams(*_TIMES)
CORRECT = text(
    "UPDATE usage_period_total SET total = total + :total, billable = billable + :billable"
    " WHERE organization_id = :organization_id AND meter = :meter AND period_start = :period_start"
).bindparams(_TIMES[0])
# PostgreSQL: the batch's events as one JSON parameter (the store-only anchor's shape).
INSERT_EVENTS = text(
    "INSERT INTO usage_event (organization_id, meter, quantity, billable_quantity, idempotency_key, occurred_at,"
    " period_start, recorded_at) SELECT :organization_id, e.meter, e.quantity, e.billable, e.key, e.at, e.period,"
    " :now FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS e(meter text, quantity bigint, billable bigint,"
    " key text, at timestamptz, period timestamptz)"
    " ON CONFLICT (organization_id, idempotency_key) DO NOTHING RETURNING id, idempotency_key"
).bindparams(bindparam("now", type_=Timestamp))
# PostgreSQL, a batch of one meter and period without a hard limit (the common case): ADD and the
# events' insert in one statement. The counter's upsert returns the total before the batch, from which
# each event's billable part is computed in the insert (its running total `after`, in the batch's order,
# past `included`); the final SELECT returns that total even when every event was already stored.
# With a remembered account the counter's upsert happens only if `live` holds a row (the key is live and
# the organization as remembered); otherwise nothing is written and the statement returns no row.
_LIVE = (
    "SELECT 1 AS live WHERE CAST(:key_id AS bigint) IS NULL OR EXISTS (SELECT 1 FROM api_key k"
    " JOIN organization o ON o.id = k.organization_id WHERE k.id = :key_id AND k.revoked_at IS NULL"
    " AND o.id = :organization_id AND o.tier IS NOT DISTINCT FROM CAST(:tier AS text)"
    " AND o.billing_status = :billing_status"
    " AND o.current_period_end IS NOT DISTINCT FROM CAST(:current_period_end AS timestamptz))"
)
_ACCOUNT_TIMES = (*_TIMES, bindparam("current_period_end", type_=Timestamp))
LIVE = text(_LIVE).bindparams(_ACCOUNT_TIMES[2])
COUNT_AND_INSERT = text(
    "WITH live AS (" + _LIVE + "), counter AS (INSERT INTO usage_period_total AS t"  # noqa: S608 (constants)
    " (organization_id, meter, period_start, period_end, total, billable)"
    " SELECT :organization_id, :meter, :period_start, :period_end, :added, :fresh_billable FROM live"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE SET total = t.total + excluded.total,"
    " billable = t.billable + CASE WHEN :billed = 0 THEN 0 WHEN t.total >= :included THEN excluded.total"
    " WHEN t.total + excluded.total <= :included THEN 0 ELSE t.total + excluded.total - :included END"
    " RETURNING t.total - :added AS before),"
    " inserted AS (INSERT INTO usage_event (organization_id, meter, quantity, billable_quantity, idempotency_key,"
    " occurred_at, period_start, recorded_at) SELECT :organization_id, :meter, e.quantity,"
    " CASE WHEN :billed = 0 THEN 0 ELSE greatest(0, c.before + e.after"
    " - greatest(c.before + e.after - e.quantity, :included)) END, e.key, e.at, :period_start, :now"
    " FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS e(quantity bigint, key text, at timestamptz, after bigint)"
    " CROSS JOIN counter c ORDER BY e.after, e.key"
    " ON CONFLICT (organization_id, idempotency_key) DO NOTHING RETURNING id, idempotency_key)"
    " SELECT c.before, i.id, i.idempotency_key FROM counter c LEFT JOIN inserted i ON true"
).bindparams(*_ACCOUNT_TIMES, bindparam("now", type_=Timestamp))
ACCOUNT = select(Organization.tier, Organization.billing_status, Organization.current_period_end).where(
    Organization.id == bindparam("organization_id")
)


def _dialect() -> str:
    return str(db.session.get_bind().dialect.name)


def _execute(statement: Any, params: dict[str, Any]) -> Any:
    """A Core statement on the session's connection (in its transaction), without the ORM's execution."""
    return db.session.connection().execute(statement, params)


@functools.lru_cache(maxsize=1024)
def iso(moment: datetime) -> str:
    return moment.isoformat()  # a batch's events mostly share one time (now) and one period


def account(organization_id: int) -> Account | None:
    row = db.session.execute(ACCOUNT, {"organization_id": organization_id}).first()
    return None if row is None else Account(row.tier, row.billing_status, row.current_period_end)


# --- storing ------------------------------------------------------------------------------------------


def store(organization_id: int, account: Account, candidates: Sequence[Candidate], now: datetime) -> dict[int, Outcome]:
    """Store the candidates (distinct idempotency keys) in the open transaction; the outcome of each by
    its place in the request. Nothing refused is written. AccountChanged: a remembered account is out of date."""
    groups: dict[tuple[str, datetime], _Group] = {}
    for candidate in candidates:
        group_key = (candidate.meter.key, candidate.period.start)
        if group_key not in groups:
            groups[group_key] = _Group(candidate.meter, candidate.allowance, candidate.period)
        groups[group_key].events.append(candidate)
    outcomes: dict[int, Outcome] = {}
    stored_before: dict[str, Any] = {}
    rows: list[tuple[Candidate, int]] = []  # (event, its billable quantity)
    [only] = groups.values() if len(groups) == 1 else [None]
    if only is not None and only.allowance.overage != "hard_limit" and _dialect() == "postgresql":
        inserted = _count_and_insert(organization_id, account, only, now)  # the common case: one statement
        rows = list(zip(only.counted, _billable(only, only.counted), strict=True))
    else:
        check(organization_id, account)
        for group_key in sorted(groups):  # one order for every batch: counters are locked without deadlocks
            group = groups[group_key]
            _count(organization_id, group, outcomes, stored_before)
            rows.extend(zip(group.counted, _billable(group, group.counted), strict=True))
        inserted = _insert(organization_id, rows, now) if rows else {}
    missing = [event for event, _ in rows if event.key not in inserted]
    if missing:
        _correct(organization_id, groups.values(), inserted, rows)
        stored_before.update(_stored(organization_id, [event.key for event in missing]))
    for event, _ in rows:
        if event.key in inserted:
            outcomes[event.place] = Stored(inserted[event.key], event.meter.key, event.quantity, event.at, False)
        else:
            outcomes[event.place] = _repeat(event, stored_before[event.key])
    for group in groups.values():
        if group.allowance.overage == "soft_limit":
            after = group.before + sum(event.quantity for event in group.counted if event.key in inserted)
            _warn_on_crossing(organization_id, group, group.before, after)
    return outcomes


def _count(organization_id: int, group: _Group, outcomes: dict[int, Outcome], stored_before: dict[str, Any]) -> None:
    """Add the group's quantity to its counter (locking the row), deciding which events count."""
    allowance, included = group.allowance, group.allowance.included
    added = sum(event.quantity for event in group.events)
    names = {
        "organization_id": organization_id,
        "meter": group.meter.key,
        "period_start": group.period.start,
        "period_end": group.period.end,
    }
    if allowance.overage != "hard_limit":
        fresh_billable = max(0, added - included) if allowance.billed else 0
        values = {**names, "added": added, "fresh_billable": fresh_billable, "billed": int(allowance.billed)}
        total = _execute(ADD, {**values, "included": included}).scalar_one()
        group.before, group.counted = total - added, list(group.events)
        return
    if added <= included:
        total = _execute(ADD_WITHIN_LIMIT, {**names, "added": added, "limit": included}).scalar()
        if total is not None:
            group.before, group.counted = total - added, list(group.events)
            return
    # The group does not fit as a whole: judge each event in order, under the row's lock.
    group.before = db.session.execute(LOCK, names).scalar_one()
    stored_before.update(_stored(organization_id, [event.key for event in group.events]))
    used = group.before
    for event in group.events:
        if event.key in stored_before:  # stored before: answered as a repeat, not counted
            outcomes[event.place] = _repeat(event, stored_before[event.key])
        elif used + event.quantity > included:
            outcomes[event.place] = Refused(group.meter, limit=included, used=used, resets_at=group.period.end)
        else:
            used += event.quantity
            group.counted.append(event)
    if used > group.before:
        db.session.execute(CORRECT, {**names, "total": used - group.before, "billable": 0})


def check(organization_id: int, account: Account) -> None:
    """AccountChanged if the account is remembered and out of date (one statement; none if read now)."""
    if account.key_id is not None and _execute(LIVE, _account_names(organization_id, account)).first() is None:
        raise AccountChanged


def _account_names(organization_id: int, account: Account) -> dict[str, Any]:
    return {
        "organization_id": organization_id,
        "key_id": account.key_id,
        "tier": account.tier,
        "billing_status": account.billing_status,
        "current_period_end": account.current_period_end,
    }


def _count_and_insert(organization_id: int, account: Account, group: _Group, now: datetime) -> dict[str, int]:
    """PostgreSQL, one meter and period, no hard limit: COUNT_AND_INSERT; the inserted events' ids by key."""
    allowance, included, added = group.allowance, group.allowance.included, 0
    events = []
    for event in group.events:
        added += event.quantity
        events.append({"quantity": event.quantity, "key": event.key, "at": iso(event.at), "after": added})
    result = _execute(
        COUNT_AND_INSERT,
        {
            **_account_names(organization_id, account),
            "meter": group.meter.key,
            "period_start": group.period.start,
            "period_end": group.period.end,
            "added": added,
            "fresh_billable": max(0, added - included) if allowance.billed else 0,
            "billed": int(allowance.billed),
            "included": included,
            "now": now,
            "events": json.dumps(events),
        },
    )
    inserted, counted = {}, False
    for before, event_id, key in result:
        group.before, counted = before, True
        if key is not None:
            inserted[key] = event_id
    if not counted:  # `live` held no row: nothing was written
        raise AccountChanged
    group.counted = list(group.events)
    return inserted


def _billable(group: _Group, events: Iterable[Candidate]) -> list[int]:
    """Each event's part past what the tier includes, in order, from the total before the batch."""
    if not group.allowance.billed:
        return [0 for _ in events]
    included, total, parts = group.allowance.included, group.before, []
    for event in events:
        parts.append(max(0, total + event.quantity - max(total, included)))
        total += event.quantity
    return parts


def _insert(organization_id: int, rows: list[tuple[Candidate, int]], now: datetime) -> dict[str, int]:
    """Insert the events; the id of each one inserted, by key (one already stored is left out)."""
    if _dialect() == "postgresql":
        events = json.dumps(
            [
                {
                    "meter": event.meter.key,
                    "quantity": event.quantity,
                    "billable": billable,
                    "key": event.key,
                    "at": iso(event.at),
                    "period": iso(event.period.start),
                }
                for event, billable in rows
            ]
        )
        result = _execute(INSERT_EVENTS, {"organization_id": organization_id, "now": now, "events": events})
    else:  # SQLite (a development run): the same insert as a multi-row VALUES
        statement = (
            portable_insert(UsageEvent)
            .values(
                [
                    {
                        "organization_id": organization_id,
                        "meter": event.meter.key,
                        "quantity": event.quantity,
                        "billable_quantity": billable,
                        "idempotency_key": event.key,
                        "occurred_at": event.at,
                        "period_start": event.period.start,
                        "recorded_at": now,
                    }
                    for event, billable in rows
                ]
            )
            .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
            .returning(UsageEvent.id, UsageEvent.idempotency_key)
        )
        result = db.session.execute(statement)
    return {key: event_id for event_id, key in result}


def _correct(
    organization_id: int, groups: Iterable[_Group], inserted: dict[str, int], rows: list[tuple[Candidate, int]]
) -> None:
    """Some counted events were already stored: count only those inserted, and recompute their billable parts."""
    written = {event.key: billable for event, billable in rows}
    for group in groups:
        kept = [event for event in group.counted if event.key in inserted]
        if len(kept) == len(group.counted):
            continue
        billables = _billable(group, kept)
        for event, billable in zip(kept, billables, strict=True):
            if billable != written[event.key]:
                db.session.execute(
                    update(UsageEvent).where(UsageEvent.id == inserted[event.key]).values(billable_quantity=billable)
                )
        db.session.execute(
            CORRECT,
            {
                "organization_id": organization_id,
                "meter": group.meter.key,
                "period_start": group.period.start,
                "total": sum(event.quantity for event in kept) - sum(event.quantity for event in group.counted),
                "billable": sum(billables) - sum(written[event.key] for event in group.counted),
            },
        )
        group.counted = kept


def _stored(organization_id: int, keys: list[str]) -> dict[str, Any]:
    """The stored events with these keys, by key."""
    rows = db.session.execute(
        select(
            UsageEvent.id, UsageEvent.meter, UsageEvent.quantity, UsageEvent.occurred_at, UsageEvent.idempotency_key
        ).where(UsageEvent.organization_id == organization_id, UsageEvent.idempotency_key.in_(keys))
    )
    return {row.idempotency_key: row for row in rows}


def _repeat(event: Candidate, first: Any) -> Outcome:
    """A key stored before: acknowledged as that event when it is the same usage, refused otherwise."""
    if first.meter != event.meter.key or first.quantity != event.quantity:
        return Reused(event.key, first.quantity, first.meter)
    return Stored(first.id, first.meter, first.quantity, first.occurred_at, duplicate=True)


def _warn_on_crossing(organization_id: int, group: _Group, old: int, new: int) -> None:
    """A soft limit's counter crossing 80% or 100% of what is included: a domain event whose outbox
    consumer emails the owner. The counter only grows, and is updated under its row's lock, so each
    threshold is crossed once per period."""
    allowance, meter, period = group.allowance, group.meter, group.period
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
