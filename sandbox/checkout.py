"""Checkout Sessions in subscription mode: creating, reading, expiring and paying them with a
sandbox card, and the settlement of an asynchronous payment.

Paying creates the customer, its payment method, the subscription and its first invoice. Like
billing.py's functions, these run inside the caller's Store.transaction().
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from . import discounts, invoicing, objects, simtime, tax
from .billing import (
    AUTOMATIC,
    JOB_HANDLERS,
    UNKNOWN_CARD,
    Origin,
    PaymentError,
    SandboxCard,
    emit,
    load,
    sandbox_card,
)
from .errors import StripeError, exclusive, inactive_price, missing
from .objects import Obj
from .store import Store


@dataclass(frozen=True)
class CheckoutRequest:
    line_items: list[tuple[str, int | None]]  # (price id, quantity; None for a metered price)
    success_url: str | None
    cancel_url: str | None
    customer: str | None
    customer_email: str | None
    client_reference_id: str | None
    metadata: dict[str, str]
    subscription_metadata: dict[str, str]
    trial_period_days: int | None
    expires_at: int | None
    allow_promotion_codes: bool | None
    payment_method_collection: str = "always"
    missing_payment_method: str | None = None  # subscription_data[trial_settings][end_behavior]
    automatic_tax: bool = False  # Stripe Tax (sandbox/tax.py)
    billing_address_collection: str = "auto"
    tax_id_collection: bool = False
    customer_update: dict[str, str] = field(default_factory=dict)


TAX_FIELDS = (
    "billingAddressLine1",
    "billingLocality",
    "billingPostalCode",
    "billingAdministrativeArea",
    "billingCountry",
    "businessName",
    "taxId",
)


@dataclass(frozen=True)
class TaxDetails:
    """What the Checkout page collects for Stripe Tax: the billing address and a business's tax ID."""

    address: Obj | None = None
    business_name: str = ""
    tax_id: str = ""

    @classmethod
    def from_form(cls, session: Obj, values: dict[str, str]) -> TaxDetails:
        address = None
        if collects_address(session) and values.get("billingCountry"):
            address = tax.address(
                {
                    "line1": values.get("billingAddressLine1"),
                    "city": values.get("billingLocality"),
                    "postal_code": values.get("billingPostalCode"),
                    "state": values.get("billingAdministrativeArea"),
                    "country": values["billingCountry"].upper(),
                }
            )
        collected = bool((session.get("tax_id_collection") or {}).get("enabled"))
        return cls(address, values.get("businessName", "") if collected else "", values.get("taxId", "") * collected)


def collects_address(session: Obj) -> bool:
    return session.get("billing_address_collection") == "required" or bool(session["automatic_tax"]["enabled"])


def create_checkout_session(store: Store, req: CheckoutRequest, public_url: str) -> Obj:
    now = simtime.now()
    if req.customer and req.customer_email:
        raise exclusive("customer", "customer_email", "customer_email")
    if req.customer:
        load(store, "customer", req.customer, "customer", 400)
    if req.expires_at is not None and not now + 1800 <= req.expires_at <= now + 86400:
        too_soon = req.expires_at < now + 1800
        raise StripeError(
            "The `expires_at` timestamp must be "
            + ("at least 30 minutes" if too_soon else "less than 24 hours")
            + " from Checkout Session creation.",
            param="expires_at",
        )
    items = []
    for index, (price_id, quantity) in enumerate(req.line_items):
        param = f"line_items[{index}][price]"
        price = load(store, "price", price_id, param, 400)
        if not price["active"]:
            raise inactive_price(param)
        if objects.metered(price) and quantity is not None:
            raise StripeError(
                "Quantity should not be specified where usage_type is `metered`. Remove quantity from"
                f" `line_items[{index}]`",
                param=f"line_items[{index}][quantity]",
            )
        if not objects.metered(price) and quantity is None:
            raise missing(f"line_items[{index}][quantity]")
        if req.automatic_tax:
            tax.require_tax_behavior(store, [price_id], param)
        items.append(objects.checkout_line_item(price, quantity))
    session = objects.checkout_session(
        line_items=items,
        # With a free trial nothing is due today.
        amount_total=0 if req.trial_period_days else sum(i["amount_total"] for i in items),
        success_url=req.success_url,
        cancel_url=req.cancel_url,
        customer=req.customer,
        customer_email=req.customer_email,
        client_reference_id=req.client_reference_id,
        metadata=req.metadata,
        subscription_metadata=req.subscription_metadata,
        trial_period_days=req.trial_period_days,
        missing_payment_method=req.missing_payment_method,
        payment_method_collection=req.payment_method_collection,
        allow_promotion_codes=req.allow_promotion_codes,
        expires_at=req.expires_at or now + 86400,
        public_url=public_url,
        now=now,
    )
    session["automatic_tax"]["enabled"] = req.automatic_tax
    session.update(
        billing_address_collection=req.billing_address_collection,
        tax_id_collection={"enabled": req.tax_id_collection, "required": "never"},
        _customer_update=req.customer_update,
    )
    store.put(session)
    store.add_job("expire_session", session["id"], session["expires_at"])
    return session


