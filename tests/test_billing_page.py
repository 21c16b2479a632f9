"""The owner's billing page and actions, sign-in, and the access guard, on real PostgreSQL and Redis
with Stripe at the one seam of conftest.py."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from tests.conftest import (
    PASSWORD,
    SandboxAccount,
    checkout_session_id,
    csrf_token,
    post_and_apply,
    query,
    sign_up,
    stripe_event,
)

TOKEN = "0123456789abcdef0123456789abcdef"


class Owner:
    def __init__(self, app: Flask, stripe_api: SandboxAccount, email: str = "ada@example.com") -> None:
        self.client = app.test_client()
        session = sign_up(self.client, stripe_api, email=email, organization_name=f"Org of {email}")
        self.subscription_id: str = session["subscription"]
        self.customer_id: str = session["customer"]
        [row] = query(app, "SELECT id FROM organization WHERE billing_subscription_id = :s", s=self.subscription_id)
        self.organization_id: int = row.id

    def post(self, path: str, **fields: Any) -> Any:
        return self.client.post(path, data={"csrf_token": csrf_token(self.client, "/billing/"), **fields})


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> Owner:
    return Owner(app, offline_stripe)


def organization(app: Flask, organization_id: int) -> Any:
    [row] = query(app, "SELECT * FROM organization WHERE id = :id", id=organization_id)
    return row


def events_named(app: Flask) -> Counter[str]:
    return Counter(row.name for row in query(app, "SELECT name FROM domain_event"))


def set_billing_status(app: Flask, organization_id: int, status: str, past_due_since: datetime | None = None) -> None:
    from sqlalchemy import text

    from app.extensions import db

    with app.app_context():
        db.session.execute(
            text("UPDATE organization SET billing_status = :s, past_due_since = :p WHERE id = :id"),
            {"s": status, "p": past_due_since, "id": organization_id},
        )
        db.session.commit()


def add_member(app: Flask, organization_id: int, email: str = "member@example.com") -> None:
    from sqlalchemy import text

    from app.extensions import db

    with app.app_context():
        db.session.execute(
            text(
                "INSERT INTO user_account (organization_id, email, name, password_hash, role, created_at) "
                "VALUES (:org, :email, 'A Member', :hash, 'member', now())"
            ),
            {"org": organization_id, "email": email, "hash": generate_password_hash(PASSWORD, method="scrypt")},
        )
        db.session.commit()


def log_in(client: FlaskClient, email: str, password: str = PASSWORD) -> Any:
    return client.post(
        "/auth/login", data={"csrf_token": csrf_token(client, "/auth/login"), "email": email, "password": password}
    )


def session_cookie(client: FlaskClient) -> str | None:
    cookie = client.get_cookie("session")
    return cookie.value if cookie else None


# --- Sign-in and sign-out -------------------------------------------------------------------------


def test_sign_in_rotates_the_session_id_and_sign_out_ends_it(app: Flask, owner: Owner) -> None:
    owner.client.post("/auth/logout", data={"csrf_token": csrf_token(owner.client, "/app")})
    assert owner.client.get("/app").status_code == 302
    browser = app.test_client()
    browser.get("/auth/login")
    before = session_cookie(browser)
    assert before and app.extensions["redis"].exists(f"session:{before}")

    response = log_in(browser, "ADA@example.com")
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    after = session_cookie(browser)
    assert after and after != before
    assert not app.extensions["redis"].exists(f"session:{before}")  # the old id is worthless now
    assert browser.get("/app").status_code == 200
    assert events_named(app)["user.signed_in"] == 2  # once after checkout, once now
    assert query(app, "SELECT last_login_at FROM user_account")[0].last_login_at is not None

    signed_out = browser.post("/auth/logout", data={"csrf_token": csrf_token(browser, "/app")})
    assert signed_out.status_code == 303 and signed_out.headers["Location"] == "/auth/login"
    assert not app.extensions["redis"].exists(f"session:{after}")
    assert browser.get("/app").status_code == 302


def test_a_failed_sign_in_does_not_reveal_whether_the_email_exists(app: Flask, owner: Owner) -> None:
    wrong_password = log_in(app.test_client(), "ada@example.com", "not the password at all")
    unknown_email = log_in(app.test_client(), "nobody@example.com", "not the password at all")
    assert wrong_password.status_code == unknown_email.status_code == 401
    message = "That email and password do not match an account."
    assert message in wrong_password.get_data(as_text=True) and message in unknown_email.get_data(as_text=True)


def test_failed_sign_ins_are_limited_per_account_and_client_with_a_429_page(
    make_app: Any, offline_stripe: SandboxAccount
) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT="3/minute")
    Owner(app, offline_stripe)
    assert log_in(app.test_client(), "ada@example.com").status_code == 303  # successes do not count
    statuses = [log_in(app.test_client(), "ada@example.com", "wrong password here").status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    limited = log_in(app.test_client(), "ada@example.com")
    assert limited.status_code == 429 and "Too many attempts" in limited.get_data(as_text=True)
    assert log_in(app.test_client(), "grace@example.com", "wrong password here").status_code == 401


def test_failed_sign_ins_are_limited_per_client(make_app: Any) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_CLIENT="2/minute")
    client = app.test_client()
    statuses = [log_in(client, f"user{n}@example.com", "wrong password here").status_code for n in range(3)]
    assert statuses == [401, 401, 429]


# --- The billing page and the owner's actions ------------------------------------------------------


def test_the_billing_page_shows_the_plan_in_plain_words(app: Flask, owner: Owner) -> None:
    page = owner.client.get("/billing/").get_data(as_text=True)
    row = organization(app, owner.organization_id)
    assert 'id="plan">Starter<' in page and 'id="billing-status">Active<' in page
    assert f'id="renews">{row.current_period_end:%d %B %Y}'.replace(">0", ">") in page
    assert "Extra seats × 2" in page
    assert all(f'id="{action}"' in page for action in ("open-portal", "cancel"))
    assert 'id="resume"' not in page and 'id="resubscribe"' not in page
    # The last payment with its amount and day, not a bare "paid".
    assert f'id="last-payment">$29.00 paid on {row.last_payment_at:%d %B %Y}</dd>'.replace(" 0", " ") in page, page


def test_an_old_success_link_opened_while_someone_else_is_signed_in_says_so(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    """Reopening a finished signup's success URL while signed in as another account: the signed-in page
    says whose account it is, never "Sign in to continue"."""
    other = app.test_client()
    session = sign_up(other, offline_stripe, email="grace@example.com", organization_name="Grace's")
    response = owner.client.get(f"/billing/complete-signup-from-stripe?session_id={session['id']}")
    assert (response.status_code, response.headers["Location"]) == (303, "/app")
    page = owner.client.get("/app").get_data(as_text=True)
    assert "Sign in to continue" not in page
    assert (
        "The account this checkout paid for (grace@example.com) is ready. You are signed in as ada@example.com"
        in page.replace("&#39;", "'")
    ), page


def test_the_portal_opens_for_the_organizations_customer(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    response = owner.post("/billing/portal")
    assert response.status_code == 303
    assert response.headers["Location"].startswith(f"{offline_stripe.url}/portal/bps_")
    [(_, call)] = offline_stripe.calls_to("billing_portal.sessions.create")
    assert call["params"] == {"customer": owner.customer_id, "return_url": "http://localhost/billing/"}


def test_cancel_now_asks_for_confirmation_first_saying_what_is_lost_and_no_refund(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    page = owner.client.get("/billing/").get_data(as_text=True)
    assert 'value="now"' in page and 'name="confirmed"' not in page
    asked = owner.post("/billing/cancel", request_token=TOKEN, when="now")
    assert asked.status_code == 200
    text = asked.get_data(as_text=True)
    assert "End your plan now?" in text and "This cannot be undone" in text
    assert "lose access to the app at once" in text
    assert "Nothing is refunded for the time already paid until" in text
    assert 'name="confirmed" value="yes"' in text and f'value="{TOKEN}"' in text  # the same request token
    assert offline_stripe.calls_to("subscriptions.cancel") == []
    assert organization(app, owner.organization_id).billing_status == "active"
    # Anything but "yes" asks again; "yes" ends it.
    assert owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="sure").status_code == 200
    assert offline_stripe.calls_to("subscriptions.cancel") == []
    assert owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="yes").status_code == 303
    assert len(offline_stripe.calls_to("subscriptions.cancel")) == 1
    assert organization(app, owner.organization_id).billing_status == "canceled"


def test_cancel_now_ends_access_and_offers_a_new_subscription(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    response = owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="yes")
    assert response.status_code == 303
    [(args, call)] = offline_stripe.calls_to("subscriptions.cancel")
    assert args == (owner.subscription_id,)
    assert call["options"] == {"idempotency_key": f"org-{owner.organization_id}-cancel-now-{TOKEN}"}
    row = organization(app, owner.organization_id)
    assert row.billing_status == "canceled" and row.ended_at is not None

    blocked = owner.client.get("/app")
    assert blocked.status_code == 303 and blocked.headers["Location"] == "/billing/"
    page = owner.client.get("/billing/").get_data(as_text=True)
    assert "Your subscription has ended." in page and 'id="resubscribe"' in page and 'id="cancel"' not in page

    deleted = stripe_event("customer.subscription.deleted", offline_stripe.subscription(owner.subscription_id))
    assert post_and_apply(owner.client, deleted).status_code == 200
    assert events_named(app)["organization.billing_status_changed"] == 1


def test_resume_undoes_a_scheduled_cancellation(app: Flask, owner: Owner, offline_stripe: SandboxAccount) -> None:
    owner.post("/billing/cancel", request_token=TOKEN, when="period_end")
    assert organization(app, owner.organization_id).cancel_at_period_end is True
    page = owner.client.get("/billing/").get_data(as_text=True)
    assert 'id="resume"' in page and 'id="plan-ends"' in page

    other_token = "f" * 32
    assert owner.post("/billing/resume", request_token=other_token).status_code == 303
    [_, (_args, call)] = offline_stripe.calls_to("subscriptions.update")
    assert call["params"] == {"cancel_at_period_end": "false", "cancel_at": "", "metadata": {"downgrade_to": ""}}
    assert call["options"] == {"idempotency_key": f"org-{owner.organization_id}-resume-{other_token}"}
    assert organization(app, owner.organization_id).cancel_at_period_end is False

    updated = stripe_event("customer.subscription.updated", offline_stripe.subscription(owner.subscription_id))
    assert post_and_apply(owner.client, updated).status_code == 200
    events = events_named(app)
    assert events["subscription.cancellation_scheduled"] == 1 and events["subscription.cancellation_withdrawn"] == 1


def test_a_double_submitted_cancel_calls_stripe_once(app: Flask, owner: Owner, offline_stripe: SandboxAccount) -> None:
    first = owner.post("/billing/cancel", request_token=TOKEN, when="period_end")
    second = owner.post("/billing/cancel", request_token=TOKEN, when="period_end")
    assert first.status_code == second.status_code == 303
    assert len(offline_stripe.calls_to("subscriptions.update")) == 1
    assert "already set to end" in owner.client.get("/billing/").get_data(as_text=True)


def test_stripe_failing_leaves_the_organization_as_it_was(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    offline_stripe.fail_next("subscriptions.update")
    owner.post("/billing/cancel", request_token=TOKEN, when="period_end")
    assert organization(app, owner.organization_id).cancel_at_period_end is False
    assert "We could not reach our payment provider." in owner.client.get("/billing/").get_data(as_text=True)


def test_a_canceled_organization_can_subscribe_again(app: Flask, owner: Owner, offline_stripe: SandboxAccount) -> None:
    owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="yes")
    response = owner.post("/billing/resubscribe", request_token="e" * 32, tier="pro")
    session_id = checkout_session_id(response)
    [_signup, (_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    params = call["params"]
    assert params["customer"] == owner.customer_id
    assert params["metadata"] == {"purpose": "resubscribe", "organization_id": str(owner.organization_id)}
    assert params["success_url"] == "http://localhost/billing/checkout-complete?session_id={CHECKOUT_SESSION_ID}"

    session = offline_stripe.pay(session_id)
    back = owner.client.get(f"/billing/checkout-complete?session_id={session_id}")
    assert back.status_code == 303 and back.headers["Location"] == "/billing/"
    row = organization(app, owner.organization_id)
    assert (row.billing_status, row.tier, row.billing_subscription_id) == ("active", "pro", session["subscription"])
    assert owner.client.get("/app").status_code == 200
    completed = stripe_event("checkout.session.completed", session)
    assert post_and_apply(owner.client, completed).status_code == 200
    assert events_named(app)["organization.subscription_replaced"] == 1


def test_the_resubscribe_return_page_says_we_are_confirming_when_stripe_is_down(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    """Issue 21, item 6: Stripe not answering when the owner comes back from paying is a page that
    checks again, not a 500; the webhook (the worker) finishes the resubscription meanwhile."""
    owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="yes")
    session_id = checkout_session_id(owner.post("/billing/resubscribe", request_token="e" * 32, tier="pro"))
    session = offline_stripe.pay(session_id)
    offline_stripe.fail_next("checkout.sessions.retrieve", times=20)
    back = owner.client.get(f"/billing/checkout-complete?session_id={session_id}")
    page = back.get_data(as_text=True)
    assert back.status_code == 202 and 'id="payment-confirming"' in page and "We are confirming your payment" in page
    assert organization(app, owner.organization_id).billing_status == "canceled"
    offline_stripe.http.delete(f"{offline_stripe.url}/_sandbox/faults", timeout=10).raise_for_status()
    assert post_and_apply(owner.client, stripe_event("checkout.session.completed", session)).status_code == 200
    row = organization(app, owner.organization_id)
    assert (row.billing_status, row.tier, row.billing_subscription_id) == ("active", "pro", session["subscription"])


# --- Who may act ----------------------------------------------------------------------------------


def test_only_the_owner_may_change_billing(app: Flask, owner: Owner, offline_stripe: SandboxAccount) -> None:
    add_member(app, owner.organization_id)
    member = app.test_client()
    assert log_in(member, "member@example.com").status_code == 303
    # Members never see billing: no plan, price, invoice or action, and no link to it.
    response = member.get("/billing/")
    page = response.get_data(as_text=True)
    assert response.status_code == 403
    assert "Only your organization's owner can see and change billing." in page
    assert 'id="cancel"' not in page and 'id="plan"' not in page and "Starter" not in page
    assert 'href="/billing/"' not in member.get("/app").get_data(as_text=True)
    for path in ("/billing/plan", "/billing/seats"):
        assert member.get(path).status_code == 403, path
    token = csrf_token(member, "/app")
    for path in (
        "/billing/portal",
        "/billing/cancel",
        "/billing/resume",
        "/billing/resubscribe",
        "/billing/plan/preview",
        "/billing/seats/preview",
        "/billing/change/confirm",
        "/billing/plan/keep",
    ):
        response = member.post(
            path,
            data={"csrf_token": token, "request_token": TOKEN, "when": "now", "tier": "pro", "extra_seats": "9"},
        )
        assert response.status_code == 403, path
    assert offline_stripe.calls_to("subscriptions.cancel") == []
    assert offline_stripe.calls_to("billing_portal.sessions.create") == []


def test_nobody_reaches_another_organizations_subscription(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    intruder = Owner(app, offline_stripe, email="mallory@example.com")
    # Ids in the request are ignored: the action applies to the signed-in owner's own organization.
    intruder.post(
        "/billing/cancel",
        request_token=TOKEN,
        when="now",
        confirmed="yes",
        organization_id=str(owner.organization_id),
        subscription_id=owner.subscription_id,
    )
    [(args, _)] = offline_stripe.calls_to("subscriptions.cancel")
    assert args == (intruder.subscription_id,)
    assert organization(app, owner.organization_id).billing_status == "active"

    # A checkout started by another organization cannot be completed into this one.
    owner.post("/billing/cancel", request_token="d" * 32, when="now", confirmed="yes")
    session_id = checkout_session_id(owner.post("/billing/resubscribe", request_token="c" * 32, tier="pro"))
    offline_stripe.pay(session_id)
    response = intruder.client.get(f"/billing/checkout-complete?session_id={session_id}")
    assert response.status_code == 404
    assert organization(app, intruder.organization_id).billing_subscription_id == intruder.subscription_id


def test_billing_pages_need_a_signed_in_user(client: FlaskClient) -> None:
    for path in ("/billing/", "/app", "/billing/checkout-complete?session_id=cs_test_x"):
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/auth/login"), path


@pytest.mark.parametrize(
    "path", ["/billing/portal", "/billing/cancel", "/billing/resume", "/billing/resubscribe", "/auth/logout"]
)
def test_every_form_needs_its_csrf_token(app: Flask, owner: Owner, offline_stripe: SandboxAccount, path: str) -> None:
    response = owner.client.post(path, data={"request_token": TOKEN, "when": "now", "tier": "pro"})
    assert response.status_code == 400
    assert "This form has expired" in response.get_data(as_text=True)
    assert organization(app, owner.organization_id).billing_status == "active"
    assert owner.client.get("/app").status_code == 200  # still signed in


# --- Access follows billing status ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "past_due_days", "allowed", "words"),
    [
        ("active", None, True, None),
        ("trialing", None, True, None),
        ("past_due", 2, True, "Your last payment failed."),
        ("past_due", 8, False, "the grace period has ended"),
        ("unpaid", None, False, "Your invoices are unpaid."),
        ("paused", None, False, "Your trial ended without a payment method."),
        ("incomplete", None, False, "Your first payment has not gone through yet."),
        ("incomplete_expired", None, False, "Your subscription has ended."),
        ("canceled", None, False, "Your subscription has ended."),
    ],
)
def test_access_follows_billing_status(
    app: Flask, owner: Owner, status: str, past_due_days: int | None, allowed: bool, words: str | None
) -> None:
    since = datetime.now(UTC) - timedelta(days=past_due_days) if past_due_days is not None else None
    set_billing_status(app, owner.organization_id, status, since)
    response = owner.client.get("/app")
    if allowed:
        assert response.status_code == 200
        page = response.get_data(as_text=True)
        assert ('id="grace-banner"' in page) == (words is not None)
        if words:
            assert words in page
    else:
        assert response.status_code == 303 and response.headers["Location"] == "/billing/"
        billing = owner.client.get("/billing/")
        assert billing.status_code == 200 and words in billing.get_data(as_text=True)


def test_the_grace_period_is_configurable(make_app: Any, offline_stripe: SandboxAccount) -> None:
    app = make_app(PAST_DUE_GRACE_DAYS=1)
    owner = Owner(app, offline_stripe)
    set_billing_status(app, owner.organization_id, "past_due", datetime.now(UTC) - timedelta(days=2))
    assert owner.client.get("/app").status_code == 303


def test_a_scheduled_cancellation_can_be_brought_forward(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount
) -> None:
    owner.post("/billing/cancel", request_token=TOKEN, when="period_end")
    page = owner.client.get("/billing/").get_data(as_text=True)
    assert 'id="cancel-now"' in page and 'id="resume"' in page
    owner.post("/billing/cancel", request_token="b" * 32, when="now", confirmed="yes")
    assert len(offline_stripe.calls_to("subscriptions.cancel")) == 1
    assert organization(app, owner.organization_id).billing_status == "canceled"
    page = owner.client.get("/billing/").get_data(as_text=True)
    assert page.count("Your subscription has ended.") == 1  # said once, not flashed again


def test_the_catalogue_prices_are_fetched_from_stripe_with_no_transaction_open(
    app: Flask, owner: Owner, offline_stripe: SandboxAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21, item 8: a page that read the organization before asking for the catalogue's prices
    (the change-plan page) holds no transaction while Stripe answers the price lookup."""
    from app.extensions import cache, db
    from app.services.billing_service import BillingService

    held_during_fetch: list[bool] = []
    real_fetch = BillingService._fetch_prices

    def fetch_and_note(keys: list[str]) -> Any:
        held_during_fetch.append(db.session().in_transaction())
        return real_fetch(keys)

    monkeypatch.setattr(BillingService, "_fetch_prices", staticmethod(fetch_and_note))
    with app.app_context():
        cache.clear()
    page = owner.client.get("/billing/plan")
    assert page.status_code == 200 and "$49.00" in page.get_data(as_text=True)
    assert held_during_fetch == [False]
