"""AccountService: a user's password, sessions and email address, and the links mailed to prove who
they are. It never sends email: it records a domain event and an outbox consumer
(app/services/account_emails.py) mints the link and sends it from the worker.

Links are signed with SECRET_KEY (itsdangerous), carry the time they were minted, and are checked here:

- **Password reset**: ``{user id, fingerprint of the current password hash, minted at}``; valid for an
  hour, and only while the password is the one it was minted for. Using it changes the password, so
  a link works once; the change is a conditional UPDATE on the old hash, so two uses at once cannot
  both succeed. Nothing usable is stored: neither the database nor a domain event holds a token.
- **Email verification**: ``{user id, the address, minted at}``; valid for seven days and only for the
  address the account has now.
- **Email change**: ``{user id, the current address, the new address, minted at}``, sent to the new
  address only; valid for a day and only while the account still has the address it was asked from, so
  it works once. Opening it moves the account to the new address, confirmed; the old address is told.

Sessions: each user has a ``session_epoch``; a session is valid only while it carries the current one
(checked on every request by the user loader in app/__init__.py). Raising it signs the user out
everywhere at once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash

from app.extensions import db
from app.models import User
from app.models.types import utcnow
from app.services import domain_events
from app.services.auth_service import active_account_id, hash_password, normalise_email, release_removed_address

RESET_LINK_SECONDS = 3600
VERIFICATION_LINK_SECONDS = 7 * 86400
EMAIL_CHANGE_LINK_SECONDS = 86400
# A link minted a little "in the future" (clocks of two hosts) is still fine; further than this is not.
CLOCK_SKEW_SECONDS = 300


class AccountError(Exception):
    """The message is meant for the person asking."""


class InvalidLink(AccountError):
    pass


class WrongPassword(AccountError):
    def __init__(self) -> None:
        super().__init__("That is not your current password.")


@dataclass(frozen=True)
class LinkClaims:
    user_id: int
    minted_at: int
    data: dict[str, Any]


def _serializer(purpose: str) -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt=f"ledgerline.{purpose}")


def _fingerprint(password_hash: str) -> str:
    """Changes whenever the password does (a new hash has a new salt); reveals nothing about it."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


def _mint(purpose: str, user_id: int, now: int | None, **data: Any) -> str:
    minted_at = int(time.time()) if now is None else now
    return str(_serializer(purpose).dumps({"u": user_id, "t": minted_at, **data}))


def _read(purpose: str, token: str, max_age: int, expired: str) -> LinkClaims:
    invalid = InvalidLink("This link is not valid. Ask for a new one.")
    try:
        claims = _serializer(purpose).loads(token)
    except BadSignature:
        raise invalid from None
    if not isinstance(claims, dict) or type(claims.get("u")) is not int or type(claims.get("t")) is not int:
        raise invalid
    age = int(time.time()) - claims["t"]
    if age > max_age:
        raise InvalidLink(expired)
    if age < -CLOCK_SKEW_SECONDS:
        raise invalid
    return LinkClaims(claims["u"], claims["t"], claims)


