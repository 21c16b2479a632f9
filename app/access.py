"""The one guard every signed-in page goes through: signed in, and billing status allows it."""

from __future__ import annotations

import time
from datetime import UTC

from flask import current_app, flash, g, redirect, session, url_for
from flask_login import current_user, login_user, logout_user
from werkzeug.wrappers import Response

from app.extensions import cache, login_manager
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
# When this session signed in, and when it was last used (Unix seconds): a session ends
# PERMANENT_SESSION_LIFETIME after sign-in however busy, and SESSION_IDLE_MINUTES after its last use.
SIGNED_IN_AT_KEY = "_signed_in_at"
SEEN_AT_KEY = "_seen_at"
# The signup this browser started: {"id": pending signup id}. Its success page signs the new owner in
# here once, within SIGNUP_SIGN_IN_MINUTES of the account's creation.
SIGNUP_KEY = "signup"


def _now() -> float:
    return time.time()


def session_is_current(user: User) -> bool:
    """The session carries the user's current epoch and is within its absolute and idle lifetimes; a
    current session is marked as used now."""
    if session.get(SESSION_EPOCH_KEY, 0) != user.session_epoch:
        return False
    now = _now()
    signed_in_at, seen_at = session.get(SIGNED_IN_AT_KEY), session.get(SEEN_AT_KEY)
    if not isinstance(signed_in_at, int | float) or not isinstance(seen_at, int | float):
        return False  # signed in before lifetimes were kept: sign in again
    lifetime = current_app.config["PERMANENT_SESSION_LIFETIME"].total_seconds()
    idle = current_app.config["SESSION_IDLE_MINUTES"] * 60
    if now - signed_in_at > lifetime or now - seen_at > idle:
        return False
    session[SEEN_AT_KEY] = int(now)
    return True


def sign_in(user: User) -> None:
    """Sign a user in on a fresh session id and a fresh CSRF token, so an id or a token planted or seen
    before sign-in is worthless after it."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    _rotate_csrf_token()
    login_user(user)
    session[SESSION_EPOCH_KEY] = user.session_epoch
    session[SIGNED_IN_AT_KEY] = session[SEEN_AT_KEY] = int(_now())
    AuthService.record_sign_in(user, source="web")


def _rotate_csrf_token() -> None:
    """Flask-WTF keeps the raw token in the session (and this request's in g): dropped, the next form
    gets a new one."""
    field = current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token")
    session.pop(field, None)
    g.pop(field, None)


def remember_signup(pending_signup_id: str) -> None:
    session[SIGNUP_KEY] = {"id": pending_signup_id}


def take_signup_sign_in(pending_signup_id: str, owner: User) -> bool:
    """May this browser be signed in as ``owner`` by the success page of signup ``pending_signup_id``?
    Only the browser that started it, within SIGNUP_SIGN_IN_MINUTES of the account's creation, and once:
    the claim is recorded in the shared cache, so even a copy of the session cannot use it again."""
    held = session.get(SIGNUP_KEY)
    if not isinstance(held, dict) or held.get("id") != pending_signup_id:
        return False
    session.pop(SIGNUP_KEY)
    window = current_app.config["SIGNUP_SIGN_IN_MINUTES"] * 60
    created = owner.created_at.replace(tzinfo=UTC) if owner.created_at.tzinfo is None else owner.created_at
    if _now() - created.timestamp() > window:
        return False
    return bool(cache.add(f"signup-signed-in:{pending_signup_id}", 1, timeout=int(window) + 60))


def stay_signed_in_at(epoch: int) -> None:
    """After the user's own password change: every other session has ended; this one continues, on a
    fresh id."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    session[SESSION_EPOCH_KEY] = epoch
    session[SEEN_AT_KEY] = int(_now())


def forget_stale_sign_in() -> None:
    """The session belongs to an epoch the user has left (signed out everywhere, password changed)."""
    for key in ("_user_id", "_fresh", "_id", SESSION_EPOCH_KEY, SIGNED_IN_AT_KEY, SEEN_AT_KEY):
        session.pop(key, None)


def sign_out(message: str = "You are signed out.") -> None:
    """End the session: its data is dropped and its id retired, so the old cookie opens nothing."""
    logout_user()
    session.clear()
    flash(message, "info")
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
