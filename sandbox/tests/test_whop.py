"""The Whop double end to end: `python -m sandbox.whop` in a subprocess, driven by the real whop-sdk
client (its environment pointed at the double), paid through the hosted checkout with `requests`,
with a local receiver standing in for the app's webhook endpoint. Signatures are checked with the
standardwebhooks package keyed as Whop keys them, and payloads are parsed with whop-sdk's types."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import standardwebhooks
from whop_sdk import Whop
from whop_sdk.core.api_error import ApiError
from whop_sdk.environment import WhopEnvironment
from whop_sdk.invoices.types.post_invoice_paid_payload import PostInvoicePaidPayload
from whop_sdk.invoices.types.post_invoice_past_due_payload import PostInvoicePastDuePayload
from whop_sdk.lib.verify_webhook import unwrap
from whop_sdk.memberships.types.post_membership_activated_payload import PostMembershipActivatedPayload
from whop_sdk.memberships.types.post_membership_updated_payload import PostMembershipUpdatedPayload
from whop_sdk.payments.types.post_payment_failed_payload import PostPaymentFailedPayload
from whop_sdk.payments.types.post_payment_succeeded_payload import PostPaymentSucceededPayload
from whop_sdk.types.membership import Membership

from sandbox.tests.conftest import Receiver as SandboxReceiver
from sandbox.whop.delivery import sign

ROOT = Path(__file__).resolve().parents[2]
SECRET = "ws_whop_sandbox_tests_0123456789"
OLD_SECRET = "ws_whop_sandbox_tests_previous"
ACCOUNT = "biz_tests"
CATALOGUE = """
[tiers.starter]
name = "Starter"
lookup_key = "starter_monthly"
whop_plan_id = "plan_starter"
sandbox_unit_amount = 1900

[tiers.pro]
name = "Pro"
lookup_key = "pro_monthly"
whop_plan_id = "plan_pro"
trial_days = 14
sandbox_unit_amount = 4900

[tiers.business]
name = "Business"
lookup_key = "business_monthly"
"""
CARD_OK = "4242 4242 4242 4242"
CARD_DECLINED = "4000 0000 0000 0002"
PAYLOAD_TYPES: dict[str, Any] = {
    "membership.activated": PostMembershipActivatedPayload,
    "membership.updated": PostMembershipUpdatedPayload,
    "payment.succeeded": PostPaymentSucceededPayload,
    "payment.failed": PostPaymentFailedPayload,
    "invoice.paid": PostInvoicePaidPayload,
    "invoice.past_due": PostInvoicePastDuePayload,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def verify(body: str | bytes, headers: dict[str, str], secret: str = SECRET) -> dict[str, Any]:
    """Standard Webhooks verification keyed with the secret's own bytes, as Whop signs."""
    key = base64.b64encode(secret.encode()).decode()
    event: dict[str, Any] = standardwebhooks.Webhook(key).verify(body, headers)
    return event


