"""Invoice items (prorations waiting for a subscription's next invoice), the invoice lines made
from them and from a subscription's items, and invoices built from such lines with their totals
and the customer's balance applied.

changes.py makes these when a subscription changes or is previewed; the test clock engine
completes a renewal invoice with the items waiting for it (add_pending_items()).
"""

from __future__ import annotations

from . import discounts, invoicing, objects
from .billing import load
from .objects import Obj
from .store import Store


def invoice_item(customer: Obj, subscription: Obj, line: Obj, now: int) -> Obj:
    price = line["price"]
    return {
        "id": objects.new_id("ii_"),
        "object": "invoiceitem",
        "amount": line["amount"],
        "currency": price["currency"],
        "customer": customer["id"],
        "date": now,
        "description": line["description"],
        "discountable": False,
        "discounts": [],
        "invoice": None,
        "livemode": False,
        "metadata": {},
        "net_amount": line["amount"],
        "parent": {
            "type": "subscription_details",
            "subscription_details": {
                "subscription": subscription["id"],
                "subscription_item": line["subscription_item"],
            },
        },
        "period": line["period"],
        "pricing": objects.price_pricing(price),
        "proration": line["proration"],
        "proration_details": {"discount_amounts": []},
        "quantity": line["quantity"],
        "tax_rates": [],
        "test_clock": customer.get("test_clock"),
    }


def pending_invoice_items(store: Store, subscription_id: str) -> list[Obj]:
    """Invoice items waiting for this subscription's next invoice, oldest first."""
    return [
        ii
        for ii in store.all("invoiceitem")
        if ii["invoice"] is None
        and (ii["parent"] or {}).get("subscription_details", {}).get("subscription") == subscription_id
    ]


def line_from_invoice_item(ii: Obj, invoice_id: str | None) -> Obj:
    details = ii["parent"]["subscription_details"]
    return objects.invoice_line(
        invoice_id=invoice_id,
        amount=ii["amount"],
        currency=ii["currency"],
        description=ii["description"],
        subscription_id=details["subscription"],
        subscription_item=details["subscription_item"],
        period=ii["period"],
        pricing=ii["pricing"],
        quantity=ii["quantity"],
        invoice_item=ii["id"],
        proration=ii["proration"],
        discountable=ii["discountable"],
    )


def recurring_line(item: Obj, subscription_id: str, invoice_id: str | None, start: int, end: int) -> Obj:
    price = item["price"]
    return objects.invoice_line(
        invoice_id=invoice_id,
        amount=price["unit_amount"] * (item["quantity"] or 0),
        currency=price["currency"],
        description=f"{item['quantity'] or 0} × {price['nickname'] or price['id']}"
        f" (at {objects.money(price['unit_amount'])} / {price['recurring']['interval']})",
        subscription_id=subscription_id,
        subscription_item=item["id"],
        period={"start": start, "end": end},
        pricing=objects.price_pricing(price),
        quantity=item["quantity"] or 0,
    )


def build_invoice(
    customer: Obj,
    subscription: Obj,
    lines: list[Obj],
    billing_reason: str,
    now: int,
    invoice_id: str | None = None,
    *,
    store: Store | None = None,
    preview: bool = False,
) -> Obj:
    """An invoice of the given lines, shaped like the sandbox's other invoices; given the store, the
    subscription's discounts apply (a preview only reads them)."""
    invoice = objects.invoice(customer, subscription, now)
    if invoice_id is not None:
        invoice["id"] = invoice_id
    for line in lines:
        line["invoice"] = invoice["id"]
    # The lines' url names the invoice's id, which may have been given (invoice_id).
    invoice["lines"] = objects.list_object(lines, f"/v1/invoices/{invoice['id']}/lines")
    _set_totals(invoice)
    if store is not None:
        discounts.apply_to_invoice(store, invoice, subscription, preview=preview)
    invoice.update(
        billing_reason=billing_reason,
        amount_paid=0,
        next_payment_attempt=None,
        # An invoice made by an update covers the moment of the update, as on Stripe.
        period_start=now,
        period_end=now,
    )
    invoice["parent"]["subscription_details"]["subscription_proration_date"] = None
    invoicing.decorate(invoice, customer, subscription)
    apply_balance(customer, invoice)
    return invoice


def _set_totals(invoice: Obj) -> None:
    """An invoice's totals from its lines (there are no taxes or discounts)."""
    total = sum(line["amount"] for line in invoice["lines"]["data"])
    invoice.update(subtotal=total, subtotal_excluding_tax=total, total=total, total_excluding_tax=total)


def apply_balance(customer: Obj, invoice: Obj) -> None:
    """Settle an invoice's total against the customer's balance, as Stripe does: a credit
    (negative balance) left by an earlier proration lowers what is due, and a credit larger than
    the charges becomes the customer's balance. Updates `customer["balance"]`; the caller
    stores the customer (a preview does not)."""
    starting = customer["balance"]
    applied = invoice["total"] + starting
    due = max(applied, 0)
    invoice.update(
        starting_balance=starting,
        ending_balance=min(applied, 0),
        amount_due=due,
        amount_remaining=max(due - invoice["amount_paid"], 0),
    )
    customer["balance"] = min(applied, 0)


def add_pending_items(store: Store, invoice: Obj) -> None:
    """Complete a renewal invoice: the subscription's pending invoice items (prorations) first,
    then the customer's balance (a credit from an earlier change) applied."""
    waiting = pending_invoice_items(store, invoicing.invoice_subscription(invoice) or "")
    for ii in waiting:
        ii["invoice"] = invoice["id"]
        store.put(ii)
    invoice["lines"]["data"] = [line_from_invoice_item(ii, invoice["id"]) for ii in waiting] + invoice["lines"]["data"]
    _set_totals(invoice)
    if invoice["discounts"] or invoice["automatic_tax"]["enabled"]:
        discounts.apply_to_invoice(store, invoice, None)  # the discount it carries, on its new subtotal
    customer = load(store, "customer", invoice["customer"])
    apply_balance(customer, invoice)
    store.put(customer)
    store.put(invoice)
