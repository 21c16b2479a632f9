"""Refunds of a subscription's payment, whole or in part."""

from __future__ import annotations

import pytest
import stripe

from sandbox.tests.conftest import Receiver, Sandbox, paid_subscription


def test_partial_and_full_refunds(sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    invoice = sandbox.client.v1.invoices.retrieve(sub.latest_invoice, params={"expand": ["payments"]})
    assert "payments" not in sandbox.client.v1.invoices.retrieve(sub.latest_invoice)  # only when expanded
    payment = invoice.payments.data[0]
    assert payment.amount_paid == invoice.amount_paid == 3900 and payment.status == "paid"
    intent_id = payment.payment.payment_intent
    intent = sandbox.client.v1.payment_intents.retrieve(intent_id)
    assert intent.status == "succeeded" and intent.amount_received == 3900

    refunds = sandbox.client.v1.refunds
    part = refunds.create(
        params={"payment_intent": intent_id, "amount": 1000, "reason": "requested_by_customer", "metadata": {"o": "1"}},
        options={"idempotency_key": "refund-org-1"},
    )
    assert part.id.startswith("re_") and part.status == "succeeded" and part.amount == 1000
    assert part.payment_intent == intent_id and part.charge == intent.latest_charge
    again = refunds.create(
        params={"payment_intent": intent_id, "amount": 1000, "reason": "requested_by_customer", "metadata": {"o": "1"}},
        options={"idempotency_key": "refund-org-1"},
    )
    assert again.id == part.id  # replayed, not refunded twice
    charge = sandbox.client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (1000, False)

    with pytest.raises(stripe.InvalidRequestError) as raised:
        refunds.create(params={"charge": charge.id, "amount": 3000})
    assert raised.value.param == "amount" and "greater than unrefunded amount" in str(raised.value)
    with pytest.raises(stripe.InvalidRequestError) as raised:
        refunds.create(params={"payment_intent": "pi_nope"})
    assert (raised.value.code, raised.value.param) == ("resource_missing", "payment_intent")
    with pytest.raises(stripe.InvalidRequestError) as raised:
        refunds.create(params={"charge": charge.id, "reason": "bored"})
    assert raised.value.param == "reason"

    rest = refunds.create(params={"charge": charge.id})  # the rest, by default
    assert rest.amount == 2900
    charge = sandbox.client.v1.charges.retrieve(charge.id)
    assert (charge.amount_refunded, charge.refunded) == (3900, True)
    with pytest.raises(stripe.InvalidRequestError) as raised:
        refunds.create(params={"charge": charge.id})
    assert raised.value.code == "charge_already_refunded"

    assert refunds.retrieve(part.id).metadata.to_dict() == {"o": "1"}
    listed = refunds.list(params={"payment_intent": intent_id})
    assert [r.id for r in listed.data] == [rest.id, part.id]  # newest first
    assert refunds.list(params={"payment_intent": intent_id, "limit": 1}).has_more
    [listed_charge] = sandbox.client.v1.charges.list(params={"customer": sub.customer}).data
    assert (listed_charge.id, listed_charge.amount_refunded) == (charge.id, 3900)
    assert [c.id for c in sandbox.client.v1.charges.list(params={"payment_intent": intent_id}).data] == [charge.id]
    assert sandbox.client.v1.charges.list(params={"customer": "cus_other"}).data == []

    events = receiver.wait_for({part.id, rest.id, charge.id}, 4)
    assert [e["type"] for e in events] == ["refund.created", "charge.refunded", "refund.created", "charge.refunded"]
    assert events[1]["data"]["previous_attributes"] == {"amount_refunded": 0}
    assert events[3]["data"]["object"]["refunded"] is True
