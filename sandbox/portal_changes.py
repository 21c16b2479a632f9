"""The portal's plan switch and add-on quantity change, as Stripe's customer portal does them,
and its cancellation at the period end (and undoing it).

The portal offers the catalogue's other tiers at the same billing interval as the current one
and prorates the change (`create_prorations`, the portal's default): the credit and charge wait
for the next invoice. An add-on item's quantity can be changed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import changes
from .billing import AUTOMATIC, Origin
from .errors import StripeError
from .objects import Obj
from .store import Store

ACTIONS = ("switch-plan", "update-quantity")
MAX_QUANTITY = 9999


def _role(store: Store, price_id: str) -> str | None:
    price = store.get(price_id)
    return ((price or {}).get("_catalogue") or {}).get("role")


def plan_choices(store: Store) -> list[Obj]:
    """Active catalogue tier prices (monthly and yearly), in catalogue order."""
    return [p for p in store.all("price") if p["active"] and (p.get("_catalogue") or {}).get("role") == "tier"]


def item_roles(store: Store, subscriptions: list[Obj]) -> dict[str, str | None]:
    """Each subscription item's catalogue role ("tier", "addon" or None), by item id."""
    return {item["id"]: _role(store, item["price"]["id"]) for sub in subscriptions for item in sub["items"]["data"]}


def apply(store: Store, subscription_id: str, action: str, form: Mapping[str, str]) -> None:
    subscription = store.get(subscription_id)
    assert subscription is not None
    items = subscription["items"]["data"]
    if action == "switch-plan":
        tier = next((i for i in items if _role(store, i["price"]["id"]) == "tier"), items[0])
        price_id = form.get("price", "")
        if price_id not in {p["id"] for p in plan_choices(store)}:
            raise StripeError("Choose one of the plans offered.")
        if price_id == tier["price"]["id"]:
            raise StripeError("That is already your plan.")
        change = changes.ItemChange(index=0, id=tier["id"], price=price_id)
    else:
        item_id = form.get("item", "")
        item = next((i for i in items if i["id"] == item_id and _role(store, i["price"]["id"]) == "addon"), None)
        raw = form.get("quantity", "").strip()
        if item is None:
            raise StripeError("That add-on is not part of this subscription.")
        if not raw.isdigit() or int(raw) > MAX_QUANTITY:
            raise StripeError(f"Enter a quantity from 0 to {MAX_QUANTITY}.")
        change = changes.ItemChange(index=0, id=item_id, quantity=int(raw))
    changes.update_subscription(
        store,
        subscription_id,
        changes.SubscriptionUpdate(
            items=[change], proration_behavior="create_prorations", given={"items", "proration_behavior"}
        ),
    )


def update_subscription(
    store: Store,
    subscription_id: str,
    *,
    cancel_at_period_end: bool | None = None,
    metadata: dict[str, str] | None = None,
    cancellation_details: dict[str, str] | None = None,
    origin: Origin = AUTOMATIC,
) -> Obj:
    """The simple updates; changes.update_subscription() is the whole of POST /v1/subscriptions/:id."""
    given = {
        name
        for name, value in (
            ("cancel_at_period_end", cancel_at_period_end),
            ("metadata", metadata),
            ("cancellation_details", cancellation_details),
        )
        if value is not None
    }
    update = changes.SubscriptionUpdate(
        cancel_at_period_end=cancel_at_period_end,
        metadata=metadata,
        cancellation_details=cancellation_details,
        given=given,
    )
    return changes.update_subscription(store, subscription_id, update, origin)
