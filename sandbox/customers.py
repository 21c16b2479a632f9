"""Customers created and updated through the API, optionally on a test clock."""

from __future__ import annotations

import copy

from . import billing, invoicing, objects, simtime, tax
from .errors import StripeError
from .objects import Obj
from .store import Store


def create(
    store: Store,
    *,
    email: str | None,
    name: str | None,
    metadata: dict[str, str],
    test_clock: str | None,
    payment_method: str | None,
    default_payment_method: str | None,
    origin: billing.Origin,
    tax_details: tuple[Obj | None, str | None] = (None, None),
) -> Obj:
    """POST /v1/customers. On a test clock the customer is created at the clock's frozen time.
    Events: customer.created, then payment_method.attached for `payment_method`."""
    frozen = None
    if test_clock:
        clock = billing.load(store, "test_helpers.test_clock", test_clock, "test_clock", 400)
        frozen = clock["frozen_time"]
    with simtime.frozen_at(frozen):
        customer = objects.customer(email, name, simtime.now())
        customer.update(metadata=metadata, test_clock=test_clock)
        tax.set_customer_details(store, customer, address_given=tax_details[0], tax_exempt=tax_details[1])
        store.put(customer)
        billing.emit(store, "customer.created", customer, origin=origin)
        attached = None
        if payment_method:
            attached = invoicing.resolve_payment_method(store, payment_method, customer, "payment_method")
        if default_payment_method:
            method_id = (
                attached["id"] if attached and default_payment_method == payment_method else default_payment_method
            )
            _check_owned(store, customer, method_id)
            customer["invoice_settings"]["default_payment_method"] = method_id
            store.put(customer)
    return customer


def update(
    store: Store,
    customer_id: str,
    *,
    email: str | None,
    name: str | None,
    metadata: dict[str, str] | None,
    default_payment_method: str | None,
    origin: billing.Origin,
    tax_details: tuple[Obj | None, str | None] = (None, None),
) -> Obj:
    """POST /v1/customers/:id; customer.updated lists what changed (none if nothing did).
    default_payment_method "" clears it (passed here as "")."""
    customer = billing.load(store, "customer", customer_id)
    before = copy.deepcopy(customer)
    if email is not None:
        customer["email"] = email or None
    if name is not None:
        customer["name"] = name or None
    billing.merge_metadata(customer, metadata)
    tax.set_customer_details(store, customer, address_given=tax_details[0], tax_exempt=tax_details[1])
    if default_payment_method is not None:
        if default_payment_method:
            _check_owned(store, customer, default_payment_method)
        customer["invoice_settings"]["default_payment_method"] = default_payment_method or None
    changes = objects.previous_attributes(before, customer)
    if changes:
        store.put(customer)
        billing.emit(store, "customer.updated", customer, changes, origin)
    return customer


def _check_owned(store: Store, customer: Obj, method_id: str) -> None:
    method = store.get(method_id)
    if method is None or method["object"] != "payment_method" or method["customer"] != customer["id"]:
        raise StripeError(
            f"No such PaymentMethod: '{method_id}'; the customer's default must be attached to it first.",
            code="resource_missing",
            param="invoice_settings[default_payment_method]",
        )


def use_new_card(
    store: Store,
    customer_id: str,
    card_number: str,
    *,
    name: str,
    email: str,
    expiry: tuple[int, int],
) -> Obj:
    """The portal's "update card": attach a new card and make it the default of the customer
    and of every subscription that has not ended. Events: payment_method.attached,
    customer.updated, customer.subscription.updated (one per subscription whose default changed)."""
    customer = billing.load(store, "customer", customer_id)
    method = invoicing.attach_typed_card(store, customer_id, card_number, name=name, email=email, expiry=expiry)
    invoicing.set_customer_default(store, customer, method["id"], billing.AUTOMATIC)
    for subscription in billing.customer_subscriptions(store, customer_id):
        if subscription["status"] in billing.ENDED or subscription["default_payment_method"] == method["id"]:
            continue
        before = copy.deepcopy(subscription)
        subscription["default_payment_method"] = method["id"]
        store.put(subscription)
        billing.emit(
            store, "customer.subscription.updated", subscription, objects.previous_attributes(before, subscription)
        )
    return method
