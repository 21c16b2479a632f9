"""Plan and seat changes with a preview and a confirmation, and the owner's billing page reads, against
the offline Stripe sandbox (sandbox/) reached with the real SDK over HTTP: upgrades at once with the
preview's proration date, downgrades on a subscription schedule, seat changes, stale previews refused
with a fresh one, double submits and two tabs making one change at Stripe."""

from __future__ import annotations

import html
import re
import threading
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import TEST_USER_AGENT, SandboxAccount, csrf_token, query, run_jobs, sign_up


class Stack:
    """The app (its test client for the owner's browser) and the sandbox it calls as Stripe."""

    def __init__(self, app: Flask, stripe_api: SandboxAccount) -> None:
        self.app = app
        self.stripe_api = stripe_api

    def stripe(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        return self.stripe_api.api(method, f"/v1{path}", params)

    def requests_to(self, method: str, path_pattern: str) -> list[dict[str, Any]]:
        """The app's /v1 requests since the test began, by method and path (a regular expression)."""
        return [
            made
            for made in self.stripe_api.requests_made()
            if made["user_agent"] != TEST_USER_AGENT
            and made["method"] == method
            and re.fullmatch(path_pattern, made["path"])
        ]

    def sign_up(self, tier: str = "starter", extra_seats: int = 2) -> Owner:
        client = self.app.test_client()
        session = sign_up(client, self.stripe_api, tier=tier, addon_extra_seats=str(extra_seats))
        [row] = query(
            self.app, "SELECT * FROM organization WHERE billing_subscription_id = :s", s=session["subscription"]
        )
        return Owner(self, client, row.id, row.billing_subscription_id)


class Owner:
    def __init__(self, stack: Stack, client: FlaskClient, organization_id: int, subscription_id: str) -> None:
        self.stack, self.client = stack, client
        self.organization_id, self.subscription_id = organization_id, subscription_id

    def post(self, path: str, **fields: Any) -> Any:
        return self.client.post(path, data={"csrf_token": csrf_token(self.client, "/billing/"), **fields})

    def preview_plan(self, tier: str, interval: str = "month") -> tuple[Any, str]:
        response = self.post("/billing/plan/preview", tier=tier, interval=interval)
        return response, ticket_of(response)

    def preview_seats(self, extra_seats: int) -> tuple[Any, str]:
        response = self.post("/billing/seats/preview", extra_seats=str(extra_seats))
        return response, ticket_of(response)

    def confirm(self, ticket: str) -> Any:
        return self.post("/billing/change/confirm", ticket=ticket)

    def subscription(self) -> dict[str, Any]:
        return self.stack.stripe("GET", f"/subscriptions/{self.subscription_id}")

    def items(self) -> dict[str, int]:
        """The subscription's licensed items at Stripe: lookup key -> quantity (metered_items(): the others)."""
        items = self.subscription()["items"]["data"]
        return {item["price"]["lookup_key"]: item["quantity"] for item in items if item["quantity"] is not None}

    def metered_items(self) -> list[str]:
        """The metered items' lookup keys (they carry no quantity: Stripe bills them from the meter)."""
        items = self.subscription()["items"]["data"]
        return [item["price"]["lookup_key"] for item in items if item["quantity"] is None]

    def updates(self) -> list[dict[str, Any]]:
        return self.stack.requests_to("POST", f"/v1/subscriptions/{self.subscription_id}")


def ticket_of(response: Any) -> str:
    page = response.get_data(as_text=True)
    match = re.search(r'name="ticket" type="hidden" value="([^"]+)"', page) or re.search(
        r'id="ticket" name="ticket" type="hidden" value="([^"]+)"', page
    )
    return html.unescape(match.group(1)) if match else ""


def amount(page: str, element: str) -> int:
    match = re.search(rf'id="{element}" data-amount="(-?\d+)"', page)
    assert match, page
    return int(match.group(1))


def flashes(client: FlaskClient) -> str:
    return html.unescape(client.get("/billing/").get_data(as_text=True))


@pytest.fixture
def stack(app: Flask, offline_stripe: SandboxAccount) -> Stack:
    return Stack(app, offline_stripe)


def test_an_upgrade_is_previewed_then_made_at_once_with_the_previews_proration_date(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    assert owner.client.get("/billing/plan").status_code == 200
    response, ticket = owner.preview_plan("business")
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == 200 and ticket, page
    assert "At once, when you confirm." in page
    today = amount(page, "preview-today")
    prices = stack.app.extensions["plan_catalogue"]
    assert 0 < today <= 9900 - 1900  # the rest of this period at the difference, prorated
    assert amount(page, "preview-recurring") == 9900 + 2 * 500
    assert "is charged today" in page and "$109.00 / month" in page

    confirmed = owner.confirm(ticket)
    assert confirmed.status_code == 303 and confirmed.headers["Location"] == "/billing/"
    assert "Your subscription is changed." in flashes(owner.client)
    # At Stripe: the same items, the tier's on the new price, and the proration date of the preview.
    assert owner.items() == {"business_monthly": 1, "extra_seat_monthly": 2}
    assert owner.metered_items() == ["api_calls_overage"]  # the metered item is kept (monthly, as the plan)
    [update] = owner.updates()
    change_previews = [
        r["params"]
        for r in stack.requests_to("POST", "/v1/invoices/create_preview")
        if "subscription_details" in r["params"]
    ]
    preview_call = change_previews[-1]
    assert update["params"]["proration_date"] == preview_call["subscription_details"]["proration_date"]
    assert update["params"]["proration_behavior"] == "always_invoice"
    assert update["idempotency_key"].startswith(f"org-{owner.organization_id}-change-")
    # The invoice Stripe made charges what the preview said.
    invoice = stack.stripe("GET", f"/invoices/{owner.subscription()['latest_invoice']}")
    assert invoice["amount_due"] == today
    # The organization follows Stripe's answer at once.
    [row] = query(stack.app, "SELECT tier FROM organization")
    assert row.tier == "business"
    assert prices.tiers["business"].features and owner.client.get("/app/audit-log").status_code == 200
    events = [r.name for r in query(stack.app, "SELECT name FROM domain_event")]
    assert "subscription.changed" in events and "organization.plan_changed" in events


def test_a_downgrade_is_scheduled_for_the_end_of_the_period_and_can_be_withdrawn(stack: Stack) -> None:
    owner = stack.sign_up("business", extra_seats=1)
    response, ticket = owner.preview_plan("starter")
    page = html.unescape(response.get_data(as_text=True))
    assert "At the end of the current billing period" in page and "your plan switches by itself" in page
    assert amount(page, "preview-today") == 0 and "Nothing is charged today." in page
    assert amount(page, "preview-recurring") == 1900 + 500

    assert owner.confirm(ticket).status_code == 303
    assert "Your plan will change at the end of the billing period." in flashes(owner.client)
    subscription = owner.subscription()
    assert owner.items() == {"business_monthly": 1, "extra_seat_monthly": 1}  # nothing changes before then
    assert subscription["schedule"], subscription
    schedule = stack.stripe("GET", f"/subscription_schedules/{subscription['schedule']}")
    starter = stack.stripe_api.price("starter_monthly")
    assert next(item["price"] for item in schedule["phases"][1]["items"]) == starter["id"]
    assert schedule["phases"][0]["end_date"] == schedule["phases"][1]["start_date"]
    assert schedule["end_behavior"] == "release"
    assert query(stack.app, "SELECT tier FROM organization")[0].tier == "business"

    page = flashes(owner.client)
    assert 'id="scheduled-change"' in page and "Starter (monthly)" in page
    # The next invoice shown is what the renewal will charge: the new plan (Stripe's preview of the
    # schedule), not the current one.
    assert re.search(r'id="next-invoice">\s*\$24\.00 on ', page), page
    schedule_previews = [r["params"] for r in stack.requests_to("POST", "/v1/invoices/create_preview")]
    assert {"schedule": subscription["schedule"]} in schedule_previews, schedule_previews
    assert owner.post("/billing/plan/keep").status_code == 303
    assert "the scheduled change is withdrawn" in flashes(owner.client)
    released = stack.stripe("GET", f"/subscription_schedules/{subscription['schedule']}")
    assert released["status"] == "released" and not owner.subscription()["schedule"]
    assert 'id="scheduled-change"' not in flashes(owner.client)


def test_seats_are_bought_at_once_and_never_below_the_members(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=0)
    assert "Extra seats" in owner.client.get("/billing/seats?add=1").get_data(as_text=True)
    response, ticket = owner.preview_seats(3)
    page = html.unescape(response.get_data(as_text=True))
    assert "At once" in page and amount(page, "preview-recurring") == 1900 + 3 * 500
    assert 0 < amount(page, "preview-today") <= 3 * 500
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 3}
    assert [(r.addon_key, r.quantity) for r in query(stack.app, "SELECT * FROM organization_addon")] == [
        ("extra_seats", 3)
    ]
    assert "8 in use of" not in flashes(owner.client) and "1 in use of 8" in flashes(owner.client)

    # With seven members, the seats cannot drop below two extra.
    from sqlalchemy import text

    from app.extensions import db

    with stack.app.app_context():
        for index in range(6):
            db.session.execute(
                text(
                    "INSERT INTO user_account (organization_id, email, name, password_hash, role, created_at) "
                    "VALUES (:o, :e, 'Member', 'x', 'member', now())"
                ),
                {"o": owner.organization_id, "e": f"m{index}@example.com"},
            )
        db.session.commit()
    refused = owner.post("/billing/seats/preview", extra_seats="1")
    assert refused.status_code == 303
    assert "7 members: keep at least 2 extra seats" in flashes(owner.client)
    response, ticket = owner.preview_seats(2)
    assert amount(html.unescape(response.get_data(as_text=True)), "preview-today") < 0  # a credit
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 2}


