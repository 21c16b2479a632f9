"""TwoFactorService: two-factor sign-in with an authenticator app (TOTP, RFC 6238, via pyotp), ten
single-use recovery codes, and an organization's requirement that every member uses it.

- **Enrolment**: a new secret (160 random bits, base32) is shown as a QR code (segno, inline SVG) and as
  text; it is stored only once the user proves their app has it by typing a code it shows.
- **Codes**: six digits for 30-second time steps. A code of the current step or one step either side
  is accepted (clocks drift), and the step of each accepted code is stored (``totp_last_step``): a code
  of that step or an earlier one is refused, so a code works once even if someone saw it being typed.
  The store is a conditional UPDATE, so two uses of one code at the same moment cannot both pass.
- **Recovery codes**: ten of 80 random bits each, shown once when made; only their SHA-256 is stored
  (80 random bits need no slow hash), and each is spent by a conditional UPDATE. Making new ones voids
  the old ones.
- **Required by the owner**: ``organization.require_two_factor``; a member without two-factor sign-in is
  sent to enrolment after signing in (app/access.py). Only an owner who uses it can require it.

The time comes from app.clock, which tests move. Domain events record every change (never a secret or
a code).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import pyotp
import segno
from flask import current_app
from sqlalchemy import delete, func, or_, select, update

from app import clock
from app.extensions import db
from app.models import Organization, RecoveryCode, User
from app.models.types import utcnow
from app.services import domain_events

STEP_SECONDS = 30
CODE_DIGITS = 6
# Steps either side of the current one whose codes are still accepted.
ALLOWED_SKEW_STEPS = 1
RECOVERY_CODE_COUNT = 10
RECOVERY_CODE_BYTES = 10  # 80 bits, written as 20 hex digits in four groups of five


class TwoFactorError(Exception):
    """The message is meant for the person asking."""


class InvalidCode(TwoFactorError):
    def __init__(self) -> None:
        super().__init__("That code is not right. Type the code your authenticator app shows now, or a recovery code.")


class CodeAlreadyUsed(TwoFactorError):
    def __init__(self) -> None:
        super().__init__("That code has been used already. Wait for your app to show the next one.")


@dataclass(frozen=True)
class Enrolment:
    secret: str
    uri: str
    qr_svg: str

    @property
    def secret_groups(self) -> str:
        """The secret in groups of four, easier to type into an app by hand."""
        return " ".join(self.secret[i : i + 4] for i in range(0, len(self.secret), 4))


def _digits(code: str) -> str:
    return "".join(code.split())


def _normalise_recovery_code(code: str) -> str:
    return "".join(character for character in code.lower() if character not in " -")


def _recovery_code_hash(code: str) -> str:
    return hashlib.sha256(_normalise_recovery_code(code).encode()).hexdigest()


def _new_recovery_code() -> str:
    digits = secrets.token_hex(RECOVERY_CODE_BYTES)
    return "-".join(digits[i : i + 5] for i in range(0, len(digits), 5))


def matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step, within the allowed skew of ``now``, whose code ``code`` is; None if none."""
    code = _digits(code)
    if len(code) != CODE_DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=CODE_DIGITS, interval=STEP_SECONDS)
    current = int(now) // STEP_SECONDS
    found = None
    for step in range(current - ALLOWED_SKEW_STEPS, current + ALLOWED_SKEW_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):  # every step compared: no early return
            found = step
    return found


def looks_like_totp(code: str) -> bool:
    code = _digits(code)
    return len(code) == CODE_DIGITS and code.isdigit()


