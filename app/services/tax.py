"""Taxes with Stripe Tax: what Checkout is asked to collect when STRIPE_AUTOMATIC_TAX is on (the billing
address and tax IDs, saved on the customer), the customer's tax details as the billing page shows them
(address, tax IDs with Stripe's verification status, exemption), and the owner's edits of them, made at
Stripe through the TaxCalls BillingService implements (no transaction is held while Stripe answers).

Stripe is the record for addresses and tax IDs: nothing of them is stored here; the page reads them
(cached with the page's other reads) and an edit forgets that cache.

Prices and tax (PRICES_SHOWN_WITH_TAX): with Stripe Tax each price must say whether its amount
includes the tax (`tax_behavior` inclusive or exclusive; Stripe refuses automatic tax on an
`unspecified` one), and it must agree with the setting: `flask billing check-prices` reports a price
that does not (`price_problem`). How an amount is shown follows what Stripe did on the invoice
(`pricing.InvoiceTax`, from `total_taxes`): exclusive tax is added on top ("$19.00 + $3.61 tax"), inclusive
tax is inside what is paid ("including $3.03 tax").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from flask import current_app

from app.extensions import db
from app.models import Organization
from app.services import domain_events
from app.services.billing_common import BillingError
from app.services.pricing import PriceInfo

ADDRESS_KEYS = ("line1", "line2", "city", "postal_code", "state", "country")
# The tax ID types the billing page offers, with the shape Stripe accepts (Stripe checks it again).
TAX_ID_TYPES = {
    "eu_vat": ("EU VAT number", r"[A-Z]{2}[0-9A-Z]{2,13}"),
    "gb_vat": ("UK VAT number", r"GB\d{9,12}"),
    "us_ein": ("US EIN", r"\d{2}-?\d{7}"),
}
STATUS_WORDS = {
    "verified": "verified",
    "pending": "being verified",
    "unverified": "not verified",
    "unavailable": "could not be verified",
}


class TaxDetailsError(BillingError):
    """An edit the page refuses before asking Stripe (an empty country, a malformed tax ID)."""


class TaxCalls(Protocol):
    """Stripe calls for the customer's tax details, implemented by BillingService."""

    def update_customer(self, customer_id: str, fields: Mapping[str, Any], *, key: str) -> None: ...

    def change_customer_tax_id(
        self, customer_id: str, *, add: tuple[str, str] | None, remove: str | None, key: str
    ) -> None: ...

    def forget_billing_reads(self, organization_id: int) -> None: ...


def enabled() -> bool:
    return bool(current_app.config["STRIPE_AUTOMATIC_TAX"])


def prices_include_tax() -> bool:
    return str(current_app.config["PRICES_SHOWN_WITH_TAX"]) == "inclusive"


def shown_with_tax() -> str:
    """PRICES_SHOWN_WITH_TAX: the tax_behavior every catalogue price must have under Stripe Tax."""
    return str(current_app.config["PRICES_SHOWN_WITH_TAX"])


def price_problem(price: PriceInfo) -> str | None:
    """Why a catalogue price does not fit the tax settings, or None. Only with STRIPE_AUTOMATIC_TAX:
    without it Stripe computes no tax and tax_behavior is not read."""
    if not enabled():
        return None
    wanted = shown_with_tax()
    if price.tax_behavior == wanted:
        return None
    if price.tax_behavior == "unspecified":
        return (
            f"price {price.id} ({price.lookup_key}) has no tax_behavior (unspecified): Stripe Tax refuses it."
            f" Set it to {wanted} at Stripe (it can be set once), as PRICES_SHOWN_WITH_TAX={wanted} says"
        )
    return (
        f"price {price.id} ({price.lookup_key}) has tax_behavior={price.tax_behavior}, but"
        f" PRICES_SHOWN_WITH_TAX={wanted}: the pages would misstate what is charged. A price's tax_behavior"
        f" cannot be changed: create a {wanted} price with the same lookup key (transfer_lookup_key)"
    )


def price_words(price: PriceInfo | None) -> str:
    """What a catalogue price says about tax next to its amount, from its own tax_behavior: "including
    tax" or "plus tax" with Stripe Tax on; nothing otherwise (or when Stripe does not say)."""
    if price is None or not enabled():
        return ""
    return {"inclusive": "including tax", "exclusive": "plus tax"}.get(price.tax_behavior, "")


def checkout_params(*, existing_customer: bool) -> Any:
    """A Checkout Session's tax parameters: with STRIPE_AUTOMATIC_TAX, Stripe Tax on the session (and so
    on the subscription and its invoices), the billing address required, tax IDs collected, and both
    saved on a customer the session is given (customer_update); nothing otherwise."""
    if not enabled():
        return {}
    params: dict[str, Any] = {
        "automatic_tax": {"enabled": True},
        "billing_address_collection": "required",
        "tax_id_collection": {"enabled": True},
    }
    if existing_customer:
        params["customer_update"] = {"address": "auto", "name": "auto"}
    return params