def test_a_stale_preview_is_refused_and_a_fresh_one_offered(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    _, upgrade_ticket = owner.preview_plan("pro")
    # A second tab changes the seats first.
    _, seats_ticket = owner.preview_seats(4)
    assert owner.confirm(seats_ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 4}

    stale = owner.confirm(upgrade_ticket)
    page = html.unescape(stale.get_data(as_text=True))
    assert stale.status_code == 409 and 'id="stale-preview"' in page
    assert "Your subscription changed since this preview. Nothing was changed." in page
    assert amount(page, "preview-recurring") == 4900 + 4 * 500  # the fresh preview counts the new seats
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 4}
    assert len(owner.updates()) == 1
    fresh_ticket = ticket_of(stale)
    assert fresh_ticket and fresh_ticket != upgrade_ticket
    assert owner.confirm(fresh_ticket).status_code == 303
    assert owner.items() == {"pro_monthly": 1, "extra_seat_monthly": 4}
    statuses = [r.status for r in query(stack.app, "SELECT status FROM subscription_change ORDER BY id")]
    assert statuses == ["applied", "refused", "applied"]


def test_a_price_that_moved_since_the_preview_makes_it_stale(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    _, ticket = owner.preview_plan("business")
    old = stack.stripe_api.price("business_monthly")
    new = stack.stripe(
        "POST",
        "/prices",
        currency="usd",
        unit_amount=12900,
        product=old["product"],
        lookup_key="business_monthly",
        transfer_lookup_key=True,
        recurring={"interval": "month"},
        tax_behavior=old["tax_behavior"],
    )
    try:
        stale = owner.confirm(ticket)
    finally:  # the sandbox serves the whole session: the catalogue goes back as it was
        stack.stripe_api.force(new["id"], active=False, lookup_key=None)
        stack.stripe_api.force(old["id"], active=True, lookup_key="business_monthly")
    page = html.unescape(stale.get_data(as_text=True))
    assert stale.status_code == 409 and "A price changed since this preview." in page
    assert amount(page, "preview-recurring") == 12900 + 2 * 500
    assert owner.updates() == [] and owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 2}