class TwoFactorService:
    # --- enrolment ---------------------------------------------------------------------------------

    @staticmethod
    def new_enrolment(user: User, secret: str | None = None) -> Enrolment:
        """A secret to enrol (a new one unless ``secret``, the one being enrolled, is given), with the
        otpauth:// address and its QR code."""
        secret = secret or pyotp.random_base32()
        uri = pyotp.TOTP(secret, digits=CODE_DIGITS, interval=STEP_SECONDS).provisioning_uri(
            name=user.email, issuer_name=current_app.config["TWO_FACTOR_ISSUER"]
        )
        qr_svg = segno.make(uri, error="m").svg_inline(
            scale=4, border=4, dark="#000", light="#fff", svgclass="qr-code", title="QR code of your secret"
        )
        return Enrolment(secret=secret, uri=uri, qr_svg=qr_svg)

    @staticmethod
    def enable(user: User, secret: str, code: str) -> list[str]:
        """Turn two-factor sign-in on with ``secret`` once ``code`` proves the user's app has it.
        Returns the ten recovery codes, to be shown once. Raises InvalidCode, TwoFactorError."""
        step = matching_step(secret, code, clock.now())
        if step is None:
            raise InvalidCode()
        enabled = db.session.execute(
            update(User)
            .where(User.id == user.id, User.totp_enabled_at.is_(None))
            .values(totp_secret=secret, totp_enabled_at=utcnow(), totp_last_step=step)
            .returning(User.id)
            .execution_options(synchronize_session="fetch")
        ).first()
        if enabled is None:
            db.session.rollback()
            raise TwoFactorError("Two-factor sign-in is already on for your account.")
        codes = TwoFactorService._replace_recovery_codes(user.id)
        domain_events.record(
            "user.two_factor_enabled", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
        )
        db.session.commit()
        return codes

    @staticmethod
    def disable(user: User) -> None:
        """Turn two-factor sign-in off (the caller made sure the user just proved who they are).
        Refused while the organization requires it."""
        if user.organization.require_two_factor:
            raise TwoFactorError(
                "Your organization requires two-factor sign-in, so it stays on. You can make new recovery codes."
            )
        db.session.execute(
            update(User)
            .where(User.id == user.id)
            .values(totp_secret=None, totp_enabled_at=None, totp_last_step=None)
            .execution_options(synchronize_session="fetch")
        )
        db.session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
        domain_events.record(
            "user.two_factor_disabled", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
        )
        db.session.commit()

    @staticmethod
    def regenerate_recovery_codes(user: User) -> list[str]:
        """Ten new recovery codes; the old ones stop working."""
        if not user.two_factor_enabled:
            raise TwoFactorError("Turn on two-factor sign-in first.")
        codes = TwoFactorService._replace_recovery_codes(user.id)
        domain_events.record(
            "user.recovery_codes_replaced",
            organization_id=user.organization_id,
            user_id=user.id,
            source=f"user:{user.id}",
        )
        db.session.commit()
        return codes

    @staticmethod
    def _replace_recovery_codes(user_id: int) -> list[str]:
        db.session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
        codes = [_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
        db.session.add_all(RecoveryCode(user_id=user_id, code_hash=_recovery_code_hash(code)) for code in codes)
        return codes

    @staticmethod
    def recovery_codes_left(user: User) -> int:
        return int(
            db.session.execute(
                select(func.count(RecoveryCode.id)).where(
                    RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None)
                )
            ).scalar_one()
        )

    # --- checking codes ----------------------------------------------------------------------------

    @staticmethod
    def verify(user: User, code: str) -> str:
        """Check a second factor: a code of the user's authenticator app, or one of their recovery
        codes. Returns "totp" or "recovery_code". Raises InvalidCode or CodeAlreadyUsed."""
        if not user.two_factor_enabled or user.totp_secret is None:
            raise InvalidCode()
        if looks_like_totp(code):
            TwoFactorService._use_totp(user, code)
            return "totp"
        TwoFactorService._use_recovery_code(user, code)
        return "recovery_code"

    @staticmethod
    def _use_totp(user: User, code: str) -> None:
        step = matching_step(user.totp_secret or "", code, clock.now())
        if step is None:
            raise InvalidCode()
        # Only a step later than the last accepted one: a code is good once, and so is any earlier one.
        accepted = db.session.execute(
            update(User)
            .where(User.id == user.id, or_(User.totp_last_step.is_(None), User.totp_last_step < step))
            .values(totp_last_step=step)
            .returning(User.id)
            .execution_options(synchronize_session="fetch")
        ).first()
        db.session.commit()
        if accepted is None:
            raise CodeAlreadyUsed()

    @staticmethod
    def _use_recovery_code(user: User, code: str) -> None:
        spent = db.session.execute(
            update(RecoveryCode)
            .where(
                RecoveryCode.user_id == user.id,
                RecoveryCode.code_hash == _recovery_code_hash(code),
                RecoveryCode.used_at.is_(None),
            )
            .values(used_at=utcnow())
            .returning(RecoveryCode.id)
        ).first()
        if spent is None:
            db.session.rollback()
            raise InvalidCode()
        domain_events.record(
            "user.recovery_code_used", organization_id=user.organization_id, user_id=user.id, source=f"user:{user.id}"
        )
        db.session.commit()

    # --- the organization's requirement ------------------------------------------------------------

    @staticmethod
    def set_required(owner: User, required: bool) -> None:
        """The owner requires (or stops requiring) two-factor sign-in of every member."""
        if not owner.is_owner:
            raise TwoFactorError("Only the organization's owner can decide this.")
        if required and not owner.two_factor_enabled:
            raise TwoFactorError("Turn on two-factor sign-in for your own account first.")
        db.session.execute(
            update(Organization)
            .where(Organization.id == owner.organization_id)
            .values(require_two_factor=required)
            .execution_options(synchronize_session="fetch")
        )
        domain_events.record(
            "organization.two_factor_required" if required else "organization.two_factor_not_required",
            organization_id=owner.organization_id,
            user_id=owner.id,
            source=f"user:{owner.id}",
        )
        db.session.commit()

    @staticmethod
    def enrolment_required(user: User) -> bool:
        """The user's organization requires two-factor sign-in and the user has not turned it on."""
        return bool(user.organization.require_two_factor) and not user.two_factor_enabled
