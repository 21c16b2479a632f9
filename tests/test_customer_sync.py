"""Stripe's customer kept equal to the account (app/services/customer_sync.py): the owner's new email
reaches it through the worker, once; customer.updated from Stripe (the portal) comes back as the
billing email address; reconcile names a customer whose email or tax IDs differ."""

from __future__ import annotations

from flask import Flask

from app.extensions import db
from app.models import User
from app.services import domain_events
from app.services.billing_service import BillingService
from tests.conftest import SandboxAccount, query, run_jobs, sign_up


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


def test_a_change_made_at_stripe_comes_back_and_reconcile_names_what_differs(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    session = sign_up(client, offline_stripe)
    customer_id = session["customer"]
    offline_stripe.take_events()
    # The customer changes the billing email in the portal: customer.updated comes back.
    offline_stripe.api("POST", f"/v1/customers/{customer_id}", {"email": "Finance@Example.com"})
    assert ("customer.updated", 200) in offline_stripe.deliver(client)
    [organization] = query(app, "SELECT id, billing_email FROM organization")
    assert organization.billing_email == "finance@example.com"
    events = query(app, "SELECT data FROM domain_event WHERE name = 'organization.billing_email_from_stripe'")
    assert [e.data["billing_email"] for e in events] == ["finance@example.com"]
    # Back to the owner's own address: no billing email address is kept.
    offline_stripe.api("POST", f"/v1/customers/{customer_id}", {"email": "ada@example.com"})
    offline_stripe.deliver(client)
    assert query(app, "SELECT billing_email FROM organization")[0].billing_email is None

    with app.app_context():
        assert BillingService.reconcile(organization_id=organization.id).customers == []
    # Drift nobody was told of (no event), and a tax ID Stripe could not verify: reconcile names both.
    offline_stripe.force(customer_id, email="someone@example.com")
    offline_stripe.api("POST", f"/v1/customers/{customer_id}/tax_ids", {"type": "eu_vat", "value": "DE111111111"})
    offline_stripe.take_events()
    with app.app_context():
        report = BillingService.reconcile(organization_id=organization.id)
    who = f"organization {organization.id} ({customer_id})"
    assert report.customers == [
        f"{who}: customer email 'someone@example.com' is not 'ada@example.com'",
        f"{who}: tax ID DE111111111 is unverified",
    ]
    assert f"customer: organization {organization.id} ({customer_id}): tax ID DE111111111 is unverified" in (
        report.lines()
    )
