"""Test fixtures: a real PostgreSQL database built by the migrations, a real Redis, and Stripe replaced
at one seam: the offline sandbox (sandbox/), started once for the session, which the app's real Stripe
SDK reaches over HTTP through STRIPE_API_BASE. It is the only Stripe double in the repository; tests act
as the customer on its hosted pages, as Stripe through its API and control endpoints, and receive its
signed webhooks the way `stripe listen` forwards them. `pytest --stripe-live` points the same tests at
whatever STRIPE_API_BASE and the keys name instead (Stripe test mode)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
import requests
from aiosmtpd.controller import Controller
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app import create_app
from app.extensions import db
from app.services import queue
from app.services.billing_service import STRIPE_API_VERSION
from config import DevelopmentConfig, TestConfig, normalise_database_url

pytest_plugins = ["tests.live_support"]
OFFLINE_SECRET_KEY = "sk_test_offline_suite_51Hx0000000000000"
OFFLINE_WEBHOOK_SECRET = "whsec_offline_suite_0123456789abcdef"
TABLES = (
    "outbox_delivery",
    "domain_event",
    "staff_audit",
    "organization_addon",
    "user_account",
    "pending_signup",
    "stripe_event",
    "whop_event",
    "resubscribe_checkout",
    "catalogue_price",
    "organization",
    "procrastinate_events",
    "procrastinate_periodic_defers",
    "procrastinate_jobs",
    "procrastinate_workers",
)
LIVE_VARIABLES = ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stripe-live",
        action="store_true",
        help="run the end-to-end signup against the Stripe API that STRIPE_API_BASE and the STRIPE_* keys "
        "point at (Stripe test mode, or the offline sandbox) instead of the in-process seam",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "live: also runs under --stripe-live, against a real Stripe API")
    config.addinivalue_line(
        "markers", "serial: runs alone, after the parallel run (it restarts a server the other workers use)"
    )
    _isolate_parallel_worker()


def _isolate_parallel_worker() -> None:
    """scripts/test runs the suite on several pytest-xdist workers; each gets a database and a Redis
    database of its own (billing_test_gw0, Redis db 15, billing_test_gw1, Redis db 14, ...), so they
    never clean each other's tables. Everything else a test starts (SMTP sink, sandboxes, live
    servers) already listens on a free port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    index = int(worker.removeprefix("gw"))
    base = TestConfig()
    os.environ["TEST_DATABASE_URL"] = f"{base.SQLALCHEMY_DATABASE_URI}_{worker}"
    redis_base, redis_db = base.REDIS_URL.rsplit("/", 1)
    if int(redis_db) - index < 0:
        raise pytest.UsageError(f"{worker}: Redis has no database {int(redis_db) - index}; start fewer workers")
    os.environ["TEST_REDIS_URL"] = f"{redis_base}/{int(redis_db) - index}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run runs everything offline; --stripe-live runs only the tests marked live."""
    if not config.getoption("--stripe-live"):
        return
    selected = [item for item in items if item.get_closest_marker("live") is not None]
    deselected = [item for item in items if item not in selected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


# --- PostgreSQL and Redis -----------------------------------------------------------------------


def _test_config() -> TestConfig:
    return TestConfig()


@pytest.fixture(scope="session")
def database_url() -> str:
    """The test database, created if missing and rebuilt from empty by the migrations."""
    url = _test_config().SQLALCHEMY_DATABASE_URI
    parts = urlsplit(url.replace("postgresql+psycopg2://", "postgresql://"))
    name = parts.path.lstrip("/")
    admin = psycopg2.connect(
        host=parts.hostname, port=parts.port or 5432, user=parts.username, password=parts.password, dbname="postgres"
    )
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    app = create_app(_test_config())
    with app.app_context():
        from flask_migrate import downgrade, upgrade

        upgrade()
        downgrade(revision="base")  # a database left by an earlier run starts from empty too
        upgrade()
        db.engine.dispose()
    return normalise_database_url(url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _test_config().REDIS_URL


def offline_overrides(sandbox_url: str) -> dict[str, Any]:
    """The app's Stripe is the suite's sandbox. The SDK does not retry, nor does the usage stream, so an
    injected fault is seen as it happened (production retries; see STRIPE_MAX_NETWORK_RETRIES and
    USAGE_STREAM_RETRIES)."""
    return {
        "STRIPE_SECRET_KEY": OFFLINE_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": OFFLINE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": sandbox_url,
        "STRIPE_MAX_NETWORK_RETRIES": 0,
        "USAGE_STREAM_RETRIES": 0,
        "APP_BASE_URL": "http://localhost",
    }


def worker_env(app: Flask, smtp_server: SmtpSink, sandbox: SandboxAccount) -> dict[str, str]:
    """The environment of a worker on the test database, Redis, SMTP sink and offline Stripe."""
    return {
        **os.environ,
        "APP_ENV": "test",
        "FLASK_APP": "wsgi.py",
        "TEST_DATABASE_URL": str(app.config["SQLALCHEMY_DATABASE_URI"]),
        "TEST_REDIS_URL": str(app.config["REDIS_URL"]),
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_server.port),
        "STRIPE_SECRET_KEY": OFFLINE_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": OFFLINE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": sandbox.url,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "JOB_RETRY_BASE_SECONDS": "1",
        "JOB_RETRY_MAX_WAIT_SECONDS": "2",
        "OUTBOX_MAX_ATTEMPTS": "30",
        "WORKER_POLL_SECONDS": "0.5",
    }


@pytest.fixture(scope="session")
def cleaner(database_url: str, redis_url: str) -> Iterator[Callable[[], None]]:
    """Empties every table and the test Redis database; one connection for the whole run. Ids are not
    restarted: the sandbox keeps the whole session's Stripe objects and idempotency keys, which are
    derived from our ids, as Stripe keeps an account's."""
    engine = create_engine(database_url, poolclass=NullPool)
    redis_client = redis.Redis.from_url(redis_url)

    def clean() -> None:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        redis_client.flushdb()

    yield clean
    engine.dispose()


# --- SMTP: a real server (aiosmtpd) that keeps what it receives -----------------------------------


class SmtpSink:
    """The SMTP server's handler: every accepted message, parsed, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refusals = 0
        self.lock = threading.Lock()
        self.port = 0
        self.holding = False
        self.held = threading.Event()  # a held message has arrived
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.holding:
            # The message is in, the answer is not: the sender waits here (a test kills it meanwhile).
            held, release = self.held, self.release
            held.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
            return "451 Requested action aborted: the sender went away"
        with self.lock:
            if self.refusals:
                self.refusals -= 1
                return "451 Requested action aborted: try again later"
            message = message_from_bytes(envelope.content, policy=email_policy.default)
            assert isinstance(message, EmailMessage)
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def hold_messages(self) -> None:
        """From now on, keep each message unanswered until ``release`` is set; then refuse it."""
        self.held, self.release = threading.Event(), threading.Event()
        self.holding = True

    def refuse_next(self, count: int = 1) -> None:
        """The next ``count`` messages are refused with a temporary error (451)."""
        self.refusals = count

    def to(self, address: str) -> list[EmailMessage]:
        return [message for message in self.messages if address in str(message["To"])]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
            self.refusals = 0
            self.holding = False
            self.release.set()  # a message a previous test held is let go


def email_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "no text/plain part"
    return str(part.get_content())


def email_html(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "no text/html part"
    return str(part.get_content())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def _smtp_sink() -> Iterator[SmtpSink]:
    # The server's own protocol log (every line of every message) is the test harness's, not the app's.
    server_log = logging.getLogger("mail.log")
    server_log.setLevel(logging.WARNING)
    server_log.propagate = False
    sink = SmtpSink()
    sink.port = _free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    yield sink
    controller.stop()


@pytest.fixture
def smtp_server(_smtp_sink: SmtpSink) -> SmtpSink:
    """The suite's SMTP server (every app the fixtures build sends to it), emptied for this test:
    ``smtp_server.messages`` holds what arrived."""
    _smtp_sink.clear()
    return _smtp_sink


def run_jobs(app: Flask, *, queues: list[str] | None = None) -> None:
    """Run every queued job that is due (webhook application, outbox deliveries, emails) inline, the
    way `flask billing worker` runs them, and return when none is left.

    In a thread of its own: the worker runs an asyncio loop, and the browser tests' Playwright keeps one
    running in the main thread for the rest of the session, where asyncio.run() refuses to start."""
    failures: list[BaseException] = []

    def work() -> None:
        try:
            queue.run_pending_jobs(app, queues=queues)
        except BaseException as exc:  # handed to the test below
            failures.append(exc)

    worker = threading.Thread(target=work, name="run_jobs")
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


@pytest.fixture
def make_app(
    cleaner: Callable[[], None], smtp_server: SmtpSink, stripe_sandbox: SandboxAccount
) -> Iterator[Callable[..., Flask]]:
    """Build an app on the test database and Redis, from a clean slate; overrides go on top."""
    apps: list[Flask] = []
    cleaner()

    def build(**overrides: Any) -> Flask:
        mail = {"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": smtp_server.port}
        app = create_app(_test_config(), **{**offline_overrides(stripe_sandbox.url), **mail, **overrides})
        apps.append(app)
        return app

    yield build
    _close(apps)


def _close(apps: list[Flask]) -> None:
    """The apps a test built give back their database connections."""
    for app in apps:
        with app.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# --- The embedded default: what `make run` runs with no DATABASE_URL or REDIS_URL ------------------

SQLITE_FILE = "development.sqlite3"


def _sqlite_environ(instance: Path, smtp_port: int) -> dict[str, str]:
    """The environment of `make run` on the embedded stand-ins (a SQLite file in the instance folder,
    filesystem sessions, in-process cache and limits), with the suite's SMTP server; nothing is read
    from the shell, so no TEST_DATABASE_URL or REDIS_URL leaks in."""
    return {
        "APP_ENV": "development",
        "APP_INSTANCE_DIR": str(instance),
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_port),
        "MAIL_DEFAULT_SENDER": "Ledgerline Billing <billing@localhost>",
    }


def flask_db_upgrade(app: Flask) -> None:
    """`flask db upgrade`, through the command itself, against ``app``'s database."""
    from flask_migrate.cli import db as db_command

    result = app.test_cli_runner().invoke(db_command, ["upgrade"])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory, _smtp_sink: SmtpSink) -> Path:
    """A SQLite file built once by `flask db upgrade`; each test gets a copy of it."""
    instance = tmp_path_factory.mktemp("sqlite-template")
    app = create_app(DevelopmentConfig(_sqlite_environ(instance, _smtp_sink.port)))
    flask_db_upgrade(app)
    with app.app_context():
        db.session.remove()
        for engine in db.engines.values():
            engine.dispose()
    return instance / SQLITE_FILE


