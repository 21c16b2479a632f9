"""The harness every sandbox test module shares: the server in a subprocess (one per module,
module scope), a local webhook receiver, and helpers for Checkout, the hosted form and units."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from sandbox import billing, checkout
from sandbox.store import Store

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_sandbox_tests_0123456789"
CATALOGUE = """
[tiers.starter]
name = "Starter"
lookup_key = "starter_monthly"
yearly_lookup_key = "starter_yearly"
sandbox_unit_amount = 1900

[tiers.pro]
name = "Pro"
lookup_key = "pro_monthly"
trial_days = 14
sandbox_unit_amount = 4900

[addons.extra_seats]
name = "Extra seats"
lookup_key = "extra_seat_monthly"
max_quantity = 50

[meters.api_calls]
name = "API calls"
event_name = "sandbox_api_calls"
lookup_key = "api_calls_metered"
sandbox_unit_amount = 2
"""
CARD_OK = "4242 4242 4242 4242"
CARD_DECLINED = "4000 0000 0000 0002"
CARD_ASYNC_OK = "4000 0000 0000 3220"
CARD_ASYNC_FAIL = "4000 0084 0000 1629"


# -- harness ----------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint that records every attempt and can be told to fail."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.fail_next = 0  # answer 500 to this many upcoming deliveries
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                status = receiver.receive(body, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_status(self) -> int:
        """200, or 500 while `fail_next` says so (call with the lock held)."""
        status = 500 if self.fail_next > 0 else 200
        self.fail_next = max(0, self.fail_next - 1)
        return status

    def receive(self, body: str, headers: dict[str, str]) -> int:
        """Record one POST; the status to answer it with."""
        with self.lock:
            status = self.next_status()
            self.attempts.append({"body": body, "headers": headers, "status": status, "at": time.time()})
        return status

    def events(self, related: set[str]) -> list[dict[str, Any]]:
        """Successfully delivered events about the given object ids, verified, in arrival order."""
        with self.lock:
            delivered = [a for a in self.attempts if a["status"] == 200]
        events = []
        for attempt in delivered:
            event = json.loads(attempt["body"])
            if "data" in event and event["data"]["object"]["id"] in related:  # (thin v2 events have no data)
                stripe.WebhookSignature.verify_header(
                    attempt["body"], attempt["headers"]["Stripe-Signature"], SECRET, 300
                )
                events.append(event)
        return events

    def wait_for(self, related: set[str], count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(related)
            if len(events) >= count:
                return events
            time.sleep(0.05)
        raise AssertionError(f"expected {count} events, got {[e['type'] for e in self.events(related)]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Sandbox:
    """`python -m sandbox` in a subprocess with its own state dir, port and catalogue."""

    def __init__(self, tmp: Path, webhook_url: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "sandbox.log"
        catalogue = tmp / "plans.toml"
        catalogue.write_text(CATALOGUE)
        self.env = {
            **os.environ,
            "SANDBOX_PORT": str(self.port),
            "SANDBOX_STATE_DIR": str(tmp / "state"),
            "SANDBOX_WEBHOOK_URL": webhook_url,
            "SANDBOX_WEBHOOK_SECRET": SECRET,
            "SANDBOX_ASYNC_DELAY_SECONDS": "1",
            "SANDBOX_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
            "PLAN_CATALOGUE_FILE": str(catalogue),
        }
        # Typed as Any: the SDK types expanded fields as "id | object | None" unions, and these
        # tests inspect whichever the sandbox returned.
        self.client: Any = stripe.StripeClient("sk_test_sandbox", base_addresses={"api": self.url})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/_sandbox/deliveries", timeout=1)
                return
            except requests.ConnectionError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError("sandbox did not start:\n" + self.log.read_text())

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(10)

    def deliveries(self) -> list[dict[str, Any]]:
        deliveries: list[dict[str, Any]] = requests.get(f"{self.url}/_sandbox/deliveries", timeout=5).json()[
            "deliveries"
        ]
        return deliveries


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def started(tmp: Path, receiver: Receiver, **env: str) -> Iterator[Sandbox]:
    """A running sandbox with these extra environment variables, stopped afterwards."""
    server = Sandbox(tmp, receiver.url)
    server.env.update(env)
    server.start()
    yield server
    assert server.stop() == 0  # SIGTERM shuts down cleanly


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Sandbox]:
    yield from started(tmp_path_factory.mktemp("sandbox"), receiver)


@pytest.fixture(scope="module")
def prices(sandbox: Sandbox) -> dict[str, str]:
    listed = sandbox.client.v1.prices.list(
        params={"lookup_keys": ["starter_monthly", "pro_monthly", "extra_seat_monthly"]}
    )
    return {p.lookup_key: p.id for p in listed.data if p.lookup_key}


def create_session(sandbox: Sandbox, prices: dict[str, str], **params: Any) -> Any:
    defaults: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [
            {"price": prices["starter_monthly"], "quantity": 1},
            {"price": prices["extra_seat_monthly"], "quantity": 2},
        ],
        "success_url": "http://app.test/billing/success?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://app.test/billing/plans",
        "customer_email": "ada@example.com",
        "client_reference_id": "org_42",
        "metadata": {"org_id": "42"},
        "subscription_data": {"metadata": {"org_id": "42", "plan": "starter"}},
    }
    return sandbox.client.v1.checkout.sessions.create(params={**defaults, **params})


def pay(sandbox: Sandbox, session_id: str, card: str = CARD_OK, **fields: str) -> requests.Response:
    """Submit the hosted Checkout form, as a customer's browser would."""
    form = {
        "email": "ada@example.com",
        "cardNumber": card,
        "cardExpiry": "12 / 40",
        "cardCvc": "123",
        "billingName": "Ada Lovelace",
        **fields,
    }
    url = f"{sandbox.url}/checkout/{session_id}"
    return requests.post(url, data=form, allow_redirects=False, timeout=10)


def paid_subscription(sandbox: Sandbox, prices: dict[str, str]) -> tuple[Any, Any]:
    session = create_session(sandbox, prices)
    assert pay(sandbox, session.id).status_code == 303
    session = sandbox.client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["subscription"]})
    return session, session.subscription


def checkout_request(line_items: list[tuple[str, int]], **fields: Any) -> checkout.CheckoutRequest:
    """A Checkout request for unit tests: these line items, every other field empty."""
    empty: dict[str, Any] = {
        "success_url": None,
        "cancel_url": None,
        "customer": None,
        "customer_email": None,
        "client_reference_id": None,
        "metadata": {},
        "subscription_metadata": {},
        "trial_period_days": None,
        "expires_at": None,
        "allow_promotion_codes": None,
    }
    return checkout.CheckoutRequest(line_items=line_items, **{**empty, **fields})


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def server_price(server: Sandbox) -> str:
    price_id: str = server.client.v1.prices.list(params={"lookup_keys": ["starter_monthly"]}).data[0].id
    return price_id


# -- units: a store without a server ---------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    (tmp_path / "plans.toml").write_text(CATALOGUE)
    store = Store(tmp_path / "state.sqlite3")
    with store.transaction():
        billing.seed_catalogue(store, tmp_path / "plans.toml")
    yield store
    store.close()


def in_transaction(store: Store, action: Callable[[], Any]) -> Any:
    with store.transaction():
        return action()
