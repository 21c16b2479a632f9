"""Account emails, sent by outbox consumers from the worker (app/services/outbox.py): the password
reset link, the email confirmation link, the email change link (to the new address) and the notices
that the password or the address was changed (to the address that had it). Each link is
minted here, at send time, and never stored: the domain events say only "user N asked"
(app/services/account_service.py)."""

from __future__ import annotations

from datetime import UTC

from flask import current_app

from app.extensions import db
from app.models import User
from app.services import outbox
from app.services.account_service import (
    EMAIL_CHANGE_LINK_SECONDS,
    RESET_LINK_SECONDS,
    VERIFICATION_LINK_SECONDS,
    AccountService,
)
from app.services.auth_service import active_account_id
from app.services.mailer import send_event_email
from app.services.outbox import OutboxEvent


def _link(path: str, token: str) -> str:
    """An absolute link (the worker has no request to build URLs from): APP_BASE_URL + the route."""
    return f"{current_app.config['APP_BASE_URL']}{path}{token}"


def _user(user_id: int | None) -> User | None:
    user = db.session.get(User, user_id) if user_id is not None else None
    if user is not None:
        db.session.expunge(user)  # read; no transaction stays open while SMTP answers
    db.session.rollback()
    return user


@outbox.consumer("user.password_reset_requested", name="password_reset_email")
def password_reset_email(event: OutboxEvent) -> None:
    user = _user(event.user_id)
    if user is None:
        return  # the address has no account: nothing is sent (and nothing about it was stored)
    send_event_email(
        event,
        user.email,
        "password_reset",
        subject="Reset your Ledgerline password",
        user=user,
        reset_url=_link("/auth/reset-password/", AccountService.password_reset_token(user)),
        minutes=RESET_LINK_SECONDS // 60,
    )


def _send_verification(event: OutboxEvent) -> None:
    user = _user(event.user_id)
    if user is None or user.email_verified:
        return
    send_event_email(
        event,
        user.email,
        "verify_email",
        subject="Confirm your email address for Ledgerline",
        user=user,
        verify_url=_link("/auth/verify-email/", AccountService.email_verification_token(user)),
        days=VERIFICATION_LINK_SECONDS // 86400,
    )


@outbox.consumer("signup.completed", name="verify_email_after_signup")
def verify_email_after_signup(event: OutboxEvent) -> None:
    _send_verification(event)


@outbox.consumer("user.email_verification_requested", name="verify_email_again")
def verify_email_again(event: OutboxEvent) -> None:
    _send_verification(event)


def _send_password_changed(event: OutboxEvent, how: str) -> None:
    user = _user(event.user_id)
    if user is None:
        return
    send_event_email(
        event,
        user.email,
        "password_changed",
        subject="Your Ledgerline password was changed",
        user=user,
        how=how,
        when=event.occurred_at.astimezone(UTC),
        reset_url=f"{current_app.config['APP_BASE_URL']}/auth/forgot-password",
    )


@outbox.consumer("user.password_changed", name="password_changed_email")
def password_changed_email(event: OutboxEvent) -> None:
    """Tell the account's mailbox its password changed: if it was not its owner, they learn at once."""
    _send_password_changed(event, "from your account page")


@outbox.consumer("user.password_reset", name="password_reset_done_email")
def password_reset_done_email(event: OutboxEvent) -> None:
    _send_password_changed(event, "through a password reset link")


@outbox.consumer("user.email_change_requested", name="email_change_link")
def email_change_link(event: OutboxEvent) -> None:
    """The link goes to the new address only: opening it is what proves the address is the user's. An
    address that already has an account is told so instead, with no link (the form did not say)."""
    user = _user(event.user_id)
    new_email = str(event.data["new_email"])
    if user is None or user.removed_at is not None:
        return
    taken = active_account_id(new_email) is not None
    db.session.rollback()
    if taken:
        send_event_email(
            event, new_email, "email_change_taken", subject="Your Ledgerline address was not changed", user=user
        )
        return
    send_event_email(
        event,
        new_email,
        "email_change",
        subject="Confirm your new Ledgerline email address",
        user=user,
        new_email=new_email,
        confirm_url=_link("/auth/change-email/", AccountService.email_change_token(user, new_email)),
        hours=EMAIL_CHANGE_LINK_SECONDS // 3600,
    )


@outbox.consumer("user.email_changed", name="email_changed_notice")
def email_changed_notice(event: OutboxEvent) -> None:
    """Tell the address the account had: if it was not its owner's doing, they learn at once."""
    user = _user(event.user_id)
    if user is None:
        return
    send_event_email(
        event,
        str(event.data["old_email"]),
        "email_changed",
        subject="Your Ledgerline email address was changed",
        user=user,
        new_email=event.data["new_email"],
        when=event.occurred_at.astimezone(UTC),
        reset_url=f"{current_app.config['APP_BASE_URL']}/auth/forgot-password",
    )
