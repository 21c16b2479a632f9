"""The operations console's payments: each of a customer's Stripe charges with the invoice it paid and
its refunds, and what each invoice has had refunded. Read live with the page-read timeout and no
retries (the BillingService reads staff_console hands in); a read that does not answer is named, and
the rest of the page is shown. Reads only; no transaction is open while Stripe answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.services.billing_common import BillingConfigurationError, BillingError

PAYMENT_HISTORY_LENGTH = 12
REFUNDED_CHARGES_READ = 5  # the refunds of at most this many refunded payments are listed (one read each)
ListRead = Callable[[Any, dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Refund:
    id: str
    amount: int
    created: int
    reason: str | None
    status: str


@dataclass
class Payment:
    id: str
    created: int
    amount: int
    currency: str
    status: str
    amount_refunded: int
    invoice_id: str | None
    refunds: list[Refund] = field(default_factory=list)
    refunds_unavailable: str | None = None


@dataclass
class Payments:
    payments: list[Payment] = field(default_factory=list)
    refunded_by_invoice: dict[str, int] = field(default_factory=dict)
    unavailable: str | None = None  # "Stripe did not answer" and why


def _id(value: Any) -> str | None:
    found = value.get("id") if isinstance(value, dict) else value
    return str(found) if found else None


def invoice_of_intent(invoices: list[dict[str, Any]]) -> dict[str, str]:
    """Each payment intent (or charge) id to the invoice it paid, from invoices read with their payments."""
    found: dict[str, str] = {}
    for invoice in invoices:
        for entry in (invoice.get("payments") or {}).get("data") or []:
            payment = entry.get("payment") or {}
            for key in ("payment_intent", "charge"):
                if paid := _id(payment.get(key)):
                    found[paid] = str(invoice.get("id"))
    return found


def payments_and_refunds(read_list: ListRead, customer_id: str, invoices: list[dict[str, Any]]) -> Payments:
    """The customer's latest charges, each with its invoice and (for those refunded) its refunds."""
    view = Payments()
    try:
        charges = read_list("charges", {"customer": customer_id, "limit": PAYMENT_HISTORY_LENGTH})
    except (BillingError, BillingConfigurationError) as exc:
        view.unavailable = f"Stripe did not answer: {exc}"
        return view
    paid_invoice = invoice_of_intent(invoices)
    for charge in charges:
        invoice_id = paid_invoice.get(_id(charge.get("payment_intent")) or "") or paid_invoice.get(str(charge["id"]))
        payment = Payment(
            id=str(charge["id"]),
            created=int(charge.get("created") or 0),
            amount=int(charge.get("amount") or 0),
            currency=str(charge.get("currency") or "usd"),
            status=str(charge.get("status") or ""),
            amount_refunded=int(charge.get("amount_refunded") or 0),
            invoice_id=invoice_id,
        )
        view.payments.append(payment)
        if invoice_id and payment.amount_refunded:
            view.refunded_by_invoice[invoice_id] = view.refunded_by_invoice.get(invoice_id, 0) + payment.amount_refunded
    for payment in [p for p in view.payments if p.amount_refunded][:REFUNDED_CHARGES_READ]:
        try:
            listed = read_list("refunds", {"charge": payment.id, "limit": 10})
        except (BillingError, BillingConfigurationError) as exc:
            payment.refunds_unavailable = f"Stripe did not answer: {exc}"
            continue
        payment.refunds = [
            Refund(
                str(r["id"]), int(r.get("amount") or 0), int(r.get("created") or 0), r.get("reason"), str(r["status"])
            )
            for r in listed
        ]
    return view
