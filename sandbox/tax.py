"""Stripe Tax, small and deterministic: a rate table, customer tax IDs with a verification status, and
the taxes of an invoice whose `automatic_tax` is enabled (Checkout Sessions, subscriptions, invoices and
previews), in the shapes of the pinned API version (`total_taxes`, the lines' `taxes`).

The sandbox account's head office is in Germany (ORIGIN) and it is registered in the places RATES
names. What a customer pays depends on its address, tax IDs and `tax_exempt`:
- `tax_exempt=exempt`: no tax (taxability_reason `customer_exempt`); `reverse`: reverse charge.
- An EU country other than ORIGIN, with a verified `eu_vat` tax ID: reverse charge (no tax, the
  customer accounts for it). Otherwise the country's VAT (Germany 19%, also for a German business).
- A US state in RATES: its sales tax; another state, or another country: `not_collecting`.
- No address: nothing is computed, `automatic_tax.status` is `requires_location_inputs`.
Stripe Tax needs every price it taxes to say whether its amount includes the tax (`tax_behavior`
`inclusive` or `exclusive`): automatic tax on a price whose `tax_behavior` is `unspecified` is refused as
Stripe refuses it (`require_tax_behavior`), on Checkout Sessions, subscription changes and invoice
previews. An exclusive price's tax is added on top; an inclusive price's amount is what the customer
pays, the tax carved out of it (`taxable_amount` = the amount less the tax, rounded on the net: net =
round(gross / (1 + rate)), tax = gross - net), after any discount. `total_excluding_tax` leaves out
both kinds; `subtotal_excluding_tax` is the subtotal (before discounts) less the tax inside it, carved
out line by line the same way. A zero-tax outcome (reverse charge, exempt, not
collecting) leaves an inclusive price's amount as it is: "the amount your buyer pays never changes,
even if the tax rate varies" (Stripe's docs on tax behavior), so a reverse-charge business pays the
sticker price with no tax in it.

A tax ID's verification is decided by its digits: a value ending in 1 is `unverified` (Stripe's test
value 111111111) and one ending in 2 is `pending`, both at once; any other is `verified` (000000000). A
pending ID stays pending (and so does not make reverse charge apply) until it is settled: by
`POST /_sandbox/tax_ids/:id/verification` (to `verified`, `unverified` or `unavailable`), or as
`verified` when a test clock its customer is on advances. Settling sends `customer.tax_id.updated`.
"""

from __future__ import annotations

import copy
import re

from . import billing, objects, simtime
from .errors import StripeError
from .objects import Obj
from .store import Store

ORIGIN = "DE"
EU = frozenset(
    [
        "AT",
        "BE",
        "BG",
        "CY",
        "CZ",
        "DE",
        "DK",
        "EE",
        "ES",
        "FI",
        "FR",
        "GR",
        "HR",
        "HU",
        "IE",
        "IT",
        "LT",
        "LU",
        "LV",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SE",
        "SI",
        "SK",
    ]
)
# (country, state or "") -> (percentage, tax type, display name)
RATES: dict[tuple[str, str], tuple[float, str, str]] = {
    ("DE", ""): (19.0, "vat", "VAT"),
    ("FR", ""): (20.0, "vat", "TVA"),
    ("NL", ""): (21.0, "vat", "BTW"),
    ("IE", ""): (23.0, "vat", "VAT"),
    ("US", "CA"): (7.25, "sales_tax", "Sales Tax"),
    ("US", "NY"): (4.0, "sales_tax", "Sales Tax"),
    ("US", "WA"): (6.5, "sales_tax", "Sales Tax"),
}
TAX_ID_TYPES = {"eu_vat": r"[A-Z]{2}[0-9A-Z]{2,13}", "us_ein": r"\d{2}-?\d{7}", "gb_vat": r"GB\d{9,12}"}
TAX_EXEMPT = ("none", "exempt", "reverse")


def address(values: Obj | None) -> Obj | None:
    """An address as Stripe keeps it (every key present), or None when there is none."""
    if not values:
        return None
    keys = ("city", "country", "line1", "line2", "postal_code", "state")
    return {key: (values.get(key) or None) for key in keys}


def location(customer: Obj) -> tuple[str, str] | None:
    found = customer.get("address") or {}
    country = (found.get("country") or "").upper()
    return (country, (found.get("state") or "").upper()) if country else None


