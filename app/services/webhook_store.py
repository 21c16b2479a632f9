"""The webhook event store: one row per verified delivery, written so that each event is applied at
most once. BillingService.handle_webhook_event drives it; every provider's event table has the shape
of stripe_event (whop_event: the same columns, its event time in `whop_created`), named by the model's
`created_column`. These statements run on every delivery, so each is built once per table and sent as
few times as the guarantees allow (see "Receiving" in docs/system/BILLING.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import Insert, Select, Update, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.extensions import db
from app.models import StripeEvent, StripeEventStatus, WhopEvent
from app.models.stripe_event import SETTLED_STATUSES
from app.models.types import utcnow

# The tables a provider's events can live in: one shape, one set of statuses (StripeEventStatus).
EventModel = type[StripeEvent] | type[WhopEvent]


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
    finish: Update
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
    # An earlier delivery that did not settle (it failed) is taken over; a settled one is left alone.
    unsettled = model.status.not_in(SETTLED_STATUSES)
    new_row = insert(model).values(**row, status=bindparam("p_status"), outcome=bindparam("p_outcome"))
    claim = new_row.on_conflict_do_update(
        index_elements=[model.event_id],
        set_={
            "attempts": model.attempts + 1,
            "status": new_row.excluded.status,
            "outcome": new_row.excluded.outcome,
            "last_error": None,
            "processed_at": new_row.excluded.processed_at,
        },
        where=unsettled,
    ).returning(model.id)
    failed_row = insert(model).values(**row, status=StripeEventStatus.FAILED, last_error=bindparam("p_error"))
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
        finish=update(model).where(model.id == bindparam("p_row_id")).values(outcome=bindparam("p_outcome")),
        fail=fail,
    )


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


def is_settled(model: EventModel, event_id: str) -> bool:
    """Whether the event was already processed or ignored: one indexed read, outside any transaction
    (autocommit), so a duplicate costs a single round trip and no write."""
    with db.engines["autocommit"].connect() as connection:
        status = connection.execute(_for(model).status, {"p_event_id": event_id}).scalar()
    return status in SETTLED_STATUSES


def claim(model: EventModel, event: VerifiedEvent, status: StripeEventStatus, outcome: str | None) -> int | None:
    """Store the delivery in the current transaction with the status it will settle with (the row is
    invisible to others until commit, and a rollback takes it away). Returns the row id, or None when a
    concurrent delivery of the same event settled it first: the insert waits for that one to finish."""
    parameters = {**_row(event), "p_status": status, "p_outcome": _short(outcome)}
    row_id: int | None = db.session.execute(_for(model).claim, parameters).scalar()
    return row_id


def finish(model: EventModel, row_id: int, outcome: str) -> None:
    """What applying the claimed event did, for `flask billing events`."""
    db.session.execute(_for(model).finish, {"p_row_id": row_id, "p_outcome": _short(outcome)})


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
    if row is None:
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
