"""Domain events: appended to the domain_event table inside the caller's transaction, and announced
to in-process subscribers only after that transaction commits (never for work that rolled back)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from app.extensions import db
from app.models import DomainEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxEvent:
    """What a consumer receives: the committed domain event, detached from any session."""

    id: int
    name: str
    organization_id: int | None
    user_id: int | None
    source: str | None
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Announcement:
    """What subscribers receive: a copy of the committed event, safe to read after the commit."""

    name: str
    organization_id: int | None
    user_id: int | None
    source: str | None
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Announcement], None]
_subscribers: dict[str, list[Subscriber]] = defaultdict(list)
_PENDING_KEY = "domain_events_to_announce"
# The rows recorded in the session's transaction: the outbox queues their delivery as it commits.
RECORDED_KEY = "domain_events_recorded"


def subscribe(name: str, subscriber: Subscriber) -> None:
    """Call ``subscriber(event)`` after each committed event called ``name`` ("*" for all)."""
    _subscribers[name].append(subscriber)


def unsubscribe(name: str, subscriber: Subscriber) -> None:
    _subscribers[name].remove(subscriber)


def subscribers(name: str) -> list[Subscriber]:
    return list(_subscribers.get(name, ()))


def record(
    name: str,
    /,
    *,
    organization_id: int | None = None,
    user_id: int | None = None,
    source: str | None = None,
    **data: Any,
) -> DomainEvent:
    """Append an event to the current transaction."""
    domain_event = DomainEvent(name=name, organization_id=organization_id, user_id=user_id, source=source, data=data)
    db.session.add(domain_event)
    db.session().info.setdefault(RECORDED_KEY, []).append(domain_event)
    _pending(db.session()).append(Announcement(name, organization_id, user_id, source, dict(data)))
    return domain_event


def _pending(session: Session) -> list[Announcement]:
    pending: list[Announcement] = session.info.setdefault(_PENDING_KEY, [])
    return pending


@event.listens_for(Session, "after_commit")
def _announce_after_commit(session: Session) -> None:
    for announcement in session.info.pop(_PENDING_KEY, []):
        for subscriber in (*_subscribers.get(announcement.name, ()), *_subscribers.get("*", ())):
            try:
                subscriber(announcement)
            except Exception:  # a subscriber's failure must not undo or fail committed work
                logger.exception("domain event subscriber failed for %s", announcement.name)


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if not previous_transaction.nested:
        session.info.pop(_PENDING_KEY, None)
        session.info.pop(RECORDED_KEY, None)


def log_announcement(announcement: Announcement) -> None:
    logger.info(
        "domain event %s",
        announcement.name,
        extra={"event_name": announcement.name, "organization_id": announcement.organization_id},
    )
