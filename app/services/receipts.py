"""Receipts: an email for every paid invoice, sent by the worker through the outbox, once per
`billing.payment_succeeded` (one per invoice: the invoice.paid webhook records it, or provisioning for a
signup's first invoice, and a second word about the same paid invoice records nothing). The receipt
says what was paid, the tax, the period, the card, and links Stripe's hosted invoice and its PDF; it goes
to the organization's billing email address when the owner chose one, else to the owner.

Stripe is read through the ReceiptReads BillingService hands in (the consumer is registered in
jobs.py, the worker's side that may call the authority)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from app.extensions import db
from app.models import Organization
from app.services import domain_events
from app.services.auth_service import normalise_email
from app.services.mailer import send_event_email
from app.services.notifications import organization_and_owner
from app.services.outbox import OutboxEvent
from app.services.pricing import InvoiceTax, format_money
from app.services.subscription_state import from_unix


class ReceiptReads(Protocol):
    def read_invoice_for_receipt(self, invoice_id: str) -> dict[str, Any]: ...

    def read_payment_method(self, customer_id: str, default_method: str | None) -> dict[str, Any] | None: ...


class BillingEmailError(ValueError):
    """The billing email address given cannot be used; the message says why."""


@dataclass(frozen=True)
class Receipt:
    number: str | None
    amount_paid: int
    currency: str
    subtotal: int
    discount: int
    tax: int
    tax_included: int  # the part of `tax` inside inclusive prices (not added on top)
    period_start: datetime | None
    period_end: datetime | None
    card: str | None  # "Visa ending in 4242"
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    lines: list[tuple[str, int]]

    def money(self, amount: int) -> str:
        return format_money(amount, self.currency)

    @classmethod
    def from_stripe(cls, invoice: Mapping[str, Any], card: Mapping[str, Any] | None) -> Receipt:
        lines = (invoice.get("lines") or {}).get("data") or []
        starts = [int(p["start"]) for line in lines if (p := line.get("period")) and p.get("start")]
        ends = [int(p["end"]) for line in lines if (p := line.get("period")) and p.get("end")]
        details = (card or {}).get("card") or {}
        return cls(
            number=invoice.get("number"),
            amount_paid=int(invoice.get("amount_paid") or 0),
            currency=str(invoice.get("currency") or "usd"),
            subtotal=int(invoice.get("subtotal") or 0),
            discount=sum(int(d.get("amount") or 0) for d in invoice.get("total_discount_amounts") or []),
            tax=InvoiceTax.of(invoice).amount,
            tax_included=InvoiceTax.of(invoice).included,
            period_start=from_unix(min(starts)) if starts else None,
            period_end=from_unix(max(ends)) if ends else None,
            card=f"{str(details.get('brand') or 'card').title()} ending in {details['last4']}"
            if details.get("last4")
            else None,
            hosted_invoice_url=_https_or_none(invoice.get("hosted_invoice_url")),
            invoice_pdf=_https_or_none(invoice.get("invoice_pdf")),
            lines=[(str(line.get("description") or ""), int(line.get("amount") or 0)) for line in lines],
        )


def send_receipt(event: OutboxEvent, stripe: ReceiptReads) -> None:
    """The receipt for the paid invoice a `billing.payment_succeeded` names (nothing for $0)."""
    invoice_id = event.data.get("invoice_id")
    found = organization_and_owner(event.organization_id)
    if not invoice_id or found is None:
        return
    organization, owner = found
    invoice = stripe.read_invoice_for_receipt(str(invoice_id))
    if not invoice.get("amount_paid") or invoice.get("status") != "paid":
        return
    customer = invoice.get("customer")
    card = stripe.read_payment_method(str(customer), None) if isinstance(customer, str) else None
    receipt = Receipt.from_stripe(invoice, card)
    send_event_email(
        event,
        organization.billing_email or owner.email,
        "receipt",
        subject=f"Your Ledgerline receipt: {receipt.money(receipt.amount_paid)} paid",
        organization=organization,
        owner=owner,
        receipt=receipt,
    )


def set_billing_email(organization_id: int, address: str, *, actor_user_id: int) -> str | None:
    """The owner chooses where receipts go: an address, or empty for their own. Returns the address kept."""
    address = normalise_email(address or "")
    if address and ("@" not in address or len(address) > 254 or any(c.isspace() for c in address)):
        raise BillingEmailError("Enter an email address, or leave it empty to use yours.")
    organization = db.session.get(Organization, organization_id, with_for_update=True)
    if organization is None:
        raise BillingEmailError("This organization does not exist.")
    kept = address or None
    if organization.billing_email != kept:
        domain_events.record(
            "organization.billing_email_changed",
            organization_id=organization_id,
            user_id=actor_user_id,
            source=f"user:{actor_user_id}",
            billing_email=kept,
            previous=organization.billing_email,
        )
        organization.billing_email = kept
    db.session.commit()
    return kept


def _https_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value.startswith(("https://", "http://")) else None
