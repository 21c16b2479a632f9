"""Creating and changing prices; lookup keys that move to a new price."""

from __future__ import annotations

import pytest
import stripe

from sandbox.tests.conftest import Sandbox, paid_subscription


def test_create_retrieve_and_update_prices(sandbox: Sandbox) -> None:
    prices = sandbox.client.v1.prices
    created = prices.create(
        params={
            "currency": "usd",
            "unit_amount": 2500,
            "recurring": {"interval": "month", "interval_count": 3},
            "product_data": {"name": "Quarterly thing"},
            "lookup_key": "quarterly_thing",
            "nickname": "Quarterly",
            "metadata": {"tier": "q"},
        }
    )
    assert created.id.startswith("price_") and created.type == "recurring" and created.active
    assert (created.recurring.interval, created.recurring.interval_count) == ("month", 3)
    assert created.unit_amount == 2500 and str(created.unit_amount_decimal) == "2500"
    fetched = prices.retrieve(created.id, params={"expand": ["product"]})
    assert fetched.product.name == "Quarterly thing" and fetched.lookup_key == "quarterly_thing"

    one_time = prices.create(params={"currency": "usd", "unit_amount": 500, "product": created.product})
    assert one_time.type == "one_time" and one_time.recurring is None and one_time.lookup_key is None

    changed = prices.update(created.id, params={"active": False, "nickname": "", "metadata": {"tier": ""}})
    assert changed.active is False and changed.nickname is None and changed.metadata.to_dict() == {}
    assert prices.update(created.id, params={"lookup_key": ""}).lookup_key is None

    cases = [
        ({"unit_amount": 1, "product_data": {"name": "x"}}, "parameter_missing", "currency"),
        ({"currency": "usd", "unit_amount": 1}, "parameter_missing", "product"),
        ({"currency": "usd", "unit_amount": 1, "product": "prod_nope"}, "resource_missing", "product"),
        (
            {
                "currency": "usd",
                "unit_amount": 1,
                "product_data": {"name": "x"},
                "recurring": {"interval": "fortnight"},
            },
            None,
            "recurring[interval]",
        ),
        (
            {"currency": "usd", "unit_amount": 1, "product_data": {"name": "x"}, "tiers": "x"},
            "parameter_unknown",
            "tiers",
        ),
        (
            {"currency": "usd", "unit_amount": 1, "product_data": {"name": "x"}, "lookup_key": "starter_monthly"},
            None,
            "lookup_key",
        ),
    ]
    for params, code, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            prices.create(params=params)
        assert (raised.value.code, raised.value.param) == (code, param), params
    with pytest.raises(stripe.InvalidRequestError) as raised:
        prices.retrieve("price_nope")
    assert raised.value.http_status == 404


def test_transfer_lookup_key_leaves_subscriptions_on_the_old_price(sandbox: Sandbox, prices: dict[str, str]) -> None:
    _, sub = paid_subscription(sandbox, prices)
    old = sandbox.client.v1.prices.retrieve(prices["extra_seat_monthly"])
    new = sandbox.client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": 1200,
            "recurring": {"interval": "month"},
            "product": old.product,
            "lookup_key": "extra_seat_monthly",
            "transfer_lookup_key": True,
        }
    )
    assert new.lookup_key == "extra_seat_monthly"
    assert sandbox.client.v1.prices.retrieve(old.id).lookup_key is None
    listed = sandbox.client.v1.prices.list(params={"lookup_keys": ["extra_seat_monthly"]}).data
    assert [p.id for p in listed] == [new.id]

    kept = sandbox.client.v1.subscriptions.retrieve(sub.id)
    seat = next(i for i in kept["items"].data if i.price.product == old.product)
    assert seat.price.id == old.id and seat.price.lookup_key is None  # still billed at the old price
    assert seat.quantity == 2

    # Moving it back with an update works the same way.
    back = sandbox.client.v1.prices.update(
        old.id, params={"lookup_key": "extra_seat_monthly", "transfer_lookup_key": True}
    )
    assert back.lookup_key == "extra_seat_monthly"
    assert sandbox.client.v1.prices.retrieve(new.id).lookup_key is None
