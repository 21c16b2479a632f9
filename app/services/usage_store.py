"""Storing validated usage set-based: a whole batch (or one event) in one statement, whatever its size.
app/services/usage.py validates each event and calls `store` inside its transaction; the caller commits.

Storing does not count. Every event is inserted by one INSERT ... ON CONFLICT (organization_id,
idempotency_key) DO NOTHING RETURNING (PostgreSQL: one event's values, or the batch as one
`jsonb_to_recordset` parameter) with its billable quantity NULL: "not tallied yet". The worker's tally
(app/services/usage_tally.py) adds the events to their period's total (usage_period_total) one row
lock at a time, decides each one's billable part and warns at soft limits. So concurrent requests of
one organization never wait for each other on a counter row, and a request costs what the bare insert
costs; the billing page and hard limits add the untallied events to the tallied total.

Only when the database refused some events as already stored (a key repeated from an earlier request,
or sent by a concurrent one) are those read to answer them (a duplicate, or 409 when the key was used
for other usage).

A hard limit must be judged as the usage is stored, so a meter the tier hard-limits is counted here:
its period's row is locked (created at 0), the events not tallied yet are added to its total, each
event is judged in order (one that would pass the limit is refused, UsageLimitReached, and not stored),
and the accepted ones are added to the row and stored already tallied (billable 0: a hard limit bills
no overage). The row lock orders this against the tally and other recordings, in a fixed order of
rows so two batches never deadlock.

The organization's state (Account) comes from the caller. When it was remembered from an earlier
request (the usage API's keys, app/services/api_keys.py) rather than read now, the insert itself
checks that the key is still live and the organization unchanged (it inserts nothing when not), and
AccountChanged is raised, with nothing written.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, cast

import msgspec
from sqlalchemy import bindparam, func, select, text

from app.extensions import db
from app.models import Organization, UsageEvent
from app.models.types import Timestamp
from app.prepared import PreparedStatement
from app.services.billing_common import portable_insert
from app.services.plans import Meter, MeterAllowance


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


class RecordedUsage(NamedTuple):
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


Outcome = RecordedUsage | Refused | Reused


@dataclass
class _Group:
    meter: Meter
    allowance: MeterAllowance
    period: Period
    events: list[Candidate] = field(default_factory=list)
    before: int = 0  # the period's usage before this batch (read under the row's lock)
    counted: list[Candidate] = field(default_factory=list)  # the events within the limit, added to the row


# --- statements ---------------------------------------------------------------------------------------

_TIMES = (bindparam("period_start", type_=Timestamp), bindparam("period_end", type_=Timestamp))
# The live check of a remembered account: a row when the key is live and the organization as
# remembered (or when the account was read now: key_id NULL).
_LIVE = (
    "SELECT 1 AS live WHERE CAST(:key_id AS bigint) IS NULL OR EXISTS (SELECT 1 FROM api_key k"
    " JOIN organization o ON o.id = k.organization_id WHERE k.id = :key_id AND k.revoked_at IS NULL"
    " AND o.id = :organization_id AND o.tier IS NOT DISTINCT FROM CAST(:tier AS text)"
    " AND o.billing_status = :billing_status"
    " AND o.current_period_end IS NOT DISTINCT FROM CAST(:current_period_end AS timestamptz))"
)
LIVE = text(_LIVE).bindparams(bindparam("current_period_end", type_=Timestamp))
_COLUMNS = (
    "INSERT INTO usage_event (organization_id, meter, quantity, billable_quantity, idempotency_key, occurred_at,"
    " period_start, period_end, recorded_at)"
)
_TYPES = {
    "key_id": "bigint",
    "organization_id": "bigint",
    "tier": "text",
    "billing_status": "text",
    "current_period_end": "timestamptz",
    "meter": "text",
    "quantity": "bigint",
    "key": "text",
    "at": "timestamptz",
    "period_start": "timestamptz",
    "period_end": "timestamptz",
    "now": "timestamptz",
    "events": "jsonb",
}
# PostgreSQL, one event not tallied yet (the usage API's usual request), inserted only if `live`.
# Prepared once per connection (app/prepared.py): planning this statement costs ten times running it.
INSERT_ONE = PreparedStatement(
    "usage_insert_one",
    "WITH live AS (" + _LIVE + ") " + _COLUMNS + " SELECT :organization_id, :meter, :quantity, NULL, :key, :at,"  # noqa: S608
    " :period_start, :period_end, :now FROM live"
    " ON CONFLICT (organization_id, idempotency_key) DO NOTHING RETURNING idempotency_key, id",
    _TYPES,
)
ROWS_ENCODER = msgspec.json.Encoder()
# PostgreSQL, a batch's events not tallied yet, as one JSON parameter (the store-only anchor's shape).
INSERT_MANY = PreparedStatement(
    "usage_insert_many",
    "WITH live AS (" + _LIVE + ") " + _COLUMNS + " SELECT :organization_id, e.meter, e.quantity, NULL, e.key,"  # noqa: S608
    " coalesce(e.at, :now), coalesce(e.starts, :period_start), coalesce(e.ends, :period_end), :now"
    " FROM jsonb_to_recordset(:events) AS e(meter text, quantity bigint, key text,"
    " at timestamptz, starts timestamptz, ends timestamptz) CROSS JOIN live"
    " ON CONFLICT (organization_id, idempotency_key) DO NOTHING RETURNING idempotency_key, id",
    _TYPES,
)
# A hard-limited meter's row, locked (created at 0) without changing it: its tallied total.
LOCK = text(
    "INSERT INTO usage_period_total (organization_id, meter, period_start, period_end, total, billable)"
    " VALUES (:organization_id, :meter, :period_start, :period_end, 0, 0)"
    " ON CONFLICT (organization_id, meter, period_start) DO UPDATE SET total = usage_period_total.total"
    " RETURNING total"
).bindparams(*_TIMES)
# The events of a meter and period not tallied yet. Read after LOCK, in a statement of its own: it sees
# what a tally that held the row before committed (READ COMMITTED takes a snapshot per statement).
UNTALLIED = select(func.coalesce(func.sum(UsageEvent.quantity), 0)).where(
    UsageEvent.organization_id == bindparam("organization_id"),
    UsageEvent.meter == bindparam("meter"),
    UsageEvent.period_start == bindparam("period_start", type_=Timestamp),
    UsageEvent.billable_quantity.is_(None),
)
ADD = text(
    "UPDATE usage_period_total SET total = total + :added"
    " WHERE organization_id = :organization_id AND meter = :meter AND period_start = :period_start"
).bindparams(_TIMES[0])
ACCOUNT = select(Organization.tier, Organization.billing_status, Organization.current_period_end).where(
    Organization.id == bindparam("organization_id")
)


def is_postgresql() -> bool:
    """Whether the session's bind (the engine the statements run on) is PostgreSQL's. Asked of the bind,
    not of session.connection(), which walks the session's transaction state on every call."""
    return str(db.session.get_bind().dialect.name) == "postgresql"


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
    outcomes: dict[int, Outcome] = {}
    stored_before: dict[str, Any] = {}
    untallied = [c for c in candidates if c.allowance.overage != "hard_limit"]
    limited: dict[tuple[str, datetime], _Group] = {}
    for candidate in candidates:
        if candidate.allowance.overage == "hard_limit":
            group_key = (candidate.meter.key, candidate.period.start)
            if group_key not in limited:
                limited[group_key] = _Group(candidate.meter, candidate.allowance, candidate.period)
            limited[group_key].events.append(candidate)
    inserted: dict[str, int] = {}
    if untallied:
        inserted = _insert_untallied(organization_id, account, untallied, now)  # checks the account
    elif limited:
        check(organization_id, account)
    tallied: list[Candidate] = []
    for group_key in sorted(limited):  # one order for every batch: rows are locked without deadlocks
        group = limited[group_key]
        _judge(organization_id, group, outcomes, stored_before)
        tallied += group.counted
    if tallied:
        inserted.update(_insert_tallied(organization_id, tallied, now))
        _uncount_repeats(organization_id, limited.values(), inserted)
    missing = [event.key for event in (*untallied, *tallied) if event.key not in inserted]
    if missing:
        stored_before.update(_stored(organization_id, missing))
    for event in (*untallied, *tallied):
        if event.key in inserted:
            outcomes[event.place] = RecordedUsage(inserted[event.key], event.meter.key, event.quantity, event.at, False)
        else:
            outcomes[event.place] = _repeat(event, stored_before[event.key])
    return outcomes


