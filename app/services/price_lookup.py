"""Prices and the catalogue as Stripe sells them: the Redis price cache in front of Stripe's price
lookup, the prices we remember (catalogue_price, so a later price migration cannot unmap what was sold),
and a subscription mapped onto the catalogue. Stripe itself is reached only through the `fetch`
BillingService hands in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import current_app
from sqlalchemy import select

from app.extensions import cache, db
from app.models import CataloguePrice, Organization
from app.models.types import utcnow
from app.services.billing_common import (
    BillingError,
    PriceUnavailableError,
    UnknownTierError,
    id_of,
    plan_catalogue,
    portable_insert,
)
from app.services.catalogue_mapping import CatalogueEntry, KnownPrice, KnownPrices, entry_for_lookup_key
from app.services.plans import Tier
from app.services.pricing import PriceInfo
from app.services.subscription_state import SubscriptionState


def subscription_state(subscription: Mapping[str, Any], organization: Organization | None = None) -> SubscriptionState:
    """A subscription mapped onto the catalogue with every price we remember (catalogue_price)
    and the add-on items the organization holds; prices seen with a catalogue lookup key are
    remembered in the caller's transaction."""
    held = (
        {row.provider_item_id: row.addon_key for row in organization.addons if row.provider_item_id}
        if organization is not None
        else {}
    )
    state = SubscriptionState.from_stripe(subscription, plan_catalogue(), known_prices(), held)
    if state.seen_prices:
        db.session.execute(remember_prices_statement(state.seen_prices))
    return state


def known_prices() -> KnownPrices:
    rows = db.session.execute(select(CataloguePrice)).scalars().all()
    return KnownPrices.from_rows(
        KnownPrice(row.price_id, row.product_id, row.lookup_key, CatalogueEntry(row.kind, row.catalogue_key))
        for row in rows
    )


def prices_for_lookup_keys(
    lookup_keys: list[str], fetch: Callable[[list[str]], dict[str, PriceInfo]], *, required: bool = True
) -> dict[str, PriceInfo]:
    """Stripe's active price (id, amount, currency, interval) for each lookup key, from the Redis price
    cache (PRICE_CACHE_SECONDS) or one lookup at Stripe for those not cached. required: a key with no
    active price raises PriceUnavailableError; otherwise it is left out, and remembered as missing for
    BILLING_READ_FAILURE_SECONDS so pages that show prices do not ask again on every view."""
    keys = list(dict.fromkeys(lookup_keys))
    cached = {
        key: PriceInfo.from_cache(value)
        for key, value in zip(keys, cache.get_many(*(f"stripe-price:{key}" for key in keys)), strict=True)
    }
    missing = [key for key, price in cached.items() if price is None]
    if missing and not required:
        known_missing = cache.get_many(*(f"stripe-price-missing:{key}" for key in missing))
        missing = [key for key, flag in zip(missing, known_missing, strict=True) if not flag]
    found: dict[str, PriceInfo] = {}
    if missing:
        release_transaction_before_provider()
        try:
            found = fetch(missing)
        except BillingError:
            if required:
                raise
            remember_missing_prices(missing)
            return {key: price for key, price in cached.items() if price is not None}
        cache.set_many({f"stripe-price:{key}": price.to_cache() for key, price in found.items()})
        remember_missing_prices([key for key in missing if key not in found])
    prices = {key: price for key, price in cached.items() if price is not None} | found
    unknown = [key for key in keys if key not in prices]
    if unknown and required:
        raise PriceUnavailableError(f"No active Stripe price has the lookup key {', '.join(repr(k) for k in unknown)}.")
    return {key: prices[key] for key in keys if key in prices}


def release_transaction_before_provider() -> None:
    """No transaction (and so no pooled connection) is held while Stripe answers: a page that read the
    organization (or the signed-in user) before asking for prices ends that read-only transaction
    here; its objects are read again when next used. A session with writes pending is left alone
    (its caller commits them first; none does today)."""
    session = db.session()
    if session.in_transaction() and not (session.new or session.dirty or session.deleted):
        session.rollback()


