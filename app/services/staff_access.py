"""Who may use the operations console: users with the staff flag, which only the command line grants
and revokes (`flask users grant-staff EMAIL`, `revoke-staff`), and only to someone with two-factor
sign-in on. Every grant and revocation is written to the staff audit log."""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.models import User
from app.services import staff_audit


class StaffGrantRefused(Exception):
    """The grant or revocation was not made; the message says why."""


def console_allowed(user: User | None) -> bool:
    """Staff who still have two-factor sign-in on (turning it off closes the console to them)."""
    return bool(user is not None and user.is_staff and user.removed_at is None and user.two_factor_enabled)


def _user(email: str) -> User:
    user = db.session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()
    if user is None:
        raise StaffGrantRefused(f"no user with the email {email.strip().lower()}")
    return user


def grant(email: str, *, reason: str) -> str:
    return _set_staff(email, True, reason=reason)


def revoke(email: str, *, reason: str) -> str:
    return _set_staff(email, False, reason=reason)


def _set_staff(email: str, staff: bool, *, reason: str) -> str:
    """Grant or revoke the staff flag (the command line's only), audited. Granting needs an account
    that can sign in with two-factor sign-in on."""
    address = email.strip().lower()
    try:
        user = _user(email)
        if staff and user.removed_at is not None:
            raise StaffGrantRefused(f"{user.email} was removed from their organization")
        if staff and not user.two_factor_enabled:
            raise StaffGrantRefused(
                f"{user.email} has no two-factor sign-in: staff must turn it on first (Account → Two-factor sign-in)"
            )
        if user.is_staff == staff:
            return f"{user.email} is staff already" if staff else f"{user.email} is not staff"
        user.is_staff = staff
        user_id, organization_id = user.id, user.organization_id
        db.session.commit()
    finally:
        db.session.rollback()
    staff_audit.record(
        None,
        "staff.granted" if staff else "staff.revoked",
        reason=reason,
        outcome=f"{address} may use the operations console"
        if staff
        else f"{address} may no longer use the operations console",
        organization_id=organization_id,
        target=f"user:{user_id}",
        before={"is_staff": not staff},
        after={"is_staff": staff},
    )
    return f"{address} is staff now" if staff else f"{address} is no longer staff"


def start_viewing_as_owner(staff: User, organization_id: int, *, reason: str) -> User:
    """The organization's owner, once the view is audited; refused without a reason or an owner."""
    if not reason.strip():
        raise StaffGrantRefused("Type the reason for viewing as the owner.")
    try:
        owner = db.session.execute(
            select(User).where(User.organization_id == organization_id, User.role == "owner")
        ).scalar_one_or_none()
        if owner is None:
            raise StaffGrantRefused("This organization has no owner to view as.")
        db.session.expunge(owner)
    finally:
        db.session.rollback()
    staff_audit.record(
        staff,
        "view_as_owner",
        reason=reason.strip(),
        outcome=f"viewed as {owner.email}, read-only, for 15 minutes at most",
        organization_id=organization_id,
        target=f"user:{owner.id}",
    )
    return owner


def stop_viewing_as_owner(staff_user_id: int, organization_id: int, owner_id: int) -> None:
    try:
        staff = db.session.get(User, staff_user_id)
        if staff is not None:
            db.session.expunge(staff)
    finally:
        db.session.rollback()
    staff_audit.record(
        staff,
        "view_as_owner.ended",
        reason="ended by staff",
        outcome="stopped viewing as the owner",
        organization_id=organization_id,
        target=f"user:{owner_id}",
    )