def _insert_untallied(
    organization_id: int, account: Account, events: Sequence[Candidate], now: datetime
) -> dict[str, int]:
    """Insert events not tallied yet (checking a remembered account in the same statement); the id of
    each one inserted, by key. AccountChanged (nothing written) when the account is out of date."""
    names = _account_names(organization_id, account)
    if is_postgresql():
        if len(events) == 1:
            [event] = events
            parameters = {
                **names,
                "meter": event.meter.key,
                "quantity": event.quantity,
                "key": event.key,
                "at": event.at,
                "period_start": event.period.start,
                "period_end": event.period.end,
                "now": now,
            }
            result = INSERT_ONE.execute(db.session.connection(), parameters)
        else:
            # An event happening now, in the batch's first period (nearly all), carries neither time:
            # the statement takes :now and the period's bounds (less JSON to write and to parse).
            period = events[0].period
            rows = []
            for e in events:
                row: dict[str, Any] = {"meter": e.meter.key, "quantity": e.quantity, "key": e.key}
                if e.at is not now:
                    row["at"] = iso(e.at)
                if e.period is not period:
                    row["starts"], row["ends"] = iso(e.period.start), iso(e.period.end)
                rows.append(row)
            parameters = {**names, "now": now, "period_start": period.start, "period_end": period.end}
            events_json = ROWS_ENCODER.encode(rows).decode()  # msgspec: about a third of json.dumps' time
            result = INSERT_MANY.execute(db.session.connection(), {**parameters, "events": events_json})
        inserted: dict[str, int] = dict(cast("list[tuple[str, int]]", result.all()))  # RETURNING idempotency_key, id
        if not inserted and account.key_id is not None:
            check(organization_id, account)  # nothing inserted: all repeats, or the key is not live?
        return inserted
    check(organization_id, account)  # SQLite (a development run): the check, then the insert
    return _portable_insert(organization_id, [(event, None) for event in events], now)


