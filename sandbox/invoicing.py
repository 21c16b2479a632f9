"""Money: payment methods (cards), charging invoices, PaymentIntents, Charges and InvoicePayments.

A card number typed on a hosted page, or one of Stripe's test tokens (pm_card_visa, …) passed to
the API, becomes a PaymentMethod attached to a customer. Charging an invoice creates (or reuses)
the invoice's PaymentIntent and one Charge per attempt; a card's outcome decides whether the
charge succeeds. Every function runs inside the caller's Store.transaction(), at simtime.now().
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from functools import cache

from . import billing, discounts, lists, meters, objects, simtime
from .config import Settings
from .errors import StripeError
from .objects import Obj
from .store import Store


@dataclass(frozen=True)
class Card:
    number: str
    brand: str
    funding: str
    charges_fail: bool  # attaches, then every charge is declined (Stripe's 4000 0000 0000 0341)
    requires_authentication: bool = False  # off-session charges need the customer (4000 0027 6000 3184)


DECLINED = "Your card was declined."
# 0341 attaches and then fails every charge, as on Stripe; 1629 (3-D Secure, then declined on
# Stripe) is the sandbox's asynchronous failure at Checkout and fails later charges too.
CARDS_WHOSE_CHARGES_FAIL = ("4000000000000341", "4000008400001629")
# 3184 asks for 3-D Secure on every payment: a charge the customer is not present for (a renewal, a
# subscription update, POST /v1/invoices/:id/pay) leaves the PaymentIntent `requires_action`; paying on
# a hosted page (where the customer authenticates) succeeds.
CARDS_THAT_REQUIRE_AUTHENTICATION = ("4000002760003184",)
AUTHENTICATION_REQUIRED = "Your card was declined. This transaction requires authentication."

# Stripe's test PaymentMethod tokens the sandbox knows, and the card each stands for.
TEST_TOKENS = {
    "pm_card_visa": "4242424242424242",
    "pm_card_mastercard": "5555555555554444",
    "pm_card_chargeCustomerFail": "4000000000000341",
    "pm_card_chargeDeclined": "4000000000000002",
    "pm_card_authenticationRequired": "4000002760003184",
}


def card_for(number: str) -> Card:
    brand = "mastercard" if number.startswith("5") else "visa"
    return Card(
        number,
        brand,
        "credit",
        charges_fail=number in CARDS_WHOSE_CHARGES_FAIL,
        requires_authentication=number in CARDS_THAT_REQUIRE_AUTHENTICATION,
    )


@cache
def public_url() -> str:
    """The base URL of hosted pages; read from the same environment the server started with."""
    return Settings.from_env().public_url


# -- payment methods ----------------------------------------------------------------------------


def create_payment_method(
    store: Store,
    number: str,
    *,
    customer_id: str | None,
    name: str | None = None,
    email: str | None = None,
    exp_month: int = 12,
    exp_year: int = 2034,
) -> Obj:
    card = card_for(number)
    method = {
        "id": objects.new_id("pm_"),
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {
            "address": {
                "city": None,
                "country": None,
                "line1": None,
                "line2": None,
                "postal_code": None,
                "state": None,
            },
            "email": email,
            "name": name,
            "phone": None,
            "tax_id": None,
        },
        "card": {
            "brand": card.brand,
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": card.brand,
            "exp_month": exp_month,
            "exp_year": exp_year,
            "fingerprint": hashlib.sha256(number.encode()).hexdigest()[:16],
            "funding": card.funding,
            "generated_from": None,
            "last4": number[-4:],
            "networks": {"available": [card.brand], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": simtime.now(),
        "customer": customer_id,
        "customer_account": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
        "_charges_fail": card.charges_fail,
        "_requires_authentication": card.requires_authentication,
    }
    store.put(method)
    return method


def resolve_payment_method(store: Store, value: str, customer: Obj, param: str) -> Obj:
    """A payment method for a customer from an API parameter: an existing pm_… that is
    unattached or already the customer's (attached now), or a test token such as pm_card_visa
    (a new PaymentMethod is made from it, as Stripe does). Emits payment_method.attached."""
    if value in TEST_TOKENS:
        if value == "pm_card_chargeDeclined":
            raise StripeError(DECLINED, status=402, type="card_error", code="card_declined", param=param)
        method = create_payment_method(store, TEST_TOKENS[value], customer_id=None)
    else:
        method = billing.load(store, "payment_method", value, param, 400)
    if method["customer"] not in (None, customer["id"]):
        raise StripeError(
            f"The payment method you provided has already been attached to another customer: '{value}'",
            param=param,
        )
    if method["customer"] is None:
        attach(store, method, customer["id"])
    return method


def attach(store: Store, method: Obj, customer_id: str) -> None:
    method["customer"] = customer_id
    store.put(method)
    billing.emit(store, "payment_method.attached", method)


def attach_typed_card(
    store: Store, customer_id: str, number: str, *, name: str, email: str, expiry: tuple[int, int]
) -> Obj:
    """A card typed on a hosted page (the portal's card form, an invoice page), attached."""
    method = create_payment_method(
        store, number, customer_id=None, name=name, email=email, exp_month=expiry[0], exp_year=expiry[1]
    )
    attach(store, method, customer_id)
    return method


def customer_payment_methods(store: Store, customer_id: str, page: lists.Page) -> Obj:
    methods = [m for m in reversed(store.all("payment_method")) if m["customer"] == customer_id]
    return lists.paginate(methods, f"/v1/customers/{customer_id}/payment_methods", page, "payment_method")


def default_payment_method(store: Store, subscription: Obj | None, customer: Obj) -> Obj | None:
    """What an automatic charge uses: the subscription's default, else the customer's."""
    for method_id in (
        subscription.get("default_payment_method") if subscription else None,
        customer["invoice_settings"]["default_payment_method"],
    ):
        method = store.get(method_id) if method_id else None
        if method is not None:
            return method
    return None


def set_customer_default(store: Store, customer: Obj, method_id: str | None, origin: billing.Origin) -> None:
    before = copy.deepcopy(customer)
    customer["invoice_settings"]["default_payment_method"] = method_id
    changes = objects.previous_attributes(before, customer)
    if changes:
        store.put(customer)
        billing.emit(store, "customer.updated", customer, changes, origin)


# -- invoices -----------------------------------------------------------------------------------


def decorate(invoice: Obj, customer: Obj, subscription: Obj | None) -> None:
    """Fields objects.invoice() leaves out: hosted URLs, dunning, clock and payments."""
    invoice.update(
        **_hosted_urls(invoice),
        next_payment_attempt=None,
        automatically_finalizes_at=None,
        default_payment_method=None,
        test_clock=customer.get("test_clock"),
        webhooks_delivered_at=invoice["created"],
        payments=objects.list_object([], f"/v1/invoice_payments?invoice={invoice['id']}"),
        payment_settings={
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
    )


def _hosted_urls(invoice: Obj) -> Obj:
    """An invoice's hosted page and PDF; a draft has neither until it is finalized."""
    if invoice["status"] == "draft":
        return {"hosted_invoice_url": None, "invoice_pdf": None}
    base = f"{public_url()}/invoice/{invoice['id']}"
    return {"hosted_invoice_url": base, "invoice_pdf": f"{base}/pdf"}


def renewal_invoice(store: Store, customer: Obj, subscription: Obj, period: tuple[int, int], reason: str) -> Obj:
    """A draft invoice for the subscription's new period (its items already moved on), for the
    period that just ended (`period`); finalized an hour later unless the subscription is unpaid."""
    now = simtime.now()
    billed = meters.with_usage(store, {**subscription, "status": "active"}, period)  # a trial's end bills in full
    invoice = objects.invoice(customer, billed, now)
    invoice.update(
        status="draft",
        number=None,
        billing_reason=reason,
        auto_advance=subscription["status"] != "unpaid",
        period_start=period[0],
        period_end=period[1],
        effective_at=None,
    )
    invoice["status_transitions"]["finalized_at"] = None
    discounts.apply_to_invoice(store, invoice, subscription)
    decorate(invoice, customer, subscription)
    if invoice["auto_advance"]:
        invoice["automatically_finalizes_at"] = now + 3600
    store.put(invoice)
    return invoice


def finalize(store: Store, invoice: Obj) -> None:
    customer = billing.load(store, "customer", invoice["customer"])
    now = simtime.now()
    invoice.update(
        status="open",
        number=f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}",
        effective_at=now,
        automatically_finalizes_at=None,
    )
    invoice["status_transitions"]["finalized_at"] = now
    invoice.update(_hosted_urls(invoice))
    customer["next_invoice_sequence"] += 1
    store.put(customer)
    store.put(invoice)
    billing.emit(store, "invoice.finalized", invoice)


def charge(store: Store, invoice: Obj, method: Obj | None, *, on_session: bool = False) -> bool:
    """One payment attempt on an open invoice; True if it was paid. Records the attempt on the
    invoice, its PaymentIntent and a new Charge; emits no events (callers decide which, see
    needs_action()). on_session: the customer is paying on a hosted page and can authenticate."""
    now = simtime.now()
    if "payments" not in invoice:  # an invoice made elsewhere without this module's fields
        customer = billing.load(store, "customer", invoice["customer"])
        decorate(invoice, customer, None)
    invoice.update(attempted=True, attempt_count=invoice["attempt_count"] + 1)
    if invoice["amount_remaining"] == 0:
        _mark_paid(invoice, now)
        store.put(invoice)
        return True
    if method is None:
        store.put(invoice)
        return False
    intent = _payment_intent(store, invoice, method, now)
    if method.get("_requires_authentication") and not on_session:
        # No charge is attempted: the bank wants the customer (3-D Secure), who is not here.
        intent.update(
            status="requires_action",
            payment_method=method["id"],
            next_action={"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}},
            last_payment_error={
                "code": "authentication_required",
                "decline_code": "authentication_required",
                "doc_url": "https://stripe.com/docs/error-codes/authentication-required",
                "message": AUTHENTICATION_REQUIRED,
                "payment_method": objects.public(method),
                "type": "card_error",
            },
        )
        store.put(intent)
        store.put(invoice)
        return False
    ok = not method["_charges_fail"]
    attempt = _charge(invoice, intent, method, ok, now)
    store.put(attempt)
    intent.update(latest_charge=attempt["id"], payment_method=method["id"])
    if ok:
        intent.update(status="succeeded", amount_received=intent["amount"], last_payment_error=None, next_action=None)
        _mark_paid(invoice, now)
    else:
        intent.update(
            status="requires_payment_method",
            last_payment_error={
                "charge": attempt["id"],
                "code": "card_declined",
                "decline_code": "generic_decline",
                "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                "message": DECLINED,
                "payment_method": objects.public(method),
                "type": "card_error",
            },
        )
    store.put(intent)
    payment = invoice["payments"]["data"][0]
    payment.update(amount_paid=intent["amount_received"] or None, status="paid" if ok else "open")
    payment["status_transitions"]["paid_at"] = now if ok else None
    store.put(invoice)
    return ok


def needs_action(store: Store, invoice: Obj) -> bool:
    """Whether the invoice's last attempt stopped for the customer's authentication (Stripe then
    sends invoice.payment_action_required rather than invoice.payment_failed)."""
    payments = (invoice.get("payments") or {}).get("data") or []
    if not payments:
        return False
    intent = store.get(payments[0]["payment"]["payment_intent"])
    return intent is not None and intent["status"] == "requires_action"


def failure_event(store: Store, invoice: Obj) -> str:
    """The event an unpaid attempt on this invoice sends."""
    return "invoice.payment_action_required" if needs_action(store, invoice) else "invoice.payment_failed"


def _mark_paid(invoice: Obj, now: int) -> None:
    invoice.update(
        amount_paid=invoice["amount_due"],
        amount_remaining=0,
        status="paid",
        next_payment_attempt=None,
    )
    invoice["status_transitions"]["paid_at"] = now


def _payment_intent(store: Store, invoice: Obj, method: Obj, now: int) -> Obj:
    payments = invoice["payments"]["data"]
    if payments:
        intent = store.get(payments[0]["payment"]["payment_intent"])
        assert intent is not None
        return intent
    intent = {
        "id": objects.new_id("pi_"),
        "object": "payment_intent",
        "amount": invoice["amount_remaining"],
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic",
        "client_secret": None,
        "confirmation_method": "automatic",
        "created": now,
        "currency": invoice["currency"],
        "customer": invoice["customer"],
        "customer_account": None,
        "description": "Subscription update" if invoice["billing_reason"] != "subscription_create" else None,
        "excluded_payment_method_types": None,
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": False,
        "managed_payments": None,
        "metadata": {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": method["id"],
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None,
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": "off_session",
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "requires_payment_method",
        "transfer_data": None,
        "transfer_group": None,
    }
    intent["client_secret"] = f"{intent['id']}_secret_{objects.new_id('', 24)}"
    store.put(intent)
    payments.append(
        {
            "id": objects.new_id("inpay_"),
            "object": "invoice_payment",
            "amount_paid": None,
            "amount_requested": invoice["amount_remaining"],
            "created": now,
            "currency": invoice["currency"],
            "invoice": invoice["id"],
            "is_default": True,
            "livemode": False,
            "payment": {"type": "payment_intent", "payment_intent": intent["id"]},
            "status": "open",
            "status_transitions": {"canceled_at": None, "paid_at": None},
        }
    )
    return intent


def _charge(invoice: Obj, intent: Obj, method: Obj, ok: bool, now: int) -> Obj:
    card = method["card"]
    return {
        "id": objects.new_id("ch_"),
        "object": "charge",
        "amount": intent["amount"],
        "amount_captured": intent["amount"] if ok else 0,
        "amount_refunded": 0,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": objects.new_id("txn_") if ok else None,
        "billing_details": method["billing_details"],
        "calculated_statement_descriptor": "SANDBOX",
        "captured": ok,
        "created": now,
        "currency": intent["currency"],
        "customer": invoice["customer"],
        "description": intent["description"],
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": None if ok else "card_declined",
        "failure_message": None if ok else DECLINED,
        "fraud_details": {},
        "livemode": False,
        "metadata": {},
        "on_behalf_of": None,
        "outcome": {
            "advice_code": None,
            "network_advice_code": None,
            "network_decline_code": None if ok else "05",
            "network_status": "approved_by_network" if ok else "declined_by_network",
            "reason": None if ok else "generic_decline",
            "risk_level": "normal",
            "seller_message": "Payment complete."
            if ok
            else "The bank did not return any further details with this decline.",
            "type": "authorized" if ok else "issuer_declined",
        },
        "paid": ok,
        "payment_intent": intent["id"],
        "payment_method": method["id"],
        "payment_method_details": {
            "type": "card",
            "card": {
                "amount_authorized": intent["amount"] if ok else None,
                "authorization_code": "123456" if ok else None,
                "brand": card["brand"],
                "checks": copy.deepcopy(card["checks"]),
                "country": card["country"],
                "exp_month": card["exp_month"],
                "exp_year": card["exp_year"],
                "extended_authorization": {"status": "disabled"},
                "fingerprint": card["fingerprint"],
                "funding": card["funding"],
                "incremental_authorization": {"status": "unavailable"},
                "installments": None,
                "last4": card["last4"],
                "mandate": None,
                "multicapture": {"status": "unavailable"},
                "network": card["brand"],
                "network_token": {"used": False},
                "network_transaction_id": objects.new_id("", 15) if ok else None,
                "overcapture": {"maximum_amount_capturable": intent["amount"], "status": "unavailable"},
                "regulated_status": "unregulated",
                "three_d_secure": None,
                "transaction_link_id": None,
                "wallet": None,
            },
        },
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": None,
        "refunded": False,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded" if ok else "failed",
        "transfer_data": None,
        "transfer_group": None,
    }


def invoice_subscription(invoice: Obj) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    subscription: str | None = details.get("subscription")
    return subscription


def paid(store: Store, invoice: Obj, origin: billing.Origin | None = None) -> None:
    """After a successful charge: invoice.paid, a pending update that waited for this invoice
    applies, and a past_due or unpaid subscription with no other open invoice becomes active again."""
    origin = origin or billing.AUTOMATIC
    billing.emit(store, "invoice.paid", invoice, origin=origin)
    _apply_pending_update(store, invoice, origin)
    sub_id = invoice_subscription(invoice)
    subscription = store.get(sub_id) if sub_id else None
    if subscription is None or subscription["status"] not in ("past_due", "unpaid"):
        return
    still_open = [i for i in store.all("invoice") if i["status"] == "open" and invoice_subscription(i) == sub_id]
    if not still_open:
        before = copy.deepcopy(subscription)
        subscription["status"] = "active"
        store.put(subscription)
        billing.emit(
            store,
            "customer.subscription.updated",
            subscription,
            objects.previous_attributes(before, subscription),
            origin,
        )


def _apply_pending_update(store: Store, invoice: Obj, origin: billing.Origin) -> None:
    """Called when an invoice becomes paid: applies a subscription's pending update that waited
    for it (changes.py's pending_if_incomplete). It lives here, beside the other effects of a
    payment, because changes.py builds on this module."""
    subscription = store.get(invoice_subscription(invoice) or "")
    if subscription is None:
        return
    before = copy.deepcopy(subscription)
    pending = subscription.get("pending_update")
    if pending and subscription.get("_pending_invoice") == invoice["id"]:
        if pending["expires_at"] > simtime.now():
            subscription["items"] = objects.list_object(pending["subscription_items"], subscription["items"]["url"])
            if pending["billing_cycle_anchor"]:
                subscription["billing_cycle_anchor"] = pending["billing_cycle_anchor"]
            if pending.get("discounts") is not None:
                subscription["discounts"] = pending["discounts"]
        subscription["pending_update"] = None
        subscription.pop("_pending_invoice", None)
    changes = objects.previous_attributes(before, subscription)
    if changes:
        store.put(subscription)
        billing.emit(store, "customer.subscription.updated", subscription, changes, origin)


def pay(store: Store, invoice_id: str, method_id: str | None, origin: billing.Origin) -> Obj:
    """POST /v1/invoices/:id/pay: charge an open invoice now, with the given payment method or
    the default one. A declined card is a 402 card_error and changes nothing."""
    invoice = billing.load(store, "invoice", invoice_id)
    if invoice["status"] == "paid":
        raise StripeError("Invoice is already paid", code="invoice_already_paid")
    if invoice["status"] != "open":
        raise StripeError(
            f"You can only pay an invoice whose status is open. This invoice's status is {invoice['status']}.",
            code="invoice_not_open",
        )
    customer = billing.load(store, "customer", invoice["customer"])
    if method_id:
        method: Obj | None = resolve_payment_method(store, method_id, customer, "payment_method")
    else:
        sub_id = invoice_subscription(invoice)
        method = default_payment_method(store, store.get(sub_id) if sub_id else None, customer)
        if method is None:
            raise StripeError(
                "There is no `default_payment_method` set on this Customer or Invoice. It's possible"
                " that this is because the Customer object has no `default_payment_method`.",
                code="invoice_payment_method_missing",
            )
    if not charge(store, invoice, method):
        raise StripeError(DECLINED, status=402, type="card_error", code="card_declined", param="payment_method")
    paid(store, invoice, origin)
    return invoice


def list_invoices(
    store: Store,
    *,
    customer: str | None,
    subscription: str | None,
    status: str | None,
    page: lists.Page,
) -> Obj:
    found = [
        i
        for i in reversed(store.all("invoice"))
        if (customer is None or i["customer"] == customer)
        and (subscription is None or invoice_subscription(i) == subscription)
        and (status is None or i["status"] == status)
    ]
    return lists.paginate(found, "/v1/invoices", page, "invoice")


def invoice_payments(store: Store, invoice_id: str) -> Obj:
    invoice = billing.load(store, "invoice", invoice_id, "invoice", 400)
    return objects.list_object(invoice["payments"]["data"], "/v1/invoice_payments")


def pay_by_card(
    store: Store,
    invoice_id: str,
    card_number: str,
    *,
    name: str,
    email: str,
    expiry: tuple[int, int],
) -> Obj:
    """The hosted invoice page: attach the typed card to the customer and charge it. A card
    whose charges fail raises PaymentError (the caller's transaction then changes nothing)."""
    invoice = billing.load(store, "invoice", invoice_id)
    if invoice["status"] != "open":
        raise billing.PaymentError(f"This invoice is {invoice['status']}; it can no longer be paid.")
    method = attach_typed_card(store, invoice["customer"], card_number, name=name, email=email, expiry=expiry)
    if not charge(store, invoice, method, on_session=True):
        raise billing.PaymentError(DECLINED)
    paid(store, invoice)
    return invoice


def pdf(invoice: Obj) -> bytes:
    """A one-page PDF naming the invoice number and amount: small, but a valid PDF 1.4 file."""
    amount = f"{invoice['amount_due'] / 100:,.2f} {invoice['currency'].upper()}"
    lines = [
        f"Invoice {invoice['number']}",
        f"Amount due: {amount}",
        f"Amount paid: {invoice['amount_paid'] / 100:,.2f} {invoice['currency'].upper()}",
        f"Status: {invoice['status']}",
        "Stripe sandbox - not a real invoice",
    ]
    text = "BT /F1 14 Tf 72 720 Td 20 TL " + " ".join(f"({_pdf_text(line)}) '" for line in lines) + " ET"
    bodies = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        " /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(bodies, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(bodies) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(bodies) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _pdf_text(value: str) -> str:
    ascii_only = value.encode("ascii", "replace").decode()
    return ascii_only.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
