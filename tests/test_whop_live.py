"""The app and the offline Whop double over real HTTP: the app's whop-sdk client creates a checkout
on the double, the double's signed deliveries reach the app's endpoint and are stored once; a wrong
secret is refused and retried three times; held events taken and delivered by hand are deduplicated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import query
from tests.live_support import LiveServer, free_port, wait_until
from tests.whop_double import WhopDouble

SECRET = "ws_whop_live_suite_0123456789"
ACCOUNT = "biz_live_suite"


@pytest.fixture
def whop_pair(live_server: Callable[..., LiveServer], tmp_path: Path) -> Iterator[tuple[LiveServer, WhopDouble]]:
    port = free_port()
    server = live_server(
        WHOP_API_KEY="apik_live_suite",
        WHOP_WEBHOOK_SECRET=f"ws_next_secret_0123, {SECRET}",
        WHOP_COMPANY_ID=ACCOUNT,
        WHOP_API_BASE=f"http://127.0.0.1:{port}/whop/api/v1",
    )
    double = WhopDouble(
        port=port,
        webhook_url=f"{server.url}/billing/webhooks/whop",
        secrets=SECRET,
        account_id=ACCOUNT,
        log=tmp_path / "whop.log",
    ).start()
    yield server, double
    double.stop()


def stored(server: LiveServer) -> list[Any]:
    assert server.app is not None
    return query(server.app, "SELECT event_id, type, status, attempts FROM whop_event ORDER BY id")


def test_the_double_and_the_app_agree_on_signatures_rotation_retries_and_duplicates(
    whop_pair: tuple[LiveServer, WhopDouble],
) -> None:
    from app.services.billing_service import BillingService

    server, double = whop_pair
    assert server.app is not None
    with server.app.app_context():
        plan_id = BillingService.tier("starter").whop_plan_id
        checkout = BillingService.ensure_whop().checkout_configurations.create(
            plan_id=plan_id, metadata={"purpose": "live-test"}
        )
    assert checkout.purchase_url is not None and checkout.purchase_url.startswith(double.url)
    assert double.pay(checkout.purchase_url).status_code == 200  # no redirect_url: the double's own page

    wait_until(lambda: len(stored(server)) == 2, 10, "both events stored")
    assert sorted(row.type for row in stored(server)) == ["membership.activated", "payment.succeeded"]
    # What the webhooks:apply job does: the membership is read from the double; not one of our signups.
    keys = [row.object_key for row in query(server.app, "SELECT DISTINCT object_key FROM whop_event")]
    with server.app.app_context():
        for key in keys:
            BillingService.apply_queued_events("whop", key)
    assert all(row.status == "ignored" and row.attempts == 1 for row in stored(server))
    assert {d["state"] for d in double.deliveries()} == {"delivered"}
    membership_id = next(d["event"]["data"]["id"] for d in double.deliveries() if d["type"] == "membership.activated")

    # The new secret alone (the app accepts either while rotating).
    double.control("delivery", {"secrets": ["ws_next_secret_0123"]})
    with server.app.app_context():
        BillingService.ensure_whop().memberships.cancel(membership_id, cancel_at_period_end=True)
    wait_until(lambda: len(stored(server)) == 4, 10, "cancellation events stored")

    # A secret the app does not know: every attempt is refused, Whop's three retries end in failure.
    double.control("delivery", {"secrets": ["ws_unknown_secret"]})
    with server.app.app_context():
        BillingService.ensure_whop().memberships.update(membership_id, cancel_at_period_end=False)
    wait_until(
        lambda: [d["state"] for d in double.deliveries()[:2]] == ["failed", "failed"], 10, "undo deliveries fail"
    )
    assert [(d["attempts"], d["last_status"]) for d in double.deliveries()[:2]] == [(4, 400), (4, 400)]
    assert len(stored(server)) == 4

    # Held, taken and delivered by hand: stored once however often it is posted.
    double.control("delivery", {"secrets": [SECRET], "mode": "hold"})
    double.control(f"memberships/{membership_id}/period_end", {"outcome": "paid"})
    taken = double.control("deliveries/take")["events"]
    assert sorted(event["type"] for event in taken) == ["invoice.paid", "membership.updated", "payment.succeeded"]
    for event in taken:
        for _ in range(2):
            response = requests.post(
                f"{server.url}/billing/webhooks/whop", data=event["payload"], headers=event["headers"], timeout=5
            )
            assert response.status_code == 200
    assert len(stored(server)) == 7
    assert all(row.attempts == 1 for row in stored(server))