@pytest.fixture
def make_sqlite_app(
    tmp_path: Path, _sqlite_template: Path, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount
) -> Iterator[Callable[..., Flask]]:
    """Build an app on the embedded default of `make run` (a fresh migrated SQLite file of its own,
    filesystem sessions, in-process cache and rate limits, jobs run inside the app), paying through the
    suite's Stripe sandbox and mailing the suite's SMTP server; overrides go on top."""
    instance = tmp_path / "instance"
    instance.mkdir()
    shutil.copyfile(_sqlite_template, instance / SQLITE_FILE)
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        config = DevelopmentConfig(_sqlite_environ(instance, smtp_server.port))
        app = create_app(config, **{**offline_overrides(stripe_sandbox.url), **overrides})
        assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{instance / SQLITE_FILE}"
        apps.append(app)
        return app

    yield build
    _close(apps)


@pytest.fixture
def sqlite_app(make_sqlite_app: Callable[..., Flask]) -> Flask:
    return make_sqlite_app()


def query(app: Flask, sql: str, **params: Any) -> list[Any]:
    """Rows straight from the database, bypassing the ORM: what is really stored."""
    with app.app_context():
        rows = db.session.execute(text(sql), params).all()
        db.session.rollback()
        return list(rows)


def csrf_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of the form at path, read off the rendered page."""
    page = client.get(path).get_data(as_text=True)
    marker = 'name="csrf_token" type="hidden" value="'
    start = page.find(marker)
    if start < 0:
        marker = 'name="csrf_token" value="'
        start = page.find(marker)
    assert start >= 0, f"no CSRF token on {path}"
    start += len(marker)
    return page[start : page.index('"', start)]


# --- Stripe: the offline sandbox, the one Stripe double ----------------------------------------------


def sign_stripe_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header, computed the way Stripe does: HMAC-SHA256 over "{t}.{body}"."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# What the SDK's calls look like on the wire, so a test can ask for "subscriptions.update" and read what
# the sandbox received. Path groups are the call's positional arguments (the ids).
STRIPE_CALLS: dict[str, tuple[str, str]] = {
    "billing.meter_events.create": ("POST", r"/v1/billing/meter_events"),
    "billing.meter_event_session.create": ("POST", r"/v2/billing/meter_event_session"),
    "billing.meter_event_stream.create": ("POST", r"/v2/billing/meter_event_stream"),
    "prices.list": ("GET", r"/v1/prices"),
    "prices.retrieve": ("GET", r"/v1/prices/([^/]+)"),
    "customers.create": ("POST", r"/v1/customers"),
    "customers.retrieve": ("GET", r"/v1/customers/([^/]+)"),
    "customers.update": ("POST", r"/v1/customers/([^/]+)"),
    "checkout.sessions.create": ("POST", r"/v1/checkout/sessions"),
    "checkout.sessions.list": ("GET", r"/v1/checkout/sessions"),
    "checkout.sessions.retrieve": ("GET", r"/v1/checkout/sessions/([^/]+)"),
    "checkout.sessions.expire": ("POST", r"/v1/checkout/sessions/([^/]+)/expire"),
    "subscriptions.list": ("GET", r"/v1/subscriptions"),
    "subscriptions.retrieve": ("GET", r"/v1/subscriptions/([^/]+)"),
    "subscription_schedules.retrieve": ("GET", r"/v1/subscription_schedules/([^/]+)"),
    "subscriptions.update": ("POST", r"/v1/subscriptions/([^/]+)"),
    "subscriptions.cancel": ("DELETE", r"/v1/subscriptions/([^/]+)"),
    "billing_portal.sessions.create": ("POST", r"/v1/billing_portal/sessions"),
    "invoices.list": ("GET", r"/v1/invoices"),
    "invoices.retrieve": ("GET", r"/v1/invoices/([^/]+)"),
    "invoices.create_preview": ("POST", r"/v1/invoices/create_preview"),
    "refunds.create": ("POST", r"/v1/refunds"),
    "refunds.list": ("GET", r"/v1/refunds"),
    "charges.list": ("GET", r"/v1/charges"),
    "events.list": ("GET", r"/v1/events"),
    "test_helpers.test_clocks.create": ("POST", r"/v1/test_helpers/test_clocks"),
}
CARDS = {
    "paid": "4242 4242 4242 4242",
    "trial": "4242 4242 4242 4242",
    "async": "4000 0000 0000 3220",
    "declined": "4000 0000 0000 0002",
    "no_card": "",  # a trial Checkout with payment_method_collection=if_required, left without a card
}


def form_encode(params: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Stripe's form encoding (a[b][0][c]=...), as the SDK and the Stripe CLI send it."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, dict):
            pairs += form_encode(value, name)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    pairs += form_encode(item, f"{name}[{index}]")
                else:
                    pairs.append((f"{name}[{index}]", _form_value(item)))
        elif value is not None:
            pairs.append((name, _form_value(value)))
    return pairs


def _form_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


TEST_USER_AGENT = "ledgerline-test-suite"


class SandboxAccount:
    """The sandbox's Stripe account as a test sees it: the Stripe API over HTTP (as the Stripe CLI or a
    script would use it), the hosted pages (as a customer's browser would), and the sandbox's control
    endpoints (what it received, faults to inject, events held for delivery). One sandbox serves the
    whole session; each test sees only the requests made since it started."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.auth = (api_key, "")
        self.http.headers["User-Agent"] = TEST_USER_AGENT
        self.since = 0

    # -- the Stripe API ----------------------------------------------------------------------------

    def api(self, method: str, path: str, params: dict[str, Any] | None = None, **headers: str) -> dict[str, Any]:
        pairs = form_encode(params or {})
        response = self.http.request(
            method,
            f"{self.url}{path}",
            params=pairs if method == "GET" else None,
            data=pairs if method != "GET" else None,
            headers=headers,
            timeout=30,
        )
        body: dict[str, Any] = response.json()
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {body}")
        return body

    def session(self, session_id: str) -> dict[str, Any]:
        return self.api("GET", f"/v1/checkout/sessions/{session_id}")

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        return self.api("GET", f"/v1/subscriptions/{subscription_id}")

    def price(self, lookup_key: str) -> dict[str, Any]:
        [price] = self.api("GET", "/v1/prices", {"lookup_keys": [lookup_key], "active": True})["data"]
        return price

    def price_id(self, lookup_key: str) -> str:
        return str(self.price(lookup_key)["id"])

    # -- what the sandbox received ----------------------------------------------------------------

    def requests_made(self) -> list[dict[str, Any]]:
        response = self.http.get(f"{self.url}/_sandbox/requests", params={"after": self.since}, timeout=10)
        response.raise_for_status()
        made: list[dict[str, Any]] = response.json()["requests"]
        return made

    def calls_to(self, call: str) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """The app's calls to one SDK method since the test began: (path ids, {"params", "options"}), oldest
        first. The test's own requests (as the customer, or as Stripe) are not counted."""
        method, pattern = STRIPE_CALLS[call]
        found = []
        for made in self.requests_made():
            if made["user_agent"] == TEST_USER_AGENT:
                continue
            match = re.fullmatch(pattern, made["path"])
            if made["method"] == method and match:
                key = made.get("idempotency_key")
                found.append((match.groups(), {"params": made["params"], "options": {"idempotency_key": key}}))
        return found

    # -- faults, as Stripe can fail ---------------------------------------------------------------

    def fail_next(self, call: str, kind: str = "connection", times: int = 1) -> None:
        """The next call to an SDK method fails: "connection" (no answer), "server" (500) or "missing"."""
        method, pattern = STRIPE_CALLS[call]
        response = self.http.post(
            f"{self.url}/_sandbox/faults",
            json={"method": method, "path_regex": pattern, "kind": kind, "times": times},
            timeout=10,
        )
        response.raise_for_status()

    def set_latency(self, seconds: float) -> None:
        self.http.post(f"{self.url}/_sandbox/latency", json={"seconds": seconds}, timeout=10).raise_for_status()

    # -- acting as the customer --------------------------------------------------------------------

    def pay(
        self,
        session_id: str,
        *,
        outcome: str = "paid",
        card: str | None = None,
        promotion_code: str = "",
        tax_details: dict[str, str] | None = None,  # Checkout's address and tax ID fields (Stripe Tax)
    ) -> dict[str, Any]:
        """The customer pays on the hosted Checkout page. outcome: paid, trial (a trial checkout), async (the
        payment settles later) or declined. Returns the session as the API then reports it."""
        response = self.http.post(
            f"{self.url}/checkout/{session_id}",
            data={
                "email": "ada@example.com",  # a Session's customer_email wins (read-only at Checkout)
                "cardNumber": (number := CARDS[outcome] if card is None else card),
                "cardExpiry": "12 / 34" if number else "",
                "cardCvc": "123" if number else "",
                "billingName": "Ada Lovelace",
                "promotionCode": promotion_code,  # Checkout's field, where the session allows codes
                **(tax_details or {}),
            },
            allow_redirects=False,
            timeout=30,
        )
        expected = 400 if outcome == "declined" else 303
        assert response.status_code == expected, response.text[-2000:]
        return self.session(session_id)

    def _card_form(self, url: str, card: str, expected: int = 303) -> requests.Response:
        """Fill in and submit a hosted page's card form (Checkout's element names) as a browser would."""
        response = self.http.post(
            url,
            data={
                "email": "ada@example.com",
                "cardNumber": card,
                "cardExpiry": "12 / 34",
                "cardCvc": "123",
                "billingName": "Ada Lovelace",
            },
            allow_redirects=False,
            timeout=30,
        )
        assert response.status_code == expected, response.text[-2000:]
        return response

    def update_card_in_portal(self, portal_url: str, card: str) -> None:
        """The customer replaces the card on file in the customer portal (#update-card)."""
        page = self.http.get(portal_url, timeout=30)
        assert page.ok and 'id="update-card"' in page.text, page.text[-2000:]
        self._card_form(f"{portal_url}/payment-method", card)

    def update_information_in_portal(self, portal_url: str, *, name: str, email: str) -> None:
        """The customer changes its billing name and email in the customer portal (#update-information)."""
        page = self.http.get(portal_url, timeout=30)
        assert page.ok and 'id="update-information"' in page.text, page.text[-2000:]
        response = self.http.post(
            f"{portal_url}/information", data={"name": name, "email": email}, allow_redirects=False, timeout=30
        )
        assert response.status_code == 303, response.text[-2000:]

    def pay_invoice_page(self, hosted_invoice_url: str, card: str = CARDS["paid"]) -> None:
        """The customer pays an open invoice on its hosted invoice page."""
        self._card_form(hosted_invoice_url, card)

    def advance_clock(self, clock_id: str, frozen_time: int, timeout: float = 60) -> dict[str, Any]:
        """Move a test clock forward and wait until Stripe has run everything that fell due meanwhile."""
        from tests.live_support import wait_until

        self.api("POST", f"/v1/test_helpers/test_clocks/{clock_id}/advance", {"frozen_time": frozen_time})
        return wait_until(
            lambda: (
                (clock := self.api("GET", f"/v1/test_helpers/test_clocks/{clock_id}"))["status"] == "ready" and clock
            ),
            timeout,
            f"test clock {clock_id} did not finish advancing",
            0.05,
        )

    def settle_async_payment(self, session_id: str, timeout: float = 20) -> dict[str, Any]:
        """Wait for an asynchronous payment to settle at the sandbox; returns the settled session."""
        from tests.live_support import wait_until

        return wait_until(
            lambda: (session := self.session(session_id))["payment_status"] == "paid" and session,
            timeout,
            f"the asynchronous payment of {session_id} did not settle",
        )

    # -- acting as Stripe itself (its dashboard, its internals) ------------------------------------

    def change_subscription(
        self, subscription_id: str, *, lookup_keys: dict[str, int] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A change made at Stripe: lookup_keys replaces the items through the API; other fields are set
        as Stripe's internals would (status, trial_end, ...). Returns the new subscription."""
        if lookup_keys is not None:
            current = self.subscription(subscription_id)["items"]["data"]
            items: list[dict[str, Any]] = [{"id": item["id"], "deleted": True} for item in current]
            items += [{"price": self.price_id(key), "quantity": quantity} for key, quantity in lookup_keys.items()]
            self.api("POST", f"/v1/subscriptions/{subscription_id}", {"items": items, "proration_behavior": "none"})
        if fields:
            self.force(subscription_id, **fields)
        return self.subscription(subscription_id)

    def force(self, object_id: str, **fields: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.url}/_sandbox/objects/{object_id}", json=fields, timeout=10)
        assert response.ok, response.text
        forced: dict[str, Any] = response.json()
        return forced

    # -- webhooks, delivered the way `stripe listen` forwards them ----------------------------------

    def take_events(self) -> list[dict[str, Any]]:
        response = self.http.post(f"{self.url}/_sandbox/deliveries/take", json={"limit": 1000}, timeout=30)
        response.raise_for_status()
        taken: list[dict[str, Any]] = response.json()["events"]
        return taken

    def deliver(
        self, client: FlaskClient, *, types: tuple[str, ...] | None = None, apply: bool = True
    ) -> list[tuple[str, int]]:
        """Post every event the sandbox holds to the app, signed by the sandbox; those of other types
        than `types` (when given) are dropped. Then, unless apply=False, run the queued jobs as the
        worker would (the request only stores and queues). Returns (event type, HTTP status) in
        delivery order."""
        delivered = []
        for event in self.take_events():
            if types is not None and event["type"] not in types:
                continue
            response = client.post("/billing/webhooks/stripe", data=event["payload"].encode(), headers=event["headers"])
            delivered.append((event["type"], response.status_code))
        if apply:
            run_jobs(client.application)
        return delivered

    def reset(self) -> None:
        """A new test: no armed faults, no latency, no events still held, requests counted from here."""
        self.http.delete(f"{self.url}/_sandbox/faults", timeout=10).raise_for_status()
        self.set_latency(0)
        self.take_events()
        response = self.http.get(f"{self.url}/_sandbox/requests/last_seq", timeout=10)
        response.raise_for_status()
        self.since = int(response.json()["last_seq"])


def stripe_event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    livemode: bool = False,
    event_id: str | None = None,
) -> dict[str, Any]:
    """An event payload as Stripe shapes it, for deliveries a test composes itself (replays, forgeries,
    events from elsewhere); the sandbox's own events come through SandboxAccount.deliver."""
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": int(time.time()) if created is None else created,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


@pytest.fixture(scope="session")
def stripe_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxAccount]:
    """`python -m sandbox` for the whole session, holding its webhooks until a test takes them."""
    from tests.live_support import Sandbox

    workdir = tmp_path_factory.mktemp("stripe-sandbox")
    process = Sandbox(workdir, webhook_url="http://127.0.0.1:9/unused", secret=OFFLINE_WEBHOOK_SECRET)
    process.env.update(SANDBOX_DELIVERY_MODE="hold", SANDBOX_ASYNC_DELAY_SECONDS="2")
    process.start()
    yield SandboxAccount(process.url, OFFLINE_SECRET_KEY)
    process.stop()