def test_double_submits_and_two_tabs_make_one_change_at_stripe(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    _, ticket = owner.preview_plan("pro")
    token = csrf_token(owner.client, "/billing/")
    results: list[int] = []

    def submit() -> None:
        results.append(
            owner.client.post("/billing/change/confirm", data={"csrf_token": token, "ticket": ticket}).status_code
        )

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [303] * 4
    # Submitted again later, from the same page (the browser's back button):
    assert owner.confirm(ticket).status_code == 303
    assert "This change was already made." in flashes(owner.client)
    assert owner.items() == {"pro_monthly": 1, "extra_seat_monthly": 2}
    updates = owner.updates()
    assert len({u["idempotency_key"] for u in updates}) == 1  # any retry reused the one key
    assert len(query(stack.app, "SELECT id FROM subscription_change")) == 1


def arm_fault(stack: Stack, path_regex: str, kind: str = "connection", times: int = 10) -> None:
    response = stack.stripe_api.http.post(
        f"{stack.stripe_api.url}/_sandbox/faults",
        json={"path_regex": path_regex, "kind": kind, "times": times},
        timeout=10,
    )
    assert response.status_code == 201, response.text


def test_the_billing_page_shows_stripes_figures_cached_briefly_and_survives_stripe_failing(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    page = flashes(owner.client)
    assert 'id="billing-unavailable"' not in page, page
    assert re.search(r'id="payment-method">\s*Visa ending in 4242, expires 12/2034', page), page
    # The invoice history: the signup's paid invoice, with Stripe's hosted page and PDF.
    invoice = stack.stripe("GET", f"/invoices/{owner.subscription()['latest_invoice']}")
    row = re.search(rf'<tr class="invoice" data-invoice="{invoice["id"]}">(.*?)</tr>', page, re.S)
    assert row, page
    assert "$29.00" in row.group(1) and ">paid<" in row.group(1)
    assert f'href="{invoice["hosted_invoice_url"]}"' in row.group(
        1
    ) and f'href="{invoice["invoice_pdf"]}"' in row.group(1)
    assert invoice["number"] and invoice["number"] in row.group(1)
    assert re.search(r'id="plan-price">\s*<span class="price-line">\$19\.00 / month</span>', page), page
    assert "2 × $5.00 / month" in page
    assert re.search(r'id="next-invoice">\s*\$29\.00 on ', page), page
    assert re.search(r'id="seats">1 in use of 7 \(5 included \+ 2 extra\)', page), page
    # Read once, then served from the cache for BILLING_READ_CACHE_SECONDS.
    upcoming = [
        r
        for r in stack.requests_to("POST", "/v1/invoices/create_preview")
        if not r["params"].get("subscription_details")
    ]
    flashes(owner.client)
    again = [
        r
        for r in stack.requests_to("POST", "/v1/invoices/create_preview")
        if not r["params"].get("subscription_details")
    ]
    assert len(upcoming) == len(again) == 1

    # Stripe stops answering: the page still loads, shows what the organization holds, says what is missing.
    with stack.app.app_context():
        from app.services.billing_service import BillingService

        BillingService.forget_billing_reads(owner.organization_id)
    arm_fault(stack, r"/v1/(subscriptions/.*|invoices.*|customers/.*|payment_methods/.*)")
    response = owner.client.get("/billing/")
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == 200
    assert 'id="plan">Starter<' in page and 'id="billing-status">Active<' in page
    assert 'id="billing-unavailable"' in page and "the next invoice" in page and "the plan's price" in page
    assert re.search(r'id="next-invoice">\s*Not available right now', page), page
    assert 'id="plan-price"' not in page
    # The failure is remembered for BILLING_READ_FAILURE_SECONDS: the next view does not wait on Stripe.
    seen = len(stack.requests_to("POST", "/v1/invoices/create_preview"))
    assert owner.client.get("/billing/").status_code == 200
    assert len(stack.requests_to("POST", "/v1/invoices/create_preview")) == seen


def test_a_slow_stripe_costs_the_billing_page_its_details_not_the_page(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    stack.app.config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"] = 0.3
    stack.app.extensions.pop("stripe_read_client", None)
    stack.stripe_api.set_latency(2)
    try:
        page = html.unescape(owner.client.get("/billing/").get_data(as_text=True))
    finally:
        stack.stripe_api.set_latency(0)
    assert 'id="plan">Starter<' in page and 'id="billing-unavailable"' in page
    assert re.search(r'id="next-invoice">\s*Not available right now', page), page


def organization_row(stack: Stack) -> Any:
    [row] = query(stack.app, "SELECT * FROM organization")
    return row


def addons(stack: Stack) -> dict[str, int]:
    return {r.addon_key: r.quantity for r in query(stack.app, "SELECT * FROM organization_addon")}


@pytest.mark.parametrize(
    ("card", "why", "paid_with"),
    [
        ("pm_card_chargeCustomerFail", "Your card was declined.", "4242424242424242"),
        # The same card, on the hosted page, where the customer completes 3-D Secure.
        (
            "pm_card_authenticationRequired",
            "Your bank asks you to confirm this payment (3-D Secure).",
            "4000002760003184",
        ),
    ],
)
def test_an_upgrade_is_granted_only_once_paid_and_the_owner_is_told_why_and_where_to_pay(
    stack: Stack, card: str, why: str, paid_with: str
) -> None:
    """pending_if_incomplete: a declined or 3-D Secure upgrade payment changes nothing at Stripe or
    here; the owner is told why and given the invoice; paying it makes the change (by webhook)."""
    owner = stack.sign_up("starter", extra_seats=0)
    stack.stripe("POST", f"/subscriptions/{owner.subscription_id}", default_payment_method=card)

    _, ticket = owner.preview_plan("pro")
    assert owner.confirm(ticket).status_code == 303
    subscription = owner.subscription()
    invoice = stack.stripe("GET", f"/invoices/{subscription['latest_invoice']}")
    assert invoice["status"] == "open" and invoice["amount_due"] > 0
    # Nothing is granted: Stripe keeps the old items (the change waits in pending_update), and so do we.
    assert owner.items() == {"starter_monthly": 1}
    assert subscription["status"] == "active" and subscription["pending_update"]
    pending_items = [i["price"]["lookup_key"] for i in subscription["pending_update"]["subscription_items"]]
    assert pending_items == ["pro_monthly", "api_calls_overage"]
    assert (organization_row(stack).tier, organization_row(stack).billing_status) == ("starter", "active")
    [update] = owner.updates()
    assert update["params"]["payment_behavior"] == "pending_if_incomplete"
    page = flashes(owner.client)
    assert f"The payment for this change did not go through: {why}" in page
    assert "Your plan stays as it was until the invoice is paid" in page
    assert f'href="{invoice["hosted_invoice_url"]}" id="payment-action-link"' in page
    assert 'id="plan">Starter<' in page
    # Every later visit says so too, with the invoice to pay, until it is paid or lapses.
    again = owner.client.get("/billing/").get_data(as_text=True)
    assert 'id="pending-payment"' in again and "waits for its payment" in again
    assert f'href="{invoice["hosted_invoice_url"]}" id="pending-payment-link"' in again
    [(event,)] = query(stack.app, "SELECT data FROM domain_event WHERE name = 'subscription.change_awaiting_payment'")
    assert event["payment_problem"] == why and event["tier"] == "pro"

    # Another change meanwhile is refused with the reason (Stripe would refuse it too).
    assert owner.post("/billing/seats/preview", extra_seats="1").status_code == 303
    assert "Your last change is waiting for its payment" in flashes(owner.client)

    # The owner pays on the hosted invoice page (authenticating, for 3-D Secure): Stripe makes the
    # change and its webhook brings the new plan here.
    stack.stripe_api.pay_invoice_page(invoice["hosted_invoice_url"], paid_with)
    assert owner.items() == {"pro_monthly": 1} and not owner.subscription()["pending_update"]
    stack.stripe_api.deliver(owner.client)
    run_jobs(stack.app)
    assert (organization_row(stack).tier, organization_row(stack).billing_status) == ("pro", "active")
    paid_page = flashes(owner.client)
    assert 'id="plan">Pro<' in paid_page and 'id="pending-payment"' not in paid_page


def test_a_seat_purchase_whose_payment_fails_grants_no_seat(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=1)
    stack.stripe("POST", f"/subscriptions/{owner.subscription_id}", default_payment_method="pm_card_chargeCustomerFail")
    _, ticket = owner.preview_seats(4)
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 1}
    assert addons(stack) == {"extra_seats": 1}
    assert "did not go through: Your card was declined." in flashes(owner.client)


def test_a_scheduled_downgrade_takes_effect_when_the_period_ends(make_app: Any, offline_stripe: SandboxAccount) -> None:
    """On the customer's Stripe test clock: the downgrade waits for the renewal, which bills the new plan."""
    app = make_app(STRIPE_TEST_CLOCKS=True)
    stack = Stack(app, offline_stripe)
    owner = stack.sign_up("business", extra_seats=1)
    _, ticket = owner.preview_plan("starter")
    assert owner.confirm(ticket).status_code == 303
    subscription = owner.subscription()
    period_end = subscription["items"]["data"][0]["current_period_end"]
    clock_id = stack.stripe("GET", f"/customers/{subscription['customer']}")["test_clock"]
    assert clock_id

    offline_stripe.advance_clock(clock_id, period_end + 2 * 3600)
    delivered = offline_stripe.deliver(owner.client)
    assert all(status == 200 for _, status in delivered), delivered
    run_jobs(app)
    renewed = owner.subscription()
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 1}
    renewal = stack.stripe("GET", f"/invoices/{renewed['latest_invoice']}")
    assert renewal["amount_due"] == 1900 + 500 and renewal["status"] == "paid"
    [row] = query(app, "SELECT tier FROM organization")
    assert row.tier == "starter"
    assert "organization.plan_changed" in {r.name for r in query(app, "SELECT name FROM domain_event")}
    assert 'id="scheduled-change"' not in flashes(owner.client)


def test_switching_to_yearly_billing_moves_every_item_to_its_yearly_price(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    response, ticket = owner.preview_plan("business", interval="year")
    page = html.unescape(response.get_data(as_text=True))
    assert "At once" in page and amount(page, "preview-recurring") == 99000 + 2 * 5000
    assert "$1,090.00 / year" in page
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"business_yearly": 1, "extra_seat_yearly": 2}
    assert owner.metered_items() == []  # the monthly metered price leaves a yearly subscription
    assert query(stack.app, "SELECT tier FROM organization")[0].tier == "business"
    assert re.search(r"\$990\.00 / year", flashes(owner.client))


def test_bad_change_requests_get_a_clear_answer_and_change_nothing(stack: Stack) -> None:
    owner = stack.sign_up("starter", extra_seats=2)
    for fields, words in (
        ({"extra_seats": "-1"}, "a whole number of at least 0"),
        ({"extra_seats": "many"}, "a whole number of at least 0"),
        ({"extra_seats": "51"}, "Extra seats: choose between 0 and 50."),
        ({"extra_seats": "2"}, "That is the plan you already have."),
    ):
        response = owner.post("/billing/seats/preview", **fields)
        assert response.status_code == 303, fields
        assert words in flashes(owner.client), fields
    for fields in ({"tier": "platinum", "interval": "month"}, {"tier": "pro", "interval": "fortnight"}, {}):
        assert owner.post("/billing/plan/preview", **fields).status_code == 303
        assert "Choose a plan and how often to pay." in flashes(owner.client)
    _, ticket = owner.preview_plan("pro")
    for forged in ("", "not-a-ticket", ticket[:-4] + "AAAA", ticket.replace(".", "x", 1)):
        response = owner.confirm(forged)
        assert response.status_code == 400, forged
    assert owner.updates() == [] and owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 2}
    assert query(stack.app, "SELECT id FROM subscription_change") == []


