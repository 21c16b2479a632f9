"""Stripe Tax in the sandbox (sandbox/tax.py): Checkout collecting the billing address and a tax ID,
the rate table (German VAT, reverse charge for a verified VAT ID of another EU country, US sales tax,
an exempt customer, a place not registered), tax IDs with their verification, and automatic_tax on
subscriptions and invoice previews, in the shapes of the pinned API version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from sandbox import billing
from sandbox.config import Settings
from sandbox.store import Store
from sandbox.tests.conftest import Sandbox, create_session, pay
from sandbox.tests.test_clock import T0, advance, clock_customer
from sandbox.tests.test_discounts import code_for

BERLIN = {
    "billingAddressLine1": "Friedrichstr. 1",
    "billingLocality": "Berlin",
    "billingPostalCode": "10117",
    "billingCountry": "DE",
}


def taxed_checkout(sandbox: Sandbox, prices: dict[str, str], **form: str) -> tuple[Any, dict[str, Any]]:
    session = create_session(
        sandbox,
        prices,
        automatic_tax={"enabled": True},
        billing_address_collection="required",
        tax_id_collection={"enabled": True},
    )
    assert session.automatic_tax.enabled and session.tax_id_collection.enabled
    response = pay(sandbox, session.id, **form)
    assert response.status_code == 303, response.text[-500:]
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    invoice = sandbox.client.v1.invoices.retrieve(session.subscription.latest_invoice).to_dict()
    return session, invoice


def test_a_berlin_business_pays_19_percent_vat_and_its_verified_vat_id_is_on_the_invoice(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    session, invoice = taxed_checkout(sandbox, prices, **BERLIN, businessName="Ada GmbH", taxId="DE123456789")
    subtotal = invoice["subtotal"]
    [tax] = invoice["total_taxes"]
    assert tax["amount"] == round(subtotal * 0.19) and tax["taxable_amount"] == subtotal
    assert (tax["taxability_reason"], tax["tax_behavior"], tax["type"]) == (
        "standard_rated",
        "exclusive",
        "tax_rate_details",
    )
    assert invoice["total"] == invoice["amount_paid"] == subtotal + tax["amount"]
    assert invoice["total_excluding_tax"] == subtotal and invoice["automatic_tax"]["status"] == "complete"
    assert invoice["customer_tax_ids"] == [{"type": "eu_vat", "value": "DE123456789"}]
    assert invoice["customer_address"]["country"] == "DE" and invoice["customer_tax_exempt"] == "none"
    assert sum(line["taxes"][0]["amount"] for line in invoice["lines"]["data"]) == tax["amount"]
    rate = tax["tax_rate_details"]["tax_rate"]
    assert session.total_details.amount_tax == tax["amount"] and session.amount_total == invoice["total"]
    assert session.customer_details.address.city == "Berlin" and session.customer_details.business_name == "Ada GmbH"
    assert session.subscription.automatic_tax.enabled
    customer = sandbox.client.v1.customers.retrieve(session.customer, params={"expand": ["tax_ids"]})
    assert customer.address.postal_code == "10117" and customer.name == "Ada GmbH"
    [tax_id] = customer.tax_ids.data
    assert (tax_id.type, tax_id.value, tax_id.verification.status, tax_id.country) == (
        "eu_vat",
        "DE123456789",
        "verified",
        "DE",
    )
    assert "tax_ids" not in sandbox.client.v1.customers.retrieve(session.customer).to_dict()
    assert rate.startswith("txr_")


@pytest.mark.parametrize(
    ("address", "tax_id", "reason", "percent"),
    [
        ({"billingCountry": "FR", "billingLocality": "Paris"}, "FR12345678900", "reverse_charge", 0),
        ({"billingCountry": "FR", "billingLocality": "Paris"}, "FR12345678901", "standard_rated", 20),  # unverified
        (
            {"billingCountry": "US", "billingAdministrativeArea": "CA", "billingPostalCode": "94107"},
            "",
            "standard_rated",
            7.25,
        ),
        (
            {"billingCountry": "US", "billingAdministrativeArea": "TX", "billingPostalCode": "73301"},
            "",
            "not_collecting",
            0,
        ),
    ],
)
def test_the_rate_table_reverse_charge_and_places_not_registered(
    sandbox: Sandbox, prices: dict[str, str], address: dict[str, str], tax_id: str, reason: str, percent: float
) -> None:
    _, invoice = taxed_checkout(sandbox, prices, **address, taxId=tax_id)
    taxes = invoice["total_taxes"]
    if reason == "not_collecting":
        assert taxes == [] and invoice["total"] == invoice["subtotal"]
        return
    [tax] = taxes
    assert tax["taxability_reason"] == reason and tax["amount"] == round(invoice["subtotal"] * percent / 100)
    assert invoice["total"] == invoice["subtotal"] + tax["amount"]


def test_an_exempt_customer_tax_ids_by_api_and_automatic_tax_on_updates_and_previews(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = sandbox.client.v1.customers.create(
        params={"email": "ops@example.com", "address": {"country": "DE", "city": "Berlin"}, "tax_exempt": "exempt"}
    )
    assert customer.tax_exempt == "exempt" and customer.address.country == "DE"
    session = create_session(
        sandbox, prices, customer_email=None, customer=customer.id, automatic_tax={"enabled": True}
    )
    assert pay(sandbox, session.id, billingCountry="US", billingAdministrativeArea="CA").status_code == 303
    subscription = sandbox.client.v1.checkout.sessions.retrieve(session.id).subscription
    invoice = sandbox.client.v1.invoices.retrieve(
        sandbox.client.v1.subscriptions.retrieve(str(subscription)).latest_invoice
    ).to_dict()
    # The customer the session was given keeps its own address (no customer_update): German, exempt.
    [tax] = invoice["total_taxes"]
    assert (tax["taxability_reason"], tax["amount"]) == ("customer_exempt", 0)
    sandbox.client.v1.customers.update(customer.id, params={"tax_exempt": "none"})
    preview = sandbox.client.v1.invoices.create_preview(params={"subscription": str(subscription)})
    assert preview.total_taxes[0].amount == round(preview.subtotal * 0.19)
    untaxed = sandbox.client.v1.invoices.create_preview(
        params={"subscription": str(subscription), "automatic_tax": {"enabled": False}}
    )
    assert untaxed.total_taxes == [] and untaxed.total == untaxed.subtotal
    updated = sandbox.client.v1.subscriptions.update(str(subscription), params={"automatic_tax": {"enabled": False}})
    assert not updated.automatic_tax.enabled
    assert sandbox.client.v1.invoices.create_preview(params={"subscription": str(subscription)}).total_taxes == []

    made = sandbox.client.v1.customers.tax_ids.create(customer.id, params={"type": "eu_vat", "value": "de 111 111 111"})
    assert (made.value, made.verification.status) == ("DE111111111", "unverified")
    assert [t.id for t in sandbox.client.v1.customers.tax_ids.list(customer.id).data] == [made.id]
    with pytest.raises(stripe.InvalidRequestError, match="Invalid value"):
        sandbox.client.v1.customers.tax_ids.create(customer.id, params={"type": "eu_vat", "value": "12"})
    assert sandbox.client.v1.customers.tax_ids.delete(customer.id, made.id).deleted
    assert sandbox.client.v1.customers.tax_ids.list(customer.id).data == []
    types = [e.type for e in sandbox.client.v1.events.list(params={"limit": 20}).data]
    assert "customer.tax_id.created" in types and "customer.tax_id.deleted" in types


def test_a_pending_vat_id_is_taxed_until_its_verification_completes_by_control_or_clock(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    paris = {"billingAddressLine1": "1 rue de Rivoli", "billingLocality": "Paris", "billingCountry": "FR"}
    session, invoice = taxed_checkout(sandbox, prices, **paris, businessName="Ada SARL", taxId="FR222222222")
    customer = sandbox.client.v1.customers.retrieve(session.customer, params={"expand": ["tax_ids"]})
    [pending] = customer.tax_ids.data
    assert (pending.verification.status, pending.verification.verified_name) == ("pending", None)
    # Not verified yet: French VAT, no reverse charge.
    [tax] = invoice["total_taxes"]
    assert (tax["taxability_reason"], tax["amount"]) == ("standard_rated", round(invoice["subtotal"] * 0.20))

    settle = f"{sandbox.url}/_sandbox/tax_ids/{pending.id}/verification"
    assert requests.post(settle, json={"status": "maybe"}, timeout=5).status_code == 400
    settled = requests.post(settle, json={}, timeout=5)
    assert settled.status_code == 200 and settled.json()["verification"]["status"] == "verified"
    assert requests.post(settle, json={}, timeout=5).status_code == 400  # no longer pending
    [event] = sandbox.client.v1.events.list(params={"type": "customer.tax_id.updated", "limit": 1}).data
    assert event.data.object.id == pending.id and event.data.object.verification.status == "verified"
    assert event.data.previous_attributes["verification"]["status"] == "pending"
    preview = sandbox.client.v1.invoices.create_preview(params={"subscription": str(session.subscription.id)})
    assert [t.taxability_reason for t in preview.total_taxes] == ["reverse_charge"]

    # Another pending ID, on a customer of a test clock: the clock's next advance verifies it.
    clock_id, customer_id = clock_customer(sandbox)
    made = sandbox.client.v1.customers.tax_ids.create(customer_id, params={"type": "eu_vat", "value": "NL 0022"})
    assert made.verification.status == "pending"
    advance(sandbox, clock_id, T0 + 3600)
    assert sandbox.client.v1.customers.tax_ids.retrieve(customer_id, made.id).verification.status == "verified"
    ein = {"type": "us_ein", "value": "12-3456782"}
    unavailable = sandbox.client.v1.customers.tax_ids.create(customer_id, params=ein)
    settle = f"{sandbox.url}/_sandbox/tax_ids/{unavailable.id}/verification"
    assert requests.post(settle, json={"status": "unavailable"}, timeout=5).json()["verification"]["status"] == (
        "unavailable"
    )


# -- tax behavior: unspecified prices refused, inclusive prices carved out -------------------------

UNSPECIFIED = "does not have a `tax_behavior` set which is required for automatic tax computation"


def new_price(sandbox: Sandbox, amount: int, name: str, **params: Any) -> Any:
    return sandbox.client.v1.prices.create(
        params={
            "currency": "usd",
            "unit_amount": amount,
            "recurring": {"interval": "month"},
            "product_data": {"name": name},
            **params,
        }
    )


def test_automatic_tax_on_a_price_without_tax_behavior_is_refused_as_stripe_refuses_it(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    seeded = sandbox.client.v1.prices.retrieve(prices["starter_monthly"])
    assert seeded.tax_behavior == "exclusive"  # the catalogue's prices are seeded with one
    bare = new_price(sandbox, 1900, "Bare")
    assert bare.tax_behavior == "unspecified"
    line_items = [{"price": bare.id, "quantity": 1}]
    with pytest.raises(stripe.InvalidRequestError, match=UNSPECIFIED) as refused:
        create_session(sandbox, prices, line_items=line_items, automatic_tax={"enabled": True})
    assert refused.value.http_status == 400 and f"The price `{bare.id}`" in str(refused.value.user_message)
    assert refused.value.param == "line_items[0][price]"
    create_session(sandbox, prices, line_items=line_items)  # without Stripe Tax it is fine

    # A taxed subscription cannot take the price on, nor can a preview of that change be taxed.
    session, _ = taxed_checkout(sandbox, prices, **BERLIN)
    subscription = session.subscription
    with pytest.raises(stripe.InvalidRequestError, match=UNSPECIFIED):
        sandbox.client.v1.subscriptions.update(
            subscription.id, params={"items": [{"price": bare.id, "quantity": 1}], "proration_behavior": "none"}
        )
    details = {"items": [{"price": bare.id, "quantity": 1}], "proration_behavior": "none"}
    with pytest.raises(stripe.InvalidRequestError, match=UNSPECIFIED):
        sandbox.client.v1.invoices.create_preview(
            params={"subscription": subscription.id, "subscription_details": details}
        )

    # tax_behavior can be set once on an unspecified price, and then never changed.
    set_once = sandbox.client.v1.prices.update(bare.id, params={"tax_behavior": "exclusive"})
    assert set_once.tax_behavior == "exclusive"
    with pytest.raises(stripe.InvalidRequestError, match="cannot be changed"):
        sandbox.client.v1.prices.update(bare.id, params={"tax_behavior": "inclusive"})
    with pytest.raises(stripe.InvalidRequestError, match="Invalid tax_behavior"):
        new_price(sandbox, 100, "Odd", tax_behavior="both")
    assert create_session(sandbox, prices, line_items=line_items, automatic_tax={"enabled": True}).id


def carved(gross: int, percent: float) -> int:
    """The tax inside a tax-inclusive amount: the net is rounded, the tax is the rest."""
    return gross - round(gross / (1 + percent / 100))


def test_an_inclusive_price_is_the_amount_paid_with_the_tax_carved_out_after_the_launch20_discount(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    starter = new_price(sandbox, 1900, "Starter incl.", tax_behavior="inclusive")
    pro = new_price(sandbox, 4900, "Pro incl.", tax_behavior="inclusive")
    session = create_session(
        sandbox,
        prices,
        line_items=[{"price": starter.id, "quantity": 1}],
        automatic_tax={"enabled": True},
        billing_address_collection="required",
        allow_promotion_codes=True,
    )
    # The product's LAUNCH20 (plans.toml): 20% off for three months.
    launch20 = code_for(sandbox, percent_off=20, duration="repeating", duration_in_months=3)
    assert pay(sandbox, session.id, **BERLIN, promotionCode=launch20).status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    invoice = sandbox.client.v1.invoices.retrieve(session.subscription.latest_invoice).to_dict()
    # 19.00 less 20% is 15.20, which is what is paid; 2.43 of it is German VAT (15.20 / 1.19 = 12.77).
    assert (invoice["subtotal"], invoice["total"], invoice["amount_paid"]) == (1900, 1520, 1520)
    [tax] = invoice["total_taxes"]
    assert (tax["amount"], tax["taxable_amount"], tax["tax_behavior"]) == (243, 1277, "inclusive")
    assert tax["amount"] == carved(1520, 19) and tax["taxability_reason"] == "standard_rated"
    assert invoice["total_excluding_tax"] == 1277 and invoice["subtotal_excluding_tax"] == 1900 - carved(1900, 19)
    [line] = invoice["lines"]["data"]
    assert (line["amount"], line["taxes"][0]["amount"], line["taxes"][0]["taxable_amount"]) == (1900, 243, 1277)
    assert session.amount_total == 1520 and session.total_details.amount_tax == 243
    assert tax["tax_rate_details"]["tax_rate"].endswith("_1900_incl")  # an inclusive 19% rate

    # Upgraded a third into the period: the proration is taxed the same way, and the preview's total
    # is what the change's invoice charges, to the cent.
    subscription = session.subscription
    [item] = subscription["items"].data
    start, end = item.current_period_start, item.current_period_end
    when = start + (end - start) // 3
    items = [{"id": item.id, "price": pro.id}]
    preview = sandbox.client.v1.invoices.create_preview(
        params={
            "subscription": subscription.id,
            "subscription_details": {"items": items, "proration_date": when, "proration_behavior": "always_invoice"},
        }
    ).to_dict()
    changed = sandbox.client.v1.subscriptions.update(
        subscription.id, params={"items": items, "proration_behavior": "always_invoice", "proration_date": when}
    )
    charged = sandbox.client.v1.invoices.retrieve(changed.latest_invoice).to_dict()
    for shown in (preview, charged):
        lines = shown["lines"]["data"]
        discount = sum(a["amount"] for a in shown["total_discount_amounts"])
        [tax] = shown["total_taxes"]
        assert shown["total"] == sum(line["amount"] for line in lines) - discount  # nothing added on top
        assert tax["amount"] == sum(line["taxes"][0]["amount"] for line in lines)
        for line in lines:
            line_discount = sum(d["amount"] for d in line["discount_amounts"])
            assert line["taxes"][0]["amount"] == carved(line["amount"] - line_discount, 19)
        assert shown["total_excluding_tax"] == shown["total"] - tax["amount"] == tax["taxable_amount"]
    assert (preview["total"], preview["total_taxes"]) == (charged["total"], charged["total_taxes"])
    assert charged["amount_paid"] == charged["total"] > 0


def test_a_reverse_charge_business_pays_an_inclusive_price_as_it_is_with_no_tax_in_it(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    """Stripe: with tax-inclusive prices "the amount your buyer pays never changes, even if the tax
    rate varies"; a reverse charge is a zero rate, so the sticker price is charged and none of it is tax."""
    inclusive = new_price(sandbox, 1900, "Starter incl.", tax_behavior="inclusive")
    paris = {"billingCountry": "FR", "billingLocality": "Paris"}
    _, invoice = taxed_checkout(
        sandbox,
        {**prices, "starter_monthly": inclusive.id},
        **paris,
        taxId="FR12345678900",
    )
    starter_line = next(line for line in invoice["lines"]["data"] if line["amount"] == 1900)
    assert starter_line["taxes"][0]["taxability_reason"] == "reverse_charge"
    assert starter_line["taxes"][0]["amount"] == 0 and starter_line["taxes"][0]["taxable_amount"] == 1900
    assert invoice["total"] == invoice["subtotal"] == invoice["amount_paid"] == invoice["total_excluding_tax"]


