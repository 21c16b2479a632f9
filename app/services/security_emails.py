"""Emails that keep answers uniform: the form says the same whatever the address, and the mailbox is
told what the form did not say. Sent by outbox consumers from the worker."""

from __future__ import annotations

from flask import current_app

from app.extensions import db
from app.models import User
from app.services import outbox
from app.services.mailer import send_event_email
from app.services.outbox import OutboxEvent


@outbox.consumer("signup.started_for_existing_account", name="existing_account_signup_email")
def existing_account_signup_email(event: OutboxEvent) -> None:
    """Someone started a signup with an address that has an account: its mailbox hears so, with the way
    to sign in or reset the password. The signup form answered as for any address."""
    user = db.session.get(User, event.user_id or 0)
    if user is not None:
        db.session.expunge(user)
    db.session.rollback()  # read; no transaction stays open while SMTP answers
    if user is None:
        return
    base = current_app.config["APP_BASE_URL"]
    send_event_email(
        event,
        user.email,
        "signup_existing_account",
        subject="You already have a Ledgerline account",
        user=user,
        login_url=f"{base}/auth/login",
        reset_url=f"{base}/auth/forgot-password",
    )