def test_seats_cannot_silently_withdraw_a_scheduled_downgrade(stack: Stack) -> None:
    """Issue 21, item 2: while a downgrade waits for the period's end, a seat change is refused with the
    reason and the way forward (at preview, and at confirm for a preview made before the schedule, in
    another tab); the schedule stays. A plan change made now says in its preview that it replaces it."""
    owner = stack.sign_up("starter", extra_seats=1)
    _, early_seats_ticket = owner.preview_seats(3)  # a second tab, before the downgrade is scheduled
    _, ticket = owner.preview_plan("starter", interval="year")  # cheaper per month: at the period end
    assert owner.confirm(ticket).status_code == 303
    schedule_id = owner.subscription()["schedule"]
    assert schedule_id, re.findall(r'class="flash[^<]*', flashes(owner.client))
    phases = stack.stripe("GET", f"/subscription_schedules/{schedule_id}")["phases"]
    metered = stack.stripe_api.price_id("api_calls_overage")
    assert [metered in [i["price"] for i in phase["items"]] for phase in phases] == [True, False]  # yearly: none

    refused = owner.post("/billing/seats/preview", extra_seats="3")
    assert refused.status_code == 303
    page = flashes(owner.client)
    assert "Your plan is set to change at the end of this billing period, on " in page
    assert "Changing seats now would withdraw that change, so nothing was changed" in page
    assert '"Keep my current plan"' in page

    stale = owner.confirm(early_seats_ticket)
    assert stale.status_code == 303  # the fresh preview is refused for the same reason
    assert "Changing seats now would withdraw that change" in flashes(owner.client)
    assert owner.subscription()["schedule"] == schedule_id
    assert stack.stripe("GET", f"/subscription_schedules/{schedule_id}")["status"] == "active"
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 1}
    assert addons(stack) == {"extra_seats": 1}

    # Choosing a dearer plan now replaces the scheduled change, and its preview says so.
    response, _ = owner.preview_plan("pro")
    page = html.unescape(response.get_data(as_text=True))
    assert 'id="preview-replaces-scheduled"' in page and "that change will not happen" in page

    # Once the owner keeps the current plan, seats can be changed.
    assert owner.post("/billing/plan/keep").status_code == 303
    response, ticket = owner.preview_seats(3)
    assert response.status_code == 200 and 'id="preview-replaces-scheduled"' not in response.get_data(as_text=True)
    assert owner.confirm(ticket).status_code == 303
    assert owner.items() == {"starter_monthly": 1, "extra_seat_monthly": 3}