def _insert_tallied(organization_id: int, events: Sequence[Candidate], now: datetime) -> dict[str, int]:
    """Insert events a hard limit counted as they were judged (billable 0: a hard limit bills nothing)."""
    return _portable_insert(organization_id, [(event, 0) for event in events], now)


def _portable_insert(
    organization_id: int, rows: Sequence[tuple[Candidate, int | None]], now: datetime
) -> dict[str, int]:
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
                    "period_end": event.period.end,
                    "recorded_at": now,
                }
                for event, billable in rows
            ]
        )
        .on_conflict_do_nothing(index_elements=["organization_id", "idempotency_key"])
        .returning(UsageEvent.idempotency_key, UsageEvent.id)
    )
    return dict(cast("list[tuple[str, int]]", db.session.execute(statement).all()))


def _judge(organization_id: int, group: _Group, outcomes: dict[int, Outcome], stored_before: dict[str, Any]) -> None:
    """A hard-limited meter's events, judged in order under its period's row lock: those that fit are
    counted (added to the row), the others refused."""
    limit = group.allowance.included
    names = {
        "organization_id": organization_id,
        "meter": group.meter.key,
        "period_start": group.period.start,
        "period_end": group.period.end,
    }
    tallied_total = db.session.execute(LOCK, names).scalar_one()
    group.before = int(tallied_total) + int(db.session.execute(UNTALLIED, names).scalar_one())
    stored_before.update(_stored(organization_id, [event.key for event in group.events]))
    used = group.before
    for event in group.events:
        if event.key in stored_before:  # stored before: answered as a repeat, not counted
            outcomes[event.place] = _repeat(event, stored_before[event.key])
        elif used + event.quantity > limit:
            outcomes[event.place] = Refused(group.meter, limit=limit, used=used, resets_at=group.period.end)
        else:
            used += event.quantity
            group.counted.append(event)
    if used > group.before:
        db.session.execute(ADD, {**names, "added": used - group.before})


def _uncount_repeats(organization_id: int, groups: Iterable[_Group], inserted: dict[str, int]) -> None:
    """Counted events the insert found already stored (a concurrent request stored the key first):
    take them out of their row again."""
    for group in groups:
        repeated = sum(event.quantity for event in group.counted if event.key not in inserted)
        if repeated:
            db.session.execute(
                ADD,
                {
                    "organization_id": organization_id,
                    "meter": group.meter.key,
                    "period_start": group.period.start,
                    "added": -repeated,
                },
            )
            group.counted = [event for event in group.counted if event.key in inserted]


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
    return RecordedUsage(first.id, first.meter, first.quantity, first.occurred_at, duplicate=True)