class AccountService:
    # --- sessions ----------------------------------------------------------------------------------

    @staticmethod
    def sign_out_everywhere(user: User, *, source: str) -> int:
        """Every session of this user ends on its next request. Returns the new epoch."""
        epoch = db.session.execute(
            update(User)
            .where(User.id == user.id)
            .values(session_epoch=User.session_epoch + 1)
            .returning(User.session_epoch)
        ).scalar_one()
        domain_events.record(
            "user.signed_out_everywhere", organization_id=user.organization_id, user_id=user.id, source=source
        )
        db.session.commit()
        return int(epoch)

    # --- passwords ---------------------------------------------------------------------------------

    @staticmethod
    def change_password(user: User, current_password: str, new_password: str) -> int:
        """Check the current password, set the new one and sign out every session (the caller keeps
        its own by taking the returned epoch). Raises WrongPassword."""
        old_hash = user.password_hash
        if not check_password_hash(old_hash, current_password):
            raise WrongPassword()
        epoch = AccountService._replace_password(user.id, old_hash, hash_password(new_password))
        if epoch is None:
            raise AccountError("Your password was changed elsewhere a moment ago. Sign in again.")
        domain_events.record(
            "user.password_changed", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
        )
        db.session.commit()
        return epoch

    @staticmethod
    def request_password_reset(email: str) -> None:
        """Someone asked for a reset link for ``email``. The same work whether or not it has an
        account — one indexed read, one domain event (and its delivery job), one commit — so neither
        the answer nor its timing tells the two apart. The event carries the user's id, or nothing
        for an unknown address; never the address or a token. The worker sends the link."""
        row = db.session.execute(
            select(User.id, User.organization_id).where(
                User.email == normalise_email(email)[:320], User.removed_at.is_(None)
            )
        ).first()
        domain_events.record(
            "user.password_reset_requested",
            organization_id=row.organization_id if row else None,
            user_id=row.id if row else None,
            source="web",
        )
        db.session.commit()

    @staticmethod
    def password_reset_token(user: User, *, now: int | None = None) -> str:
        """Minted by the email consumer at send time (never stored)."""
        return _mint("password-reset", user.id, now, f=_fingerprint(user.password_hash))

    @staticmethod
    def user_for_reset_token(token: str) -> User:
        """The user a reset link is for, if it can still be used. Raises InvalidLink."""
        claims = _read("password-reset", token, RESET_LINK_SECONDS, "This link has expired. Ask for a new one.")
        user = db.session.get(User, claims.user_id)
        if user is None or claims.data.get("f") != _fingerprint(user.password_hash):
            raise InvalidLink("This link has already been used. Ask for a new one if you still need it.")
        return user

    @staticmethod
    def reset_password(token: str, new_password: str) -> User:
        """Set a new password through a reset link: the link is spent, every session of the user ends,
        and the address counts as confirmed (the link reached its mailbox). Raises InvalidLink."""
        user = AccountService.user_for_reset_token(token)
        if AccountService._replace_password(user.id, user.password_hash, hash_password(new_password)) is None:
            raise InvalidLink("This link has already been used. Ask for a new one if you still need it.")
        db.session.execute(
            update(User).where(User.id == user.id, User.email_verified_at.is_(None)).values(email_verified_at=utcnow())
        )
        domain_events.record(
            "user.password_reset", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
        )
        db.session.commit()
        return user

    @staticmethod
    def _replace_password(user_id: int, old_hash: str, new_hash: str) -> int | None:
        """Set the new hash only if the old one is still in place; every session ends. The new epoch,
        or None when the password had already changed."""
        epoch = db.session.execute(
            update(User)
            .where(User.id == user_id, User.password_hash == old_hash)
            .values(password_hash=new_hash, session_epoch=User.session_epoch + 1)
            .returning(User.session_epoch)
            .execution_options(synchronize_session="fetch")
        ).scalar_one_or_none()
        return None if epoch is None else int(epoch)

    # --- email verification ------------------------------------------------------------------------

    @staticmethod
    def request_email_verification(user: User, *, source: str) -> None:
        """Send the user (again) a link to confirm their address."""
        domain_events.record(
            "user.email_verification_requested", organization_id=user.organization_id, user_id=user.id, source=source
        )
        db.session.commit()

    @staticmethod
    def email_verification_token(user: User, *, now: int | None = None) -> str:
        return _mint("verify-email", user.id, now, e=user.email)

    @staticmethod
    def verify_email(token: str) -> User:
        """Confirm the address a verification link was sent to. Using a link again changes nothing."""
        claims = _read(
            "verify-email",
            token,
            VERIFICATION_LINK_SECONDS,
            "This link has expired. Sign in and ask for a new one from the banner.",
        )
        user = db.session.get(User, claims.user_id)
        if user is None or claims.data.get("e") != user.email:
            raise InvalidLink("This link is not valid. Ask for a new one.")
        confirmed = db.session.execute(
            update(User)
            .where(User.id == user.id, User.email_verified_at.is_(None))
            .values(email_verified_at=utcnow())
            .returning(User.id)
            .execution_options(synchronize_session="fetch")
        ).first()
        if confirmed is not None:
            domain_events.record(
                "user.email_verified", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
            )
        db.session.commit()
        return user

    # --- email change ------------------------------------------------------------------------------

    @staticmethod
    def request_email_change(user: User, new_email: str, *, source: str) -> str:
        """Ask to move the account to ``new_email``: the worker sends the new address a link
        (account_emails.email_change_link); nothing changes until it is opened. Whether the address has
        an account is the new mailbox's to learn, not the form's: the answer is the same either way."""
        new_email = normalise_email(new_email)
        if new_email == user.email:
            raise AccountError("That is already your email address.")
        domain_events.record(
            "user.email_change_requested",
            organization_id=user.organization_id,
            user_id=user.id,
            source=source,
            new_email=new_email,
        )
        db.session.commit()
        return new_email

    @staticmethod
    def email_change_token(user: User, new_email: str, *, now: int | None = None) -> str:
        """Minted by the email consumer at send time (never stored)."""
        return _mint("change-email", user.id, now, e=user.email, n=new_email)

    @staticmethod
    def change_email(token: str) -> User:
        """Move the account to the address the link was sent to (which opening it proves), confirmed."""
        claims = _read("change-email", token, EMAIL_CHANGE_LINK_SECONDS, "This link has expired. Ask for a new one.")
        user = db.session.get(User, claims.user_id)
        old_email, new_email = claims.data.get("e"), claims.data.get("n")
        if user is None or user.removed_at is not None or old_email != user.email or not isinstance(new_email, str):
            raise InvalidLink("This link was already used, or the address changed since. Ask for a new one.")
        taken = InvalidLink(f"{new_email} already has a Ledgerline account, so it cannot become yours.")
        if active_account_id(new_email) is not None:
            raise taken
        try:
            release_removed_address(new_email, source=f"user:{user.id}")
            changed = db.session.execute(
                update(User)
                .where(User.id == user.id, User.email == old_email)
                .values(email=new_email, email_verified_at=utcnow())
                .returning(User.id)
                .execution_options(synchronize_session="fetch")
            ).first()
            if changed is None:  # another link changed it a moment ago
                raise InvalidLink("This link was already used, or the address changed since. Ask for a new one.")
            domain_events.record(
                "user.email_changed",
                organization_id=user.organization_id,
                user_id=user.id,
                source=f"user:{user.id}",
                old_email=old_email,
                new_email=new_email,
            )
            db.session.commit()
        except IntegrityError:
            db.session.rollback()  # the address got an account meanwhile
            raise taken from None
        except BaseException:
            db.session.rollback()
            raise
        return user
