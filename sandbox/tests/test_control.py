"""The sandbox's test controls (/_sandbox/…) and webhook delivery modes, end to end: the real
server in a subprocess, the real stripe-python SDK, and a local webhook receiver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from sandbox import objects
from sandbox.config import DeliveryConfig, Settings

from .test_sandbox import (
    SECRET,
    Receiver,
    Sandbox,
    create_session,
    paid_subscription,
    pay,
)

# -- harness ----------------------------------------------------------------------------------


def control(server: Sandbox, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{server.url}/_sandbox{path}", json=body, timeout=30, **kwargs)


def ok(response: requests.Response) -> Any:
    assert response.status_code in (200, 201), response.text
    return response.json()


def logged_since(server: Sandbox, seq: int) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = ok(control(server, "GET", f"/requests?after={seq}"))["requests"]
    return listed


def last_seq(server: Sandbox) -> int:
    seq: int = ok(control(server, "GET", "/requests/last_seq"))["last_seq"]
    return seq


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Sandbox]:
    server = Sandbox(tmp_path_factory.mktemp("sandbox"), receiver.url)
    server.start()
    yield server
    assert server.stop() == 0


@pytest.fixture(autouse=True)
def fresh_controls(sandbox: Sandbox, receiver: Receiver) -> Iterator[None]:
    """Every test starts and ends with no faults, no latency and push delivery as configured."""
    defaults = {
        "mode": "push",
        "webhook_url": receiver.url,
        "secrets": [SECRET],
        "api_version": objects.API_VERSION,
        "concurrency": 1,
        "duplicate_rate": 0.0,
        "reorder": False,
        "delay_seconds": 0.0,
    }

    def reset() -> None:
        ok(control(sandbox, "DELETE", "/faults"))
        ok(control(sandbox, "POST", "/latency", {"seconds": 0}))
        ok(control(sandbox, "POST", "/delivery", defaults))

    reset()
    yield
    reset()


@pytest.fixture(scope="module")
def prices(sandbox: Sandbox) -> dict[str, str]:
    listed = sandbox.client.v1.prices.list(params={"lookup_keys": ["starter_monthly", "extra_seat_monthly"]})
    return {p.lookup_key: p.id for p in listed.data if p.lookup_key}


def no_retries(server: Sandbox) -> Any:
    return stripe.StripeClient("sk_test_sandbox", base_addresses={"api": server.url}, max_network_retries=0)


# -- request log ------------------------------------------------------------------------------


def test_every_v1_request_is_logged_with_decoded_params(sandbox: Sandbox, prices: dict[str, str]) -> None:
    start = last_seq(sandbox)
    session = sandbox.client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "line_items": [
                {"price": prices["starter_monthly"], "quantity": 1},
                {"price": prices["extra_seat_monthly"], "quantity": 3},
            ],
            "success_url": "http://app.test/ok",
            "metadata": {"org_id": "42"},
            "subscription_data": {"metadata": {"plan": "starter"}, "trial_period_days": 14},
        },
        options={"idempotency_key": "log-key-1"},
    )
    sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription", "line_items"]})
    with pytest.raises(stripe.InvalidRequestError):
        sandbox.client.v1.subscriptions.retrieve("sub_doesnotexist")
    # curl's a[]= lists, and a request refused for its key, are logged too.
    requests.get(f"{sandbox.url}/v1/prices?lookup_keys[]=a&lookup_keys[]=b", auth=("sk_test_x", ""), timeout=5)
    requests.get(f"{sandbox.url}/v1/prices", timeout=5)

    logged = logged_since(sandbox, start)
    assert [(r["method"], r["path"], r["status"]) for r in logged] == [
        ("POST", "/v1/checkout/sessions", 200),
        ("GET", f"/v1/checkout/sessions/{session.id}", 200),
        ("GET", "/v1/subscriptions/sub_doesnotexist", 404),
        ("GET", "/v1/prices", 200),
        ("GET", "/v1/prices", 401),
    ]
    assert [r["seq"] for r in logged] == sorted(r["seq"] for r in logged)
    assert logged[0]["seq"] > start
    assert logged[0]["idempotency_key"] == "log-key-1"
    assert logged[0]["params"] == {
        "mode": "subscription",
        "line_items": [
            {"price": prices["starter_monthly"], "quantity": "1"},
            {"price": prices["extra_seat_monthly"], "quantity": "3"},
        ],
        "success_url": "http://app.test/ok",
        "metadata": {"org_id": "42"},
        "subscription_data": {"metadata": {"plan": "starter"}, "trial_period_days": "14"},
    }
    assert logged[1]["params"] == {"expand": ["subscription", "line_items"]}
    assert logged[1]["idempotency_key"] is None
    assert logged[3]["params"] == {"lookup_keys": ["a", "b"]}

    # A marker: only what came after it, and last_seq to continue from.
    listed = ok(control(sandbox, "GET", f"/requests?after={logged[2]['seq']}"))
    assert [r["seq"] for r in listed["requests"]] == [logged[3]["seq"], logged[4]["seq"]]
    assert listed["last_seq"] == logged[4]["seq"] == last_seq(sandbox)
    page = ok(control(sandbox, "GET", f"/requests?after={start}&limit=2"))
    assert [r["seq"] for r in page["requests"]] == [logged[0]["seq"], logged[1]["seq"]]
    assert page["last_seq"] == logged[1]["seq"]
    assert logged_since(sandbox, last_seq(sandbox)) == []
    assert control(sandbox, "GET", "/requests?after=x").status_code == 400


# -- faults -----------------------------------------------------------------------------------


def test_server_fault_fails_the_next_matching_request_without_changing_anything(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    armed = ok(
        control(sandbox, "POST", "/faults", {"method": "POST", "path": "/v1/checkout/sessions", "kind": "server"})
    )
    assert armed["times"] == 1 and armed["kind"] == "server"
    assert ok(control(sandbox, "GET", "/faults"))["faults"] == [armed]
    start = last_seq(sandbox)

    sandbox.client.v1.prices.list()  # another method or path is untouched
    with pytest.raises(stripe.APIError) as failure:
        no_retries(sandbox).v1.checkout.sessions.create(
            params={"mode": "subscription", "line_items": [{"price": prices["starter_monthly"], "quantity": 1}]},
            options={"idempotency_key": "fault-key"},
        )
    assert failure.value.http_status == 500
    assert failure.value.error is not None and failure.value.error.type == "api_error"
    assert ok(control(sandbox, "GET", "/faults"))["faults"] == []  # used up

    # The failed request stored nothing, so the same key now creates a session for real.
    response = requests.post(
        f"{sandbox.url}/v1/checkout/sessions",
        data={
            "mode": "subscription",
            "line_items[0][price]": prices["starter_monthly"],
            "line_items[0][quantity]": "1",
        },
        headers={"Idempotency-Key": "fault-key"},
        auth=("sk_test_x", ""),
        timeout=5,
    )
    assert response.status_code == 200 and "Idempotent-Replayed" not in response.headers
    logged = logged_since(sandbox, start)
    assert [(r["path"], r["status"]) for r in logged] == [
        ("/v1/prices", 200),
        ("/v1/checkout/sessions", 500),
        ("/v1/checkout/sessions", 200),
    ]
    assert logged[1]["idempotency_key"] == "fault-key"


def test_missing_fault_by_path_regex_answers_404_and_changes_no_state(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    _, subscription = paid_subscription(sandbox, prices)
    ok(
        control(
            sandbox,
            "POST",
            "/faults",
            {"method": "POST", "path_regex": "/v1/subscriptions/[^/]+", "kind": "missing", "times": 2},
        )
    )
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError) as failure:
            sandbox.client.v1.subscriptions.update(subscription.id, params={"cancel_at_period_end": True})
        assert failure.value.http_status == 404
        assert failure.value.code == "resource_missing"
        assert subscription.id in str(failure.value.user_message)
    # Retrieval (GET) was never armed; the update did not happen and sent nothing.
    assert sandbox.client.v1.subscriptions.retrieve(subscription.id).cancel_at_period_end is False
    updated = sandbox.client.v1.subscriptions.update(subscription.id, params={"cancel_at_period_end": True})
    assert updated.cancel_at_period_end is True
    events = receiver.wait_for({subscription.id}, 2)
    assert [e["type"] for e in events] == ["customer.subscription.created", "customer.subscription.updated"]


def test_connection_fault_drops_the_connection_so_the_sdk_raises_api_connection_error(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    ok(control(sandbox, "POST", "/faults", {"method": "POST", "path": "/v1/checkout/sessions", "kind": "connection"}))
    start = last_seq(sandbox)
    with pytest.raises(stripe.APIConnectionError):
        no_retries(sandbox).v1.checkout.sessions.create(
            params={
                "mode": "subscription",
                "line_items": [{"price": prices["starter_monthly"], "quantity": 1}],
                "client_reference_id": "dropped",
            }
        )
    [logged] = logged_since(sandbox, start)
    assert (logged["method"], logged["path"], logged["status"]) == ("POST", "/v1/checkout/sessions", 0)
    assert logged["params"]["client_reference_id"] == "dropped"
    # The server carries on: the next request goes through.
    assert create_session(sandbox, prices).status == "open"


def test_faults_can_be_listed_and_cleared(sandbox: Sandbox) -> None:
    first = ok(control(sandbox, "POST", "/faults", {"path": "/v1/prices", "kind": "server", "times": 3}))
    second = ok(control(sandbox, "POST", "/faults", {"method": "get", "path_regex": "/v1/.*", "kind": "connection"}))
    assert first["method"] is None  # any method
    assert second["method"] == "GET"
    assert ok(control(sandbox, "GET", "/faults"))["faults"] == [first, second]
    # The first armed fault that matches is used first.
    with pytest.raises(stripe.APIError):
        no_retries(sandbox).v1.prices.list()
    assert [f["times"] for f in ok(control(sandbox, "GET", "/faults"))["faults"]] == [2, 1]
    assert ok(control(sandbox, "DELETE", "/faults")) == {"faults": []}
    assert ok(control(sandbox, "GET", "/faults"))["faults"] == []
    sandbox.client.v1.prices.list()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"path": "/v1/prices"}, "kind must be one of"),
        ({"path": "/v1/prices", "kind": "timeout"}, "kind must be one of"),
        ({"kind": "server"}, "exactly one of path"),
        ({"path": "/v1/prices", "path_regex": "/v1/.*", "kind": "server"}, "exactly one of path"),
        ({"path": "prices", "kind": "server"}, "/v1/"),
        ({"path_regex": "/v1/(", "kind": "server"}, "not a valid regular expression"),
        ({"path": "/v1/prices", "kind": "server", "times": 0}, "times must be"),
        ({"path": "/v1/prices", "kind": "server", "times": True}, "times must be"),
        ({"path": "/v1/prices", "kind": "server", "when": "now"}, "Unknown field"),
        ([], "JSON object"),
    ],
)
def test_bad_fault_requests_are_explained(sandbox: Sandbox, body: Any, message: str) -> None:
    response = control(sandbox, "POST", "/faults", body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert ok(control(sandbox, "GET", "/faults"))["faults"] == []


# -- latency ----------------------------------------------------------------------------------


def test_latency_delays_v1_responses_without_blocking_others(sandbox: Sandbox) -> None:
    assert ok(control(sandbox, "POST", "/latency", {"seconds": 1.5})) == {"seconds": 1.5}
    assert ok(control(sandbox, "GET", "/latency")) == {"seconds": 1.5}
    durations: list[float] = []

    def timed_call() -> None:
        started = time.monotonic()
        sandbox.client.v1.prices.list()
        durations.append(time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=timed_call) for _ in range(3)]
    for thread in threads:
        thread.start()
    control_started = time.monotonic()
    control(sandbox, "GET", "/faults")  # not /v1: answered at once
    control_took = time.monotonic() - control_started
    for thread in threads:
        thread.join()
    overall = time.monotonic() - started
    assert len(durations) == 3 and min(durations) >= 1.5
    assert overall < 1.5 * 3  # served side by side, not one after another
    assert control_took < 1.5

    assert ok(control(sandbox, "POST", "/latency", {"seconds": 0})) == {"seconds": 0.0}
    for bad in ({"seconds": -1}, {"seconds": "5"}, {"seconds": 10_000}, {}):
        assert control(sandbox, "POST", "/latency", bad).status_code == 400


# -- delivery settings and hold mode ----------------------------------------------------------


def test_delivery_settings_read_and_partially_update(sandbox: Sandbox, receiver: Receiver) -> None:
    current = ok(control(sandbox, "GET", "/delivery"))
    assert current == {
        "mode": "push",
        "webhook_url": receiver.url,
        "secrets": [SECRET],
        "api_version": objects.API_VERSION,
        "concurrency": 1,
        "duplicate_rate": 0.0,
        "reorder": False,
        "delay_seconds": 0.0,
    }
    updated = ok(control(sandbox, "POST", "/delivery", {"concurrency": 4, "reorder": True}))
    assert updated == {**current, "concurrency": 4, "reorder": True}
    assert ok(control(sandbox, "GET", "/delivery")) == updated
    for bad, message in [
        ({"mode": "pull"}, "mode must be"),
        ({"concurrency": 0}, "concurrency must be"),
        ({"concurrency": "2"}, "concurrency must be"),
        ({"duplicate_rate": 1.5}, "duplicate_rate must be"),
        ({"reorder": "yes"}, "reorder must be"),
        ({"delay_seconds": -1}, "delay_seconds must be"),
        ({"secrets": []}, "secrets must be"),
        ({"secrets": "whsec_x"}, "secrets must be"),
        ({"webhook_url": "ftp://x"}, "webhook_url must be"),
        ({"api_version": "latest"}, "api_version must"),
        ({"colour": "blue"}, "unknown setting"),
        # One bad value refuses the whole update.
        ({"concurrency": 2, "mode": "pull"}, "mode must be"),
    ]:
        response = control(sandbox, "POST", "/delivery", bad)
        assert response.status_code == 400, bad
        assert message in response.json()["error"]["message"]
    assert ok(control(sandbox, "GET", "/delivery")) == updated


def test_start_up_delivery_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SANDBOX_DELIVERY_MODE": "hold",
            "SANDBOX_WEBHOOK_URL": "http://127.0.0.1:9/hook",
            "SANDBOX_WEBHOOK_SECRET": "whsec_old, whsec_new",
            "SANDBOX_API_VERSION": "2025-01-27.acacia",
            "SANDBOX_DELIVERY_CONCURRENCY": "3",
            "SANDBOX_DUPLICATE_RATE": "0.25",
            "SANDBOX_REORDER": "1",
            "SANDBOX_DELIVERY_DELAY_SECONDS": "0.5",
        }
    )
    assert settings.delivery == DeliveryConfig(
        mode="hold",
        webhook_url="http://127.0.0.1:9/hook",
        secrets=("whsec_old", "whsec_new"),
        api_version="2025-01-27.acacia",
        concurrency=3,
        duplicate_rate=0.25,
        reorder=True,
        delay_seconds=0.5,
    )
    defaults = Settings.from_env({}).delivery
    assert (defaults.mode, defaults.concurrency, defaults.duplicate_rate, defaults.reorder) == ("push", 1, 0, False)
    assert defaults.api_version == objects.API_VERSION
    with pytest.raises(ValueError, match="SANDBOX_DELIVERY_CONCURRENCY"):
        Settings.from_env({"SANDBOX_DELIVERY_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="SANDBOX_DELIVERY_MODE"):
        Settings.from_env({"SANDBOX_DELIVERY_MODE": "pull"})


def test_hold_mode_keeps_events_until_taken_signed_with_every_secret(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    # Delivered in push mode: never returned by take.
    pushed = create_session(sandbox, prices)
    sandbox.client.v1.checkout.sessions.expire(pushed.id)
    receiver.wait_for({pushed.id}, 1)

    ok(control(sandbox, "POST", "/delivery", {"mode": "hold", "secrets": ["whsec_old_one", "whsec_new_one"]}))
    session = create_session(sandbox, prices)
    assert pay(sandbox, session.id).status_code == 303
    time.sleep(0.6)  # three worker polls: nothing is pushed in hold mode
    assert receiver.events({session.id}) == []
    held = [d for d in sandbox.deliveries() if d["state"] == "pending"]
    assert len(held) == 3

    taken = ok(control(sandbox, "POST", "/deliveries/take", {"limit": 2}))["events"]
    taken += ok(control(sandbox, "POST", "/deliveries/take"))["events"]
    assert [e["type"] for e in taken] == [
        "customer.subscription.created",
        "invoice.paid",
        "checkout.session.completed",
    ]
    for item in taken:
        assert item["headers"]["Content-Type"] == "application/json; charset=utf-8"
        header = item["headers"]["Stripe-Signature"]
        assert header.count("v1=") == 2
        for secret in ("whsec_old_one", "whsec_new_one"):
            stripe.WebhookSignature.verify_header(item["payload"], header, secret, 300)
        event = json.loads(item["payload"])
        assert event["id"] == item["id"] and event["type"] == item["type"]
    assert json.loads(taken[2]["payload"])["data"]["object"]["id"] == session.id
    assert ok(control(sandbox, "POST", "/deliveries/take"))["events"] == []
    listed = {d["event"]: d for d in sandbox.deliveries()}
    assert all(listed[item["id"]]["state"] == "delivered" for item in taken)
    assert all(listed[item["id"]]["via"] == "take" for item in taken)
    assert receiver.events({session.id}) == []  # taken, never pushed

    for bad in ({"limit": 0}, {"limit": "5"}, ["x"]):
        assert control(sandbox, "POST", "/deliveries/take", bad).status_code == 400


# -- changing objects -------------------------------------------------------------------------


def test_objects_can_be_changed_with_or_without_an_event(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    _, subscription = paid_subscription(sandbox, prices)
    assert subscription.status == "active"

    changed = ok(
        control(
            sandbox,
            "POST",
            f"/objects/{subscription.id}",
            {"status": "past_due", "emit": "customer.subscription.updated"},
        )
    )
    assert changed["status"] == "past_due" and changed["id"] == subscription.id
    assert sandbox.client.v1.subscriptions.retrieve(subscription.id).status == "past_due"
    events = receiver.wait_for({subscription.id}, 2)
    assert events[-1]["type"] == "customer.subscription.updated"
    assert events[-1]["data"]["object"]["status"] == "past_due"
    assert events[-1]["data"]["previous_attributes"] == {"status": "active"}

    # Silently, with the event type given in the query string instead, or not at all.
    ok(control(sandbox, "POST", f"/objects/{subscription.id}", {"trial_end": 123}))
    assert sandbox.client.v1.subscriptions.retrieve(subscription.id).trial_end == 123
    ok(
        control(
            sandbox,
            "POST",
            f"/objects/{subscription.id}?emit=customer.subscription.updated",
            {"status": "active", "trial_end": None},
        )
    )
    events = receiver.wait_for({subscription.id}, 3)
    assert [e["type"] for e in events] == ["customer.subscription.created"] + ["customer.subscription.updated"] * 2
    assert events[-1]["data"]["previous_attributes"] == {"status": "past_due", "trial_end": 123}

    missing = control(sandbox, "POST", "/objects/sub_nope", {"status": "active"})
    assert missing.status_code == 404 and "sub_nope" in missing.json()["error"]["message"]
    for bad in ({"id": "sub_other"}, {"object": "customer"}, {"_sandbox": 1}, {"status": "x", "emit": "Bad"}, [1]):
        assert control(sandbox, "POST", f"/objects/{subscription.id}", bad).status_code == 400
    assert sandbox.client.v1.subscriptions.retrieve(subscription.id).status == "active"


def test_bad_environment_stops_the_server_with_a_message(tmp_path: Path, receiver: Receiver) -> None:
    server = Sandbox(tmp_path, receiver.url)
    server.env["SANDBOX_DUPLICATE_RATE"] = "often"
    with pytest.raises(AssertionError):
        server.start()
    assert server.proc is not None and server.proc.wait(10) != 0
    assert "SANDBOX_DUPLICATE_RATE" in server.log.read_text()
