"""Refunds of a Charge (named directly or through its PaymentIntent), whole or in part.

A refund succeeds at once. It may not exceed what is left unrefunded on the charge. The
charge's `amount_refunded` grows and `refunded` turns true when nothing is left; Stripe's
`refund.created` and `charge.refunded` events are sent.
"""

from __future__ import annotations

import copy

from . import objects, simtime
from .billing import AUTOMATIC, Origin, emit, load
from .errors import StripeError, exclusive
from .objects import Obj
from .store import Store

REASONS = ("duplicate", "fraudulent", "requested_by_customer")


def create_refund(
    store: Store,
    *,
    payment_intent: str | None,
    charge: str | None,
    amount: int | None,
    reason: str | None,
    metadata: dict[str, str],
    origin: Origin = AUTOMATIC,
) -> Obj:
    if payment_intent and charge:
        raise exclusive("charge", "payment_intent", "payment_intent")
    if charge:
        found = load(store, "charge", charge, "charge", 400)
    elif payment_intent:
        intent = load(store, "payment_intent", payment_intent, "payment_intent", 400)
        if intent["status"] != "succeeded" or not intent["latest_charge"]:
            raise StripeError(
                f"This PaymentIntent ({payment_intent}) does not have a successful charge to refund.",
                code="charge_not_refundable" if intent["latest_charge"] else "resource_missing",
                param="payment_intent",
            )
        found = load(store, "charge", intent["latest_charge"], "payment_intent", 400)
    else:
        raise StripeError(
            "One of the following params should be provided for this request: payment_intent or charge.",
            code="parameter_missing",
        )
    if reason is not None and reason not in REASONS:
        raise StripeError(f"Invalid reason: must be one of {', '.join(REASONS)}", param="reason")
    if found["status"] != "succeeded":
        raise StripeError(
            f"Charge {found['id']} has not succeeded and cannot be refunded.", code="charge_not_refundable"
        )
    remaining = found["amount"] - found["amount_refunded"]
    if remaining <= 0:
        raise StripeError(f"Charge {found['id']} has already been refunded.", code="charge_already_refunded")
    amount = remaining if amount is None else amount
    if amount > remaining:
        raise StripeError(
            f"Refund amount ({objects.money(amount)}) is greater than unrefunded amount on charge"
            f" ({objects.money(remaining)})",
            param="amount",
        )
    now = simtime.now()
    refund = {
        "id": objects.new_id("re_"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": objects.new_id("txn_"),
        "charge": found["id"],
        "created": now,
        "currency": found["currency"],
        "customer": found["customer"],
        "customer_account": None,
        "destination_details": {
            "type": "card",
            "card": {"reference_status": "pending", "reference_type": "acquirer_reference_number", "type": "refund"},
        },
        "metadata": metadata,
        "payment_intent": found["payment_intent"],
        "payment_method": found["payment_method"],
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": "succeeded",
        "transfer_reversal": None,
    }
    before = copy.deepcopy(found)
    found["amount_refunded"] += amount
    found["refunded"] = found["amount_refunded"] >= found["amount"]
    store.put(refund)
    store.put(found)
    emit(store, "refund.created", refund, origin=origin)
    emit(store, "charge.refunded", found, objects.previous_attributes(before, found), origin)
    return refund
