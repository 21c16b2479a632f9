"""The primary billing test module. Stripe is replaced at the one seam in conftest.py (OfflineStripe in
place of stripe.StripeClient); `pytest --stripe-live` runs test_signup_flow_end_to_end against a real
Stripe API instead (see test_live_flow.py for the live walker it hands over to)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import (
    OFFLINE_WEBHOOK_SECRET,
    OfflineStripe,
    csrf_token,
    post_webhook,
    query,
    sign_stripe_payload,
)

PASSWORD = "correct horse battery staple"
SIGNUP_EVENTS = ("organization.created", "user.created", "signup.completed")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Offline, both arrival orders are forced; live, Stripe decides the order.
    if metafunc.function.__name__ == "test_signup_flow_end_to_end":
        live = metafunc.config.getoption("--stripe-live")
        metafunc.parametrize("order", ["as delivered"] if live else ["redirect_first", "webhook_first"])


def signup_form(client: FlaskClient, **fields: Any) -> dict[str, Any]:
    form = {
        "csrf_token": csrf_token(client, "/auth/signup"),
        "email": "Ada@Example.COM ",
        "password": PASSWORD,
        "organization_name": "Analytical Engines",
        "owner_name": "Ada Lovelace",
        "tier": "starter",
        "addon_extra_seats": "2",
    }
    form.update(fields)
    return form


def start_signup(client: FlaskClient, **fields: Any) -> Any:
    return client.post("/auth/signup", data=signup_form(client, **fields))


def session_id_of(response: Any) -> str:
    assert response.status_code == 303, response.get_data(as_text=True)
    return str(response.headers["Location"].rsplit("/", 1)[-1])


def domain_event_counts(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def signed_up(client: FlaskClient, stripe_api: OfflineStripe, *, outcome: str = "paid", **fields: Any) -> dict[str, Any]:
    """A signup walked to a signed-in owner: returns the paid checkout session."""
    session_id = session_id_of(start_signup(client, **fields))
    session = stripe_api.pay(session_id, outcome=outcome)
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert response.status_code == 303 and response.headers["Location"] == "/app", response.get_data(as_text=True)
    return session


# --- The primary test ------------------------------------------------------------------------------


@pytest.mark.live
def test_signup_flow_end_to_end(request: pytest.FixtureRequest, order: str) -> None:
    """Form → Stripe Checkout → provisioning (redirect and webhook, in either order) → signed-in page →
    billing page → cancellation, and the webhook that follows it."""
    if request.config.getoption("--stripe-live"):
        from tests.test_live_flow import walk_live_signup

        walk_live_signup(request)
        return
    app: Flask = request.getfixturevalue("app")
    stripe_api: OfflineStripe = request.getfixturevalue("offline_stripe")
    client = app.test_client()

    # The form offers every plan of the catalogue.
    page = client.get("/auth/signup").get_data(as_text=True)
    assert all(name in page for name in ("Starter", "Pro", "Business", "Extra seats"))

    # Submitting it stores the intent and sends the browser to Stripe Checkout.
    response = start_signup(client)
    session_id = session_id_of(response)
    assert response.headers["Location"] == f"https://checkout.stripe.test/c/pay/{session_id}"
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.email, pending.status, pending.checkout_session_id) == ("ada@example.com", "pending", session_id)
    assert pending.tier == "starter" and pending.addons == {"extra_seats": 2}
    assert pending.password_hash.startswith("scrypt:") and PASSWORD not in pending.password_hash

    [(args, call)] = stripe_api.calls_to("checkout.sessions.create")
    params = call["params"]
    assert params["mode"] == "subscription"
    assert params["line_items"] == [
        {"price": "price_starter_monthly", "quantity": 1},
        {"price": "price_extra_seat_monthly", "quantity": 2},
    ]
    assert params["customer_email"] == "ada@example.com"
    assert params["client_reference_id"] == str(pending.id)
    assert params["metadata"] == {"purpose": "signup", "pending_signup_id": str(pending.id)}
    assert params["subscription_data"]["metadata"] == params["metadata"]
    assert params["success_url"] == "http://localhost/billing/complete-signup-from-stripe?session_id={CHECKOUT_SESSION_ID}"
    assert params["cancel_url"] == "http://localhost/auth/signup?checkout=canceled"
    assert call["options"] == {"idempotency_key": f"signup-checkout-{pending.id}"}
    assert stripe_api.client_kwargs["api_key"] == "sk_test_offline_suite_51Hx0000000000000"
    assert stripe_api.client_kwargs["stripe_version"] == "2026-10-28.endive"
    assert stripe_api.client_kwargs["max_network_retries"] == 2

    # The customer pays; the redirect and the webhook both arrive, in the order under test.
    session = stripe_api.pay(session_id)
    completed = OfflineStripe.event("checkout.session.completed", session)

    def redirect() -> Any:
        return client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")

    if order == "redirect_first":
        landing = redirect()
        assert post_webhook(client, completed).status_code == 200
    else:
        assert post_webhook(client, completed).status_code == 200
        landing = redirect()
    assert landing.status_code == 303 and landing.headers["Location"] == "/app"
    assert post_webhook(client, completed).status_code == 200  # a redelivery changes nothing

    [organization] = query(app, "SELECT * FROM organization")
    subscription = stripe_api.subscriptions[session["subscription"]]
    assert organization.name == "Analytical Engines"
    assert (organization.tier, organization.billing_status) == ("starter", "active")
    assert organization.stripe_customer_id == session["customer"]
    assert organization.stripe_subscription_id == subscription["id"]
    assert organization.signup_checkout_session_id == session_id
    assert organization.current_period_end.timestamp() == subscription["items"]["data"][0]["current_period_end"]
    assert [(a.addon_key, a.quantity) for a in query(app, "SELECT * FROM organization_addon")] == [("extra_seats", 2)]
    [owner] = query(app, "SELECT * FROM user_account")
    assert (owner.email, owner.name, owner.role, owner.organization_id) == (
        "ada@example.com", "Ada Lovelace", "owner", organization.id
    )
    assert owner.password_hash == pending.password_hash
    [pending] = query(app, "SELECT * FROM pending_signup")
    assert (pending.status, pending.organization_id, pending.password_hash) == ("completed", organization.id, None)
    events = domain_event_counts(app)
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
    assert [row.status for row in query(app, "SELECT status FROM stripe_event")] == ["processed"]

    # Signed in, on a page that shows the organization, its plan and billing status.
    home = client.get("/app").get_data(as_text=True)
    assert "Analytical Engines" in home and "Starter" in home and "Active" in home

    # The billing page: plan, status, renewal date, add-ons, and the owner's actions.
    billing = client.get("/billing/").get_data(as_text=True)
    assert "Extra seats × 2" in billing and "Renews" in billing and 'id="cancel"' in billing

    # Cancel at the period end: Stripe is told (with an idempotency key) and the organization follows.
    response = client.post(
        "/billing/cancel", data={"csrf_token": csrf_token(client, "/billing/"), "request_token": "a" * 32, "when": "period_end"}
    )
    assert response.status_code == 303
    [(args, call)] = stripe_api.calls_to("subscriptions.update")
    assert args == (subscription["id"],) and call["params"] == {"cancel_at_period_end": True}
    assert call["options"] == {"idempotency_key": f"org-{organization.id}-cancel-period-end-{'a' * 32}"}
    [organization] = query(app, "SELECT * FROM organization")
    assert organization.cancel_at_period_end is True and organization.billing_status == "active"
    assert "Plan ends" in client.get("/billing/").get_data(as_text=True)

    # Stripe's webhook for that change agrees and records nothing twice.
    updated = OfflineStripe.event("customer.subscription.updated", dict(stripe_api.subscriptions[subscription["id"]]))
    assert post_webhook(client, updated).status_code == 200
    assert domain_event_counts(app)["subscription.cancellation_scheduled"] == 1
    assert [events[name] for name in SIGNUP_EVENTS] == [1, 1, 1]
