"""Coupons, promotion codes and the discounts they make, as Stripe has them.

A coupon takes `percent_off` or `amount_off` (with `currency`) and lasts `once`, `repeating`
(`duration_in_months`) or `forever`; a promotion code is a customer-facing code for a coupon
(codes are unique among active codes, matched case-insensitively), optionally limited by
`max_redemptions`, `expires_at`, `customer` (only that customer may redeem it),
`restrictions.first_time_transaction` and `restrictions.minimum_amount` (with
`minimum_amount_currency`; held against the amount bought where one is known: an invoice preview's
new items). A code entered on a
Checkout page that allows promotion codes starts a discount (`di_…`) on the new subscription; every
invoice of the subscription while the discount lasts carries it (`discounts`,
`total_discount_amounts`, each line's `discount_amounts`) and is charged the discounted total. A
`once` discount ends with the first invoice that has something to discount (a trial's $0 invoice
does not use it up); a `repeating` one ends `duration_in_months` after it started.

Endpoints: POST/GET /v1/coupons[/:id], POST/GET /v1/promotion_codes[/:id] (list by `code`,
`active`, `coupon`, `customer`). Subscriptions list their discounts' ids in `discounts`
(expandable); a subscription update's `discounts` replaces them (with `pending_if_incomplete` too,
waiting in `pending_update.discounts` while its invoice is unpaid), and an invoice preview's
`discounts` stands in for the subscription's for that preview only (checked as a redemption would
be, redeeming nothing)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from . import lists, objects, simtime, tax
from .billing import load
from .context import current_store
from .errors import StripeError
from .objects import Obj
from .params import Params, boolean, integer, mapping, new_metadata, reject_unknown, required_string, string
from .store import Store
from .v1 import _retrieve, endpoint

DURATIONS = ("once", "repeating", "forever")


# -- objects ----------------------------------------------------------------------------------


def coupon(
    *,
    coupon_id: str | None,
    name: str | None,
    percent_off: float | None,
    amount_off: int | None,
    currency: str | None,
    duration: str,
    duration_in_months: int | None,
    max_redemptions: int | None,
    redeem_by: int | None,
    metadata: dict[str, str],
    now: int,
) -> Obj:
    return {
        "id": coupon_id or objects.new_id("", 8),
        "object": "coupon",
        "amount_off": amount_off,
        "applies_to": None,
        "created": now,
        "currency": currency,
        "duration": duration,
        "duration_in_months": duration_in_months,
        "livemode": False,
        "max_redemptions": max_redemptions,
        "metadata": metadata,
        "name": name,
        "percent_off": percent_off,
        "redeem_by": redeem_by,
        "times_redeemed": 0,
        "valid": True,
    }


def promotion_code(
    *,
    code: str,
    coupon_obj: Obj,
    active: bool,
    max_redemptions: int | None,
    expires_at: int | None,
    first_time_transaction: bool,
    metadata: dict[str, str],
    now: int,
    customer: str | None = None,
    minimum_amount: int | None = None,
    minimum_amount_currency: str | None = None,
) -> Obj:
    return {
        "id": objects.new_id("promo_"),
        "object": "promotion_code",
        "active": active,
        "code": code,
        "created": now,
        "customer": customer,
        "customer_account": None,
        "expires_at": expires_at,
        "livemode": False,
        "max_redemptions": max_redemptions,
        "metadata": metadata,
        "promotion": {"coupon": coupon_obj["id"], "type": "coupon"},
        "restrictions": {
            "currency_options": {},
            "first_time_transaction": first_time_transaction,
            "minimum_amount": minimum_amount,
            "minimum_amount_currency": minimum_amount_currency,
        },
        "times_redeemed": 0,
    }


def discount(
    store: Store, code: Obj | None, *, customer_id: str, subscription_id: str, now: int, coupon_id: str = ""
) -> Obj:
    """A discount made by redeeming a promotion code (or, with no code, a coupon) on a subscription."""
    coupon_obj = load(store, "coupon", code["promotion"]["coupon"] if code is not None else coupon_id)
    end = None
    if coupon_obj["duration"] == "repeating":
        end = now
        for _ in range(coupon_obj["duration_in_months"] or 0):
            end = objects.add_month(end)
    return {
        "id": objects.new_id("di_"),
        "object": "discount",
        "checkout_session": None,
        "customer": customer_id,
        "customer_account": None,
        "end": end,
        "invoice": None,
        "invoice_item": None,
        "promotion_code": code["id"] if code is not None else None,
        "source": {"coupon": coupon_obj["id"], "type": "coupon"},  # expandable: discounts.source.coupon
        "start": now,
        "subscription": subscription_id,
        "subscription_item": None,
    }


def seed_promotion_codes(store: Store, path: Path) -> list[Obj]:
    """The promotion codes the catalogue says the marketing pages name ([promotion_codes.<CODE>]),
    each with a coupon from its sandbox_percent_off / sandbox_amount_off, sandbox_duration and
    sandbox_duration_in_months; a code that already exists is left as it is."""
    with path.open("rb") as file:
        section = tomllib.load(file).get("promotion_codes") or {}
    seeded = []
    now = simtime.now()
    for code, entry in section.items():
        if find_code(store, code) is not None:
            continue
        amount_off = entry.get("sandbox_amount_off")
        made = coupon(
            coupon_id=None,
            name=code,
            percent_off=None if amount_off else float(entry.get("sandbox_percent_off", 10)),
            amount_off=int(amount_off) if amount_off else None,
            currency="usd" if amount_off else None,
            duration=str(entry.get("sandbox_duration", "once")),
            duration_in_months=entry.get("sandbox_duration_in_months"),
            max_redemptions=None,
            redeem_by=None,
            metadata={},
            now=now,
        )
        promo = promotion_code(
            code=code,
            coupon_obj=made,
            active=True,
            max_redemptions=None,
            expires_at=None,
            first_time_transaction=False,
            metadata={},
            now=now,
        )
        store.put(made)
        store.put(promo)
        seeded.append(promo)
    return seeded


# -- redeeming and applying -------------------------------------------------------------------


def find_code(store: Store, code: str) -> Obj | None:
    """The active promotion code with this code (case-insensitive), if any."""
    wanted = code.strip().lower()
    return next((p for p in store.all("promotion_code") if p["active"] and p["code"].lower() == wanted), None)


def redeemable(store: Store, code: str, customer: Obj | None, amount: tuple[int, str] | None = None) -> Obj:
    """The promotion code a customer may redeem now, or Checkout's error message (a StripeError).
    `amount` (the amount bought and its currency) is held against the code's minimum amount."""
    found = find_code(store, code)
    now = simtime.now()
    if found is None or (found["expires_at"] and found["expires_at"] <= now):
        raise StripeError("This code is invalid.", code="promotion_code_invalid", param="promotion_code")
    coupon_obj = load(store, "coupon", found["promotion"]["coupon"])
    if not coupon_obj["valid"] or (coupon_obj["redeem_by"] and coupon_obj["redeem_by"] <= now):
        raise StripeError("This code is invalid.", code="coupon_expired", param="promotion_code")
    if found["max_redemptions"] is not None and found["times_redeemed"] >= found["max_redemptions"]:
        raise StripeError("This code has been used up.", code="promotion_code_invalid", param="promotion_code")
    if found["customer"] and (customer is None or customer["id"] != found["customer"]):
        raise StripeError(
            "This code is not valid for this customer.", code="promotion_code_invalid", param="promotion_code"
        )
    minimum, currency = found["restrictions"]["minimum_amount"], found["restrictions"]["minimum_amount_currency"]
    if minimum and amount is not None and amount[1] == currency and amount[0] < minimum:
        raise StripeError(
            "This code has a minimum amount this purchase does not reach.",
            code="promotion_code_invalid",
            param="promotion_code",
        )
    first_time_only = found["restrictions"]["first_time_transaction"] and customer is not None
    if first_time_only and any(i["customer"] == customer["id"] and i["amount_paid"] > 0 for i in store.all("invoice")):  # type: ignore[index]
        raise StripeError(
            "This code is only for first-time customers.", code="promotion_code_invalid", param="promotion_code"
        )
    return found