# -- tax IDs ----------------------------------------------------------------------------------


VERIFICATION_STATUSES = ("pending", "verified", "unverified", "unavailable")
SETTLED_STATUSES = VERIFICATION_STATUSES[1:]


def verification(value: str) -> str:
    digits = re.sub(r"\D", "", value)
    return "unverified" if digits.endswith("1") else "pending" if digits.endswith("2") else "verified"


def _verification_hash(status: str, customer: Obj) -> Obj:
    return {
        "status": status,
        "verified_address": None,
        "verified_name": customer.get("name") if status == "verified" else None,
    }


def create_tax_id(store: Store, customer: Obj, type: str, value: str, origin: billing.Origin) -> Obj:
    """POST /v1/customers/:id/tax_ids. Event: customer.tax_id.created."""
    if type not in TAX_ID_TYPES:
        raise StripeError(f"Invalid value for type: the sandbox knows {', '.join(TAX_ID_TYPES)}.", param="type")
    value = re.sub(r"\s", "", value).upper()
    if not re.fullmatch(TAX_ID_TYPES[type], value):
        raise StripeError(f"Invalid value for {type}.", code="tax_id_invalid", param="value")
    status = verification(value)
    tax_id = {
        "id": objects.new_id("txi_", 14),
        "object": "tax_id",
        "country": value[:2] if type.endswith("_vat") else type[:2].upper(),
        "created": simtime.now(),
        "customer": customer["id"],
        "customer_account": None,
        "livemode": False,
        "owner": {"customer": customer["id"], "customer_account": None, "type": "customer"},
        "type": type,
        "value": value,
        "verification": _verification_hash(status, customer),
    }
    store.put(tax_id)
    _list_on_customer(store, customer)
    billing.emit(store, "customer.tax_id.created", tax_id, origin=origin)
    return tax_id


def _list_on_customer(store: Store, customer: Obj) -> None:
    """The customer's includable `tax_ids` list, kept equal to its tax IDs."""
    found = [objects.public(t) for t in tax_ids_of(store, customer["id"])]
    customer["tax_ids"] = objects.list_object(found, f"/v1/customers/{customer['id']}/tax_ids")
    store.put(customer)


def settle_verification(store: Store, tax_id_id: str, status: str) -> Obj:
    """A pending tax ID's verification completes with `status`. Event: customer.tax_id.updated (with
    previous_attributes.verification), as Stripe sends it when its check of the ID finishes."""
    tax_id = store.get(tax_id_id)
    if tax_id is None or tax_id["object"] != "tax_id" or tax_id.get("_deleted"):
        raise StripeError(f"No such tax ID: '{tax_id_id}'", status=404, code="resource_missing", param="id")
    if status not in SETTLED_STATUSES:
        raise StripeError(f"status must be one of {', '.join(SETTLED_STATUSES)}, not {status!r}.", param="status")
    if tax_id["verification"]["status"] != "pending":
        status_now = tax_id["verification"]["status"]
        raise StripeError(f"The tax ID {tax_id_id} is not pending verification: it is {status_now}.")
    customer = billing.load(store, "customer", tax_id["customer"])
    before = copy.deepcopy(tax_id["verification"])
    tax_id["verification"] = _verification_hash(status, customer)
    store.put(tax_id)
    _list_on_customer(store, customer)
    previous = objects.previous_attributes({"verification": before}, {"verification": tax_id["verification"]})
    billing.emit(store, "customer.tax_id.updated", tax_id, previous)
    return tax_id


def settle_pending_on_clock(store: Store, customer_ids: list[str]) -> None:
    """A test clock advanced: Stripe's check of its customers' pending tax IDs has finished (verified)."""
    for tax_id in store.all("tax_id"):
        pending = tax_id["verification"]["status"] == "pending" and not tax_id.get("_deleted")
        if pending and tax_id["customer"] in customer_ids:
            settle_verification(store, tax_id["id"], "verified")


def tax_ids_of(store: Store, customer_id: str) -> list[Obj]:
    return [t for t in store.all("tax_id") if t["customer"] == customer_id and not t.get("_deleted")]


