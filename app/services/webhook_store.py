"""The webhook event store: one row per verified delivery, written so that each event is applied at
most once. BillingService.handle_webhook_event drives it; every provider's event table has the shape
of stripe_event (whop_event: the same columns, its event time in `whop_created`), named by the model's
`created_column`. These statements run on every delivery, so each is built once per table and sent as
few times as the guarantees allow (see "Receiving" in docs/system/BILLING.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Insert, Select, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.extensions import db
from app.models import StripeEvent, StripeEventStatus, WhopEvent
from app.models.stripe_event import RECORDED_STATUSES, SETTLED_STATUSES
from app.models.types import utcnow

# The tables a provider's events can live in: one shape, one set of statuses (StripeEventStatus).
EventModel = type[StripeEvent] | type[WhopEvent]
Event = TypeVar("Event", StripeEvent, WhopEvent)


@dataclass(frozen=True)
class VerifiedEvent:
    """A delivery whose signature a provider verified: stored as received, applied from `body`."""

    provider: str
    event_id: str
    type: str
    created: int
    livemode: bool
    api_version: str | None
    raw: str
    body: dict[str, Any]

    @property
    def source(self) -> str:
        return f"{self.provider}:{self.event_id}"


@dataclass(frozen=True)
class _Statements:
    status: Select[Any]
    claim: Insert
    fail: Insert


@cache
def _statements(model: EventModel, dialect: str) -> _Statements:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    row = {
        "event_id": bindparam("p_event_id"),
        "type": bindparam("p_type"),
        "api_version": bindparam("p_api_version"),
        "livemode": bindparam("p_livemode"),
        model.created_column: bindparam("p_created"),
        "payload": bindparam("p_payload"),
        "received_at": bindparam("p_now"),
        "processed_at": bindparam("p_now"),
        "attempts": 1,
    }
    # An earlier delivery that failed is taken over; one that is queued or settled is left alone.
    unsettled = model.status.not_in(RECORDED_STATUSES)
    new_row = insert(model).values(
        **row,
        status=bindparam("p_status"),
        outcome=bindparam("p_outcome"),
        last_error=bindparam("p_error"),
        object_key=bindparam("p_object_key"),
    )
    claim = new_row.on_conflict_do_update(
        index_elements=[model.event_id],
        set_={
            "attempts": model.attempts + 1,
            "status": new_row.excluded.status,
            "outcome": new_row.excluded.outcome,
            "last_error": new_row.excluded.last_error,
            "object_key": new_row.excluded.object_key,
            "processed_at": new_row.excluded.processed_at,
        },
        where=unsettled,
    ).returning(model.id)
    failed_row = insert(model).values(
        **row, status=StripeEventStatus.FAILED, last_error=bindparam("p_error"), object_key=None
    )
    fail = failed_row.on_conflict_do_update(
        index_elements=[model.event_id],
        set_={
            "attempts": model.attempts + 1,
            "status": StripeEventStatus.FAILED,
            "last_error": failed_row.excluded.last_error,
            "processed_at": failed_row.excluded.processed_at,
        },
        where=unsettled,
    )
    return _Statements(
        status=select(model.status).where(model.event_id == bindparam("p_event_id")),
        claim=claim,
        fail=fail,
    )


# Intake on PostgreSQL, in one statement sent on the autocommit connection (so it is its own
# transaction: one round trip, no BEGIN or COMMIT of its own): store a new event (or take over one
# that failed). That is all: the stored pending event is the unit of work, and the workers find it
# (webhook_intake.queue_unclaimed, every WEBHOOK_DISPATCH_SECONDS in each worker). No job is inserted
# and nothing is NOTIFYed here: a NOTIFY takes PostgreSQL's one notification lock from its commit's
# WAL flush to its end, so every delivery would commit after the one before it (measured: 2.4x slower
# than the bare insert at 16 connections; procrastinate's job insert NOTIFYs too, and more).
# A duplicate inserts nothing, locks nothing and writes nothing: both probes of the event id find it
# and stop. It is prepared once per connection (PREPARE): planning it would cost more than running it.
_INTAKE_PARAMETERS = (
    ("event_id", "text"),
    ("type", "text"),
    ("api_version", "text"),
    ("livemode", "boolean"),
    ("created", "bigint"),
    ("payload", "text"),
    ("now", "timestamptz"),
    ("status", "text"),
    ("outcome", "text"),
    ("error", "text"),
    ("object_key", "text"),
)
_INTAKE = """
WITH inserted AS (
    INSERT INTO {table} AS e (event_id, type, api_version, livemode, {created}, payload, received_at,
                              processed_at, attempts, status, outcome, last_error, object_key)
    SELECT $event_id, $type, $api_version, $livemode, $created, $payload, $now, $now, 1,
           $status, $outcome, $error, $object_key
    WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE event_id = $event_id)  -- a duplicate stops here
    ON CONFLICT (event_id) DO NOTHING  -- a concurrent delivery of the same event
    RETURNING e.id
), retaken AS (
    UPDATE {table} AS e SET attempts = e.attempts + 1, status = $status, outcome = $outcome,
        last_error = $error, object_key = $object_key, processed_at = $now
    WHERE e.event_id = $event_id AND e.status = 'failed'
    RETURNING e.id
)
SELECT (SELECT id FROM inserted UNION ALL SELECT id FROM retaken LIMIT 1) AS id,
       (SELECT status FROM {table} WHERE event_id = $event_id) AS existing  -- a duplicate's status
