"""Canceling a paid subscription no organization may keep and refunding what its first invoice took
(a conflicting signup, a surplus resubscription): the steps and the result recorded, with Stripe
reached through the RefundCalls BillingService implements. No transaction is open; the idempotency
keys `<key>-cancel` and `<key>-refund` make a retry the same Stripe requests."""

from __future__ import annotations

from typing import Any, Protocol

from app.services import settlement
from app.services.billing_common import id_of


class RefundCalls(Protocol):
    def _cancel_now(self, subscription_id: str, *, key: str) -> dict[str, Any]: ...

    def _read_invoice_with_payments(self, invoice_id: str) -> dict[str, Any]: ...

    def _refund(self, target: dict[str, Any], *, key: str) -> dict[str, Any]: ...


def cancel_and_refund(calls: RefundCalls, subscription_id: str, *, key: str) -> dict[str, Any]:
    """Cancel the subscription now and refund what its first invoice took; what was done."""
    subscription = calls._cancel_now(subscription_id, key=f"{key}-cancel")
    result: dict[str, Any] = {
        "stripe_subscription_id": subscription_id,
        "subscription_status": subscription.get("status"),
        "refund_id": None,
        "amount_refunded": 0,
        "currency": None,
    }
    invoice_id = id_of(subscription.get("latest_invoice"))
    if not invoice_id:
        return result
    invoice = calls._read_invoice_with_payments(invoice_id)
    result["currency"] = invoice.get("currency")
    if not invoice.get("amount_paid"):
        return result  # nothing was taken (a trial, or no payment yet)
    refund = calls._refund(settlement.refund_target(invoice, key), key=f"{key}-refund")
    result.update(
        refund_id=refund.get("id"),
        amount_refunded=refund.get("amount") or 0,
        currency=refund.get("currency") or invoice.get("currency"),
        refund_status=refund.get("status"),
    )
    return result