def redeem(store: Store, code: Obj | None, subscription: Obj, now: int, coupon_id: str = "") -> Obj:
    """Start the code's (or, with no code, the coupon's) discount on a subscription, counted as
    redeemed on the code and the coupon."""
    made = discount(
        store,
        code,
        customer_id=subscription["customer"],
        subscription_id=subscription["id"],
        now=now,
        coupon_id=coupon_id,
    )
    subscription["discounts"] = [*subscription["discounts"], made["id"]]
    coupon_obj = load(store, "coupon", made["source"]["coupon"])
    coupon_obj["times_redeemed"] += 1
    if coupon_obj["max_redemptions"] is not None and coupon_obj["times_redeemed"] >= coupon_obj["max_redemptions"]:
        coupon_obj["valid"] = False
    if code is not None:
        code["times_redeemed"] += 1
        store.put(code)
    for obj in (made, coupon_obj):
        store.put(obj)
    return made


def set_subscription_discounts(store: Store, subscription: Obj, entries: list[Obj], now: int) -> None:
    """`discounts` on a subscription update: the subscription's discounts become the listed ones, each
    `{"discount": di_…}` (one it has, kept), `{"coupon": id}` or `{"promotion_code": promo_…}` (a new
    discount, redeemed now); those not listed leave it. An empty list removes them all."""
    kept: list[str] = []
    new: list[tuple[Obj | None, str]] = []
    coupons: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"discounts[{index}]"
        if (
            not isinstance(entry, dict)
            or len(entry) != 1
            or next(iter(entry)) not in ("coupon", "discount", "promotion_code")
        ):
            raise StripeError("Pass exactly one of coupon, discount or promotion_code.", param=where)
        if "discount" in entry:
            if entry["discount"] not in subscription["discounts"]:
                raise StripeError(f"The discount {entry['discount']} is not on this subscription.", param=where)
            kept.append(entry["discount"])
            coupons.add(load(store, "discount", entry["discount"])["source"]["coupon"])
            continue
        if "promotion_code" in entry:
            code = load(store, "promotion_code", entry["promotion_code"], f"{where}[promotion_code]", 400)
            redeemable(store, code["code"], store.get(subscription["customer"]))
            coupon_id = code["promotion"]["coupon"]
        else:
            code, coupon_id = None, str(entry["coupon"])
            coupon_obj = load(store, "coupon", coupon_id, f"{where}[coupon]", 400)
            if not coupon_obj["valid"] or (coupon_obj["redeem_by"] and coupon_obj["redeem_by"] <= now):
                raise StripeError(f"Coupon expired: {coupon_id}", code="coupon_expired", param=f"{where}[coupon]")
        new.append((code, coupon_id))
        coupons.add(coupon_id)
    if len(coupons) != len(kept) + len(new):
        raise StripeError("The same coupon cannot be applied twice to a subscription.", param="discounts")
    subscription["discounts"] = kept
    for code, coupon_id in new:
        redeem(store, code, subscription, now, coupon_id)