def delete_tax_id(store: Store, customer_id: str, tax_id_id: str, origin: billing.Origin) -> Obj:
    """DELETE /v1/customers/:id/tax_ids/:id. Event: customer.tax_id.deleted."""
    tax_id = store.get(tax_id_id)
    if tax_id is None or tax_id["object"] != "tax_id" or tax_id["customer"] != customer_id or tax_id.get("_deleted"):
        raise StripeError(f"No such tax ID: '{tax_id_id}'", status=404, code="resource_missing", param="id")
    tax_id["_deleted"] = True
    store.put(tax_id)
    _list_on_customer(store, billing.load(store, "customer", customer_id))
    billing.emit(store, "customer.tax_id.deleted", tax_id, origin=origin)
    return {"id": tax_id_id, "object": "tax_id", "deleted": True}


def customer_tax_ids(store: Store, customer_id: str) -> list[Obj]:
    """An invoice's (or a Session's customer_details') `customer_tax_ids`: type and value."""
    return [{"type": t["type"], "value": t["value"]} for t in tax_ids_of(store, customer_id)]


# -- what is charged ------------------------------------------------------------------------------


def decide(store: Store, customer: Obj) -> tuple[str | None, float, str, str, str]:
    """(the rate's jurisdiction key or None, percentage, taxability_reason, tax type, country)."""
    where = location(customer)
    if where is None:
        return None, 0.0, "not_collecting", "vat", ""
    country, state = where
    rate = RATES.get((country, state)) or RATES.get((country, ""))
    kind = rate[1] if rate else ("vat" if country in EU else "sales_tax")
    if customer.get("tax_exempt") == "exempt":
        return f"{country}-{state}", 0.0, "customer_exempt", kind, country
    verified_vat = any(
        t["type"] == "eu_vat" and t["verification"]["status"] == "verified" for t in tax_ids_of(store, customer["id"])
    )
    if customer.get("tax_exempt") == "reverse" or (country in EU and country != ORIGIN and verified_vat):
        return f"{country}-{state}", 0.0, "reverse_charge", kind, country
    if rate is None:
        return None, 0.0, "not_collecting", kind, country
    return f"{country}-{state}", rate[0], "standard_rated", kind, country


def tax_rate(store: Store, key: str, percentage: float, kind: str, country: str, inclusive: bool) -> Obj:
    """The tax rate Stripe Tax reports a tax at (one per jurisdiction, rate and behaviour, made once)."""
    rate_id = f"txr_sandbox_{key.replace('-', '_').lower()}_{int(percentage * 100)}{'_incl' if inclusive else ''}"
    found = store.get(rate_id)
    if found is not None:
        return found
    state = key.split("-")[1] or None
    name = (RATES.get((country, state or "")) or (0, kind, "VAT" if kind == "vat" else "Sales Tax"))[2]
    rate = {
        "id": rate_id,
        "object": "tax_rate",
        "active": True,
        "country": country,
        "created": simtime.now(),
        "description": None,
        "display_name": name,
        "effective_percentage": percentage,
        "flat_amount": None,
        "inclusive": inclusive,
        "jurisdiction": state or country,
        "jurisdiction_level": "state" if state else "country",
        "livemode": False,
        "metadata": {},
        "percentage": percentage,
        "rate_type": "percentage",
        "state": state,
        "tax_type": kind,
    }
    store.put(rate)
    return rate


TAX_BEHAVIOR_DOCS = "https://stripe.com/docs/tax/products-prices-tax-categories-tax-behavior#tax-behavior"


def require_tax_behavior(store: Store, price_ids: list[str], param: str | None = None) -> None:
    """Stripe Tax refuses a price whose tax_behavior is unspecified (with Stripe's message), when no
    default tax behavior is set in the account's tax settings (the sandbox account has none)."""
    for price_id in price_ids:
        price = store.get(price_id)
        if price is not None and price.get("tax_behavior", "unspecified") == "unspecified":
            raise StripeError(
                f"The price `{price_id}` does not have a `tax_behavior` set which is required for automatic tax"
                f" computation. Please visit {TAX_BEHAVIOR_DOCS} for more information.",
                param=param,
            )


def line_price_ids(invoice: Obj) -> list[str]:
    found = []
    for line in invoice["lines"]["data"]:
        price_id = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
        if price_id:
            found.append(price_id)
    return found