class Receiver(SandboxReceiver):
    """The sandbox tests' webhook endpoint, keeping Whop's headers lower-cased as Standard Webhooks
    names them, and finding events by what they mention."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_all = False  # answer 500 to every delivery while set

    def next_status(self) -> int:
        return 500 if self.fail_all else super().next_status()

    def receive(self, body: str, headers: dict[str, str]) -> int:
        return super().receive(body, {k.lower(): v for k, v in headers.items()})

    def events(self, about: str) -> list[dict[str, Any]]:
        """Delivered events whose data (or data.membership_id / invoice member) mentions `about`,
        each verified, in arrival order."""
        with self.lock:
            delivered = [a for a in self.attempts if a["status"] == 200]
        found = []
        for attempt in delivered:
            if about not in attempt["body"]:
                continue
            event = verify(attempt["body"], attempt["headers"])
            event["_headers"] = attempt["headers"]
            found.append(event)
        return found

    def wait_for(self, about: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(about)
            if len(events) >= count:
                return events
            time.sleep(0.05)
        raise AssertionError(f"expected {count} events, got {[e['type'] for e in self.events(about)]}")


class WhopDouble:
    def __init__(self, tmp: Path, webhook_url: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "whop.log"
        catalogue = tmp / "plans.toml"
        catalogue.write_text(CATALOGUE)
        self.env = {
            **os.environ,
            "WHOP_SANDBOX_PORT": str(self.port),
            "WHOP_SANDBOX_WEBHOOK_URL": webhook_url,
            "WHOP_SANDBOX_WEBHOOK_SECRET": SECRET,
            "WHOP_SANDBOX_COMPANY_ID": ACCOUNT,
            "WHOP_SANDBOX_RETRY_SECONDS": "0.2,0.4,0.8",
            "PLAN_CATALOGUE_FILE": str(catalogue),
        }
        api = f"{self.url}/whop/api/v1"
        self.client = Whop(token="apik_sandbox_tests", environment=WhopEnvironment(api=api, vault=api), max_retries=0)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.whop"], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/whop/_sandbox/deliveries", timeout=1)
                return
            except requests.ConnectionError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError("whop sandbox did not start:\n" + self.log.read_text())

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(10)

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.post(f"{self.url}/whop/_sandbox/{path}", json=body or {}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def deliveries(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = requests.get(f"{self.url}/whop/_sandbox/deliveries", timeout=5).json()[
            "deliveries"
        ]
        return listed

    def pay(self, purchase_url: str, card: str = CARD_OK, email: str = "buyer@example.com") -> requests.Response:
        form = {"email": email, "name": "Ada Buyer", "card": card, "expiry": "12/34", "cvc": "123"}
        return requests.post(purchase_url, data=form, allow_redirects=False, timeout=5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def whop(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[WhopDouble]:
    server = WhopDouble(tmp_path_factory.mktemp("whop"), receiver.url)
    server.start()
    yield server
    assert server.stop() == 0  # SIGTERM shuts down cleanly


def by_type(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Events of one step keyed by type: deliveries run concurrently and arrive in any order."""
    keyed = {event["type"]: event for event in events}
    assert len(keyed) == len(events), [event["type"] for event in events]
    return keyed


def signup(whop: WhopDouble, plan_id: str = "plan_starter", **metadata: str) -> tuple[Any, Membership]:
    checkout = whop.client.checkout_configurations.create(
        plan_id=plan_id,
        metadata={"purpose": "signup", "pending_signup_id": "ps-1", **metadata},
        redirect_url="http://app.test/billing/complete-signup-from-whop?signup=ps-1",
    )
    response = whop.pay(str(checkout.purchase_url))
    assert response.status_code == 303, response.text
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    return checkout, whop.client.memberships.retrieve(query["membership_id"][0])


# -- API shapes through the SDK ---------------------------------------------------------------------


def test_plans_are_seeded_from_the_catalogue_with_whop_plan_ids(whop: WhopDouble) -> None:
    starter = whop.client.plans.retrieve("plan_starter")
    assert (starter.id, starter.renewal_price, starter.billing_period, starter.plan_type) == (
        "plan_starter",
        19.0,
        30,
        "renewal",
    )
    assert whop.client.plans.retrieve("plan_pro").trial_period_days == 14
    with pytest.raises(ApiError) as missing:  # business has no whop_plan_id: Stripe-only
        whop.client.plans.retrieve("plan_business")
    assert missing.value.status_code == 404


def test_checkout_configuration_carries_metadata_into_the_membership(whop: WhopDouble, receiver: Receiver) -> None:
    checkout, membership = signup(whop, reference="a1")
    assert checkout.id.startswith("ch_")
    assert checkout.account_id == ACCOUNT
    assert checkout.plan is not None and checkout.plan.id == "plan_starter"
    assert str(checkout.purchase_url).endswith(f"/whop/checkout/{checkout.id}")
    assert membership.id.startswith("mem_")
    assert (membership.status, membership.plan_id, membership.cancel_at_period_end) == ("active", "plan_starter", False)
    assert membership.metadata == {"purpose": "signup", "pending_signup_id": "ps-1", "reference": "a1"}
    assert membership.member_id is not None and membership.member_id.startswith("mber_")
    assert membership.manage_url == f"{whop.url}/whop/manage/{membership.id}"
    assert membership.renewal_price is not None and membership.renewal_price.amount == "19.00"
    assert membership.current_period_end is not None and membership.current_period_end > membership.created_at

    events = by_type(receiver.wait_for(membership.id, 2))
    assert sorted(events) == ["membership.activated", "payment.succeeded"]
    for event in events.values():
        parsed = PAYLOAD_TYPES[event["type"]].model_validate({k: v for k, v in event.items() if k != "_headers"})
        assert parsed.api_version == "v1"
        assert event["id"] == event["_headers"]["webhook-id"]
        assert event["account_id"] == ACCOUNT
    assert events["payment.succeeded"]["data"]["membership_id"] == membership.id
    assert events["payment.succeeded"]["data"]["status"] == "paid"
    assert events["membership.activated"]["data"]["metadata"]["pending_signup_id"] == "ps-1"


