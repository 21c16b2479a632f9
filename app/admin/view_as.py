"""View as the owner: read-only impersonation for staff. While it lasts, the staff member's session
loads the organization's owner as the current user (so every page shows what the owner sees), a banner
says so, nothing but GET is answered (no form submits: anything else is refused with 403, except ending
it), and it ends on its own VIEW_AS_SECONDS after it began. Starting and ending are written to the
staff audit log. The staff member's own sign-in is untouched: the session still belongs to them."""

from __future__ import annotations

from typing import Any

from flask import abort, g, request, session
from flask_login import current_user

from app import clock
from app.extensions import db
from app.models import User
from app.services import staff_access

VIEW_AS_KEY = "_view_as"
VIEW_AS_SECONDS = 15 * 60
ALLOWED_WHILE_VIEWING = frozenset({"admin.stop_viewing", "auth.logout", "static"})


def begin(staff: User, owner: User) -> int:
    """Start viewing as ``owner``; returns when it ends (Unix seconds)."""
    until = int(clock.now()) + VIEW_AS_SECONDS
    session[VIEW_AS_KEY] = {"staff": staff.id, "owner": owner.id, "organization": owner.organization_id, "until": until}
    return until


def viewing() -> bool:
    return isinstance(session.get(VIEW_AS_KEY), dict)


def end() -> dict[str, Any] | None:
    """Stop viewing; what was being viewed, if anything."""
    held = session.pop(VIEW_AS_KEY, None)
    return held if isinstance(held, dict) else None


def viewed_owner(staff: User) -> User | None:
    """The owner this staff member's session views as, while that is still allowed and not expired."""
    held = session.get(VIEW_AS_KEY)
    if not isinstance(held, dict):
        return None
    if held.get("staff") != staff.id or not staff_access.console_allowed(staff) or clock.now() > held.get("until", 0):
        session.pop(VIEW_AS_KEY, None)
        return None
    owner = db.session.get(User, held.get("owner"))
    if owner is None or owner.removed_at is not None:
        session.pop(VIEW_AS_KEY, None)
        return None
    g.viewing_as = {**held, "staff_email": staff.email, "owner_email": owner.email}
    return owner


def refuse_writes_while_viewing() -> None:
    """before_request for the whole app: viewing as the owner is read-only."""
    if VIEW_AS_KEY in session:
        _ = current_user.is_authenticated  # loads the user: a view that has expired or may not go on ends here
    if VIEW_AS_KEY not in session or request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if request.endpoint in ALLOWED_WHILE_VIEWING:
        return
    abort(403, "You are viewing as the owner, read-only: nothing can be submitted. End the view first.")
