"""Money moving: payment methods, PaymentIntents, Charges and charging an invoice.

Every paid invoice gets a PaymentIntent with one Charge, listed on the invoice as an
InvoicePayment (`invoice.payments`, returned only when expanded, as on Stripe). Refunds
(refunds.py) act on those Charges.

Payment methods: the card used at Checkout is assumed good for later charges. A subscription
or customer can instead name a payment method; besides ids of existing ones, Stripe's test
tokens `pm_card_visa` (succeeds) and `pm_card_chargeCustomerFail` (attaches, then every charge
fails, like card 4000 0000 0000 0341) create a new one attached to the customer.
"""

from __future__ import annotations

from typing import Any

from . import objects
from .errors import StripeError
from .objects import Obj
from .store import Store

TEST_TOKENS = {
    "pm_card_visa": ("4242", "succeeds"),
    "pm_card_chargeCustomerFail": ("0341", "fails"),
}


def payment_method(customer_id: str, last4: str, now: int) -> Obj:
    return {
        "id": objects.new_id("pm_"),
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {"address": None, "email": None, "name": None, "phone": None, "tax_id": None},
        "card": {
            "brand": "visa",
            "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
            "country": "US",
            "display_brand": "visa",
            "exp_month": 12,
            "exp_year": 2040,
            "fingerprint": objects.new_id("", 16),
            "funding": "credit",
            "generated_from": None,
            "last4": last4,
            "networks": {"available": ["visa"], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": now,
        "customer": customer_id,
        "livemode": False,
        "metadata": {},
        "type": "card",
        "_outcome": "fails" if last4 == "0341" else "succeeds",
    }


def resolve_payment_method(store: Store, customer_id: str, pm_id: str, param: str, now: int) -> str:
    """The id of a payment method usable by this customer; a test token creates one."""
    if pm_id in TEST_TOKENS:
        created = payment_method(customer_id, TEST_TOKENS[pm_id][0], now)
        store.put(created)
        return str(created["id"])
    found = store.get(pm_id)
    if found is None or found["object"] != "payment_method":
        raise StripeError(f"No such PaymentMethod: '{pm_id}'", code="resource_missing", param=param)
    if found.get("customer") != customer_id:
        raise StripeError(
            f"The PaymentMethod {pm_id} does not belong to the Customer {customer_id}. Please attach it"
            " to the Customer first.",
            param=param,
        )
    return pm_id


def _payment_method_for(store: Store, subscription: Obj | None, customer: Obj) -> Obj | None:
    pm_id = (subscription or {}).get("default_payment_method") or customer["invoice_settings"]["default_payment_method"]
    return store.get(pm_id) if pm_id else None


def charge_invoice(store: Store, invoice: Obj, subscription: Obj | None, now: int) -> bool:
    """Attempt to collect an open invoice now. Records the PaymentIntent and Charge either way
    and updates the invoice (paid, or attempted with the failure); returns whether it was paid.
    The caller emits the invoice events."""
    customer = store.get(invoice["customer"])
    assert customer is not None
    pm = _payment_method_for(store, subscription, customer)
    succeeded = pm is None or pm.get("_outcome") != "fails"
    invoice["attempt_count"] += 1
    invoice["attempted"] = True
    if invoice["amount_remaining"] <= 0 or succeeded:
        record_payment(store, invoice, now, pm)
        return True
    intent, charge = _intent_and_charge(invoice, customer, pm, now, succeeded=False)
    store.put(intent)
    store.put(charge)
    invoice["_failed_payment_intents"] = [*invoice.get("_failed_payment_intents", []), intent["id"]]
    return False


def record_payment(store: Store, invoice: Obj, now: int, pm: Obj | None = None, customer: Obj | None = None) -> None:
    """Mark an invoice paid and record the PaymentIntent, Charge and InvoicePayment behind it."""
    customer = customer or store.get(invoice["customer"])
    assert customer is not None
    if invoice["amount_due"] > 0:
        intent, charge = _intent_and_charge(invoice, customer, pm, now, succeeded=True)
        store.put(intent)
        store.put(charge)
        payments = invoice.setdefault("payments", objects.list_object([], f"/v1/invoices/{invoice['id']}/payments"))
        payments["data"].append(
            {
                "id": objects.new_id("inpay_"),
                "object": "invoice_payment",
                "amount_paid": invoice["amount_remaining"],
                "amount_requested": invoice["amount_remaining"],
                "created": now,
                "currency": invoice["currency"],
                "invoice": invoice["id"],
                "is_default": True,
                "livemode": False,
                "payment": {"type": "payment_intent", "payment_intent": intent["id"]},
                "status": "paid",
                "status_transitions": {"canceled_at": None, "paid_at": now},
            }
        )
    invoice.update(
        amount_paid=invoice["amount_due"],
        amount_remaining=0,
        attempt_count=max(invoice["attempt_count"], 1),
        attempted=True,
        status="paid",
        next_payment_attempt=None,
    )
    invoice["status_transitions"]["paid_at"] = now


def _intent_and_charge(invoice: Obj, customer: Obj, pm: Obj | None, now: int, *, succeeded: bool) -> tuple[Obj, Obj]:
    amount = invoice["amount_remaining"]
    intent_id = objects.new_id("pi_")
    charge_id = objects.new_id("ch_")
    pm_id = pm["id"] if pm else None
    last4 = pm["card"]["last4"] if pm else "4242"
    failure: dict[str, Any] = {}
    if not succeeded:
        failure = {
            "code": "card_declined",
            "decline_code": "generic_decline",
            "message": "Your card was declined.",
            "type": "card_error",
        }
    charge = {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if succeeded else 0,
        "amount_refunded": 0,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": objects.new_id("txn_") if succeeded else None,
        "billing_details": {
            "address": None,
            "email": customer["email"],
            "name": customer["name"],
            "phone": None,
            "tax_id": None,
        },
        "calculated_statement_descriptor": "SANDBOX",
        "captured": succeeded,
        "created": now,
        "currency": invoice["currency"],
        "customer": customer["id"],
        "description": "Subscription update" if invoice["billing_reason"] == "subscription_update" else None,
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": failure.get("code"),
        "failure_message": failure.get("message"),
        "fraud_details": {},
        "livemode": False,
        "metadata": {},
        "on_behalf_of": None,
        "outcome": {
            "advice_code": None,
            "network_advice_code": None,
            "network_decline_code": None,
            "network_status": "approved_by_network" if succeeded else "declined_by_network",
            "reason": None if succeeded else "generic_decline",
            "risk_level": "normal",
            "risk_score": 20,
            "seller_message": "Payment complete." if succeeded else "The bank did not return any further details.",
            "type": "authorized" if succeeded else "issuer_declined",
        },
        "paid": succeeded,
        "payment_intent": intent_id,
        "payment_method": pm_id,
        "payment_method_details": {
            "type": "card",
            "card": {
                "brand": "visa",
                "country": "US",
                "exp_month": 12,
                "exp_year": 2040,
                "funding": "credit",
                "last4": last4,
                "network": "visa",
            },
        },
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": None,
        "refunded": False,
        "review": None,
        "shipping": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded" if succeeded else "failed",
        "transfer_data": None,
        "transfer_group": None,
    }
    intent = {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": amount if succeeded else 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic",
        "client_secret": f"{intent_id}_secret_{objects.new_id('', 24)}",
        "confirmation_method": "automatic",
        "created": now,
        "currency": invoice["currency"],
        "customer": customer["id"],
        "description": charge["description"],
        "last_payment_error": (
            None
            if succeeded
            else {
                **failure,
                "charge": charge_id,
                "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                "payment_method": pm,
            }
        ),
        "latest_charge": charge_id,
        "livemode": False,
        "metadata": {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": pm_id if succeeded else None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": "off_session",
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded" if succeeded else "requires_payment_method",
        "transfer_data": None,
        "transfer_group": None,
    }
    return intent, charge
