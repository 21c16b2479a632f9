"""Template filters shared by the pages."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Flask, current_app

from app.extensions import db
from app.models import Organization
from app.services import tax, trials
from app.services.access_policy import STATUS_WORDS
from app.services.pricing import PriceInfo, format_money
from app.services.wording import counted


def money(amount: int | None, currency: str | None = "usd") -> str:
    """Stripe's smallest-unit amount as people write it: 2900, "usd" -> "$29.00" (app/services/pricing.py)."""
    return format_money(amount or 0, currency)


def init_templating(app: Flask) -> None:
    app.add_template_filter(money, "money")
    app.add_template_filter(counted, "counted")

    @app.template_filter("longdate")
    def longdate(value: datetime | None) -> str:
        if value is None:
            return ""
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return f"{value:%d %B %Y}".lstrip("0")

    @app.template_filter("clock")
    def clock(value: datetime | None) -> str:
        """The time of day in UTC, "14:05 UTC"."""
        if value is None:
            return ""
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
        return f"{value.astimezone(UTC):%H:%M} UTC"

    @app.template_filter("tier_name")
    def tier_name(tier_key: str) -> str:
        tier = current_app.extensions["plan_catalogue"].tier(tier_key)
        return tier.name if tier else tier_key

    @app.template_filter("unixdate")
    def unixdate(value: int | None) -> str:
        return longdate(datetime.fromtimestamp(value, UTC)) if value else ""

    @app.template_filter("status_words")
    def status_words(status: str) -> str:
        return STATUS_WORDS.get(status, status)  # type: ignore[call-overload, no-any-return]

    @app.template_global("tax_note")
    def tax_note() -> str:
        """How prices are shown (PRICES_SHOWN_WITH_TAX), when Stripe Tax is on (STRIPE_AUTOMATIC_TAX)."""
        if not app.config["STRIPE_AUTOMATIC_TAX"]:
            return ""
        if app.config["PRICES_SHOWN_WITH_TAX"] == "inclusive":
            return "Prices include tax."
        return "Prices are shown before tax; sales tax or VAT is added from your billing address."

    @app.template_global("price_tax_words")
    def price_tax_words(price: PriceInfo | None) -> str:
        """ "including tax" or "plus tax" after a catalogue price, from its tax_behavior (tax.py)."""
        words = tax.price_words(price)
        return f" {words}" if words else ""

    @app.template_global("trial_reminder")
    def trial_reminder(organization_id: int | None) -> datetime | None:
        """When a trial that started without a card ends, in its last days (the banner); else None.
        By id: the signed-in user may be detached from the session by then (a page rendered after a
        refused action rolled it back), and the banner must not lazy-load through them."""
        organization = db.session.get(Organization, organization_id) if organization_id is not None else None
        if organization is None:
            return None
        return trials.reminder(organization, current_app.extensions["plan_catalogue"])