def preview_discounts(
    store: Store, subscription: Obj, customer: Obj, entries: list[Obj], at: tuple[int, int]
) -> list[str]:
    """An invoice preview's `discounts` ({"promotion_code": …} or {"coupon": …}), checked as a
    redemption would be (the code's restrictions; its minimum amount against `at`'s amount bought),
    made into discounts that the caller deletes once the preview is built: redeeming nothing."""
    bought, now = at
    made = []
    for index, entry in enumerate(entries):
        where = f"discounts[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("coupon", "promotion_code"):
            raise StripeError("Pass exactly one of coupon or promotion_code.", param=where)
        code = None
        if "promotion_code" in entry:
            code = load(store, "promotion_code", str(entry["promotion_code"]), f"{where}[promotion_code]", 400)
            currency = subscription["items"]["data"][0]["price"]["currency"] if subscription["items"]["data"] else ""
            redeemable(store, code["code"], customer, (bought, currency))
        else:
            load(store, "coupon", str(entry["coupon"]), f"{where}[coupon]", 400)
        discount_obj = discount(
            store,
            code,
            customer_id=customer["id"],
            subscription_id=subscription["id"],
            now=now,
            coupon_id=str(entry.get("coupon") or ""),
        )
        store.put(discount_obj)
        made.append(discount_obj["id"])
    return made


