"""Which tier or add-on of the catalogue each subscription item sells. Pure: plain dicts in.

An item maps by, in order: its price's lookup key (the catalogue's own words); the price's id, remembered
from an earlier sighting of that price with a catalogue lookup key (`catalogue_price`); the price's
product, remembered likewise (when the product sells exactly one catalogue entry); and, for add-ons, the
subscription item the organization already holds for that add-on. So a subscription left on an old price
after `transfer_lookup_key` moved the key to a new one keeps its tier and add-ons. A metered price (a
`[meters.*]` lookup key) is remembered the same way and maps to its meter: billed from the meter's usage,
it is neither a tier nor an add-on, and is not reported once its key has moved on. An item that maps to
nothing is reported, never treated as absent: the organization keeps its tier and add-ons."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.services.plans import Meter, PlanCatalogue

TIER = "tier"
ADDON = "addon"
METER = "meter"  # a metered price: billed from its meter's usage


@dataclass(frozen=True)
class CatalogueEntry:
    kind: str  # "tier", "addon" or "meter"
    key: str


@dataclass(frozen=True)
class KnownPrice:
    price_id: str
    product_id: str | None
    lookup_key: str
    entry: CatalogueEntry


@dataclass(frozen=True)
class KnownPrices:
    """Prices remembered from the catalogue: by price id, and by product where it is unambiguous."""

    by_price: dict[str, CatalogueEntry] = field(default_factory=dict)
    by_product: dict[str, CatalogueEntry] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[KnownPrice]) -> KnownPrices:
        by_price: dict[str, CatalogueEntry] = {}
        products: dict[str, set[CatalogueEntry]] = {}
        for row in rows:
            by_price[row.price_id] = row.entry
            if row.product_id:
                products.setdefault(row.product_id, set()).add(row.entry)
        by_product = {product: next(iter(entries)) for product, entries in products.items() if len(entries) == 1}
        return cls(by_price, by_product)


@dataclass(frozen=True)
class MappedAddon:
    quantity: int
    subscription_item_id: str


@dataclass(frozen=True)
class ItemMapping:
    tier: str | None
    addons: dict[str, MappedAddon]
    unmapped: list[dict[str, Any]]  # {"item", "price", "product", "quantity"}: reported, never dropped
    seen: list[KnownPrice]  # prices seen carrying a catalogue lookup key: remember them


def entry_for_lookup_key(catalogue: PlanCatalogue, lookup_key: str | None) -> CatalogueEntry | None:
    if tier := catalogue.tier_for_lookup_key(lookup_key):
        return CatalogueEntry(TIER, tier.key)
    if addon := catalogue.addon_for_lookup_key(lookup_key):
        return CatalogueEntry(ADDON, addon.key)
    if meter := next((m for m in catalogue.meters.values() if lookup_key and lookup_key in _keys_of(m)), None):
        return CatalogueEntry(METER, meter.key)
    return None


def _keys_of(meter: Meter) -> tuple[str | None, str | None]:
    return (meter.lookup_key, meter.yearly_lookup_key)


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def map_items(
    items: Iterable[Mapping[str, Any]],
    catalogue: PlanCatalogue,
    known: KnownPrices | None = None,
    held_addon_items: Mapping[str, str] | None = None,
) -> ItemMapping:
    """Map a subscription's items (`items.data`) onto the catalogue. held_addon_items: the subscription
    item id of each add-on the organization holds (item id -> add-on key)."""
    known = known or KnownPrices()
    held = held_addon_items or {}
    tier: str | None = None
    addons: dict[str, MappedAddon] = {}
    unmapped: list[dict[str, Any]] = []
    seen: list[KnownPrice] = []
    for item in items:
        price = item.get("price") or {}
        price_id = _id_of(price)
        product_id = _id_of(price.get("product")) if isinstance(price, dict) else None
        lookup_key = price.get("lookup_key") if isinstance(price, dict) else None
        entry = entry_for_lookup_key(catalogue, lookup_key)
        if entry is not None and price_id and isinstance(lookup_key, str):
            seen.append(KnownPrice(price_id, product_id, lookup_key, entry))
        entry = (
            entry
            or (known.by_price.get(price_id) if price_id else None)
            or (known.by_product.get(product_id) if product_id else None)
        )
        if entry is None and item.get("id") in held:
            entry = CatalogueEntry(ADDON, held[str(item["id"])])
        if entry is not None and entry.kind == METER and entry.key in catalogue.meters:
            continue  # a metered price: billed from its meter's usage, neither a tier nor an add-on
        if entry is not None and entry.kind == TIER and entry.key in catalogue.tiers:
            tier = tier or entry.key
            continue
        if entry is not None and entry.kind == ADDON and entry.key in catalogue.addons:
            quantity = item.get("quantity")
            if isinstance(quantity, int) and quantity > 0:
                addons[entry.key] = MappedAddon(quantity, str(item.get("id")))
            continue
        unmapped.append(
            {"item": item.get("id"), "price": price_id, "product": product_id, "quantity": item.get("quantity")}
        )
    return ItemMapping(tier, addons, unmapped, seen)
