"""The one guard every signed-in page goes through: signed in, two-factor sign-in set up where the
organization requires it, and billing status allows it; and the recent-authentication guard of the
sensitive actions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import current_app, flash, g, redirect, request, session, url_for
from flask_login import current_user, login_user, logout_user
from werkzeug.wrappers import Response

from app import clock
from app.extensions import db, login_manager
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


def session_is_current(user: User) -> bool:
    return bool(session.get(SESSION_EPOCH_KEY, 0) == user.session_epoch)


def sign_in(user: User) -> None:
    """Sign a user in on a fresh session id, so an id planted before sign-in is worthless after it.
    Signing in counts as proving who they are (recent_auth_required)."""
    session.pop(SECOND_STEP_KEY, None)
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
    login_user(user)
    session[SESSION_EPOCH_KEY] = user.session_epoch
    mark_recently_authenticated()
    AuthService.record_sign_in(user, source="web")


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


def forget_stale_sign_in() -> None:
    """The session belongs to an epoch the user has left (signed out everywhere, password changed)."""
    for key in ("_user_id", "_fresh", "_id", SESSION_EPOCH_KEY, REAUTHENTICATED_AT_KEY):
        session.pop(key, None)


def sign_out(message: str = "You are signed out.") -> None:
    """End the session: its data is dropped and its id retired, so the old cookie opens nothing."""
    logout_user()
    session.clear()
    flash(message, "info")
    current_app.session_interface.regenerate(session)  # type: ignore[attr-defined]
