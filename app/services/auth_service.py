"""Passwords and sign-in for existing users."""

from __future__ import annotations

from sqlalchemy import select
from werkzeug.security import check_password_hash, generate_password_hash

from app.extensions import db
from app.models import User
from app.models.types import utcnow
from app.services import domain_events

# werkzeug's default: scrypt (N=2**15, r=8, p=1) with a 16-byte salt.
PASSWORD_HASH_METHOD = "scrypt"  # noqa: S105 (a method name, not a password)
# Checked when the email is unknown, so a miss costs what a hit costs and timing reveals nothing.
_UNKNOWN_USER_HASH = generate_password_hash("no user has this password", method=PASSWORD_HASH_METHOD)


def normalise_email(email: str) -> str:
    """Emails are compared case-insensitively: stored trimmed and lower-cased."""
    return email.strip().lower()


def hash_password(password: str) -> str:
    return generate_password_hash(password, method=PASSWORD_HASH_METHOD)


class AuthService:
    @staticmethod
    def authenticate(email: str, password: str) -> User | None:
        user = db.session.execute(select(User).where(User.email == normalise_email(email))).scalar_one_or_none()
        if user is None:
            check_password_hash(_UNKNOWN_USER_HASH, password)
            return None
        matches = check_password_hash(user.password_hash, password)
        return user if matches and user.removed_at is None else None

    @staticmethod
    def record_sign_in(user: User, *, source: str) -> None:
        user.last_login_at = utcnow()
        domain_events.record("user.signed_in", organization_id=user.organization_id, user_id=user.id, source=source)
        db.session.commit()
