"""Metered prices in the catalogue's memory (catalogue_price, kind 'meter'): remembered when seen with
their lookup key, so a subscription's metered item still maps to its meter after `transfer_lookup_key`
moved the key to a newer price, as a tier's or an add-on's does."""

from __future__ import annotations

from flask import Flask

from tests.conftest import SandboxAccount, query
from tests.test_money_leaks import Owner, organization

METERED = "api_calls_overage"  # plans.toml [meters.api_calls]


def test_a_metered_price_is_remembered_and_its_item_still_maps_after_its_key_moved(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner = Owner(app, offline_stripe)
    old = offline_stripe.price(METERED)
    rows = query(
        app,
        "SELECT price_id, product_id, catalogue_key FROM catalogue_price WHERE kind = 'meter' AND price_id = :p",
        p=old["id"],
    )  # (the signup page looked up both metered prices: the yearly one is remembered too)
    assert [(r.price_id, r.product_id, r.catalogue_key) for r in rows] == [(old["id"], old["product"], "api_calls")]
    recurring = {"interval": "month", "usage_type": "metered", "meter": old["recurring"]["meter"]}
    offline_stripe.api(
        "POST",
        "/v1/prices",
        {"currency": "usd", "unit_amount": old["unit_amount"] + 1, "product": old["product"], "recurring": recurring}
        | {"lookup_key": METERED, "transfer_lookup_key": True},
    )
    try:
        items = offline_stripe.subscription(owner.subscription_id)["items"]["data"]
        [metered] = [i for i in items if i["price"]["id"] == old["id"]]
        assert metered["price"]["lookup_key"] is None  # its key moved away
        offline_stripe.api("POST", f"/v1/subscriptions/{owner.subscription_id}", {"metadata": {"touched": "1"}})
        updated = offline_stripe.deliver(owner.client, types=("customer.subscription.updated",))
        assert updated == [("customer.subscription.updated", 200)]
        row = organization(app, owner.organization_id)
        assert row.tier == "starter" and row.unmapped_items is None  # still the meter's: nothing reported
    finally:
        offline_stripe.api("POST", f"/v1/prices/{old['id']}", {"lookup_key": METERED, "transfer_lookup_key": True})


def test_check_prices_checks_and_remembers_each_metered_price(app: Flask, offline_stripe: SandboxAccount) -> None:
    result = app.test_cli_runner().invoke(args=["billing", "check-prices"])
    assert result.exit_code == 0, result.output
    monthly, yearly = offline_stripe.price(METERED), offline_stripe.price("api_calls_overage_yearly")
    assert monthly["id"] in result.output and yearly["id"] in result.output
    assert yearly["recurring"] | {"trial_period_days": None} == monthly["recurring"] | {"interval": "year"}
    rows = query(app, "SELECT price_id, lookup_key FROM catalogue_price WHERE kind = 'meter' ORDER BY lookup_key")
    assert [(r.price_id, r.lookup_key) for r in rows] == [(monthly["id"], METERED), (yearly["id"], f"{METERED}_yearly")]
