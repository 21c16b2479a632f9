from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import BigId, Timestamp, utcnow


class RecoveryCode(Model):
    """One of a user's ten single-use recovery codes for two-factor sign-in. Only its SHA-256 is kept
    (the code is 80 random bits, shown once); used_at is set by a conditional update, so a code signs
    in once even when it is tried twice at the same moment."""

    __tablename__ = "recovery_code"
    __table_args__ = (UniqueConstraint("user_id", "code_hash", name="uq_recovery_code_user_hash"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(Timestamp)