def get_checkout_session(store: Store, session_id: str) -> Obj:
    session = load(store, "checkout.session", session_id, "session")
    return _expire_if_due(store, session, simtime.now())


def _expire_if_due(store: Store, session: Obj, now: int) -> Obj:
    # Expiry is applied lazily on read as well as by the worker, so nobody sees a stale "open".
    if session["status"] == "open" and session["expires_at"] <= now:
        return _expire(store, session, AUTOMATIC)
    return session


def _expire(store: Store, session: Obj, origin: Origin) -> Obj:
    session.update(status="expired", url=None)
    store.put(session)
    emit(store, "checkout.session.expired", session, origin=origin)
    return session


def expire_checkout_session(store: Store, session_id: str, origin: Origin) -> Obj:
    session = get_checkout_session(store, session_id)
    if session["status"] != "open":
        raise StripeError(
            'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout'
            f" Session has a status of `{session['status']}`."
        )
    return _expire(store, session, origin)


def pay_checkout_session(
    store: Store,
    session_id: str,
    *,
    card_number: str,
    email: str,
    name: str,
    async_delay: float,
    card_expiry: tuple[int, int] = (12, 2034),
    promotion_code: str = "",
    tax_details: TaxDetails | None = None,
) -> Obj:
    """Complete a Session with a sandbox card (and a promotion code, where the Session allows them):
    create the customer, its payment method, the
    subscription and invoice, emit the events Stripe emits, and schedule the settlement of an
    asynchronous payment. card_number may be empty for a trial Session whose
    payment_method_collection is if_required. A customer on a test clock gets everything at
    the clock's frozen time."""
    session = get_checkout_session(store, session_id)
    if session["status"] != "open":
        raise PaymentError(f"This Checkout Session is {session['status']}; it can no longer be paid.")
    trial_days = session["_subscription_data"]["trial_period_days"]
    card = sandbox_card(card_number)
    if card is None and not (card_number == "" and card_optional(session)):
        raise PaymentError(UNKNOWN_CARD)
    if card and (card.outcome == "declined" or (card.outcome == "charge_fails" and not trial_days)):
        raise PaymentError(invoicing.DECLINED)
    tax_details = tax_details or TaxDetails()
    if collects_address(session) and tax_details.address is None:
        raise PaymentError("Your billing address is incomplete.")
    with simtime.time_of(store, session["customer"]):
        code = None
        if promotion_code:
            try:
                existing = store.get(session["customer"]) if session["customer"] else None
                code = discounts.redeemable(store, promotion_code, existing)
            except StripeError as exc:
                raise PaymentError(exc.message) from None
        return _complete_checkout(store, session, card, email, name, async_delay, card_expiry, code, tax_details)


def card_optional(session: Obj) -> bool:
    """A trial Session with payment_method_collection=if_required can complete without a card."""
    return bool(session["_subscription_data"]["trial_period_days"]) and (
        session["payment_method_collection"] == "if_required"
    )


def _complete_checkout(
    store: Store,
    session: Obj,
    card: SandboxCard | None,
    email: str,
    name: str,
    async_delay: float,
    card_expiry: tuple[int, int],
    code: Obj | None = None,
    tax_details: TaxDetails | None = None,
) -> Obj:
    now = simtime.now()
    sub_data = session["_subscription_data"]
    trial_days = sub_data["trial_period_days"]
    settles_later = card is not None and card.outcome.startswith("async") and not trial_days

    customer = store.get(session["customer"]) if session["customer"] else objects.customer(email, name, now)
    assert customer is not None
    method = None
    if card is not None:
        method = invoicing.create_payment_method(
            store,
            card.number,
            customer_id=customer["id"],
            name=name,
            email=email,
            exp_month=card_expiry[0],
            exp_year=card_expiry[1],
        )
        if customer["invoice_settings"]["default_payment_method"] is None:
            customer["invoice_settings"]["default_payment_method"] = method["id"]
    subscription = objects.subscription(
        customer_id=customer["id"],
        line_items=session["line_items"]["data"],
        metadata=sub_data["metadata"],
        trial_days=trial_days,
        status="trialing" if trial_days else "incomplete" if settles_later else "active",
        now=now,
    )
    subscription.update(
        test_clock=customer.get("test_clock"),
        default_payment_method=method["id"] if method else None,
    )
    if sub_data.get("missing_payment_method"):
        subscription["trial_settings"]["end_behavior"]["missing_payment_method"] = sub_data["missing_payment_method"]
    _collect_tax_details(store, session, customer, subscription, tax_details or TaxDetails())
    if code is not None:
        made = discounts.redeem(store, code, subscription, now)
        session["discounts"] = [{"coupon": None, "promotion_code": code["id"]}]
        session["_discount"] = made["id"]
    invoice = objects.invoice(customer, subscription, now)
    discounts.apply_to_invoice(store, invoice, subscription)
    invoicing.decorate(invoice, customer, subscription)
    customer["next_invoice_sequence"] += 1
    subscription["latest_invoice"] = invoice["id"]
    if not settles_later:
        paid = invoicing.charge(store, invoice, method, on_session=True)  # the customer is on the page
        assert paid, "cards whose charges fail are refused above"
    session.update(
        status="complete",
        payment_status=("no_payment_required" if trial_days else "unpaid" if settles_later else "paid"),
        customer=customer["id"],
        subscription=subscription["id"],
        invoice=invoice["id"],  # the subscription's first invoice, as Stripe records it
        customer_details=objects.customer_details(email, name),
        url=None,
    )
    _tax_totals(store, session, customer, invoice, tax_details or TaxDetails())
    for obj in (customer, subscription, invoice, session):
        store.put(obj)

    emit(store, "customer.subscription.created", subscription)
    if not settles_later:
        emit(store, "invoice.paid", invoice)
    emit(store, "checkout.session.completed", session)
    if settles_later and card is not None:  # (settles_later implies a card)
        store.add_job(f"settle_{card.outcome}", session["id"], time.time() + async_delay)
    return session


