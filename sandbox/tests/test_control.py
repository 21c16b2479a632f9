"""The sandbox's test controls (/_sandbox/…) and webhook delivery modes, end to end: the real
server in a subprocess, the real stripe-python SDK, and a local webhook receiver."""

from __future__ import annotations

import json
import sqlite3
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
from sandbox.store import Store
from sandbox.tests.conftest import (
    SECRET,
    Receiver,
    Sandbox,
    create_session,
    paid_subscription,
    pay,
    wait_until,
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


def delivery_defaults(receiver: Receiver) -> dict[str, Any]:
    """The delivery settings this module's server starts with (the harness's environment)."""
    return {
        "mode": "push",
        "webhook_url": receiver.url,
        "secrets": [SECRET],
        "api_version": objects.API_VERSION,
        "concurrency": 1,
        "duplicate_rate": 0.0,
        "reorder": False,
        "delay_seconds": 0.0,
    }


@pytest.fixture(autouse=True)
def fresh_controls(sandbox: Sandbox, receiver: Receiver) -> Iterator[None]:
    """Every test starts and ends with no faults, no latency and push delivery as configured."""
    defaults = delivery_defaults(receiver)

    def reset() -> None:
        ok(control(sandbox, "DELETE", "/faults"))
        ok(control(sandbox, "POST", "/latency", {"seconds": 0}))
        ok(control(sandbox, "POST", "/delivery", defaults))

    reset()
    yield
    reset()


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


def test_rate_limit_fault_answers_429_in_stripes_shape_with_its_retry_headers(
    sandbox: Sandbox, prices: dict[str, str]
) -> None:
    armed = ok(
        control(
            sandbox,
            "POST",
            "/faults",
            {"method": "GET", "path": "/v1/prices", "kind": "rate_limit", "retry_after": 3, "should_retry": False},
        )
    )
    assert (armed["retry_after"], armed["should_retry"]) == (3, False)
    start = last_seq(sandbox)
    with pytest.raises(stripe.RateLimitError) as failure:
        sandbox.client.v1.prices.list()  # Stripe-Should-Retry: false, so not retried either
    assert failure.value.http_status == 429
    assert failure.value.error is not None and failure.value.error.code == "rate_limit"
    assert failure.value.error.type == "invalid_request_error"
    assert failure.value.headers is not None and failure.value.headers["Retry-After"] == "3"
    assert failure.value.headers["Stripe-Should-Retry"] == "false"
    assert [row["status"] for row in logged_since(sandbox, start)] == [429]
    assert sandbox.client.v1.prices.list().data  # spent: the next request goes through


def test_lock_timeout_fault_that_says_retry_is_retried_by_the_sdk(sandbox: Sandbox) -> None:
    ok(control(sandbox, "POST", "/faults", {"path": "/v1/prices", "kind": "lock_timeout", "should_retry": True}))
    start = last_seq(sandbox)
    retrying = stripe.StripeClient("sk_test_sandbox", base_addresses={"api": sandbox.url}, max_network_retries=1)
    assert retrying.v1.prices.list().data
    assert [row["status"] for row in logged_since(sandbox, start)] == [429, 200]
    with pytest.raises(requests.HTTPError):
        response = control(sandbox, "POST", "/faults", {"path": "/v1/prices", "kind": "server", "retry_after": 1})
        response.raise_for_status()


def test_invalid_request_fault_refuses_only_requests_whose_body_holds_the_text(sandbox: Sandbox) -> None:
    armed = ok(
        control(
            sandbox,
            "POST",
            "/faults",
            {"path": "/v1/customers", "kind": "invalid_request", "times": 2, "body_contains": "refuse-me"},
        )
    )
    assert armed["body_contains"] == "refuse-me"
    start = last_seq(sandbox)
    with pytest.raises(stripe.InvalidRequestError, match="an 'invalid_request' fault") as refused:
        no_retries(sandbox).v1.customers.create(params={"email": "refuse-me@example.com"})
    assert refused.value.http_status == 400 and refused.value.code == "invalid_request"
    assert no_retries(sandbox).v1.customers.create(params={"email": "fine@example.com"}).id  # another body
    assert [row["status"] for row in logged_since(sandbox, start)] == [400, 200]
    assert [f["times"] for f in ok(control(sandbox, "GET", "/faults"))["faults"]] == [1]


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
        ({"path": "/v1/prices", "kind": "invalid_request", "body_contains": ""}, "body_contains must be"),
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
    assert current == delivery_defaults(receiver)
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


# -- delivery as Stripe does it ---------------------------------------------------------------


class TimedReceiver(Receiver):
    """A webhook endpoint that takes `seconds` to answer, fails the first `fail_next`, and
    records when each POST started and ended and how many were in progress at once."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.posts: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        super().__init__()

    def receive(self, body: str, headers: dict[str, str]) -> int:
        started = time.monotonic()
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            status = self.next_status()
        time.sleep(self.seconds)
        with self.lock:
            self.in_flight -= 1
            self.posts.append(
                {
                    "event": json.loads(body),
                    "body": body,
                    "headers": headers,
                    "status": status,
                    "started": started,
                    "ended": time.monotonic(),
                }
            )
        return status

    def about(self, ids: set[str]) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["event"]["data"]["object"]["id"] in ids]

    def wait_for(self, ids: set[str], count: int, timeout: float = 15) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.about(ids)) >= count, timeout)
        return self.about(ids)


@pytest.fixture
def timed_receiver(sandbox: Sandbox) -> Iterator[TimedReceiver]:
    receiver = TimedReceiver()
    ok(control(sandbox, "POST", "/delivery", {"webhook_url": receiver.url}))
    yield receiver
    receiver.close()


def expired_sessions(server: Sandbox, prices: dict[str, str], count: int) -> list[str]:
    """`count` checkout.session.expired events, created in this order; their session ids."""
    ids = []
    for _ in range(count):
        session = create_session(server, prices)
        server.client.v1.checkout.sessions.expire(session.id)
        ids.append(session.id)
    return ids


def test_deliveries_run_concurrently_up_to_the_setting(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    timed_receiver.seconds = 0.4
    ok(control(sandbox, "POST", "/delivery", {"mode": "hold"}))  # queue them all first
    ids = expired_sessions(sandbox, prices, 3)
    ok(control(sandbox, "POST", "/delivery", {"mode": "push"}))
    timed_receiver.wait_for(set(ids), 3)
    assert timed_receiver.most_in_flight == 1  # the default: one at a time

    ok(control(sandbox, "POST", "/delivery", {"mode": "hold", "concurrency": 3}))
    ids = expired_sessions(sandbox, prices, 6)
    ok(control(sandbox, "POST", "/delivery", {"mode": "push"}))
    posts = timed_receiver.wait_for(set(ids), 6)
    assert timed_receiver.most_in_flight == 3  # never more than the setting
    assert sorted(p["event"]["data"]["object"]["id"] for p in posts) == sorted(ids)
    assert all(p["status"] == 200 for p in posts)


def test_events_are_duplicated_with_the_same_id(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    ok(control(sandbox, "POST", "/delivery", {"duplicate_rate": 1.0}))
    session = create_session(sandbox, prices)
    assert pay(sandbox, session.id).status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    related = {session.id, session.subscription.id, session.subscription.latest_invoice}
    posts = timed_receiver.wait_for(related, 6)
    ids = [p["event"]["id"] for p in posts]
    assert len(set(ids)) == 3 and all(ids.count(i) == 2 for i in ids)
    for post in posts:
        stripe.WebhookSignature.verify_header(post["body"], post["headers"]["Stripe-Signature"], SECRET, 300)
    listed = {d["event"]: d for d in sandbox.deliveries()}
    assert all((listed[i]["sends"], listed[i]["duplicates"], listed[i]["attempts"]) == (2, 1, 1) for i in ids)

    ok(control(sandbox, "POST", "/delivery", {"duplicate_rate": 0.0}))
    [single] = expired_sessions(sandbox, prices, 1)
    time.sleep(0.6)
    assert len(timed_receiver.wait_for({single}, 1)) == 1


def test_reorder_shuffles_due_deliveries(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    # Without reorder, queued events go out oldest first.
    ok(control(sandbox, "POST", "/delivery", {"mode": "hold"}))
    ids = expired_sessions(sandbox, prices, 8)
    ok(control(sandbox, "POST", "/delivery", {"mode": "push"}))
    posts = timed_receiver.wait_for(set(ids), 8)
    assert [p["event"]["data"]["object"]["id"] for p in posts] == ids

    # With it, they go out in random order: 8 in creation order would be a 1 in 40320 chance.
    ok(control(sandbox, "POST", "/delivery", {"mode": "hold", "reorder": True}))
    ids = expired_sessions(sandbox, prices, 8)
    ok(control(sandbox, "POST", "/delivery", {"mode": "push"}))
    posts = timed_receiver.wait_for(set(ids), 8)
    arrived = [p["event"]["data"]["object"]["id"] for p in posts]
    assert sorted(arrived) == sorted(ids)
    assert arrived != ids


def test_delay_holds_each_first_attempt(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    ok(control(sandbox, "POST", "/delivery", {"delay_seconds": 1.5}))
    session = create_session(sandbox, prices)
    expired_at = time.monotonic()
    sandbox.client.v1.checkout.sessions.expire(session.id)
    time.sleep(0.8)
    assert timed_receiver.about({session.id}) == []
    assert [d["state"] for d in sandbox.deliveries()[:1]] == ["pending"]
    [post] = timed_receiver.wait_for({session.id}, 1)
    assert post["started"] - expired_at >= 1.5


def test_failed_deliveries_retry_with_growing_backoff_in_the_pool(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    ok(control(sandbox, "POST", "/delivery", {"concurrency": 3}))
    timed_receiver.fail_next = 2
    [session_id] = expired_sessions(sandbox, prices, 1)
    posts = timed_receiver.wait_for({session_id}, 3)
    assert [p["status"] for p in posts] == [500, 500, 200]
    assert len({p["event"]["id"] for p in posts}) == 1
    # SANDBOX_WEBHOOK_RETRY_BASE_SECONDS is 0.2 in these tests: waits of at least 0.2 s, then 0.4 s.
    assert posts[1]["started"] - posts[0]["ended"] >= 0.2
    assert posts[2]["started"] - posts[1]["ended"] >= 0.4
    [delivery] = [d for d in sandbox.deliveries() if d["event"] == posts[0]["event"]["id"]]
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("delivered", 3, 200)


def test_rolled_secrets_and_api_version_apply_to_pushed_events(
    sandbox: Sandbox, timed_receiver: TimedReceiver, prices: dict[str, str]
) -> None:
    ok(
        control(
            sandbox,
            "POST",
            "/delivery",
            {"secrets": [SECRET, "whsec_rolled_in"], "api_version": "2025-03-31.basil"},
        )
    )
    [session_id] = expired_sessions(sandbox, prices, 1)
    [post] = timed_receiver.wait_for({session_id}, 1)
    header = post["headers"]["Stripe-Signature"]
    assert header.startswith("t=") and header.count(",v1=") == 2
    for secret in (SECRET, "whsec_rolled_in"):
        stripe.WebhookSignature.verify_header(post["body"], header, secret, 300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(post["body"], header, "whsec_someone_else", 300)
    assert post["event"]["api_version"] == "2025-03-31.basil"
    assert post["event"]["type"] == "checkout.session.expired"


# -- units ------------------------------------------------------------------------------------


def test_request_log_keeps_the_newest_and_seq_keeps_growing(tmp_path: Path) -> None:
    store = Store(tmp_path / "log.sqlite3")
    try:
        for n in range(1, 1201):
            seq = store.log_request(
                method="GET", path=f"/v1/prices/{n}", params="{}", idempotency_key=None, status=200, at=0, keep=300
            )
            assert seq == n
        kept = store.logged_requests(0, 10_000)
        assert kept[-1]["seq"] == store.last_request_seq() == 1200
        assert 300 <= len(kept) < 800  # pruned every 500 rows down to the last 300
        assert [row["seq"] for row in kept] == list(range(kept[0]["seq"], 1201))
    finally:
        store.close()


def test_a_request_log_from_an_older_sandbox_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE request_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, method TEXT NOT NULL,"
            " path TEXT NOT NULL, params TEXT NOT NULL, idempotency_key TEXT, status INTEGER NOT NULL)"
        )
    db.close()
    store = Store(path)
    try:
        store.log_request(
            method="GET",
            path="/v1/prices",
            params="{}",
            idempotency_key=None,
            status=200,
            at=0,
            keep=10,
            user_agent="Stripe/v1 PythonBindings",
        )
        [row] = store.logged_requests(0, 10)
        assert (row["user_agent"], row["stripe_version"]) == ("Stripe/v1 PythonBindings", None)
    finally:
        store.close()
