from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.models.types import Timestamp, utcnow


class CataloguePrice(Model):
    """A Stripe price once seen carrying one of the catalogue's lookup keys. Remembered so that a
    subscription item still maps to its tier, add-on or meter (a metered price) after
    `transfer_lookup_key` moved the key to a newer price (the old price keeps its id and product, and
    loses its lookup key)."""

    __tablename__ = "catalogue_price"
    __table_args__ = (CheckConstraint("kind IN ('tier', 'addon', 'meter')", name="ck_catalogue_price_kind"),)

    price_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    product_id: Mapped[str | None] = mapped_column(String(255), index=True)
    lookup_key: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))  # tier, addon or meter
    catalogue_key: Mapped[str] = mapped_column(String(50))
    first_seen_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
