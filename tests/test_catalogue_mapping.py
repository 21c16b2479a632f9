"""Mapping subscription items onto the plan catalogue (app/services/catalogue_mapping.py): pure."""

from __future__ import annotations

from typing import Any

from app.services.catalogue_mapping import (
    ADDON,
    METER,
    TIER,
    CatalogueEntry,
    KnownPrice,
    KnownPrices,
    MappedAddon,
    map_items,
)
from app.services.plans import PlanCatalogue

CATALOGUE = PlanCatalogue.from_mapping(
    {
        "tiers": {
            "starter": {"name": "Starter", "lookup_key": "starter_monthly"},
            "pro": {"name": "Pro", "lookup_key": "pro_monthly"},
        },
        "addons": {"extra_seats": {"name": "Extra seats", "lookup_key": "seat_monthly"}},
        "meters": {
            "api_calls": {
                "name": "API calls",
                "event_name": "api_calls",
                "lookup_key": "calls_overage",
                "tiers": {"starter": {"included": 10, "overage": "billed"}},
            }
        },
    }
)
KNOWN = KnownPrices.from_rows(
    [
        KnownPrice("price_starter_v1", "prod_starter", "starter_monthly", CatalogueEntry(TIER, "starter")),
        KnownPrice("price_seat_v1", "prod_seat", "seat_monthly", CatalogueEntry(ADDON, "extra_seats")),
        # One product selling two entries cannot say which one a new price of it is.
        KnownPrice("price_pro_v1", "prod_shared", "pro_monthly", CatalogueEntry(TIER, "pro")),
        KnownPrice("price_seat_x", "prod_shared", "seat_monthly", CatalogueEntry(ADDON, "extra_seats")),
    ]
)


def item(
    item_id: str, price_id: str, product: str | None = None, lookup_key: str | None = None, quantity: Any = 1
) -> dict[str, Any]:
    return {
        "id": item_id,
        "price": {"id": price_id, "product": product, "lookup_key": lookup_key},
        "quantity": quantity,
    }


def test_lookup_keys_map_and_are_remembered() -> None:
    mapping = map_items(
        [item("si_1", "price_new", "prod_x", "starter_monthly"), item("si_2", "price_s", "prod_s", "seat_monthly", 3)],
        CATALOGUE,
    )
    assert (mapping.tier, mapping.addons, mapping.unmapped) == ("starter", {"extra_seats": MappedAddon(3, "si_2")}, [])
    assert [(seen.price_id, seen.product_id, seen.entry) for seen in mapping.seen] == [
        ("price_new", "prod_x", CatalogueEntry(TIER, "starter")),
        ("price_s", "prod_s", CatalogueEntry(ADDON, "extra_seats")),
    ]


def test_a_price_without_its_lookup_key_maps_by_id_then_by_product() -> None:
    mapping = map_items(
        [item("si_1", "price_starter_v1"), item("si_2", "price_seat_v2", {"id": "prod_seat"}, quantity=4)],
        CATALOGUE,
        KNOWN,
    )
    assert mapping.tier == "starter" and mapping.addons == {"extra_seats": MappedAddon(4, "si_2")}
    assert mapping.unmapped == [] and mapping.seen == []


def test_an_ambiguous_product_maps_nothing_and_an_unknown_item_is_reported() -> None:
    mapping = map_items(
        [item("si_1", "price_pro_v2", "prod_shared"), item("si_9", "price_z", "prod_z")], CATALOGUE, KNOWN
    )
    assert mapping.tier is None and mapping.addons == {}
    assert [entry["item"] for entry in mapping.unmapped] == ["si_1", "si_9"]


def test_the_add_on_item_the_organization_holds_still_maps() -> None:
    mapping = map_items(
        [item("si_seats", "price_other", "prod_other", quantity=2)], CATALOGUE, KNOWN, {"si_seats": "extra_seats"}
    )
    assert mapping.addons == {"extra_seats": MappedAddon(2, "si_seats")} and mapping.unmapped == []


def test_a_metered_item_without_a_quantity_is_no_add_on() -> None:
    mapping = map_items([item("si_1", "price_s", "prod_s", "seat_monthly", None)], CATALOGUE)
    assert mapping.addons == {} and mapping.unmapped == []


def test_a_metered_price_is_remembered_and_still_maps_to_its_meter_after_its_key_moved() -> None:
    first = map_items(
        [
            item("si_1", "price_s", "prod_s", "starter_monthly"),
            item("si_m", "price_m1", "prod_m", "calls_overage", None),
        ],
        CATALOGUE,
    )
    assert first.unmapped == [] and first.tier == "starter"
    assert [(seen.price_id, seen.entry) for seen in first.seen][1] == ("price_m1", CatalogueEntry(METER, "api_calls"))
    known = KnownPrices.from_rows(first.seen)
    # transfer_lookup_key moved calls_overage to a newer price: the item's price has no lookup key now.
    moved = map_items([item("si_1", "price_s"), item("si_m", "price_m1", "prod_m", None, None)], CATALOGUE, known)
    assert (moved.tier, moved.addons, moved.unmapped) == ("starter", {}, [])
    unknown = map_items([item("si_1", "price_s"), item("si_m", "price_m9", "prod_m9", None, None)], CATALOGUE, known)
    assert [entry["item"] for entry in unknown.unmapped] == ["si_m"]  # never seen: reported