"""


@cache
def _intake_prepare(model: EventModel) -> tuple[str, str]:
    """(name, PREPARE statement) of the intake statement for one table."""
    name = f"ledgerline_intake_v2_{model.__tablename__}"
    statement = _INTAKE.format(table=model.__tablename__, created=model.created_column)
    # Longest names first, so $event_id is not read as $event plus _id.
    for position, (parameter, _) in sorted(enumerate(_INTAKE_PARAMETERS, start=1), key=lambda item: -len(item[1][0])):
        statement = statement.replace(f"${parameter}", f"${position}")
    types = ", ".join(kind for _, kind in _INTAKE_PARAMETERS)
    return name, f"PREPARE {name} ({types}) AS {statement}"


def intake(
    model: EventModel,
    event: VerifiedEvent,
    status: StripeEventStatus,
    *,
    outcome: str | None,
    error: str | None,
    object_key: str | None,
) -> tuple[int | None, str | None]:
    """Store a delivery in one statement that is its own transaction (PostgreSQL). Returns the row
    id, or None for a duplicate (stored, queued or settled already, or stored by a concurrent
    delivery this one waited for), with the status a duplicate was found in (None when it was stored
    by this statement or by a concurrent one)."""
    values = {
        "event_id": event.event_id,
        "type": event.type,
        "api_version": event.api_version,
        "livemode": event.livemode,
        "created": event.created,
        "payload": event.raw,
        "now": utcnow(),
        "status": str(status),
        "outcome": _short(outcome),
        "error": error[:2000] if error else None,
        "object_key": object_key,
    }
    name, prepare = _intake_prepare(model)
    placeholders = ", ".join(["%s"] * len(_INTAKE_PARAMETERS))
    with db.engines["autocommit"].connect() as connection:
        prepared: set[str] = connection.info.setdefault("prepared", set())
        if name not in prepared:
            connection.exec_driver_sql(prepare)
            prepared.add(name)
        row = connection.exec_driver_sql(
            f"EXECUTE {name} ({placeholders})", tuple(values[parameter] for parameter, _ in _INTAKE_PARAMETERS)
        ).first()
    return (None, None) if row is None else (row[0], row[1])


def _for(model: EventModel) -> _Statements:
    return _statements(model, db.engine.dialect.name)


def _row(event: VerifiedEvent) -> dict[str, Any]:
    return {
        "p_event_id": event.event_id,
        "p_type": event.type,
        "p_api_version": event.api_version,
        "p_livemode": event.livemode,
        "p_created": event.created,
        "p_payload": event.raw,
        "p_now": utcnow(),
    }


def recent_settled_ids(model: EventModel, limit: int) -> list[str]:
    """The ids of the table's most recently stored settled events (processed or ignored: final), newest
    first: what a new process starts its memory of settled events with."""
    statement = select(model.event_id).where(model.status.in_(SETTLED_STATUSES)).order_by(model.id.desc()).limit(limit)
    try:
        return [str(event_id) for event_id in db.session.execute(statement).scalars()]
    finally:
        db.session.rollback()


def is_recorded(model: EventModel, event_id: str) -> bool:
    """Whether the event is already stored and queued, processed or ignored: one indexed read, outside
    any transaction (autocommit), so a duplicate costs a single round trip and no write."""
    with db.engines["autocommit"].connect() as connection:
        status = connection.execute(_for(model).status, {"p_event_id": event_id}).scalar()
    return status in RECORDED_STATUSES


def claim(
    model: EventModel,
    event: VerifiedEvent,
    status: StripeEventStatus,
    *,
    outcome: str | None = None,
    error: str | None = None,
    object_key: str | None = None,
) -> int | None:
    """Store the delivery in the current transaction (the row is invisible to others until commit,
    and a rollback takes it away): `pending` with the object its job applies, or already `ignored` or
    `failed`. Returns the row id, or None when a concurrent delivery of the same event stored it
    first: the insert waits for that one to finish."""
    parameters = {
        **_row(event),
        "p_status": status,
        "p_outcome": _short(outcome),
        "p_error": error[:2000] if error else None,
        "p_object_key": object_key,
    }
    row_id: int | None = db.session.execute(_for(model).claim, parameters).scalar()
    return row_id


def pending_rows(model: EventModel, object_key: str) -> list[StripeEvent] | list[WhopEvent]:
    """pending_for on whichever table holds the provider's events."""
    return pending_for(WhopEvent, object_key) if model is WhopEvent else pending_for(StripeEvent, object_key)


