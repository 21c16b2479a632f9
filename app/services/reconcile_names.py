"""The names `flask billing reconcile` shows for the ids in its report: an organization by its name and
its owner's email, a signup by the organization name and email it was started with. Read-only, in one
short transaction, after the report is made (the report itself stays pure: app/services/reconcile.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from app.extensions import db
from app.models import Organization, PendingSignup, ResubscribeCheckout, User
from app.models.user import UserRole
from app.services.reconcile import Names, ReconcileReport


def _label(name: str, email: str | None) -> str:
    return f"{name} <{email}>" if email else name


def names_for(report: ReconcileReport) -> Names:
    organization_ids = {drift.organization_id for drift in report.subscriptions}
    signup_ids: set[str] = set()
    checkout_ids: set[str] = set()  # resubscribe references are their Checkout Session ids
    for kind, reference in [(o.kind, o.reference) for o in report.orphans] + [
        (u.kind, u.reference) for u in report.unsettled
    ]:
        if reference is None:
            continue
        if kind == "signup":
            signup_ids.add(reference)
        elif kind == "resubscribe":
            checkout_ids.add(reference)
    try:
        resubscribes = {
            checkout.checkout_session_id: checkout.organization_id
            for checkout in db.session.execute(
                select(ResubscribeCheckout).where(ResubscribeCheckout.checkout_session_id.in_(checkout_ids))
            ).scalars()
        }
        organizations = _organizations(organization_ids | set(resubscribes.values()))
        signups = {
            str(signup.id): _label(signup.organization_name, signup.email)
            for signup in db.session.execute(
                select(PendingSignup).where(PendingSignup.id.in_([u for u in map(_uuid, signup_ids) if u]))
            ).scalars()
        }
    finally:
        db.session.rollback()
    return Names(
        organizations=organizations,
        signups=signups,
        resubscribes={cid: organizations[oid] for cid, oid in resubscribes.items() if oid in organizations},
    )


def _organizations(ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    owners = {
        organization_id: email
        for organization_id, email in db.session.execute(
            select(User.organization_id, User.email).where(User.organization_id.in_(ids), User.role == UserRole.OWNER)
        ).all()
    }
    return {
        organization.id: _label(organization.name, owners.get(organization.id))
        for organization in db.session.execute(select(Organization).where(Organization.id.in_(ids))).scalars()
    }


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