def apply(store: Store, invoice: Obj) -> None:
    """The invoice's taxes, when its automatic_tax is enabled: each line's `taxes` (on the line's amount
    less its discounts), `total_taxes` summed per rate, `total` = the subtotal less the discounts, plus
    exclusive tax (inclusive tax is inside it). Call it once `subtotal`, `total_discount_amounts` and the
    lines' discount amounts are known; it may be called again (a preview re-taxed) with the same result."""
    customer = store.get(invoice["customer"]) or {}
    invoice.update(
        customer_address=copy.deepcopy(customer.get("address")),
        customer_tax_exempt=customer.get("tax_exempt", "none"),
        customer_tax_ids=customer_tax_ids(store, invoice["customer"]),
    )
    for line in invoice["lines"]["data"]:
        line["taxes"] = []
    # From the amounts before tax (so applying it again, as a preview asked without tax does, is exact).
    discounted = sum(a["amount"] for a in invoice.get("total_discount_amounts") or [])
    invoice.update(subtotal_excluding_tax=invoice["subtotal"], total_excluding_tax=invoice["subtotal"] - discounted)
    automatic = invoice["automatic_tax"]
    if not automatic["enabled"]:
        invoice.update(total_taxes=[], total=invoice["total_excluding_tax"])
        return
    key, percentage, reason, kind, country = decide(store, customer)
    automatic.update(status="requires_location_inputs" if location(customer) is None else "complete")
    automatic.update(provider="stripe", liability={"type": "self"})
    totals: dict[str, Obj] = {}
    added = inside = 0
    for line in invoice["lines"]["data"]:
        if key is None:
            continue
        taxable = line["amount"] - sum(d["amount"] for d in line.get("discount_amounts") or [])
        price_id = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
        price = store.get(price_id) if price_id else None
        inclusive = bool(price and price.get("tax_behavior") == "inclusive")
        if inclusive:
            amount = taxable - round(taxable / (1 + percentage / 100))
            taxable -= amount
            # The subtotal before discounts, less the tax inside it (subtotal_excluding_tax).
            inside += line["amount"] - round(line["amount"] / (1 + percentage / 100))
        else:
            amount = round(taxable * percentage / 100)
            added += amount
        rate = tax_rate(store, key, percentage, kind, country, inclusive)
        tax = {
            "amount": amount,
            "tax_behavior": "inclusive" if inclusive else "exclusive",
            "tax_rate_details": {"tax_rate": rate["id"]},
            "taxability_reason": reason,
            "taxable_amount": taxable,
            "type": "tax_rate_details",
        }
        line["taxes"] = [tax]
        summed = totals.setdefault(rate["id"], {**tax, "amount": 0, "taxable_amount": 0})
        summed["amount"] += amount
        summed["taxable_amount"] += taxable
    invoice.update(total_taxes=list(totals.values()), total=invoice["total_excluding_tax"] + added)
    included = sum(t["amount"] for t in totals.values() if t["tax_behavior"] == "inclusive")
    invoice["total_excluding_tax"] -= included
    invoice["subtotal_excluding_tax"] = invoice["subtotal"] - inside


def retax(store: Store, invoice: Obj, enabled: bool) -> None:
    """An invoice preview asked for with automatic_tax[enabled] other than the subscription's."""
    before = invoice["total"]
    invoice["automatic_tax"]["enabled"] = enabled
    apply(store, invoice)
    delta = invoice["total"] - before
    invoice.update(amount_due=max(invoice["amount_due"] + delta, 0))
    invoice.update(amount_remaining=max(invoice["amount_remaining"] + delta, 0))


def amount_tax(invoice: Obj) -> int:
    return sum(t["amount"] for t in invoice.get("total_taxes") or [])


def set_customer_details(store: Store, customer: Obj, *, address_given: Obj | None, tax_exempt: str | None) -> None:
    """An address and tax_exempt given to POST /v1/customers(/:id) (or collected by Checkout)."""
    if address_given is not None:
        customer["address"] = address(address_given)
    if tax_exempt is not None:
        if tax_exempt not in TAX_EXEMPT:
            raise StripeError(f"Invalid tax_exempt: must be one of {', '.join(TAX_EXEMPT)}", param="tax_exempt")
        customer["tax_exempt"] = tax_exempt