def apply_to_invoice(store: Store, invoice: Obj, subscription: Obj | None, *, preview: bool = False) -> None:
    """Discount an invoice by the subscription's discounts that last at its date (or by those it
    already carries, when its totals are worked out again). A `once` discount is used up by the first
    invoice with something to discount and leaves the subscription (not by a preview, which changes
    nothing). Sets the totals, not the balance."""
    subtotal = sum(line["amount"] for line in invoice["lines"]["data"])
    ids = list(invoice["discounts"])
    if not ids and subscription is not None and subtotal > 0:
        now = invoice["created"]
        for discount_id in subscription.get("discounts") or []:
            found = store.get(discount_id)
            if found is not None and (found["end"] is None or found["end"] > now):
                ids.append(discount_id)
                if load(store, "coupon", found["source"]["coupon"])["duration"] == "once" and not preview:
                    found["end"] = now
                    store.put(found)
                    subscription["discounts"] = [d for d in subscription["discounts"] if d != discount_id]
                    store.put(subscription)
    amounts = []
    left = max(subtotal, 0)
    for discount_id in ids:
        coupon_obj = load(store, "coupon", load(store, "discount", discount_id)["source"]["coupon"])
        if coupon_obj["percent_off"] is not None:
            amount = round(left * coupon_obj["percent_off"] / 100)
        else:
            amount = min(coupon_obj["amount_off"] or 0, left)
        left -= amount
        amounts.append({"amount": amount, "discount": discount_id})
    total_off = sum(a["amount"] for a in amounts)
    _spread_over_lines(invoice, amounts, subtotal)
    total = subtotal - total_off
    invoice.update(
        discounts=ids,
        total_discount_amounts=amounts,
        subtotal=subtotal,
        subtotal_excluding_tax=subtotal,
        total=total,
        total_excluding_tax=total,
    )
    tax.apply(store, invoice)  # Stripe Tax, on what the discounts leave (sandbox/tax.py)
    if invoice["status"] in ("draft", "open") and not invoice["amount_paid"]:
        invoice.update(amount_due=max(invoice["total"] + invoice["starting_balance"], 0))
        invoice.update(amount_remaining=invoice["amount_due"])


def _spread_over_lines(invoice: Obj, amounts: list[Obj], subtotal: int) -> None:
    """Each line's share of each discount (in proportion to its amount), as Stripe lists them."""
    positive = [line for line in invoice["lines"]["data"] if line["amount"] > 0]
    for line in invoice["lines"]["data"]:
        line["discount_amounts"] = []
        line["discounts"] = [a["discount"] for a in amounts] if line in positive else []
    for share in amounts:
        given = 0
        for index, line in enumerate(positive):
            part = (
                share["amount"] - given
                if index == len(positive) - 1
                else round(share["amount"] * line["amount"] / max(subtotal, 1))
            )
            given += part
            line["discount_amounts"].append({"amount": part, "discount": share["discount"]})


# -- endpoints --------------------------------------------------------------------------------


@endpoint("/coupons", "POST")
def create_coupon(params: Params) -> Obj:
    reject_unknown(
        params,
        (
            "id",
            "name",
            "percent_off",
            "amount_off",
            "currency",
            "duration",
            "duration_in_months",
            "max_redemptions",
            "redeem_by",
            "metadata",
        ),
    )
    store = current_store()
    percent = _percent(params)
    amount_off = integer(params, "amount_off", minimum=1)
    if (percent is None) == (amount_off is None):
        raise StripeError("You must pass exactly one of percent_off or amount_off.", param="percent_off")
    currency = string(params, "currency")
    if amount_off is not None and not currency:
        raise StripeError("You must pass currency when passing amount_off.", param="currency")
    duration = string(params, "duration") or "once"
    if duration not in DURATIONS:
        raise StripeError(f"Invalid duration: must be one of {', '.join(DURATIONS)}", param="duration")
    months = integer(params, "duration_in_months", minimum=1)
    if (duration == "repeating") != (months is not None):
        raise StripeError(
            "duration_in_months is required when duration is repeating, and only then.", param="duration_in_months"
        )
    coupon_id = string(params, "id")
    if coupon_id and store.get(coupon_id) is not None:
        raise StripeError("Coupon already exists.", code="resource_already_exists", param="id")
    made = coupon(
        coupon_id=coupon_id,
        name=string(params, "name"),
        percent_off=percent,
        amount_off=amount_off,
        currency=currency.lower() if currency else None,
        duration=duration,
        duration_in_months=months,
        max_redemptions=integer(params, "max_redemptions", minimum=1),
        redeem_by=integer(params, "redeem_by"),
        metadata=new_metadata(params),
        now=simtime.now(),
    )
    store.put(made)
    return made