def row_for(model: EventModel, event_id: str) -> StripeEvent | WhopEvent | None:
    """The stored event, locked until the transaction ends (replay)."""
    return _row_for(WhopEvent, event_id) if model is WhopEvent else _row_for(StripeEvent, event_id)


def _row_for(model: type[Event], event_id: str) -> Event | None:
    row: Event | None = db.session.execute(
        select(model).where(model.event_id == event_id).with_for_update()
    ).scalar_one_or_none()
    return row


def pending_for(model: type[Event], object_key: str, limit: int = 1000) -> list[Event]:
    """The events about one object still waiting to be applied, in the order they arrived."""
    return list(
        db.session.execute(
            select(model)
            .where(model.object_key == object_key, model.status == StripeEventStatus.PENDING)
            .order_by(model.id)
            .limit(limit)
        ).scalars()
    )


def settle(model: EventModel, row_id: int, status: StripeEventStatus, outcome: str) -> None:
    """What applying a pending event did, in the applying transaction (only a pending row moves)."""
    db.session.execute(
        update(model)
        .where(model.id == row_id, model.status == StripeEventStatus.PENDING)
        .values(status=status, outcome=_short(outcome), last_error=None, processed_at=utcnow())
    )


def record_attempt_failure(model: EventModel, row_ids: list[int], error: str, *, final: bool) -> None:
    """An attempt to apply these pending events failed: the error is kept (`flask billing events`), and
    on the last attempt they become failed (replayable)."""
    values: dict[str, Any] = {"last_error": error[:2000], "attempts": model.attempts + 1, "processed_at": utcnow()}
    if final:
        values["status"] = StripeEventStatus.FAILED
    db.session.execute(
        update(model).where(model.id.in_(row_ids), model.status == StripeEventStatus.PENDING).values(**values)
    )


def note_throttled(model: EventModel, row_ids: list[int], note: str) -> None:
    """These pending events were not applied because the provider asked us to slow down: the note is
    kept where ops look (`flask billing events`); no attempt is counted and the status stays."""
    db.session.execute(
        update(model)
        .where(model.id.in_(row_ids), model.status == StripeEventStatus.PENDING)
        .values(last_error=note[:2000])
    )


def requeue(model: EventModel, row_id: int, object_key: str) -> bool:
    """A failed event goes back to pending for its object (replay). False if it is not failed."""
    result = db.session.execute(
        update(model)
        .where(model.id == row_id, model.status == StripeEventStatus.FAILED)
        .values(status=StripeEventStatus.PENDING, object_key=object_key, outcome=None)
        .returning(model.id)
    ).first()
    return result is not None


def record_failure(model: EventModel, event: VerifiedEvent, error: str) -> None:
    """In a transaction of its own, after the failed one rolled back: the event is stored as failed
    (attempts + 1), unless a concurrent delivery has settled it meanwhile."""
    db.session.execute(_for(model).fail, {**_row(event), "p_error": error[:2000]})


def _short(outcome: str | None) -> str | None:
    return outcome[:200] if outcome else None


def stored(model: EventModel, provider: str, event_id: str) -> VerifiedEvent | None:
    """A stored event as it was received, for replaying it (`flask billing replay`)."""
    created = getattr(model, model.created_column)
    row = db.session.execute(
        select(model.event_id, model.type, created, model.livemode, model.api_version, model.payload).where(
            model.event_id == event_id
        )
    ).one_or_none()
    if row is None or not row[5]:
        return None
    return VerifiedEvent(
        provider=provider,
        event_id=row[0],
        type=row[1],
        created=int(row[2]),
        livemode=row[3],
        api_version=row[4],
        raw=row[5],
        body=json.loads(row[5]),
    )