@pytest.fixture
def offline_stripe(stripe_sandbox: SandboxAccount) -> SandboxAccount:
    """The sandbox, reset for this test (the app fixture points the app at it)."""
    stripe_sandbox.reset()
    return stripe_sandbox


def post_webhook(
    client: FlaskClient,
    event: dict[str, Any] | bytes,
    *,
    secret: str = OFFLINE_WEBHOOK_SECRET,
    timestamp: int | None = None,
    provider: str = "stripe",
) -> Any:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    return client.post(
        f"/billing/webhooks/{provider}",
        data=body,
        headers={"Stripe-Signature": sign_stripe_payload(body, secret, timestamp), "Content-Type": "application/json"},
    )


def post_and_apply(client: FlaskClient, event: dict[str, Any] | bytes, **kwargs: Any) -> Any:
    """post_webhook, then run the queued jobs the way the worker would (webhooks are applied by the
    worker; the request only stores and queues). Returns the webhook's response."""
    response = post_webhook(client, event, **kwargs)
    run_jobs(client.application)
    return response


PASSWORD = "correct horse battery staple"
# The Berlin business the tax tests sign up: Checkout's address and tax ID fields (German VAT, 19%).
BERLIN_BUSINESS = {
    "billingAddressLine1": "Friedrichstr. 1",
    "billingLocality": "Berlin",
    "billingPostalCode": "10117",
    "billingCountry": "DE",
    "businessName": "Ada GmbH",
    "taxId": "DE123456789",
}