def test_redirect_carries_the_membership_and_keeps_the_apps_query(whop: WhopDouble) -> None:
    checkout = whop.client.checkout_configurations.create(
        plan_id="plan_starter", metadata={}, redirect_url="http://app.test/done?signup=xyz"
    )
    response = whop.pay(str(checkout.purchase_url), email="redirect@example.com")
    location = urlsplit(response.headers["Location"])
    query = parse_qs(location.query)
    assert (location.netloc, location.path) == ("app.test", "/done")
    assert query["signup"] == ["xyz"] and query["status"] == ["success"]
    assert query["checkout_configuration_id"] == [checkout.id]
    assert query["membership_id"][0].startswith("mem_") and query["payment_id"][0].startswith("pay_")


def test_trial_plan_starts_trialing_without_a_payment(whop: WhopDouble, receiver: Receiver) -> None:
    _, membership = signup(whop, plan_id="plan_pro")
    assert membership.status == "trialing"
    assert [e["type"] for e in receiver.wait_for(membership.id, 1)] == ["membership.activated"]
    time.sleep(0.3)
    assert [e["type"] for e in receiver.events(membership.id)] == ["membership.activated"]


def test_declined_card_makes_no_membership_and_reports_the_failed_payment(whop: WhopDouble, receiver: Receiver) -> None:
    checkout = whop.client.checkout_configurations.create(plan_id="plan_starter", metadata={"purpose": "declined"})
    before = len(whop.client.memberships.list(account_id=ACCOUNT, first=100).items)
    response = whop.pay(str(checkout.purchase_url), card=CARD_DECLINED)
    assert response.status_code == 400 and "Your card was declined." in response.text
    assert len(whop.client.memberships.list(account_id=ACCOUNT, first=100).items) == before
    events = receiver.wait_for(checkout.id, 1)
    assert [e["type"] for e in events] == ["payment.failed"]
    assert events[0]["data"]["membership_id"] is None and events[0]["data"]["substatus"] == "failed"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("card", "5555 5555 5555 4444", "sandbox test card"), ("expiry", "13/30", "month"), ("email", "nope", "email")],
)
def test_bad_card_form_is_refused_and_keeps_what_was_typed(
    whop: WhopDouble, field: str, value: str, message: str
) -> None:
    checkout = whop.client.checkout_configurations.create(plan_id="plan_starter")
    form = {"email": "typed@example.com", "name": "Typed Name", "card": CARD_OK, "expiry": "12/34", "cvc": "123"}
    form[field] = value
    response = requests.post(str(checkout.purchase_url), data=form, allow_redirects=False, timeout=5)
    assert response.status_code == 400
    assert message in response.text and "Typed Name" in response.text