def test_seeded_prices_take_the_tax_behavior_the_app_shows_prices_with(store: Store, tmp_path: Path) -> None:
    assert Settings.from_env({}).price_tax_behavior == "exclusive"
    assert Settings.from_env({"PRICES_SHOWN_WITH_TAX": "Inclusive"}).price_tax_behavior == "inclusive"
    given = {"PRICES_SHOWN_WITH_TAX": "inclusive", "SANDBOX_PRICE_TAX_BEHAVIOR": "unspecified"}
    assert Settings.from_env(given).price_tax_behavior == "unspecified"
    with pytest.raises(ValueError, match="SANDBOX_PRICE_TAX_BEHAVIOR"):
        Settings.from_env({"SANDBOX_PRICE_TAX_BEHAVIOR": "both"})

    before = {p["lookup_key"]: p for p in store.all("price")}
    assert {p["tax_behavior"] for p in before.values()} == {"exclusive"}
    # Seeded again as inclusive: prices are immutable, so new ones take over the lookup keys.
    with store.transaction():
        billing.seed_catalogue(store, tmp_path / "plans.toml", "inclusive")
    now = {p["lookup_key"]: p for p in store.all("price") if p["lookup_key"]}
    assert now.keys() == before.keys() and {p["tax_behavior"] for p in now.values()} == {"inclusive"}
    starter = before["starter_monthly"]["id"]
    assert now["starter_monthly"]["id"] != starter and store.get(starter)["active"] is False  # type: ignore[index]