def signup_form(client: FlaskClient, **fields: Any) -> dict[str, Any]:
    form = {
        "csrf_token": csrf_token(client, "/auth/signup"),
        "email": "Ada@Example.COM ",
        "password": PASSWORD,
        "organization_name": "Analytical Engines",
        "owner_name": "Ada Lovelace",
        "tier": "starter",
        "addon_extra_seats": "2",
    }
    form.update(fields)
    return form


def start_signup(client: FlaskClient, **fields: Any) -> Any:
    return client.post("/auth/signup", data=signup_form(client, **fields))


def checkout_session_id(response: Any) -> str:
    """The Checkout Session a signup POST sent the browser to."""
    assert response.status_code == 303, response.get_data(as_text=True)
    return str(response.headers["Location"].rsplit("/", 1)[-1])


def sign_up(client: FlaskClient, stripe_api: SandboxAccount, *, outcome: str = "paid", **fields: Any) -> dict[str, Any]:
    """A signup walked to a signed-in owner through the success redirect; returns the paid session."""
    session_id = checkout_session_id(start_signup(client, **fields))
    session = stripe_api.pay(session_id, outcome=outcome)
    response = client.get(f"/billing/complete-signup-from-stripe?session_id={session_id}")
    assert response.status_code == 303 and response.headers["Location"] == "/app", response.get_data(as_text=True)
    return session


