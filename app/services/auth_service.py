"""Passwords and sign-in for existing users.

Password hashes are werkzeug's scrypt with OWASP's parameters: N=PASSWORD_SCRYPT_N (2**17 by default),
r=8, p=1, and a 16-byte salt; the parameters are stored in each hash ("scrypt:131072:8:1$salt$hash").
A user whose hash was made with weaker parameters (an older N, or werkzeug's former default 2**15) gets
a new hash of the same password at their next successful sign-in, transparently."""

from __future__ import annotations

from flask import current_app
from sqlalchemy import String, cast, literal, select, update
from werkzeug.security import check_password_hash, generate_password_hash

from app.extensions import db
from app.models import User
from app.models.types import utcnow
from app.services import domain_events

SCRYPT_R = 8
SCRYPT_P = 1
# Checked when the email is unknown, so a miss costs what a hit costs and timing reveals nothing: one
# per scrypt method, made on first use.
_unknown_user_hashes: dict[str, str] = {}
# Where a removed teammate's account goes when its address is given back (release_removed_address).
RELEASED_ADDRESS_DOMAIN = "released.invalid"


def normalise_email(email: str) -> str:
    """Emails are compared case-insensitively: stored trimmed and lower-cased."""
    return email.strip().lower()


def password_hash_method() -> str:
    """werkzeug's method string for new hashes: scrypt:N:r:p."""
    return f"scrypt:{current_app.config['PASSWORD_SCRYPT_N']}:{SCRYPT_R}:{SCRYPT_P}"


def hash_password(password: str) -> str:
    return generate_password_hash(password, method=password_hash_method())


def hash_is_weaker_than_policy(password_hash: str) -> bool:
    """Whether ``password_hash`` was made with weaker parameters than new hashes get."""
    method, *args = password_hash.split("$", 1)[0].split(":")
    if method != "scrypt":
        return True
    n, r, p = (int(arg) for arg in args) if len(args) == 3 else (2**15, 8, 1)  # werkzeug's bare "scrypt"
    return n < current_app.config["PASSWORD_SCRYPT_N"] or r < SCRYPT_R or p < SCRYPT_P


def active_account_id(email: str) -> int | None:
    """The account that holds ``email`` and can sign in. A teammate the owner removed holds it no longer."""
    return db.session.execute(
        select(User.id).where(User.email == normalise_email(email), User.removed_at.is_(None))
    ).scalar_one_or_none()


def release_removed_address(email: str, *, source: str) -> None:
    """Give ``email`` back to whoever controls its mailbox, in the caller's transaction, before an account
    is made for it. A teammate's account was made by the owner's invitation, and a removed teammate can
    never sign in again; if that account kept the address, its owner could neither sign up nor join
    another organization (and an owner could squat addresses). The removed row stays, since history names
    it, under a placeholder that can never receive mail (RFC 2606's .invalid); the domain event keeps the
    address it held. A removed member invited back by the same organization gets their row back instead
    (TeamService.accept), so this runs only when the address goes elsewhere."""
    released = db.session.execute(
        update(User)
        .where(User.email == normalise_email(email), User.removed_at.is_not(None))
        .values(email=literal("removed-") + cast(User.id, String) + literal(f"@{RELEASED_ADDRESS_DOMAIN}"))
        .returning(User.id, User.organization_id)
        .execution_options(synchronize_session=False)
    ).all()
    for row in released:
        domain_events.record(
            "user.address_released",
            organization_id=row.organization_id,
            user_id=row.id,
            source=source,
            email=normalise_email(email),
        )


def _unknown_user_hash() -> str:
    method = password_hash_method()
    if method not in _unknown_user_hashes:
        _unknown_user_hashes[method] = generate_password_hash("no user has this password", method=method)
    return _unknown_user_hashes[method]


class AuthService:
    @staticmethod
    def authenticate(email: str, password: str) -> User | None:
        user = db.session.execute(select(User).where(User.email == normalise_email(email))).scalar_one_or_none()
        if user is None:
            check_password_hash(_unknown_user_hash(), password)
            return None
        matches = check_password_hash(user.password_hash, password)
        if not matches or user.removed_at is not None:
            return None
        if hash_is_weaker_than_policy(user.password_hash):
            AuthService._rehash(user, password)
        return user

    @staticmethod
    def check_password(user: User, password: str) -> bool:
        """The user's own password, typed again (confirming it's them before a sensitive action)."""
        return bool(check_password_hash(user.password_hash, password))

    @staticmethod
    def _rehash(user: User, password: str) -> None:
        """Store a hash of the same password with today's parameters. Only if the hash is still the one
        checked (a password change at the same moment wins); sessions are not touched: the password
        did not change."""
        old_hash = user.password_hash
        db.session.execute(
            update(User)
            .where(User.id == user.id, User.password_hash == old_hash)
            .values(password_hash=hash_password(password))
            .execution_options(synchronize_session="fetch")
        )
        db.session.commit()

    @staticmethod
    def record_sign_in(user: User, *, source: str) -> None:
        user.last_login_at = utcnow()
        domain_events.record("user.signed_in", organization_id=user.organization_id, user_id=user.id, source=source)
        db.session.commit()