def remember_missing_prices(lookup_keys: list[str]) -> None:
    if lookup_keys:
        timeout = current_app.config["BILLING_READ_FAILURE_SECONDS"]
        cache.set_many({f"stripe-price-missing:{key}": 1 for key in lookup_keys}, timeout=timeout)


def remember_listed_prices(prices: Iterable[Mapping[str, Any]]) -> None:
    """Prices resolved by lookup key are remembered (catalogue_price) on a connection of their own,
    so a later price migration cannot unmap the subscriptions sold at them."""
    catalogue = plan_catalogue()
    seen = [
        KnownPrice(str(price["id"]), id_of(price.get("product")), str(price["lookup_key"]), entry)
        for price in prices
        if (entry := entry_for_lookup_key(catalogue, price.get("lookup_key"))) is not None
    ]
    if seen:
        with db.engine.begin() as connection:
            connection.execute(remember_prices_statement(seen))


def lookup_key_quantities(tier: Tier, addons: Mapping[str, int], interval: str = "month") -> dict[str, int]:
    """The quantity to buy of each price, by lookup key: the tier's, then each add-on's, billed every
    `interval` (month, or year where the catalogue sells it)."""
    catalogue = plan_catalogue()
    tier_key = tier.lookup_key_for(interval)
    if tier_key is None:
        raise UnknownTierError(f"{tier.name} is not sold {'yearly' if interval == 'year' else 'monthly'}.")
    quantities = {tier_key: 1}
    for key, quantity in addons.items():
        addon = catalogue.addons.get(key)
        if addon is None:
            raise UnknownTierError(f"There is no add-on called {key!r}.")
        if not 0 <= quantity <= addon.max_quantity:
            raise BillingError(f"{addon.name}: choose between 0 and {addon.max_quantity}.")
        if quantity:
            addon_key = addon.lookup_key_for(interval)
            if addon_key is None:
                raise BillingError(f"{addon.name} are not sold {'yearly' if interval == 'year' else 'monthly'}.")
            quantities[addon_key] = quantity
    return quantities


def metered_lookup_keys(tier: Tier, interval: str = "month") -> list[str]:
    """The metered prices (by lookup key) a subscription to the tier carries, with no quantity: Stripe
    bills each in arrears from its meter's usage. On the subscription's interval (Stripe bills all of a
    classic subscription's items on one): a yearly subscription carries each meter's yearly metered
    price, so the year's overage (counted per month past each month's included quantity) is invoiced
    with the yearly renewal; a meter without one bills yearly subscriptions no overage."""
    return plan_catalogue().billed_meter_lookup_keys(tier.key, interval)


def line_items(
    tier: Tier, addons: Mapping[str, int], interval: str, price_ids: Callable[[list[str]], dict[str, str]]
) -> list[Any]:
    """What a subscription to the tier and add-ons buys ({"price", "quantity"} each), then its metered
    prices ({"price"}: no quantity, Stripe bills them from the meter)."""
    quantities, metered = lookup_key_quantities(tier, addons, interval), metered_lookup_keys(tier, interval)
    prices = price_ids([*quantities, *metered])
    return [{"price": prices[k], "quantity": q} for k, q in quantities.items()] + [
        {"price": prices[k]} for k in metered
    ]


def remember_prices_statement(prices: Iterable[KnownPrice]) -> Any:
    """Remember prices seen with a catalogue lookup key; a price already known stays as first seen."""
    now = utcnow()
    rows = {
        price.price_id: {
            "price_id": price.price_id,
            "product_id": price.product_id,
            "lookup_key": price.lookup_key,
            "kind": price.entry.kind,
            "catalogue_key": price.entry.key,
            "first_seen_at": now,
        }
        for price in prices
    }
    statement = portable_insert(CataloguePrice).values(list(rows.values()))
    return statement.on_conflict_do_nothing(index_elements=["price_id"])


def checkout_sells(session: Any, line_items: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a Checkout Session (read with its line_items expanded) can still be paid and sells exactly
    these items: then a resubmitted signup form is sent to it again instead of to a new one."""
    if session.status != "open":
        return False
    sold = sorted((item.price.id, item.quantity) for item in session.line_items.data)
    return sold == sorted((item["price"], item.get("quantity")) for item in line_items)
