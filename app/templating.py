"""Template filters shared by the pages."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Flask, current_app

from app.services.access_policy import STATUS_WORDS

ZERO_DECIMAL_CURRENCIES = frozenset({"jpy", "krw", "vnd", "clp", "isk", "ugx", "xaf", "xof"})
CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}


def money(amount: int | None, currency: str | None) -> str:
    """Stripe's smallest-unit amount as people write it: 2900, "usd" -> "$29.00"."""
    code = (currency or "usd").lower()
    value = (amount or 0) if code in ZERO_DECIMAL_CURRENCIES else (amount or 0) / 100
    text = f"{value:,.0f}" if code in ZERO_DECIMAL_CURRENCIES else f"{value:,.2f}"
    symbol = CURRENCY_SYMBOLS.get(code)
    return f"{symbol}{text}" if symbol else f"{text} {code.upper()}"


def init_templating(app: Flask) -> None:
    app.add_template_filter(money, "money")

    @app.template_filter("longdate")
    def longdate(value: datetime | None) -> str:
        if value is None:
            return ""
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return f"{value:%d %B %Y}".lstrip("0")

    @app.template_filter("tier_name")
    def tier_name(tier_key: str) -> str:
        tier = current_app.extensions["plan_catalogue"].tier(tier_key)
        return tier.name if tier else tier_key

    @app.template_filter("status_words")
    def status_words(status: str) -> str:
        return STATUS_WORDS.get(status, status)  # type: ignore[call-overload, no-any-return]
