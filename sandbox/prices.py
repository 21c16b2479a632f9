"""Creating and changing prices, with lookup keys that move between prices.

Stripe prices are immutable apart from `active`, `lookup_key`, `nickname` and `metadata`. A
lookup key belongs to one price; `transfer_lookup_key=true` moves it to the price being
created or updated, leaving the old price's `lookup_key` null. Subscriptions keep whatever
price they are on: their items show the old price, now without its lookup key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import lists, objects, simtime
from .billing import load, merge_metadata
from .errors import StripeError, exclusive
from .objects import Obj
from .store import Store

INTERVALS = ("day", "week", "month", "year")
TAX_BEHAVIORS = ("exclusive", "inclusive", "unspecified")
UNSET: Any = object()


@dataclass
class PriceCreate:
    currency: str
    unit_amount: int
    interval: str | None
    interval_count: int
    product: str | None
    product_name: str | None
    lookup_key: str | None
    transfer_lookup_key: bool
    nickname: str | None
    metadata: dict[str, str]
    active: bool
    usage_type: str = "licensed"  # or "metered": billed in arrears from its meter's usage
    meter: str | None = None  # a metered price's billing.meter
    tax_behavior: str = "unspecified"


def list_prices(
    store: Store,
    *,
    lookup_keys: list[str] | None,
    active: bool | None,
    page: lists.Page,
) -> Obj:
    prices = [
        p
        for p in reversed(store.all("price"))  # newest first, like every Stripe list
        if (lookup_keys is None or p["lookup_key"] in lookup_keys) and (active is None or p["active"] == active)
    ]
    return lists.paginate(prices, "/v1/prices", page, "price")


def _take_lookup_key(store: Store, lookup_key: str, transfer: bool, keep: str | None, param: str) -> None:
    holder = next((p for p in store.all("price") if p["lookup_key"] == lookup_key and p["id"] != keep), None)
    if holder is None:
        return
    if not transfer:
        raise StripeError(
            f"A price (`{holder['id']}`) already uses that lookup key. Pass transfer_lookup_key=true to"
            " move it to this price.",
            param=param,
        )
    holder["lookup_key"] = None
    store.put(holder)
    refresh_embedded(store, holder)


def refresh_embedded(store: Store, price: Obj) -> None:
    """Subscriptions show their items' prices as they are now, as Stripe renders them."""
    shown = objects.public(price)
    for subscription in store.all("subscription"):
        touched = False
        for item in subscription["items"]["data"]:
            if item["price"]["id"] == price["id"]:
                item["price"] = shown
                item["plan"] = objects.plan(shown)
                touched = True
        if touched:
            store.put(subscription)


def create_price(store: Store, req: PriceCreate) -> Obj:
    now = simtime.now()
    if req.product and req.product_name:
        raise exclusive("product", "product_data", "product_data")
    if req.product:
        product = load(store, "product", req.product, "product", 400)
    elif req.product_name:
        product = objects.product(req.product_name, None, now)
    else:
        raise StripeError(
            "Missing required param: product (or product_data).", code="parameter_missing", param="product"
        )
    if req.currency.lower() != objects.CURRENCY:
        raise StripeError("The sandbox only supports usd prices.", param="currency")
    if req.interval is not None and req.interval not in INTERVALS:
        raise StripeError(
            f"Invalid recurring[interval]: must be one of {', '.join(INTERVALS)}", param="recurring[interval]"
        )
    _check_usage_type(store, req)
    _check_tax_behavior(req.tax_behavior)
    if req.lookup_key:
        _take_lookup_key(store, req.lookup_key, req.transfer_lookup_key, None, "lookup_key")
    price = objects.price(
        product["id"], req.lookup_key or "", req.nickname or "", req.unit_amount, now, req.tax_behavior
    )
    price.update(lookup_key=req.lookup_key, nickname=req.nickname, metadata=req.metadata, active=req.active)
    if req.interval is None:
        price.update(type="one_time", recurring=None)
    else:
        price["recurring"].update(interval=req.interval, interval_count=req.interval_count)
        price["recurring"].update(usage_type=req.usage_type, meter=req.meter)
    if product.get("default_price") is None:
        product["default_price"] = price["id"]
    store.put(product)
    store.put(price)
    return price


def _check_usage_type(store: Store, req: PriceCreate) -> None:
    """recurring[usage_type] is licensed or metered; a metered price needs an active meter, and only it
    takes one."""
    if req.usage_type not in ("licensed", "metered"):
        raise StripeError(
            "Invalid recurring[usage_type]: must be one of licensed, metered", param="recurring[usage_type]"
        )
    if req.usage_type == "metered":
        if req.meter is None:
            raise StripeError(
                "Missing required param: recurring[meter].", code="parameter_missing", param="recurring[meter]"
            )
        meter = load(store, "billing.meter", req.meter, "recurring[meter]", 400)
        if meter["status"] != "active":
            raise StripeError(f"The meter `{req.meter}` is not active.", param="recurring[meter]")
    elif req.meter is not None:
        raise StripeError("recurring[meter] can only be set when usage_type is `metered`.", param="recurring[meter]")


def _check_tax_behavior(value: str) -> None:
    if value not in TAX_BEHAVIORS:
        raise StripeError(f"Invalid tax_behavior: must be one of {', '.join(TAX_BEHAVIORS)}", param="tax_behavior")


def update_price(
    store: Store,
    price_id: str,
    *,
    active: bool | None,
    lookup_key: Any,
    transfer_lookup_key: bool,
    nickname: Any,
    metadata: dict[str, str] | None,
    tax_behavior: str | None = None,
) -> Obj:
    price = load(store, "price", price_id, "price")
    if tax_behavior is not None and tax_behavior != price["tax_behavior"]:
        # Stripe: once inclusive or exclusive, a price's tax_behavior cannot be changed.
        _check_tax_behavior(tax_behavior)
        if price["tax_behavior"] != "unspecified":
            raise StripeError(
                f"The price's `tax_behavior` is `{price['tax_behavior']}`; once set to inclusive or exclusive"
                " it cannot be changed. Create a new price instead.",
                param="tax_behavior",
            )
        price["tax_behavior"] = tax_behavior
    if active is not None:
        price["active"] = active
    if lookup_key is not UNSET:
        if lookup_key:
            _take_lookup_key(store, lookup_key, transfer_lookup_key, price_id, "lookup_key")
        price["lookup_key"] = lookup_key or None
    if nickname is not UNSET:
        price["nickname"] = nickname or None
    merge_metadata(price, metadata)
    store.put(price)
    refresh_embedded(store, price)
    return price