def test_the_previews_fingerprint_covers_the_period_the_discounts_and_a_pending_update(app: Flask) -> None:
    """Issue 21, item 8: a preview confirmed after the period turned over, or after a discount came or
    went, or while an upgrade waits for payment, is stale (its proration would differ)."""
    from app.services.billing_common import plan_catalogue
    from app.services.plan_change import read_current

    item = {
        "id": "si_1",
        "quantity": 1,
        "current_period_start": 1_000,
        "current_period_end": 2_000,
        "price": {"id": "price_1", "lookup_key": "starter_monthly", "unit_amount": 1900, "currency": "usd"},
    }
    base = {"id": "sub_1", "status": "active", "items": {"data": [item]}, "discounts": []}
    with app.app_context():
        catalogue = plan_catalogue()
        fingerprint = read_current(base, catalogue).fingerprint
        renewed = {**base, "items": {"data": [{**item, "current_period_start": 2_000, "current_period_end": 3_000}]}}
        taxed = {**base, "automatic_tax": {"enabled": True}}
        for changed in (renewed, {**base, "discounts": ["di_1"]}, {**base, "pending_update": {"expires_at": 9}}, taxed):
            assert read_current(changed, catalogue).fingerprint != fingerprint
        assert read_current(dict(base), catalogue).fingerprint == fingerprint
