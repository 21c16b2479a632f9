"""The signup form as a newcomer meets it: choices kept across a canceled checkout, rate-limit answers
that say how long and keep what was typed, and Whop's restrictions stated before they are hit."""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask

from config import BaseConfig, DevelopmentConfig, ProductionConfig
from tests.conftest import SandboxAccount, checkout_session_id, csrf_token, signup_form, start_signup


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
