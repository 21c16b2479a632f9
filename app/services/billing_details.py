"""What the owner's billing page shows beyond the organization's own row, read from Stripe's objects
or Whop's (plain dicts) into small values that can be cached: the plan's prices, the next invoice, the
payment method on file and the invoice history. Pure: BillingService fetches, caches and degrades;
this reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from app.services.pricing import InvoiceTax
from app.services.subscription_state import from_unix
from app.services.tax import CustomerTax, invoice_tax
from app.services.whop_state import minor_units, parse_time


@dataclass(frozen=True)
class PlanLine:
    description: str
    lookup_key: str | None
    quantity: int
    unit_amount: int | None
    currency: str
    interval: str | None


@dataclass(frozen=True)
class ScheduledChange:
    """A downgrade waiting for the period's end (a subscription schedule's next phase)."""

    schedule_id: str
    starts_at: int | None
    lookup_keys: list[str]
    quantities: dict[str, int]


@dataclass(frozen=True)
class ActiveDiscount:
    """A discount on the subscription (a coupon, usually redeemed through a promotion code)."""

    code: str | None
    name: str | None
    percent_off: float | None
    amount_off: int | None
    currency: str | None
    duration: str
    ends_at: int | None  # None: forever, or a once discount waiting for the next invoice

    @property
    def ends(self) -> datetime | None:
        return from_unix(self.ends_at)

    @classmethod
    def from_stripe(cls, discount: Mapping[str, Any]) -> ActiveDiscount:
        coupon = discount.get("coupon") or (discount.get("source") or {}).get("coupon") or {}
        code = discount.get("promotion_code")
        return cls(
            code=str(code.get("code")) if isinstance(code, Mapping) and code.get("code") else None,
            name=coupon.get("name") if isinstance(coupon, Mapping) else None,
            percent_off=coupon.get("percent_off") if isinstance(coupon, Mapping) else None,
            amount_off=coupon.get("amount_off") if isinstance(coupon, Mapping) else None,
            currency=coupon.get("currency") if isinstance(coupon, Mapping) else None,
            duration=str(coupon.get("duration") or "once") if isinstance(coupon, Mapping) else "once",
            ends_at=discount.get("end"),
        )


@dataclass(frozen=True)
class SubscriptionFacts:
    lines: list[PlanLine]
    interval: str | None
    default_payment_method: str | None
    schedule_id: str | None
    latest_invoice: str | None
    # An upgrade waiting for its invoice to be paid (Stripe's pending_update): until when it can be.
    pending_update_expires_at: int | None = None
    discounts: list[ActiveDiscount] = field(default_factory=list)

    @classmethod
    def from_stripe(cls, subscription: Mapping[str, Any]) -> SubscriptionFacts:
        lines = []
        interval = None
        for item in (subscription.get("items") or {}).get("data") or []:
            price = item.get("price") or {}
            recurring = price.get("recurring") or {}
            lines.append(
                PlanLine(
                    description=str(price.get("nickname") or price.get("lookup_key") or price.get("id") or ""),
                    lookup_key=price.get("lookup_key"),
                    quantity=int(item.get("quantity") or 0),
                    unit_amount=price.get("unit_amount"),
                    currency=str(price.get("currency") or "usd"),
                    interval=recurring.get("interval"),
                )
            )
            interval = interval or recurring.get("interval")
        return cls(
            lines=lines,
            interval=interval,
            default_payment_method=_id(subscription.get("default_payment_method")),
            schedule_id=_id(subscription.get("schedule")),
            latest_invoice=_id(subscription.get("latest_invoice")),
            pending_update_expires_at=(subscription.get("pending_update") or {}).get("expires_at"),
            # Read with expand=discounts.promotion_code; an unexpanded id says nothing to show.
            discounts=[
                ActiveDiscount.from_stripe(d) for d in subscription.get("discounts") or [] if isinstance(d, Mapping)
            ],
        )

    @classmethod
    def from_whop(cls, membership: Mapping[str, Any]) -> SubscriptionFacts:
        """A Whop membership's price: its renewal price every `billing_period_days` (a month)."""
        price = membership.get("renewal_price") or membership.get("initial_price") or {}
        days = membership.get("billing_period_days")
        interval = "year" if isinstance(days, int | float) and days >= 365 else "month"
        product = membership.get("product") or {}
        line = PlanLine(
            description=str(product.get("title") or membership.get("plan_id") or ""),
            lookup_key=None,
            quantity=1,
            unit_amount=minor_units(price),
            currency=str(price.get("currency") or "usd"),
            interval=interval,
        )
        return cls(lines=[line], interval=interval, default_payment_method=None, schedule_id=None, latest_invoice=None)

    def to_cache(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_cache(cls, value: Mapping[str, Any]) -> SubscriptionFacts:
        return cls(
            **{
                **value,
                "lines": [PlanLine(**line) for line in value["lines"]],
                "discounts": [ActiveDiscount(**d) for d in value.get("discounts") or []],
            }
        )


@dataclass(frozen=True)
class UpcomingInvoice:
    amount_due: int
    currency: str
    date: int | None
    # (price id, amount) of each line billed at a price: the metered lines hold the usage Stripe has
    # counted so far, which the billing page replaces with our own (fresher) figure.
    price_amounts: tuple[tuple[str, int], ...] = ()
    tax: int = 0  # Stripe Tax's part of amount_due (total_taxes)
    tax_split: InvoiceTax | None = None  # added on top / included in the prices (tax.py)

    @property
    def when(self) -> datetime | None:
        return from_unix(self.date)

    def tax_words(self, total: int) -> str:
        """ "$19.00 + $3.61 tax" or "including $3.03 tax" for what the invoice charges (tax.py)."""
        return (self.tax_split or InvoiceTax(added=self.tax, currency=self.currency)).words(total)

    def amount_for(self, price_ids: Iterable[str]) -> int:
        wanted = set(price_ids)
        return sum(amount for price_id, amount in self.price_amounts if price_id in wanted)

    @classmethod
    def from_stripe(cls, invoice: Mapping[str, Any]) -> UpcomingInvoice:
        date = invoice.get("next_payment_attempt") or invoice.get("period_end") or invoice.get("created")
        amounts = []
        for line in (invoice.get("lines") or {}).get("data") or []:
            details = (line.get("pricing") or {}).get("price_details") or {}
            price = details.get("price") or line.get("price")  # an id (current API) or a price (older)
            price_id = price.get("id") if isinstance(price, dict) else price
            if isinstance(price_id, str):
                amounts.append((price_id, int(line.get("amount") or 0)))
        currency = str(invoice.get("currency") or "usd")
        return cls(
            int(invoice.get("amount_due") or 0),
            currency,
            date,
            tuple(amounts),
            invoice_tax(invoice),
            InvoiceTax.of(invoice),
        )

    @classmethod
    def from_whop(cls, membership: Mapping[str, Any]) -> UpcomingInvoice | None:
        """Whop's next charge: the renewal price at the period's end (none for a non-renewing one)."""
        price = membership.get("renewal_price")
        renews = parse_time(membership.get("current_period_end"))
        amount = minor_units(price or {})
        if not price or amount is None or renews is None:
            return None
        return cls(amount, str(price.get("currency") or "usd"), int(renews.timestamp()))


@dataclass(frozen=True)
class CardOnFile:
    brand: str
    last4: str
    exp_month: int | None
    exp_year: int | None
    kind: str = "card"

    @classmethod
    def from_stripe(cls, method: Mapping[str, Any]) -> CardOnFile:
        kind = str(method.get("type") or "card")
        details = method.get(kind) or {}
        return cls(
            brand=str(details.get("brand") or details.get("bank_name") or kind).replace("_", " ").title(),
            last4=str(details.get("last4") or "????"),
            exp_month=details.get("exp_month"),
            exp_year=details.get("exp_year"),
            kind=kind,
        )

    @classmethod
    def from_whop(cls, payment: Mapping[str, Any]) -> CardOnFile | None:
        """The card of a Whop payment, as Whop reports it (`payment_instrument`); None without one."""
        instrument = payment.get("payment_instrument") or {}
        card = instrument.get("card") or {}
        kind = str(instrument.get("payment_method_type") or payment.get("payment_method_type") or "")
        if not card and not kind:
            return None
        exp_month, exp_year = card.get("exp_month"), card.get("exp_year")
        return cls(
            brand=str(card.get("brand") or instrument.get("display_name") or kind).replace("_", " ").title(),
            last4=str(card.get("last4") or "????"),
            exp_month=int(exp_month) if exp_month else None,
            exp_year=int(exp_year) if exp_year else None,
            kind=kind or "card",
        )


@dataclass(frozen=True)
class InvoiceRow:
    id: str
    number: str | None
    created: int | None
    amount: int
    currency: str
    status: str | None
    hosted_invoice_url: str | None
    invoice_pdf: str | None

    @property
    def when(self) -> datetime | None:
        return from_unix(self.created)

    @classmethod
    def from_stripe(cls, invoice: Mapping[str, Any]) -> InvoiceRow:
        amount = invoice.get("total")
        if amount is None:
            amount = invoice.get("amount_due") or 0
        return cls(
            id=str(invoice["id"]),
            number=invoice.get("number"),
            created=invoice.get("created"),
            amount=int(amount),
            currency=str(invoice.get("currency") or "usd"),
            status=invoice.get("status"),
            hosted_invoice_url=_safe_url(invoice.get("hosted_invoice_url")),
            invoice_pdf=_safe_url(invoice.get("invoice_pdf")),
        )

    @classmethod
    def from_whop(cls, payment: Mapping[str, Any]) -> InvoiceRow:
        """A Whop payment as a row of the history (Whop's receipts have no public link)."""
        total = payment.get("total") or payment.get("subtotal") or {}
        created = parse_time(payment.get("paid_at") or payment.get("created_at"))
        return cls(
            id=str(payment.get("id")),
            number=None,
            created=int(created.timestamp()) if created else None,
            amount=minor_units(total) or 0,
            currency=str(payment.get("currency") or total.get("currency") or "usd"),
            status=payment.get("status"),
            hosted_invoice_url=None,
            invoice_pdf=None,
        )


@dataclass
class BillingDetails:
    """Each part is None when it could not be read; `unavailable` names those parts for the page."""

    subscription: SubscriptionFacts | None = None
    upcoming: UpcomingInvoice | None = None
    payment_method: CardOnFile | None = None
    invoices: list[InvoiceRow] | None = None
    scheduled_change: ScheduledChange | None = None
    unavailable: list[str] = field(default_factory=list)
    tax: CustomerTax | None = None  # the billing address, tax IDs and exemption (tax.py)


def scheduled_change_from_stripe(schedule: Mapping[str, Any], now: int) -> ScheduledChange | None:
    """The first phase of an active schedule that starts after the current one: what the subscription
    becomes next."""
    if schedule.get("status") not in ("not_started", "active"):
        return None
    # Stripe's own idea of now: the current phase (a test clock's time may be far from ours).
    current = schedule.get("current_phase") or {}
    if current.get("start_date") is not None:
        now = int(current["start_date"])
    for phase in schedule.get("phases") or []:
        start = phase.get("start_date")
        if start is not None and int(start) > now:
            keys: list[str] = []
            quantities: dict[str, int] = {}
            for item in phase.get("items") or []:
                price = item.get("price")
                key = price if isinstance(price, str) else (price or {}).get("lookup_key") or (price or {}).get("id")
                keys.append(str(key))
                quantities[str(key)] = int(item.get("quantity") or 1)
            return ScheduledChange(str(schedule["id"]), int(start), keys, quantities)
    return None


def _id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return str(value.get("id")) if value.get("id") else None
    return None


def _safe_url(value: Any) -> str | None:
    """Only http(s) links from Stripe are rendered as links."""
    return value if isinstance(value, str) and value.startswith(("https://", "http://")) else None