@endpoint("/coupons/<coupon_id>", "GET")
def retrieve_coupon(params: Params, coupon_id: str) -> Obj:
    return _retrieve("coupon", coupon_id, params, "coupon")


@endpoint("/coupons", "GET")
def list_coupons(params: Params) -> Obj:
    reject_unknown(params, ("created", "limit", "starting_after", "ending_before"))
    created = lists.created_filter(params)
    return lists.listing(current_store(), "coupon", "/v1/coupons", params, created)


@endpoint("/promotion_codes", "POST")
def create_promotion_code(params: Params) -> Obj:
    reject_unknown(
        params,
        (
            "promotion",
            "coupon",
            "code",
            "active",
            "customer",
            "max_redemptions",
            "expires_at",
            "restrictions",
            "metadata",
        ),
    )
    store = current_store()
    promotion = mapping(params, "promotion")
    if promotion is not None:
        reject_unknown(promotion, ("type", "coupon"), "promotion")
        coupon_id = required_string(promotion, "coupon", "promotion")
    else:
        coupon_id = required_string(params, "coupon")
    coupon_obj = load(store, "coupon", coupon_id, "promotion[coupon]" if promotion is not None else "coupon", 400)
    code = string(params, "code") or objects.new_id("", 8).upper()
    active = boolean(params, "active")
    if (active is None or active) and find_code(store, code) is not None:
        raise StripeError(
            "An active promotion code with `code` already exists.", code="resource_already_exists", param="code"
        )
    restrictions = mapping(params, "restrictions") or {}
    reject_unknown(
        restrictions, ("first_time_transaction", "minimum_amount", "minimum_amount_currency"), "restrictions"
    )
    customer_id = string(params, "customer")
    if customer_id is not None:
        load(store, "customer", customer_id, "customer", 400)
    minimum = integer(restrictions, "minimum_amount", "restrictions", minimum=1)
    minimum_currency = string(restrictions, "minimum_amount_currency", "restrictions")
    if minimum is not None and not minimum_currency:
        raise StripeError(
            "You must pass minimum_amount_currency with minimum_amount.",
            param="restrictions[minimum_amount_currency]",
        )
    made = promotion_code(
        code=code,
        coupon_obj=coupon_obj,
        active=True if active is None else active,
        max_redemptions=integer(params, "max_redemptions", minimum=1),
        expires_at=integer(params, "expires_at"),
        first_time_transaction=bool(boolean(restrictions, "first_time_transaction", "restrictions")),
        metadata=new_metadata(params),
        now=simtime.now(),
        customer=customer_id,
        minimum_amount=minimum,
        minimum_amount_currency=minimum_currency.lower() if minimum_currency else None,
    )
    store.put(made)
    return made


@endpoint("/promotion_codes/<promotion_code_id>", "GET")
def retrieve_promotion_code(params: Params, promotion_code_id: str) -> Obj:
    return _retrieve("promotion_code", promotion_code_id, params, "promotion_code")


@endpoint("/promotion_codes", "GET")
def list_promotion_codes(params: Params) -> Obj:
    reject_unknown(
        params, ("code", "active", "coupon", "customer", "created", "limit", "starting_after", "ending_before")
    )
    code = string(params, "code")
    active = boolean(params, "active")
    coupon_id = string(params, "coupon")
    created = lists.created_filter(params)

    def wanted(found: Obj) -> bool:
        return (
            (code is None or found["code"].lower() == code.lower())
            and (active is None or found["active"] == active)
            and (coupon_id is None or found["promotion"]["coupon"] == coupon_id)
            and created(found)
        )

    return lists.listing(current_store(), "promotion_code", "/v1/promotion_codes", params, wanted)


def _percent(params: Params) -> float | None:
    raw: Any = params.get("percent_off")
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise StripeError("Invalid decimal: percent_off", param="percent_off") from None
    if not 0 < value <= 100:
        raise StripeError("percent_off must be greater than 0 and at most 100.", param="percent_off")
    return value
