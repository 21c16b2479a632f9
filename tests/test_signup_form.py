"""The signup form as a newcomer meets it: choices kept across a canceled checkout, rate-limit answers
that say how long and keep what was typed, and Whop's restrictions stated before they are hit."""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask

from config import BaseConfig, DevelopmentConfig, ProductionConfig
from tests.conftest import SandboxAccount, checkout_session_id, csrf_token, query, signup_form, start_signup


def checked(page: str, name: str) -> list[str]:
    """The values of the checked radio inputs called `name`."""
    return [
        re.search(r'value="([^"]*)"', tag).group(1)  # type: ignore[union-attr]
        for tag in re.findall(r"<input[^>]*>", page)
        if f'name="{name}"' in tag and " checked" in tag
    ]


def test_cancel_and_return_keeps_tier_interval_add_ons_and_provider(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    checkout_session_id(start_signup(client, tier="pro", interval="year", addon_extra_seats="3"))
    page = client.get("/auth/signup?checkout=canceled").get_data(as_text=True)
    assert "Checkout was canceled and nothing was charged." in page
    assert checked(page, "tier") == ["pro"]
    assert checked(page, "interval") == ["year"]
    assert re.search(r'<input[^>]*name="addon_extra_seats"[^>]*value="3"', page), page
    # Another browser's choices are not this one's.
    other = app.test_client()
    checkout_session_id(start_signup(other, email="grace@example.com", tier="starter", addon_extra_seats="0"))
    assert checked(other.get("/auth/signup?checkout=canceled").get_data(as_text=True), "interval") == ["month"]


def test_cancel_and_return_after_paying_says_it_was_paid_and_where_to_go(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    """Pay, press Back to the completed checkout, follow "Cancel and return": never "nothing was charged"."""
    # Paid, the success page not reached yet: the cancel return sends the browser to it, which makes the
    # account and signs this browser in.
    client = app.test_client()
    session_id = checkout_session_id(start_signup(client))
    offline_stripe.pay(session_id)
    response = client.get("/auth/signup?checkout=canceled")
    assert response.status_code == 303, response.get_data(as_text=True)
    assert response.headers["Location"] == f"/billing/complete-signup-from-stripe?session_id={session_id}"
    landed = client.get(response.headers["Location"], follow_redirects=True).get_data(as_text=True)
    assert "This checkout was already completed, so nothing was canceled." in landed
    assert "nothing was charged" not in landed
    assert 'id="organization-name">Analytical Engines<' in landed

    # Signed in as its owner, Back and "Cancel and return" again: paid, and the billing page says what.
    response = client.get("/auth/signup?checkout=canceled")
    assert (response.status_code, response.headers["Location"]) == (303, "/billing/")
    page = client.get("/billing/").get_data(as_text=True)
    assert "This checkout was already paid, so nothing was canceled: Analytical Engines is subscribed." in page
    assert "nothing was charged" not in page

    # Another browser paid, and the webhook made the account before it came back: the success page signs
    # it in (it started the signup), saying nothing was canceled.
    other = app.test_client()
    other_session = checkout_session_id(start_signup(other, email="grace@example.com"))
    offline_stripe.pay(other_session)
    offline_stripe.deliver(other)
    assert len(query(app, "SELECT id FROM organization")) == 2
    response = other.get("/auth/signup?checkout=canceled", follow_redirects=True)
    page = response.get_data(as_text=True)
    assert response.request.path == "/app", page
    assert "This checkout was already completed, so nothing was canceled." in page
    assert "grace@example.com, owner" in page


def test_a_rate_limited_signup_says_how_long_to_wait_and_keeps_the_typed_form(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app(SIGNUP_RATE_LIMIT_PER_CLIENT="2/minute")
    client = app.test_client()
    typed = {"tier": "pro", "interval": "year", "addon_extra_seats": "4", "organization_name": "Difference Engines"}
    statuses = [client.post("/auth/signup", data=signup_form(client, password="short", **typed)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [422, 422, 429]
    page = statuses[-1].get_data(as_text=True)
    wait = re.search(r"Too many attempts from you in a short time\. Try again in (\d+) (seconds?|minutes?)\.", page)
    assert wait, page
    assert 'id="signup-form"' in page  # the form itself, not an error page
    assert 'value="Difference Engines"' in page and 'value="Ada@Example.COM"' in page
    assert checked(page, "tier") == ["pro"] and checked(page, "interval") == ["year"]
    assert re.search(r'<input[^>]*name="addon_extra_seats"[^>]*value="4"', page)
    assert "short" not in re.findall(r'<input[^>]*type="password"[^>]*>', page)[0]


def test_a_rate_limited_sign_in_keeps_the_email_and_says_how_long(make_app: Callable[..., Flask]) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_CLIENT="2/minute")
    client = app.test_client()
    token = csrf_token(client, "/auth/login")
    answers = [
        client.post("/auth/login", data={"csrf_token": token, "email": "ada@example.com", "password": "nope nope"})
        for _ in range(3)
    ]
    assert [r.status_code for r in answers] == [401, 401, 429]
    page = answers[-1].get_data(as_text=True)
    assert re.search(r"Try again in \d+ (seconds?|minutes?)\.", page) and 'value="ada@example.com"' in page


def test_development_limits_are_never_met_clicking_around_and_production_keeps_its_own() -> None:
    development = DevelopmentConfig({"APP_INSTANCE_DIR": "/nonexistent"})
    production = ProductionConfig({})
    assert production.SIGNUP_RATE_LIMIT_PER_CLIENT == "20/hour;5/minute"
    assert production.LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT == "10/hour;5/minute"
    assert production.EMAIL_VERIFICATION_RATE_LIMIT == "3/hour"
    for name in BaseConfig.RATE_LIMIT_DEFAULTS:
        assert getattr(development, name) == "1000/hour;200/minute", name
    # The environment still decides when it says something.
    assert DevelopmentConfig({"SIGNUP_RATE_LIMIT_PER_CLIENT": "1/minute"}).SIGNUP_RATE_LIMIT_PER_CLIENT == "1/minute"


def test_on_the_embedded_default_twenty_corrections_in_a_minute_are_not_limited(sqlite_app: Flask) -> None:
    client = sqlite_app.test_client()
    statuses = {client.post("/auth/signup", data=signup_form(client, password="short")).status_code for _ in range(20)}
    assert statuses == {422}


WHOP_SETTINGS = {
    "WHOP_API_KEY": "apik_signup_form_suite",
    "WHOP_WEBHOOK_SECRET": "ws_signup_form_suite",
    "WHOP_COMPANY_ID": "biz_signup_form_suite",
    # Nothing answers here: these tests never get as far as asking Whop.
    "WHOP_API_BASE": "http://127.0.0.1:9/whop/api/v1",
}


def inputs(page: str, name: str) -> dict[str, str]:
    """Each input called `name`, by its value (or its name for a number field), as rendered."""
    found = {}
    for tag in re.findall(r"<input[^>]*>", page):
        if f'name="{name}"' in tag:
            value = re.search(r'value="([^"]*)"', tag)
            found[value.group(1) if value and 'type="radio"' in tag else name] = tag
    return found


def test_whops_restrictions_are_said_before_the_plans_and_what_it_cannot_sell_is_disabled(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app(**WHOP_SETTINGS)
    client = app.test_client()
    page = client.get("/auth/signup").get_data(as_text=True)
    restrictions = re.search(r'<p class="hint" id="whop-restrictions">(.*?)</p>', page, re.S)
    assert restrictions, page
    words = " ".join(restrictions.group(1).split())
    assert "Whop sells only Starter and Pro, billed monthly, without add-ons" in words
    assert page.index('id="whop-restrictions"') < page.index('id="interval-choice"') < page.index('id="plan-starter"')
    assert '<script src="/static/signup.js" defer></script>' in page
    assert client.get("/static/signup.js").status_code == 200
    # Paying by card: nothing is disabled; what Whop cannot sell is marked for the script.
    assert not any("disabled" in tag for tag in inputs(page, "tier").values())
    assert 'data-whop="0"' in inputs(page, "interval")["year"] and 'data-whop="0"' in inputs(page, "tier")["business"]

    # A Whop signup sent back (here: a short password) comes back with Whop's impossible choices off.
    form = signup_form(client, payment_provider="whop", tier="pro", addon_extra_seats="0", password="short")
    again = client.post("/auth/signup", data=form)
    assert again.status_code == 422
    page = again.get_data(as_text=True)
    assert "disabled" in inputs(page, "interval")["year"] and "disabled" not in inputs(page, "interval")["month"]
    assert "disabled" in inputs(page, "tier")["business"] and "disabled" not in inputs(page, "tier")["pro"]
    assert "disabled" in inputs(page, "addon_extra_seats")["addon_extra_seats"]

    # The server still refuses what the page disables, for a browser without the script.
    for fields, error in (
        ({"interval": "year"}, "Whop plans are billed monthly"),
        ({"addon_extra_seats": "2"}, "Add-ons can only be bought with card payment"),
        ({"tier": "business"}, "cannot be paid through Whop"),
    ):
        form = signup_form(client, **{"payment_provider": "whop", "tier": "pro", "addon_extra_seats": "0", **fields})
        refused = client.post("/auth/signup", data=form)
        assert refused.status_code == 422 and error in refused.get_data(as_text=True), fields