def test_api_errors_reach_the_sdk_as_its_error_classes(whop: WhopDouble) -> None:
    with pytest.raises(ApiError) as missing:
        whop.client.memberships.retrieve("mem_doesnotexist")
    assert missing.value.status_code == 404
    assert missing.value.body == {"error": {"type": "not_found", "message": "Membership mem_doesnotexist not found"}}
    anonymous = requests.get(f"{whop.url}/whop/api/v1/memberships", timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "unauthorized"
    with pytest.raises(ApiError) as bad:
        whop.client.checkout_configurations.create(plan_id="plan_nope")
    assert bad.value.status_code == 404
    unknown = requests.post(
        f"{whop.url}/whop/api/v1/checkout_configurations",
        json={"plan_id": "plan_starter", "line_items": []},
        headers={"Authorization": "Bearer k"},
        timeout=5,
    )
    assert unknown.status_code == 400 and "line_items" in unknown.json()["error"]["message"]


def test_idempotency_key_replays_the_first_checkout(whop: WhopDouble) -> None:
    options: Any = {"additional_headers": {"Idempotency-Key": "signup-ps-77"}}
    first = whop.client.checkout_configurations.create(plan_id="plan_starter", request_options=options)
    again = whop.client.checkout_configurations.create(plan_id="plan_starter", request_options=options)
    assert again.id == first.id
    with pytest.raises(ApiError) as conflict:
        whop.client.checkout_configurations.create(plan_id="plan_pro", request_options=options)
    assert conflict.value.status_code == 409


# -- membership lifecycle ---------------------------------------------------------------------------


def test_cancel_at_period_end_undo_and_expiry(whop: WhopDouble, receiver: Receiver) -> None:
    _, membership = signup(whop)
    receiver.wait_for(membership.id, 2)

    canceled = whop.client.memberships.cancel(membership.id, cancel_at_period_end=True)
    assert (canceled.status, canceled.cancel_at_period_end) == ("active", True)
    assert canceled.canceled_at is not None
    events = by_type(receiver.wait_for(membership.id, 4)[2:])
    assert sorted(events) == ["membership.cancel_at_period_end_changed", "membership.updated"]
    assert events["membership.updated"]["previous_attributes"]["cancel_at_period_end"] is False
    canceling = whop.client.memberships.list(account_id=ACCOUNT, status="canceling", first=100).items
    assert membership.id in [m.id for m in canceling]
    active = whop.client.memberships.list(account_id=ACCOUNT, status="active", first=100).items
    assert membership.id not in [m.id for m in active]

    kept = whop.client.memberships.update(membership.id, cancel_at_period_end=False)
    assert (kept.cancel_at_period_end, kept.canceled_at) == (False, None)
    assert sorted(by_type(receiver.wait_for(membership.id, 6)[4:])) == [
        "membership.cancel_at_period_end_changed",
        "membership.updated",
    ]
    whop.client.memberships.update(membership.id, cancel_at_period_end=False)  # no change: no event
    whop.client.memberships.cancel(membership.id, cancel_at_period_end=True)
    receiver.wait_for(membership.id, 8)
    ended = whop.control(f"memberships/{membership.id}/period_end", {"outcome": "paid"})
    assert ended["status"] == "expired"
    events = receiver.wait_for(membership.id, 9)
    assert events[8]["type"] == "membership.deactivated"
    assert events[8]["data"]["status"] == "expired" and events[8]["previous_attributes"] == {"status": "active"}
    with pytest.raises(ApiError) as ended_already:
        whop.client.memberships.update(membership.id, cancel_at_period_end=False)
    assert ended_already.value.status_code == 400


def test_cancel_now_deactivates(whop: WhopDouble, receiver: Receiver) -> None:
    _, membership = signup(whop)
    receiver.wait_for(membership.id, 2)
    canceled = whop.client.memberships.cancel(membership.id, reason="too expensive")
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "too expensive")
    assert receiver.wait_for(membership.id, 3)[2]["type"] == "membership.deactivated"
    assert whop.client.memberships.retrieve(membership.id).status == "canceled"


def test_renewals_paid_and_failed(whop: WhopDouble, receiver: Receiver) -> None:
    _, membership = signup(whop, email_hint="renewals")
    receiver.wait_for(membership.id, 2)
    renewed = whop.control(f"memberships/{membership.id}/period_end", {"outcome": "paid"})
    assert renewed["status"] == "active" and renewed["current_period_start"] == membership.current_period_end
    events = by_type(receiver.wait_for(membership.id, 5)[2:])
    assert sorted(events) == ["invoice.paid", "membership.updated", "payment.succeeded"]
    paid = {k: v for k, v in events["invoice.paid"].items() if k != "_headers"}
    invoice = PostInvoicePaidPayload.model_validate(paid).data
    assert invoice.status == "paid" and invoice.member is not None and invoice.member.id == membership.member_id
    assert events["payment.succeeded"]["data"]["billing_reason"] == "subscription_cycle"

    whop.control(f"memberships/{membership.id}/period_end", {"outcome": "failed"})
    events = by_type(receiver.wait_for(membership.id, 8)[5:])
    assert sorted(events) == ["invoice.past_due", "membership.updated", "payment.failed"]
    assert events["membership.updated"]["data"]["status"] == "past_due"
    for event in events.values():
        PAYLOAD_TYPES[event["type"]].model_validate({k: v for k, v in event.items() if k != "_headers"})
    past_due = whop.client.memberships.list(account_id=ACCOUNT, status="past_due", first=100).items
    assert membership.id in [m.id for m in past_due]


