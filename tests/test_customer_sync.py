"""Stripe's customer kept equal to the account (app/services/customer_sync.py): the owner's new email
and the organization's new name reach it through the worker, once; customer.updated from Stripe (the
portal) comes back as the billing email address and pushes nothing back; reconcile repairs a customer
without the account's email or name and a billing page showing stale discounts or tax IDs, and names
tax IDs Stripe could not verify."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import User
from app.services import audit_log, customer_sync, domain_events, reconcile
from app.services.billing_service import BillingService, plan_catalogue
from tests.conftest import (
    BERLIN_BUSINESS,
    SandboxAccount,
    checkout_session_id,
    csrf_token,
    query,
    run_jobs,
    sign_up,
    start_signup,
)


def test_the_owners_new_email_reaches_stripes_customer_once(app: Flask, offline_stripe: SandboxAccount) -> None:
    session = sign_up(app.test_client(), offline_stripe)
    with app.app_context():
        owner = db.session.execute(db.select(User)).scalar_one()
        owner.email = "ada.new@example.com"
        domain_events.record(
            "user.email_changed",
            organization_id=owner.organization_id,
            user_id=owner.id,
            source="test",
            old_email="ada@example.com",
            new_email=owner.email,
        )
        db.session.commit()
    run_jobs(app)
    run_jobs(app)
    [(args, call)] = offline_stripe.calls_to("customers.update")
    assert args == (session["customer"],) and call["params"] == {"email": "ada.new@example.com"}
    assert call["options"]["idempotency_key"].startswith("customer-email-")
    assert offline_stripe.api("GET", f"/v1/customers/{session['customer']}")["email"] == "ada.new@example.com"


def test_a_change_made_at_stripe_comes_back_without_bouncing_and_reconcile_repairs_what_drifted(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session = sign_up(client, offline_stripe)
    customer_id = session["customer"]
    offline_stripe.deliver(client)
    # The customer changes the billing email in the portal: customer.updated comes back.
    offline_stripe.update_information_in_portal(_portal(client), name="Ada Lovelace", email="Finance@Example.com")
    assert ("customer.updated", 200) in offline_stripe.deliver(client)
    [organization] = query(app, "SELECT id, billing_email FROM organization")
    assert organization.billing_email == "finance@example.com"
    events = query(app, "SELECT data FROM domain_event WHERE name = 'organization.billing_email_from_stripe'")
    assert [e.data["billing_email"] for e in events] == ["finance@example.com"]
    # Applying Stripe's change pushes nothing back (no ping-pong): Stripe keeps what the portal set.
    run_jobs(app)
    assert offline_stripe.calls_to("customers.update") == []
    assert offline_stripe.api("GET", f"/v1/customers/{customer_id}")["email"] == "Finance@Example.com"
    # Back to the owner's own address: no billing email address is kept.
    offline_stripe.api("POST", f"/v1/customers/{customer_id}", {"email": "ada@example.com"})
    offline_stripe.deliver(client)
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email is None
    assert offline_stripe.calls_to("customers.update") == []

    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    assert report.customers == [] and report.customer_drifts == [] and report.clean
    # Drift nobody was told of (no event): the account is the source of truth for the email, so
    # --apply repairs it through the worker's customer-sync job. A tax ID Stripe could not verify is
    # reported only (the customer corrects it).
    offline_stripe.force(customer_id, email="someone@example.com")
    offline_stripe.api("POST", f"/v1/customers/{customer_id}/tax_ids", {"type": "eu_vat", "value": "DE111111111"})
    offline_stripe.take_events()
    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    who = f"organization {organization.id} ({customer_id})"
    assert report.customer_drifts == [
        reconcile.CustomerDrift(
            organization.id, customer_id, [reconcile.FieldDrift("email", "ada@example.com", "someone@example.com")]
        )
    ]
    assert not report.clean
    assert report.customers == [f"{who}: tax ID DE111111111 is unverified"]
    assert f"customer: {who}: tax ID DE111111111 is unverified" in report.lines()
    assert (
        f"organization {organization.id} (customer {customer_id}): email is 'ada@example.com' here, "
        "'someone@example.com' at Stripe" in report.lines()
    )
    assert offline_stripe.api("GET", f"/v1/customers/{customer_id}")["email"] == "someone@example.com"  # dry run

    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id, apply=True)
    assert report.clean, report.lines()
    assert any("email: customer sync queued for the worker" in line for line in report.applied)
    [(args, call)] = offline_stripe.calls_to("customers.update")
    assert args == (customer_id,) and call["params"] == {"email": "ada@example.com"}
    assert call["options"]["idempotency_key"].startswith("customer-sync-")
    assert offline_stripe.api("GET", f"/v1/customers/{customer_id}")["email"] == "ada@example.com"
    # Our push comes back as customer.updated: applied, nothing bounces; a second run repairs nothing.
    offline_stripe.deliver(client)
    with app.app_context():
        again = BillingService.reconcile(organization_id=organization.id, apply=True)
    assert again.clean and again.applied == []
    assert len(offline_stripe.calls_to("customers.update")) == 1
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email is None


def _portal(client: FlaskClient) -> str:
    """The customer portal the owner opens from the billing page."""
    response = client.post("/billing/portal", data={"csrf_token": csrf_token(client, "/billing/")})
    assert response.status_code == 303
    return str(response.headers["Location"])


def _rename(client: FlaskClient, name: str) -> str:
    response = client.post(
        "/billing/organization-name",
        data={"csrf_token": csrf_token(client, "/billing/"), "name": name},
        follow_redirects=True,
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_the_owner_renames_the_organization_and_stripes_customer_follows_once_without_bouncing(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session = sign_up(client, offline_stripe)
    customer_id = session["customer"]
    offline_stripe.deliver(client)
    assert offline_stripe.api("GET", f"/v1/customers/{customer_id}")["name"] == "Ada Lovelace"  # Checkout's
    page = client.get("/billing/").get_data(as_text=True)
    assert 'id="organization-name"' in page and 'value="Analytical Engines"' in page

    # Clear errors, nothing changed.
    assert "The organization&#39;s name must be 2 to 100 characters long." in _rename(client, " x ")
    assert "Enter the organization&#39;s name." in _rename(client, "   ")
    assert "Remove the control characters" in _rename(client, "Tab\tbed")
    assert query(app, "SELECT name FROM organization")[0].name == "Analytical Engines"

    assert "The organization is now called Difference Engines." in _rename(client, "  Difference   Engines ")
    [organization] = query(app, "SELECT id, name FROM organization")
    assert organization.name == "Difference Engines"
    [renamed] = query(app, "SELECT user_id, source, data FROM domain_event WHERE name = 'organization.renamed'")
    assert renamed.data == {"name": "Difference Engines", "previous": "Analytical Engines"}
    assert renamed.source == f"user:{renamed.user_id}"
    with app.app_context():
        [entry, *_] = audit_log.entries(organization.id, plan_catalogue())
    assert entry.what == "Organization renamed from Analytical Engines to Difference Engines"
    # The same name again records nothing.
    assert "The name is already Difference Engines." in _rename(client, "Difference Engines")
    assert len(query(app, "SELECT id FROM domain_event WHERE name = 'organization.renamed'")) == 1

    # The worker gives Stripe's customer the name, once (a customer Checkout named after the card holder
    # has no name of its own), with a key per event and what is sent.
    run_jobs(app)
    run_jobs(app)
    [(args, call)] = offline_stripe.calls_to("customers.update")
    assert args == (customer_id,)
    assert call["params"] == {"metadata": {"organization_name": "Difference Engines"}, "name": "Difference Engines"}
    assert call["options"]["idempotency_key"].startswith("customer-name-")
    customer = offline_stripe.api("GET", f"/v1/customers/{customer_id}")
    assert (customer["name"], customer["metadata"]["organization_name"]) == ("Difference Engines",) * 2
    # Our change comes back as customer.updated: applied, and nothing is pushed again.
    assert ("customer.updated", 200) in offline_stripe.deliver(client)
    run_jobs(app)
    assert len(offline_stripe.calls_to("customers.update")) == 1
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email is None

    # The customer renames itself in the portal: that name is its own now. It comes back without
    # renaming the organization or being pushed over, and the next rename leaves it alone.
    offline_stripe.update_information_in_portal(_portal(client), name="Ada Lovelace Ltd", email="ada@example.com")
    assert ("customer.updated", 200) in offline_stripe.deliver(client)
    run_jobs(app)
    assert len(offline_stripe.calls_to("customers.update")) == 1
    assert query(app, "SELECT name FROM organization")[0].name == "Difference Engines"
    with app.app_context():
        assert BillingService.reconcile(organization_id=organization.id).clean
    _rename(client, "Analytical Engines")
    run_jobs(app)
    [_, (_, call)] = offline_stripe.calls_to("customers.update")
    assert call["params"] == {"metadata": {"organization_name": "Analytical Engines"}}
    customer = offline_stripe.api("GET", f"/v1/customers/{customer_id}")
    assert (customer["name"], customer["metadata"]["organization_name"]) == ("Ada Lovelace Ltd", "Analytical Engines")
    offline_stripe.deliver(client)
    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    assert report.clean and report.customer_drifts == [], report.lines()


def test_a_business_name_given_with_a_tax_id_at_checkout_is_not_overwritten_by_a_rename(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(STRIPE_AUTOMATIC_TAX=True)
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    session = offline_stripe.pay(session_id, tax_details=BERLIN_BUSINESS)
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    customer_id = session["customer"]
    assert offline_stripe.api("GET", f"/v1/customers/{customer_id}")["name"] == "Ada GmbH"
    _rename(client, "Difference Engines")
    run_jobs(app)
    [(_, call)] = offline_stripe.calls_to("customers.update")
    assert call["params"] == {"metadata": {"organization_name": "Difference Engines"}}  # the name stays
    customer = offline_stripe.api("GET", f"/v1/customers/{customer_id}")
    assert (customer["name"], customer["metadata"]["organization_name"]) == ("Ada GmbH", "Difference Engines")
    offline_stripe.deliver(client)
    [organization] = query(app, "SELECT id FROM organization")
    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    assert report.customer_drifts == [] and report.clean, report.lines()


def test_reconcile_repairs_a_renamed_customer_and_a_billing_page_showing_stale_discounts_and_tax_ids(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client, addon_extra_seats="0"))
    session = offline_stripe.pay(session_id, promotion_code="LAUNCH20")
    assert client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}").headers["Location"] == "/app"
    customer_id, subscription_id = session["customer"], session["subscription"]
    offline_stripe.deliver(client)
    [organization] = query(app, "SELECT id FROM organization")
    assert "LAUNCH20" in client.get("/billing/").get_data(as_text=True)  # the page's reads are cached now

    # At Stripe, told to nobody: the discount is removed and a tax ID added (so the name Checkout gave the
    # customer counts as its business name, kept). The rename's push never happened (the worker was not
    # run: its outbox job is left waiting).
    offline_stripe.force(subscription_id, discounts=[])
    offline_stripe.api("POST", f"/v1/customers/{customer_id}/tax_ids", {"type": "eu_vat", "value": "DE111111111"})
    offline_stripe.take_events()
    _rename(client, "Difference Engines")
    page = client.get("/billing/").get_data(as_text=True)
    assert "LAUNCH20" in page and "DE111111111" not in page  # stale: what the page shows is not Stripe's

    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    assert [(drift.part, drift.stripe) for drift in report.page_drifts] == [
        ("tax IDs", ["DE111111111 (unverified)"]),
        ("discounts", []),
    ]
    [shown_discount] = report.page_drifts[1].shown
    assert shown_discount.startswith("LAUNCH20 (repeating, until ")
    [drift] = report.customer_drifts
    assert [(f.field, f.ours, f.stripe) for f in drift.fields] == [
        ("metadata.organization_name", "Difference Engines", None)
    ]
    assert not report.clean

    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id, apply=True)
    assert report.clean, report.lines()
    assert f"organization {organization.id}: the billing page reads tax IDs from Stripe again" in report.applied
    page = client.get("/billing/").get_data(as_text=True)
    assert "LAUNCH20" not in page and "DE111111111" in page
    customer = offline_stripe.api("GET", f"/v1/customers/{customer_id}")
    assert (customer["name"], customer["metadata"]["organization_name"]) == ("Ada Lovelace", "Difference Engines")
    # The rename's own job, run late, finds the customer in sync and sends nothing.
    run_jobs(app)
    assert len(offline_stripe.calls_to("customers.update")) == 1


def test_whose_name_stripes_customer_carries() -> None:
    """The rule a rename follows (customer_sync.name_fields): the organization's name always goes in the
    metadata; `name` follows it unless the customer keeps a name of its own."""
    ours = {"organization_name": "Difference Engines"}
    # Checkout named it after the card holder, we never named it: it takes the organization's name.
    assert customer_sync.name_fields("Difference Engines", {"name": "Ada Lovelace", "metadata": {}}) == {
        "metadata": ours,
        "name": "Difference Engines",
    }
    # The name we gave it last time follows the rename; an empty one is filled.
    given = {"name": "Analytical Engines", "metadata": {"organization_name": "Analytical Engines"}}
    assert customer_sync.name_fields("Difference Engines", given) == {"metadata": ours, "name": "Difference Engines"}
    assert customer_sync.name_fields("Difference Engines", {"name": None, "metadata": {}})["name"] == (
        "Difference Engines"
    )
    # Its own: Stripe's business_name; a name changed since we gave ours; a tax ID on a customer we
    # never named (the business name typed with it at Checkout). Only the metadata changes.
    for customer in (
        {"name": "Ada GmbH", "business_name": "Ada GmbH", "metadata": {"organization_name": "Ada GmbH"}},
        {"name": "Ada Lovelace Ltd", "metadata": {"organization_name": "Analytical Engines"}},
        {"name": "Ada GmbH", "metadata": {}, "tax_ids": {"data": [{"value": "DE123456789"}]}},
    ):
        assert customer_sync.name_fields("Difference Engines", customer) == {"metadata": ours}
    # A tax ID added later to a customer we named does not take the name from the organization.
    named = {**given, "tax_ids": {"data": [{"value": "DE123456789"}]}}
    assert customer_sync.name_fields("Difference Engines", named)["name"] == "Difference Engines"
    # Nothing to send when it carries the name already.
    assert customer_sync.name_fields("Difference Engines", {"name": "Difference Engines", "metadata": ours}) == {}
    # A push's idempotency key is its trigger's and what it sends: a retry sends the same under the same
    # key; a retry after a later change sends other fields under another (Stripe refuses a reused key).
    keyed = customer_sync._keyed
    assert keyed("customer-name-7", {"name": "A"}) == keyed("customer-name-7", {"name": "A"})
    assert keyed("customer-name-7", {"name": "A"}) != keyed("customer-name-7", {"name": "B"})
