"""The outbox: every committed domain event that has consumers is handed to each of them at least
once, by the worker, and each consumer's success is recorded so that it is never repeated.

- A service records a domain event (`domain_events.record`) in its own transaction. When that
  transaction commits, a delivery job for the event commits with it (the job row is inserted in the
  same transaction, just before COMMIT), so no event is lost when a process dies and none is
  delivered for work that rolled back.
- The worker runs the job (`outbox:deliver`, under a lock per event, so two deliveries of one event
  never run at once). For each consumer registered for the event's name without a row in
  `outbox_delivery`, it calls the consumer, outside any transaction, and then inserts the
  `(domain_event_id, consumer)` row. A consumer that raises fails the job, which is retried with
  backoff; consumers that already succeeded are not called again.
- So a consumer runs again only if its process died between finishing its work and recording it
  (for an email: between the SMTP server accepting the message and the INSERT). That is the one
  window of a duplicate; consumers whose effect can be checked should check it.

A consumer is a function of an `OutboxEvent` (a copy of the row), registered with::

    @outbox.consumer("billing.payment_failed")
    def payment_failed_email(event: OutboxEvent) -> None: ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import procrastinate
from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.extensions import db
from app.models import DomainEvent, OutboxDelivery
from app.services import queue
from app.services.domain_events import RECORDED_KEY
from app.services.domain_events import OutboxEvent as OutboxEvent  # noqa: PLC0414  (re-exported: consumers take it)

logger = logging.getLogger(__name__)

TASK = "outbox:deliver"
QUEUE = "outbox"


Consumer = Callable[[OutboxEvent], None]
_consumers: dict[str, dict[str, Consumer]] = {}


def consumer(event_name: str, *, name: str | None = None) -> Callable[[Consumer], Consumer]:
    """Register the decorated function as a consumer of events called ``event_name``. ``name``
    (default: the function's name) is what `outbox_delivery.consumer` records: keep it stable."""

    def register(func: Consumer) -> Consumer:
        consumer_name = name or func.__name__
        registered = _consumers.setdefault(event_name, {})
        if registered.get(consumer_name, func) is not func:
            raise ValueError(f"outbox consumer {consumer_name!r} is already registered for {event_name}")
        registered[consumer_name] = func
        return func

    return register


def registered_consumers() -> dict[str, list[str]]:
    """Every registered consumer's name, by the event it consumes (their names are stored in
    outbox_delivery: a test asserts them, so a module the factory no longer imports fails loudly)."""
    return {event_name: sorted(by_name) for event_name, by_name in sorted(_consumers.items())}


def consumers_for(event_name: str) -> dict[str, Consumer]:
    return dict(_consumers.get(event_name, {}))


def has_consumers(event_name: str) -> bool:
    return bool(_consumers.get(event_name))


# --- enqueueing: in the recording transaction ----------------------------------------------------


@sa_event.listens_for(Session, "before_commit")
def _enqueue_deliveries(session: Session) -> None:
    recorded: list[DomainEvent] = session.info.pop(RECORDED_KEY, [])
    wanted = [domain_event for domain_event in recorded if has_consumers(domain_event.name)]
    if not wanted:
        return
    session.flush()
    for domain_event in wanted:
        enqueue(domain_event.id)


def enqueue(domain_event_id: int) -> None:
    """Queue delivery of one event in the current transaction (the replay path uses this too)."""
    queue.defer(TASK, queue=QUEUE, lock=f"domain_event:{domain_event_id}", domain_event_id=domain_event_id)


# --- delivery: in the worker ---------------------------------------------------------------------

jobs = procrastinate.Blueprint()


@jobs.task(name="deliver", queue=QUEUE, retry=queue.OUTBOX_RETRY)
@queue.in_app_context
def deliver(domain_event_id: int) -> None:
    deliver_event(domain_event_id)


def deliver_event(domain_event_id: int) -> list[str]:
    """Hand one event to each of its consumers that has not handled it yet; returns their names.
    Holds no transaction while a consumer runs."""
    row = db.session.get(DomainEvent, domain_event_id)
    if row is None:
        logger.warning("outbox: domain event %s does not exist", domain_event_id)
        db.session.rollback()
        return []
    outbox_event = OutboxEvent(
        id=row.id,
        name=row.name,
        organization_id=row.organization_id,
        user_id=row.user_id,
        source=row.source,
        occurred_at=row.occurred_at,
        data=dict(row.data or {}),
    )
    done = set(
        db.session.execute(
            select(OutboxDelivery.consumer).where(OutboxDelivery.domain_event_id == domain_event_id)
        ).scalars()
    )
    db.session.rollback()  # no transaction is held while consumers talk to the outside world
    delivered = []
    for consumer_name, func in consumers_for(outbox_event.name).items():
        if consumer_name in done:
            continue
        func(outbox_event)
        record_delivery(domain_event_id, consumer_name)
        delivered.append(consumer_name)
        logger.info(
            "outbox: %s handled %s", consumer_name, outbox_event.name, extra={"domain_event_id": domain_event_id}
        )
    return delivered


def record_delivery(domain_event_id: int, consumer_name: str) -> bool:
    """Record that ``consumer_name`` handled the event (committed at once); False if it already was."""
    insert = sqlite_insert if db.session.get_bind().dialect.name == "sqlite" else pg_insert
    inserted = db.session.execute(
        insert(OutboxDelivery)
        .values(domain_event_id=domain_event_id, consumer=consumer_name)
        .on_conflict_do_nothing(index_elements=["domain_event_id", "consumer"])
        .returning(OutboxDelivery.id)
    ).first()
    db.session.commit()
    return inserted is not None


@dataclass(frozen=True)
class FailedDelivery:
    """A domain event whose consumers gave up (OUTBOX_MAX_ATTEMPTS), and which of them never succeeded."""

    domain_event_id: int
    name: str
    occurred_at: datetime
    attempts: int
    undelivered: list[str]


_FAILED_DELIVERIES = text(
    "SELECT DISTINCT ON (d.id) d.id, d.name, d.occurred_at, j.attempts FROM procrastinate_jobs AS j "
    "JOIN domain_event AS d ON d.id = (j.args->>'domain_event_id')::bigint "
    "WHERE j.task_name = :task AND j.status = 'failed' ORDER BY d.id, j.id DESC"
)


def failed_deliveries() -> list[FailedDelivery]:
    """Every event some consumer of which failed for good (`flask billing emails --failed`)."""
    try:
        found = []
        for row in db.session.execute(_FAILED_DELIVERIES, {"task": TASK}):
            done = set(
                db.session.execute(
                    select(OutboxDelivery.consumer).where(OutboxDelivery.domain_event_id == row.id)
                ).scalars()
            )
            undelivered = [name for name in consumers_for(row.name) if name not in done]
            found.append(FailedDelivery(row.id, row.name, row.occurred_at, row.attempts, undelivered))
        return found
    finally:
        db.session.rollback()


def replay_failed(domain_event_ids: list[int]) -> list[int]:
    """Queue delivery again for events whose delivery failed for good; consumers that already handled
    one are not run again (outbox_delivery). The failed jobs are marked cancelled, so they are listed
    no more. Returns the events queued."""
    queued: list[int] = []
    for domain_event_id in domain_event_ids:
        cancelled = db.session.execute(
            text(
                "UPDATE procrastinate_jobs SET status = 'cancelled' WHERE task_name = :task AND status = 'failed' "
                "AND (args->>'domain_event_id')::bigint = :id RETURNING id"
            ),
            {"task": TASK, "id": domain_event_id},
        ).first()
        if cancelled is not None:
            enqueue(domain_event_id)
            queued.append(domain_event_id)
    db.session.commit()
    return queued


queue.register_blueprint("outbox", jobs)
