"""Charging invoices for subscription changes; refunds (refunds.py) act on the Charges made.

The money model itself (payment methods, PaymentIntents, Charges, InvoicePayments and cards
whose charges fail) lives in invoicing.py; these are the entry points subscription changes use.
Every paid invoice gets a PaymentIntent with a Charge per attempt, listed on the invoice as an
InvoicePayment (`invoice.payments`, returned only when expanded, as on Stripe).
"""

from __future__ import annotations

from . import billing, invoicing
from .objects import Obj
from .store import Store


def resolve_payment_method(store: Store, customer_id: str, pm_id: str, param: str, now: int) -> str:
    """The id of a payment method usable by this customer: one of its own, an unattached one
    (attached now), or a Stripe test token such as pm_card_visa (a new one is made)."""
    customer = billing.load(store, "customer", customer_id, "customer", 400)
    return str(invoicing.resolve_payment_method(store, pm_id, customer, param)["id"])


def charge_invoice(store: Store, invoice: Obj, subscription: Obj | None, now: int) -> bool:
    """Attempt to collect an open invoice now with the subscription's (or customer's) default
    payment method; records the PaymentIntent and Charge either way and returns whether it was
    paid. The caller emits the invoice events."""
    customer = billing.load(store, "customer", invoice["customer"])
    return invoicing.charge(store, invoice, invoicing.default_payment_method(store, subscription, customer))