# -- what the billing page shows ----------------------------------------------------------------


@dataclass(frozen=True)
class TaxIdRow:
    id: str
    type: str
    value: str
    status: str  # Stripe's verification status

    @property
    def status_words(self) -> str:
        return STATUS_WORDS.get(self.status, self.status)

    @property
    def type_words(self) -> str:
        return TAX_ID_TYPES.get(self.type, (self.type.replace("_", " ").upper(), ""))[0]


@dataclass(frozen=True)
class CustomerTax:
    """The customer's address, tax IDs and exemption (Stripe's customer, tax_ids expanded)."""

    address: dict[str, str] = field(default_factory=dict)
    tax_ids: list[TaxIdRow] = field(default_factory=list)
    tax_exempt: str = "none"
    email: str | None = None

    @property
    def address_lines(self) -> list[str]:
        a = self.address
        place = " ".join(p for p in (a.get("postal_code"), a.get("city")) if p)
        return [p for p in (a.get("line1"), a.get("line2"), place, a.get("state"), a.get("country")) if p]

    @classmethod
    def from_stripe(cls, customer: Mapping[str, Any]) -> CustomerTax:
        address = {k: str(v) for k, v in (customer.get("address") or {}).items() if k in ADDRESS_KEYS and v}
        rows = [
            TaxIdRow(
                id=str(t.get("id")),
                type=str(t.get("type")),
                value=str(t.get("value")),
                status=str((t.get("verification") or {}).get("status") or "pending"),
            )
            for t in (customer.get("tax_ids") or {}).get("data") or []
        ]
        return cls(address, rows, str(customer.get("tax_exempt") or "none"), customer.get("email"))


def invoice_tax(invoice: Mapping[str, Any]) -> int:
    """The tax on an invoice (or a preview), as the pinned API version lists it (total_taxes)."""
    return sum(int(t.get("amount") or 0) for t in invoice.get("total_taxes") or [])


# -- the owner's edits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaxChange:
    """One edit from the billing page: a new address, a tax ID to add, or one to remove."""

    address: dict[str, str] | None = None
    add_tax_id: tuple[str, str] | None = None  # (type, value)
    remove_tax_id: str | None = None
    request_token: str = ""

    @classmethod
    def address_from_form(cls, values: Mapping[str, str], request_token: str) -> TaxChange:
        address = {k: (values.get(k) or "").strip() for k in ADDRESS_KEYS}
        address["country"] = address["country"].upper()
        if not re.fullmatch(r"[A-Z]{2}", address["country"]):
            raise TaxDetailsError("Enter the country as its two-letter code (DE, US, FR, ...).")
        return cls(address=address, request_token=request_token)

    @classmethod
    def tax_id_from_form(cls, kind: str, value: str, request_token: str) -> TaxChange:
        value = re.sub(r"[\s.]", "", value or "").upper()
        if kind not in TAX_ID_TYPES or not re.fullmatch(TAX_ID_TYPES[kind][1], value):
            raise TaxDetailsError(f"That is not a valid {TAX_ID_TYPES.get(kind, ('tax ID',))[0]}.")
        return cls(add_tax_id=(kind, value), request_token=request_token)


def change_details(organization_id: int, change: TaxChange, stripe: TaxCalls, *, actor_user_id: int) -> None:
    """Make the owner's edit at Stripe (keys derived from the form's one-time token, so a form sent twice
    is one change), record it and forget the page's cached reads."""
    organization = db.session.get(Organization, organization_id)
    if organization is None or organization.billed_by_whop or not organization.billing_customer_id:
        raise TaxDetailsError("This organization has no Stripe billing account yet.")
    customer_id = organization.billing_customer_id
    db.session.rollback()  # nothing is held while Stripe answers
    key = f"org-{organization_id}-tax-{change.request_token}"
    if change.address is not None:
        stripe.update_customer(customer_id, {"address": change.address}, key=key)
    if change.add_tax_id is not None or change.remove_tax_id is not None:
        stripe.change_customer_tax_id(customer_id, add=change.add_tax_id, remove=change.remove_tax_id, key=key)
    domain_events.record(
        "organization.tax_details_changed",
        organization_id=organization_id,
        user_id=actor_user_id,
        source=f"user:{actor_user_id}",
        address=change.address is not None,
        added_tax_id=change.add_tax_id[0] if change.add_tax_id else None,
        removed_tax_id=change.remove_tax_id,
    )
    db.session.commit()
    stripe.forget_billing_reads(organization_id)
