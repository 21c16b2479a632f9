"""The one guard every signed-in page goes through: signed in, two-factor sign-in set up where the
organization requires it, and billing status allows it; and the recent-authentication guard of the
sensitive actions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import current_app, flash, g, redirect, request, session, url_for
from flask_login import current_user, login_user, logout_user
from werkzeug.wrappers import Response

from app import clock
from app.extensions import cache, db, login_manager
from app.models import User
from app.services.access_policy import AccessDecision, decide_access
from app.services.auth_service import AuthService
from app.services.two_factor_service import TwoFactorService

View = TypeVar("View", bound=Callable[..., Any])


def current_access() -> AccessDecision:
    return decide_access(current_user.organization, grace_days=current_app.config["PAST_DUE_GRACE_DAYS"])


# Pages a member whose organization requires two-factor sign-in reaches before setting it up.
ENROLMENT_ENDPOINTS = frozenset({"account.two_factor", "account.enable_two_factor", "account.sign_out_everywhere"})


def require_signed_in() -> Response | None:
    if not current_user.is_authenticated:
        response: Response = login_manager.unauthorized()
        return response
    if request.endpoint not in ENROLMENT_ENDPOINTS and TwoFactorService.enrolment_required(current_user):
        flash("Your organization requires two-factor sign-in. Set it up to continue.", "info")
        return redirect(url_for("account.two_factor"), 303)
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
    return clock.timestamp()  # the one clock (app/clock.py)


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
    before sign-in is worthless after it. Signing in counts as proving who they are
    (recent_auth_required)."""
    session.pop(SECOND_STEP_KEY, None)
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    _rotate_csrf_token()
    login_user(user)
    session[SESSION_EPOCH_KEY] = user.session_epoch
    session[SIGNED_IN_AT_KEY] = session[SEEN_AT_KEY] = int(_now())
    mark_recently_authenticated()
    AuthService.record_sign_in(user, source="web")


def _rotate_csrf_token() -> None:
    """Flask-WTF keeps the raw token in the session (and this request's in g): dropped, the next form
    gets a new one."""
    field = current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token")
    session.pop(field, None)
    g.pop(field, None)


def remember_signup(pending_signup_id: str) -> None:
    session[SIGNUP_KEY] = {"id": pending_signup_id}


def held_signup_id() -> str | None:
    """The signup this browser started last (remember_signup), if any."""
    held = session.get(SIGNUP_KEY)
    return str(held["id"]) if isinstance(held, dict) and "id" in held else None


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


# --- Two-factor sign-in's second step ----------------------------------------------------------------

# The user who gave the right password and still owes a code: {user id, their epoch, when}.
SECOND_STEP_KEY = "_second_step"
SECOND_STEP_SECONDS = 300


def await_second_factor(user: User) -> None:
    """The password was right and the user has two-factor sign-in: nobody is signed in until a code
    follows, within SECOND_STEP_SECONDS, in this browser session (on a fresh id)."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    session[SECOND_STEP_KEY] = {"user": user.id, "epoch": user.session_epoch, "at": int(clock.now())}


def user_awaiting_second_factor() -> User | None:
    """The user whose password this session took, if the code may still follow."""
    pending = session.get(SECOND_STEP_KEY)
    if not isinstance(pending, dict) or clock.now() - pending.get("at", 0) > SECOND_STEP_SECONDS:
        session.pop(SECOND_STEP_KEY, None)
        return None
    user = db.session.get(User, pending.get("user"))
    if user is None or user.removed_at is not None or user.session_epoch != pending.get("epoch"):
        session.pop(SECOND_STEP_KEY, None)
        return None
    return user


# --- Recent authentication before sensitive actions --------------------------------------------------

REAUTHENTICATED_AT_KEY = "_reauthenticated_at"


def mark_recently_authenticated() -> None:
    session[REAUTHENTICATED_AT_KEY] = int(clock.now())


def recently_authenticated() -> bool:
    proved_at = session.get(REAUTHENTICATED_AT_KEY)
    return isinstance(proved_at, int) and clock.now() - proved_at <= current_app.config["REAUTH_MINUTES"] * 60


def safe_next_path(candidate: str | None) -> str | None:
    """``candidate`` if it is a path on this site (never another host), else None."""
    if not candidate or not candidate.startswith("/") or candidate.startswith("//") or "\\" in candidate:
        return None
    parts = urlsplit(candidate)
    return candidate if not parts.scheme and not parts.netloc else None


def _page_to_return_to() -> str:
    """Where to go once the user has confirmed it's them: the page itself for a GET; for a form, the
    page the form was on (its data is not replayed: the user submits it again)."""
    if request.method == "GET":
        return request.full_path.rstrip("?")
    referrer = urlsplit(request.referrer or "")
    same_site = referrer.netloc in ("", request.host)
    path = referrer.path + (f"?{referrer.query}" if referrer.query else "")
    return (safe_next_path(path) if same_site else None) or url_for("main.dashboard")


def recent_auth_required(view: View) -> View:
    """Before a sensitive action (changing the plan, cancelling, the customer portal, removing a
    teammate, changing the password, two-factor settings): the user must have given their password or
    a two-factor code within REAUTH_MINUTES. Otherwise nothing is done and they are asked to confirm
    it's them, then brought back."""

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if current_user.is_authenticated and not recently_authenticated():
            flash("Confirm it's you to continue. Nothing was changed yet.", "info")
            return redirect(url_for("account.confirm_access", next=_page_to_return_to()), 303)
        return view(*args, **kwargs)

    return cast(View, guarded)


def stay_signed_in_at(epoch: int) -> None:
    """After the user's own password change: every other session has ended; this one continues, on a
    fresh id."""
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    session[SESSION_EPOCH_KEY] = epoch
    session[SEEN_AT_KEY] = int(_now())


def forget_stale_sign_in() -> None:
    """The session belongs to an epoch the user has left (signed out everywhere, password changed)."""
    for key in ("_user_id", "_fresh", "_id", SESSION_EPOCH_KEY, SIGNED_IN_AT_KEY, SEEN_AT_KEY, REAUTHENTICATED_AT_KEY):
        session.pop(key, None)


def sign_out(message: str = "You are signed out.") -> None:
    """End the session: its data is dropped and its id retired, so the old cookie opens nothing."""
    logout_user()
    session.clear()
    flash(message, "info")
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