def test_list_pages_through_every_membership(whop: WhopDouble) -> None:
    for _ in range(3):
        signup(whop)
    everything = list(whop.client.memberships.list(account_id=ACCOUNT, first=2))
    ids = [m.id for m in everything]
    assert len(ids) == len(set(ids)) >= 3
    assert whop.client.memberships.list(account_id="biz_someone_else", first=100).items == []


# -- delivery ---------------------------------------------------------------------------------------


def test_signature_is_standard_webhooks_keyed_with_the_secrets_own_bytes(receiver: Receiver, whop: WhopDouble) -> None:
    _, membership = signup(whop)
    event = receiver.wait_for(membership.id, 1)[0]
    headers = event["_headers"]
    assert re.fullmatch(r"msg_[0-9a-f]{16}", headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]+=*", headers["webhook-signature"])
    with receiver.lock:
        body = next(a["body"] for a in receiver.attempts if a["headers"]["webhook-id"] == headers["webhook-id"])
    assert unwrap(body, headers=headers, key=SECRET)["id"] == headers["webhook-id"]  # whop-sdk's own helper
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(body, headers, secret="ws_wrong")
    with pytest.raises(standardwebhooks.WebhookVerificationError):  # the secret base64-decoded is not the key
        standardwebhooks.Webhook(base64.b64encode(b"x").decode()).verify(body, headers)


def test_failed_deliveries_retry_three_times_with_the_same_id_then_stop(whop: WhopDouble, receiver: Receiver) -> None:
    receiver.fail_all = True
    try:
        _, membership = signup(whop)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = {d["type"]: d for d in whop.deliveries() if membership.id in json.dumps(d["event"])}
            if states and all(d["state"] == "failed" for d in states.values()):
                break
            time.sleep(0.1)
    finally:
        receiver.fail_all = False
    activated = states["membership.activated"]
    assert (activated["state"], activated["attempts"], activated["last_status"]) == ("failed", 4, 500)
    with receiver.lock:
        tries = [a for a in receiver.attempts if a["headers"]["webhook-id"] == activated["id"]]
    assert len(tries) == 4 and all(t["status"] == 500 for t in tries)
    gaps = [round(later["at"] - earlier["at"], 1) for earlier, later in itertools.pairwise(tries)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8  # 10 s, 20 s, 40 s scaled down
    time.sleep(1.0)
    with receiver.lock:
        assert len([a for a in receiver.attempts if a["headers"]["webhook-id"] == activated["id"]]) == 4


def test_hold_mode_and_take_with_two_secrets_while_rotating(whop: WhopDouble, receiver: Receiver) -> None:
    whop.control("delivery", {"mode": "hold", "secrets": [SECRET, OLD_SECRET]})
    try:
        _, membership = signup(whop)
        time.sleep(0.3)
        assert receiver.events(membership.id) == []  # held, not pushed
        taken = whop.control("deliveries/take", {"limit": 1000})["events"]
        mine = [t for t in taken if membership.id in t["payload"]]
        assert [t["type"] for t in mine] == ["payment.succeeded", "membership.activated"]  # oldest first
        for item in mine:
            signatures = item["headers"]["webhook-signature"].split(" ")
            assert len(signatures) == 2
            assert verify(item["payload"], item["headers"], SECRET)["id"] == item["id"]
            assert verify(item["payload"], item["headers"], OLD_SECRET)["id"] == item["id"]
        assert whop.control("deliveries/take")["events"] == []  # taken once
        bad = requests.post(f"{whop.url}/whop/_sandbox/deliveries/take", json={"limit": 0}, timeout=5)
        assert bad.status_code == 400
        states = {d["id"]: d["state"] for d in whop.deliveries()}
        assert all(states[item["id"]] == "taken" for item in mine)
    finally:
        whop.control("delivery", {"mode": "push", "secrets": [SECRET]})


def test_sign_matches_standardwebhooks_own_signer() -> None:
    body = '{"id":"msg_1"}'
    key = base64.b64encode(SECRET.encode()).decode()
    from datetime import UTC, datetime

    expected = standardwebhooks.Webhook(key).sign("msg_1", datetime.fromtimestamp(1700000000, UTC), body)
    assert sign([SECRET], "msg_1", 1700000000, body) == expected