def email_confirmation_path(app: Flask, email: str) -> str:
    """The link of the confirmation email the account at `email` is sent, minted as its sender mints it."""
    from app.models import User
    from app.services.account_service import AccountService

    with app.app_context():
        user = db.session.execute(db.select(User).where(User.email == email)).scalar_one()
        path = f"/auth/verify-email/{AccountService.email_verification_token(user)}"
        db.session.rollback()
    return path


def invitation_path(app: Flask, email: str) -> str:
    """The link of the open invitation to `email`, minted as the invitation email's sender mints it (the
    owner is never shown it: the mailbox is the only way in)."""
    from app.models import Invitation, InvitationStatus
    from app.services.team_service import invitation_token

    with app.app_context():
        invitation = db.session.execute(
            db.select(Invitation).where(Invitation.email == email, Invitation.status == InvitationStatus.PENDING)
        ).scalar_one()
        path = f"/team/join/{invitation_token(invitation.id, email)}"
        db.session.rollback()
    return path


def live_stripe_environment() -> dict[str, str]:
    missing = [name for name in LIVE_VARIABLES if not os.environ.get(name)]
    if missing:
        pytest.skip(
            f"--stripe-live needs {', '.join(missing)} (Stripe test-mode keys, or the offline sandbox's: see "
            "README.md 'Live mode'); STRIPE_API_BASE is optional"
        )
    return {name: os.environ[name] for name in (*LIVE_VARIABLES, "STRIPE_API_BASE") if os.environ.get(name)}
