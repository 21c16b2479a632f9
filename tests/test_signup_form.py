"""The signup form as a newcomer meets it: choices kept across a canceled checkout, rate-limit answers
that say how long and keep what was typed, and Whop's restrictions stated before they are hit."""

from __future__ import annotations

import re

from flask import Flask

from tests.conftest import SandboxAccount, checkout_session_id, start_signup


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
