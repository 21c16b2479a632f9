"""The staff audit log: every action taken in the operations console (and every staff grant or
revocation from the command line), appended as one row of `staff_audit`: who, when, what, which
organization, the reason typed, the billing before and after, and the outcome.

Append-only: this module only inserts and reads, and the database refuses UPDATE and DELETE of its rows
(a trigger, migration 0010_staff_console). It is kept apart from the domain events (the owner's audit
log, app/services/audit_log.py): those are what happened to the organization, worded for its owner and
fed to the outbox's consumers; these are what staff did and why, for staff."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import StaffAuditEntry, User

LIMIT = 200
COMMAND_LINE = "command line"


def record(
    staff: User | None,
    action: str,
    *,
    reason: str,
    outcome: str,
    organization_id: int | None = None,
    target: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    request_key: str | None = None,
) -> StaffAuditEntry | None:
    """Append one entry and commit. None when an entry with this request_key exists already (the same
    confirmation form submitted twice): the first one stands."""
    entry = StaffAuditEntry(
        staff_user_id=staff.id if staff is not None else None,
        staff_email=staff.email if staff is not None else COMMAND_LINE,
        action=action,
        organization_id=organization_id,
        target=target,
        reason=reason,
        before=before,
        after=after,
        outcome=outcome[:500],
        request_key=request_key,
    )
    db.session.add(entry)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        if request_key is not None and done(request_key) is not None:
            return None
        raise
    return entry


def done(request_key: str) -> StaffAuditEntry | None:
    """The entry a confirmation form's token already produced, if any."""
    try:
        return db.session.execute(
            select(StaffAuditEntry).where(StaffAuditEntry.request_key == request_key)
        ).scalar_one_or_none()
    finally:
        db.session.rollback()


def entries(organization_id: int | None = None, *, limit: int = LIMIT) -> list[StaffAuditEntry]:
    """Newest first; one organization's, or everyone's."""
    query = select(StaffAuditEntry).order_by(StaffAuditEntry.id.desc()).limit(limit)
    if organization_id is not None:
        query = query.where(StaffAuditEntry.organization_id == organization_id)
    try:
        found = list(db.session.execute(query).scalars())
        for entry in found:
            db.session.expunge(entry)
        return found
    finally:
        db.session.rollback()
