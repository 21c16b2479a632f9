"""The one guard every signed-in page goes through: signed in, and billing status allows it."""

from __future__ import annotations

from flask import current_app, flash, g, redirect, session, url_for
from flask_login import current_user, login_user, logout_user
from werkzeug.wrappers import Response

from app.extensions import login_manager
from app.models import User
from app.services.access_policy import AccessDecision, decide_access
from app.services.auth_service import AuthService


def current_access() -> AccessDecision:
    return decide_access(current_user.organization, grace_days=current_app.config["PAST_DUE_GRACE_DAYS"])


def require_signed_in() -> Response | None:
    if not current_user.is_authenticated:
        response: Response = login_manager.unauthorized()
        return response
    return None


def require_billing_access() -> Response | None:
    """before_request for blueprints of signed-in pages: past_due within the grace period passes with a
    banner; blocked statuses go to the billing page, which explains and offers the fix."""
    if (response := require_signed_in()) is not None:
        return response
    g.access = current_access()
    if not g.access.allowed:
        return redirect(url_for("billing.overview"), 303)  # which says why and how to fix it
    return None


# The user's session epoch when this session signed in; app/__init__.py's user loader compares it with
# the user's current one on every request, so raising the user's epoch signs out every session at once.
SESSION_EPOCH_KEY = "_epoch"


def session_is_current(user: User) -> bool:
    return bool(session.get(SESSION_EPOCH_KEY, 0) == user.session_epoch)


def sign_in(user: User) -> None:
    """Sign a user in on a fresh session id, so an id planted before sign-in is worthless after it."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    login_user(user)
    session[SESSION_EPOCH_KEY] = user.session_epoch
    AuthService.record_sign_in(user, source="web")


def stay_signed_in_at(epoch: int) -> None:
    """After the user's own password change: every other session has ended; this one continues, on a
    fresh id."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    session[SESSION_EPOCH_KEY] = epoch


def forget_stale_sign_in() -> None:
    """The session belongs to an epoch the user has left (signed out everywhere, password changed)."""
    for key in ("_user_id", "_fresh", "_id", SESSION_EPOCH_KEY):
        session.pop(key, None)


def sign_out(message: str = "You are signed out.") -> None:
    """End the session: its data is dropped and its id retired, so the old cookie opens nothing."""
    logout_user()
    session.clear()
    flash(message, "info")
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
