"""Prices as the pages show them: what a Stripe Price says (amount, currency, interval), read into a
small value the price cache can hold, and money written for people. Pure: no Stripe SDK, no database."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

# Currencies whose amounts Stripe counts in whole units (no cents).
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "cad": "CA$", "aud": "A$", "jpy": "¥"}
MONTHS_PER: dict[str, Decimal] = {
    "month": Decimal(1),
    "year": Decimal(12),
    "week": Decimal(12) / Decimal(52),
    "day": Decimal(12) / Decimal(365),
}


@dataclass(frozen=True)
class PriceInfo:
    id: str
    lookup_key: str | None
    unit_amount: int | None  # in the currency's smallest unit; None for tiered/custom prices
    currency: str
    interval: str | None  # month, year, ... (None: not recurring)
    interval_count: int = 1
    product: str | None = None
    active: bool = True
    metered: bool = False  # recurring.usage_type "metered": billed in arrears from a meter's usage
    meter: str | None = None  # a metered price's billing meter (mtr_...)
    # exclusive | inclusive | unspecified: whether unit_amount includes the tax (Stripe Tax; tax.py)
    tax_behavior: str = "unspecified"

    @classmethod
    def from_stripe(cls, price: Mapping[str, Any]) -> PriceInfo:
        recurring = price.get("recurring") or {}
        product = price.get("product")
        return cls(
            id=str(price["id"]),
            lookup_key=price.get("lookup_key"),
            unit_amount=price.get("unit_amount"),
            currency=str(price.get("currency") or "usd"),
            interval=recurring.get("interval"),
            interval_count=int(recurring.get("interval_count") or 1),
            product=product if isinstance(product, str) or product is None else product.get("id"),
            active=bool(price.get("active", True)),
            metered=recurring.get("usage_type") == "metered",
            meter=recurring.get("meter") if isinstance(recurring.get("meter"), str) else None,
            tax_behavior=str(price.get("tax_behavior") or "unspecified"),
        )

    def to_cache(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_cache(cls, value: Any) -> PriceInfo | None:
        """A cached entry, or None for anything else (an entry written by an older release, say)."""
        if not isinstance(value, dict) or "tax_behavior" not in value:
            return None
        try:
            return cls(**value)
        except TypeError:
            return None

    def monthly_equivalent(self, quantity: int = 1) -> Decimal:
        """What quantity of this price costs per month, for comparing a plan with another."""
        if self.unit_amount is None or self.interval is None:
            return Decimal(0)
        return Decimal(self.unit_amount * quantity) / (MONTHS_PER.get(self.interval, Decimal(1)) * self.interval_count)

    def describe(self, quantity: int = 1) -> str:
        """ "$19.00 / month", "$50.00 / year" """
        if self.unit_amount is None:
            return "price set at Stripe"
        every = self.interval if self.interval_count == 1 else f"{self.interval_count} {self.interval}s"
        return (
            f"{format_money(self.unit_amount * quantity, self.currency)} / {every}"
            if every
            else format_money(self.unit_amount * quantity, self.currency)
        )


def format_money(amount: int | None, currency: str | None) -> str:
    """Stripe amounts (smallest unit) as people write them: $19.00, -$4.50, ¥500, 12.00 CHF."""
    if amount is None:
        return "—"
    code = (currency or "usd").lower()
    sign = "-" if amount < 0 else ""
    value = abs(amount)
    number = f"{value:,}" if code in ZERO_DECIMAL else f"{Decimal(value) / 100:,.2f}"
    symbol = SYMBOLS.get(code)
    return f"{sign}{symbol}{number}" if symbol else f"{sign}{number} {code.upper()}"


@dataclass(frozen=True)
class InvoiceTax:
    """An invoice's tax split by how Stripe applied it: `added` on top of exclusive prices, `included`
    inside inclusive ones (total_taxes[].tax_behavior). A reverse charge or an exemption is a zero
    amount: an inclusive price is then charged as it is (Stripe keeps what the buyer pays)."""

    added: int = 0
    included: int = 0
    currency: str = "usd"

    @classmethod
    def of(cls, invoice: Mapping[str, Any]) -> InvoiceTax:
        added = included = 0
        for tax in invoice.get("total_taxes") or []:
            if tax.get("tax_behavior") == "inclusive":
                included += int(tax.get("amount") or 0)
            else:
                added += int(tax.get("amount") or 0)
        return cls(added, included, str(invoice.get("currency") or "usd"))

    @property
    def amount(self) -> int:
        return self.added + self.included

    def words(self, total: int) -> str:
        """How `total` (what is charged, tax and all) is made up: "$19.00 + $3.61 tax" (exclusive),
        "including $3.03 tax" (inclusive); both when an invoice mixes them; "" with no tax."""
        parts = []
        if self.added:
            parts.append(
                f"{format_money(total - self.added, self.currency)} + {format_money(self.added, self.currency)} tax"
            )
        if self.included:
            parts.append(f"including {format_money(self.included, self.currency)} tax")
        return ", ".join(parts)
