"""What the owner reads: counts in the right number, plain words for what happens, the audit log in
sentences with names and times, and a resubscribe offer that says what it costs."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.services.wording import counted
from tests.conftest import SandboxAccount, csrf_token, email_confirmation_path, sign_up

TOKEN = "f" * 32


class Owner:
    def __init__(self, app: Flask, stripe_api: SandboxAccount, **fields: Any) -> None:
        self.client: FlaskClient = app.test_client()
        sign_up(self.client, stripe_api, **fields)
        assert self.client.get(email_confirmation_path(app, "ada@example.com")).status_code == 303

    def post(self, path: str, **fields: Any) -> Any:
        return self.client.post(path, data={"csrf_token": csrf_token(self.client, "/billing/"), **fields})

    def page(self, path: str) -> str:
        return html.unescape(self.client.get(path).get_data(as_text=True))


def text_of(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.S)
    assert match, f"no #{element_id}"
    return " ".join(match.group(1).split())


def test_counted_says_one_thing_or_many() -> None:
    assert counted(1, "extra seat") == "1 extra seat"
    assert counted(0, "extra seat") == "0 extra seats"
    assert counted(3, "member") == "3 members"
    assert counted(2, "person", "people") == "2 people"


def test_seat_counts_are_in_the_right_number(app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = Owner(app, offline_stripe, addon_extra_seats="2")
    page = owner.page("/billing/seats")
    assert "Your plan includes 5 seats; 1 is in use." in " ".join(page.split())
    assert "1 are in use" not in page
    preview = html.unescape(owner.post("/billing/seats/preview", extra_seats="1").get_data(as_text=True))
    assert text_of(preview, "preview-plan") == "Starter, billed monthly, 1 extra seat"


def test_a_scheduled_downgrade_is_explained_in_plain_words(app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = Owner(app, offline_stripe, tier="business", addon_extra_seats="0")
    response = owner.post("/billing/plan/preview", tier="starter", interval="month")
    preview = html.unescape(response.get_data(as_text=True))
    found = re.search(r'id="preview-when">(.*?)</dd>', preview, re.S)
    assert found, preview
    when = " ".join(found.group(1).split())
    assert when.startswith("At the end of the current billing period, on ")
    assert "your plan switches by itself. Until then nothing changes" in when
    assert "subscription schedule" not in preview and "payment provider" not in when


def test_the_resubscribe_offer_shows_each_plans_price_and_interval(app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = Owner(app, offline_stripe)
    assert owner.post("/billing/cancel", request_token=TOKEN, when="now", confirmed="yes").status_code == 303
    page = owner.page("/billing/")
    assert 'id="resubscribe"' in page
    assert text_of(page, "resubscribe-price-starter") == "$19.00 / month"
    assert re.fullmatch(r"\$\d+\.\d\d / month", text_of(page, "resubscribe-price-pro"))
    assert "Billed monthly from the day you pay." in text_of(page, "resubscribe-terms")


@pytest.fixture
def business_owner(app: Flask, offline_stripe: SandboxAccount) -> Owner:
    return Owner(app, offline_stripe, tier="business", addon_extra_seats="0")


def test_the_audit_log_reads_as_sentences_with_names_and_times(
    app: Flask, business_owner: Owner, offline_stripe: SandboxAccount
) -> None:
    owner = business_owner
    invited = owner.client.post(
        "/team/invite", data={"csrf_token": csrf_token(owner.client, "/team/"), "email": "grace@example.com"}
    )
    assert invited.status_code == 303
    assert owner.post("/billing/cancel", request_token=TOKEN, when="period_end").status_code == 303
    page = owner.page("/app/audit-log")
    rows = [
        [" ".join(cell.split()) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r'<tr class="audit-entry">(.*?)</tr>', page, re.S)
    ]
    what = {row[1]: row for row in rows}
    ada = "Ada Lovelace (ada@example.com)"
    assert "Organization Analytical Engines created on the Business plan" in what
    assert what["grace@example.com invited to join"][2] == ada
    assert what["Ada Lovelace (ada@example.com) confirmed their email address"][2] == ada
    cancel = next(row for row in rows if row[1].startswith("Cancellation scheduled: the plan ends on "))
    assert cancel[2] == ada
    for when, _, by in rows:
        assert re.fullmatch(r'<time datetime="[^"]+">\d{1,2} \w+ \d{4}, \d\d:\d\d UTC</time>', when), when
        assert by
    # No machine keys or raw sources are shown.
    assert "organization.created" not in page and "team.invitation_sent" not in page
    assert not re.search(r">\s*user:\d+\s*<", page) and "stripe:evt_" not in page