def _settle(store: Store, session_id: str, succeeded: bool) -> None:
    session = load(store, "checkout.session", session_id)
    if session["payment_status"] != "unpaid":
        return
    subscription = load(store, "subscription", session["subscription"])
    invoice = load(store, "invoice", subscription["latest_invoice"])
    before = copy.deepcopy(subscription)
    now = simtime.now()
    if succeeded:
        session["payment_status"] = "paid"
        store.put(session)
        emit(store, "checkout.session.async_payment_succeeded", session)
        customer = load(store, "customer", invoice["customer"])
        invoicing.charge(store, invoice, invoicing.default_payment_method(store, subscription, customer))
        store.put(invoice)
        emit(store, "invoice.paid", invoice)
    else:
        emit(store, "checkout.session.async_payment_failed", session)
        invoice.update(attempt_count=1, attempted=True)
        store.put(invoice)
        emit(store, "invoice.payment_failed", invoice)
    if subscription["status"] == "incomplete":  # unless it was canceled meanwhile
        if succeeded:
            subscription["status"] = "active"
        else:
            subscription.update(status="incomplete_expired", ended_at=now)
        store.put(subscription)
        emit(
            store,
            "customer.subscription.updated",
            subscription,
            objects.previous_attributes(before, subscription),
        )


# The timed jobs this module schedules (Session expiry, asynchronous settlement), which
# billing.run_job() dispatches.
JOB_HANDLERS["expire_session"] = lambda store, ref, now: _expire_if_due(
    store, load(store, "checkout.session", ref), now
)
JOB_HANDLERS["settle_async_succeeds"] = lambda store, ref, now: _settle(store, ref, succeeded=True)
JOB_HANDLERS["settle_async_fails"] = lambda store, ref, now: _settle(store, ref, succeeded=False)


def _collect_tax_details(store: Store, session: Obj, customer: Obj, subscription: Obj, details: TaxDetails) -> None:
    """The address and tax ID typed on the page go on the customer (a customer the Session was given
    keeps its own unless customer_update says `auto`), before its first invoice is taxed."""
    new_customer = not session["customer"]
    update, before = session.get("_customer_update") or {}, copy.deepcopy(customer)
    if details.address is not None and (new_customer or update.get("address") == "auto"):
        customer["address"] = details.address
    if details.business_name and (new_customer or update.get("name") == "auto"):
        customer["name"] = details.business_name
    store.put(customer)
    changes = objects.previous_attributes(before, customer)
    if not new_customer and changes:  # customer_update=auto saved what was typed
        emit(store, "customer.updated", customer, changes)
    if details.tax_id:
        value = details.tax_id.upper().replace(" ", "")
        kind = "us_ein" if not value[:2].isalpha() else "gb_vat" if value.startswith("GB") else "eu_vat"
        try:
            tax.create_tax_id(store, customer, kind, value, AUTOMATIC)
        except StripeError as exc:
            raise PaymentError(f"Your tax ID is invalid: {exc.message}") from None
    if session["automatic_tax"]["enabled"]:
        subscription["automatic_tax"].update(enabled=True, liability={"type": "self"})


def _tax_totals(store: Store, session: Obj, customer: Obj, invoice: Obj, details: TaxDetails) -> None:
    """The Session's tax: its automatic_tax status, total_details.amount_tax and customer_details."""
    if session["automatic_tax"]["enabled"]:
        session["automatic_tax"].update(status=invoice["automatic_tax"]["status"], provider="stripe")
        session["automatic_tax"]["liability"] = {"type": "self"}
    amount_tax = tax.amount_tax(invoice)
    session["total_details"]["amount_tax"] = amount_tax
    if not session["_subscription_data"]["trial_period_days"]:
        session.update(amount_total=invoice["total"], amount_subtotal=invoice["subtotal"])
    session["customer_details"].update(
        address=customer.get("address") if collects_address(session) or details.address else None,
        business_name=details.business_name or None,
        tax_exempt=customer.get("tax_exempt", "none"),
        tax_ids=tax.customer_tax_ids(store, customer["id"]),
    )
